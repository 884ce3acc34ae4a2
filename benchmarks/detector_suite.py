"""The runs that `rlhf evaluate-detectors` scores: failure presets, fixes and healthy defaults over seeds.

    python benchmarks/detector_suite.py --out /tmp/suite --sft-checkpoint SFT --rm-checkpoint RM [--jobs 2]

Every run is ``rlhf pipeline --out OUT/NAME_sS --seed S --no-diagnose`` from one SFT policy and reward model (the
length-biased presets train their own reward model once, in the first such run, and the others reuse it), with the
held-out evaluation every 5 iterations instead of 20 so that a warning's lead time is measured in 5-iteration
steps. A finished run (``summary.json`` present) is skipped, so the script resumes. ``--jobs`` runs that many at
once, each with one torch thread.

The suite is :data:`SUITE`: healthy runs (the packaged PPO, GRPO and RLOO configs; two failure presets with their
fixes) and failure presets (no KL, a too-small beta, a length-biased reward model under PPO and GRPO, RLOO with two
samples and no KL). Which runs fail is not decided here: `rlhf evaluate-detectors` takes that from the gold judge.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

#: The PPO arguments every run of the suite gets: denser held-out evaluations (the warnings' time resolution).
EVAL_ARGS = "--model.init_args.eval.every=5"


class SuiteRun(NamedTuple):
    """One configuration of the suite: ``rl_config`` is the RL phase's packaged config, ``presets`` go on top in
    order, ``own_rm`` says the presets change the preference data (the run trains or reuses its own reward model)."""

    name: str
    rl_config: str
    presets: tuple[str, ...] = ()
    own_rm: bool = False


SUITE = (
    SuiteRun("ppo", "ppo"),
    SuiteRun("grpo", "grpo"),
    SuiteRun("rloo", "rloo"),
    SuiteRun("no_kl+adaptive_kl", "ppo", ("failures/no_kl", "fixes/adaptive_kl")),
    SuiteRun("low_beta+annealed_kl", "ppo", ("failures/low_beta", "fixes/annealed_kl")),
    SuiteRun("no_kl", "ppo", ("failures/no_kl",)),
    SuiteRun("low_beta", "ppo", ("failures/low_beta",)),
    SuiteRun("rloo_k2_no_kl", "rloo", ("failures/rloo_k2_no_kl",)),
    SuiteRun("length_bias", "ppo", ("failures/length_bias",), own_rm=True),
    SuiteRun("grpo_length_bias", "grpo", ("failures/grpo_length_bias",), own_rm=True),
)


def command(run: SuiteRun, seed: int, out: Path, sft: Path, rm: Path | None) -> list[str]:
    """The `rlhf pipeline` command of one run (``rm`` None: the run trains its reward model)."""
    cmd = [sys.executable, "-m", "rlhf_lightning.cli", "pipeline", "--out", str(out), "--seed", str(seed)]
    cmd += ["--no-diagnose", "--ppo-config", run.rl_config, "--ppo-args", EVAL_ARGS, "--sft-checkpoint", str(sft)]
    for preset in run.presets:
        cmd += ["--preset", preset]
    if rm is not None:
        cmd += ["--rm-checkpoint", str(rm)]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sft-checkpoint", type=Path, required=True)
    parser.add_argument("--rm-checkpoint", type=Path, required=True, help="the reward model of the unbiased data")
    parser.add_argument("--length-rm", type=Path, help="a length-biased reward model to reuse (default: trained once)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", help="comma-separated run names of SUITE (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [r for r in SUITE if not args.only or r.name in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending = [(r, s) for s in seeds for r in runs]
    length_rm = args.length_rm
    if length_rm is None and any(r.own_rm for r, _ in pending):
        # The first length-biased run trains the reward model the others reuse: it runs alone, before them.
        first = next(p for p in pending if p[0].own_rm)
        pending.remove(first)
        proc = launch(*first, args, None, env)
        if proc is not None:
            proc.wait()
        length_rm = args.out / f"{first[0].name}_s{first[1]}" / "runs/rm/checkpoints/last.ckpt"
    active: list[subprocess.Popen] = []
    while pending or active:
        active = [p for p in active if p.poll() is None]
        while pending and len(active) < args.jobs:
            run, seed = pending.pop(0)
            proc = launch(run, seed, args, length_rm if run.own_rm else args.rm_checkpoint, env)
            if proc is not None:
                active.append(proc)
        time.sleep(2)


def launch(run: SuiteRun, seed: int, args: argparse.Namespace, rm: Path | None, env: dict) -> subprocess.Popen | None:
    """Starts one run (its log beside its folder); None when it already finished."""
    out = args.out / f"{run.name}_s{seed}"
    if (out / "summary.json").is_file():
        return None
    with open(f"{out}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command(run, seed, out, args.sft_checkpoint, rm), stdout=log, stderr=log, env=env)


if __name__ == "__main__":
    main()
