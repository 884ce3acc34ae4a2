#!/usr/bin/env bash
# DPO throughput against TRL 1.12's DPOTrainer, side by side: two rounds of
#   TRL (its default: the reference model runs every step), TRL --precompute-ref, ours (benchmarks/bench_dpo.py)
# at the peer's shape with 2 torch threads, then the ratio of each round (pairs/s, median step after warm-up, and
# mean over the whole loop). Interleaved because absolute figures drift with the machine's load: a ratio measured
# within one round is the figure to report (see ../shared/peers/README.md).
#
#   bash benchmarks/peer_dpo.sh                 # from the repository root, on a quiet machine
#   bash benchmarks/peer_dpo.sh --steps 80      # extra flags go to both scripts: use only the flags they share
#                                               # (--steps --warmup --batch --pairs --prompt-tokens
#                                               #  --response-tokens --beta --lr --seed)
# Environment: PYTHON (ours; default .venv/bin/python), TRL_PYTHON (a venv with trl==1.12.0; default
# /work/exp/trl-venv/bin/python), PEER_BENCH (the peer's trl_bench.py; default the script's own default,
# ../shared/peers/trl_bench.py beside the checkout), OUT (where the JSON lines and logs go; default a temp folder).
# OMP_NUM_THREADS is left alone: both scripts set 2 torch threads themselves.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
TRL_PYTHON="${TRL_PYTHON:-/work/exp/trl-venv/bin/python}"
OUT="${OUT:-$(mktemp -d -t peer_dpo.XXXXXX)}"
mkdir -p "$OUT"
PEER_ARGS=()
if [[ -n "${PEER_BENCH:-}" ]]; then PEER_ARGS=(--peer-bench "$PEER_BENCH"); fi

for round in 1 2; do
    echo "round $round: TRL (reference model every step)" >&2
    "$TRL_PYTHON" benchmarks/peer_trl_dpo.py --threads 2 "${PEER_ARGS[@]}" "$@" \
        > "$OUT/trl_$round.json" 2> "$OUT/trl_$round.log"
    echo "round $round: TRL --precompute-ref" >&2
    "$TRL_PYTHON" benchmarks/peer_trl_dpo.py --threads 2 --precompute-ref "${PEER_ARGS[@]}" "$@" \
        > "$OUT/trl_pre_$round.json" 2> "$OUT/trl_pre_$round.log"
    echo "round $round: ours" >&2
    # The checkout's own code first, whichever checkout the venv's editable install points at.
    PYTHONPATH="$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/bench_dpo.py --threads 2 "$@" \
        > "$OUT/ours_$round.json" 2> "$OUT/ours_$round.log"
done

"$PYTHON" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def last_json(name: str) -> dict:
    return json.loads((out / name).read_text().strip().splitlines()[-1])


print(f"JSON lines and logs: {out}")
print("round | TRL pairs/s (median, mean) | TRL precompute-ref | ours | ours/TRL (median, mean) | ours/TRL precompute")
for r in (1, 2):
    trl, pre, ours = last_json(f"trl_{r}.json"), last_json(f"trl_pre_{r}.json"), last_json(f"ours_{r}.json")

    def pair(d: dict) -> str:
        return f"{d['pairs_per_s_median']:.1f}, {d['pairs_per_s_mean']:.1f}"

    def ratio(a: dict, b: dict) -> str:
        return f"{a['pairs_per_s_median'] / b['pairs_per_s_median']:.2f}x, {a['pairs_per_s_mean'] / b['pairs_per_s_mean']:.2f}x"

    print(f"{r} | {pair(trl)} | {pair(pre)} | {pair(ours)} | {ratio(ours, trl)} | {ratio(ours, pre)}")
print(f"set-up (s), round 2: TRL {last_json('trl_2.json')['setup_s']}, TRL precompute-ref "
      f"{last_json('trl_pre_2.json')['setup_s']}, ours {last_json('ours_2.json')['setup_s']} "
      f"(reference pass {last_json('ours_2.json')['reference_pass_s']})")
EOF
