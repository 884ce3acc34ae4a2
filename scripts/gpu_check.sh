#!/usr/bin/env bash
# Every GPU check in one run of at most 8 minutes on an H200, for a lent CUDA machine whose python3 already has
# torch, triton, lightning and pytest (packages it lacks, e.g. jsonargparse, omegaconf or transformers, can be put in
# .gpu_site/, which is added to PYTHONPATH; a stage whose package is missing is reported as SKIP, not run):
#   1. kernel-tests: the kernel test suite with compiled Triton on CUDA tensors (RLHF_TEST_DEVICE=cuda);
#   2. kernel-bench: the kernel benchmark's key cases (16384x50257 and 16384x50304 bf16 log-probs, 8192x128256,
#      the PPO loss alone in place, forward + backward), each checked against the naive path before it is timed;
#   3. pipeline-tinygpt: a short `rlhf pipeline` (world -> SFT -> RM -> PPO -> diagnose) with TinyGPT on the GPU;
#   4. pipeline-hf: `rlhf hf-tiny` then the same short pipeline on that tiny Hugging Face GPT-2 (--hf-model).
# Each stage has its own time limit (they sum to 460 s, so one slow stage cannot eat the others). Logs, the bench
# JSON, the pipelines' summaries and stages.jsonl go to ${OUT:-gpu-out}/. Any failure or mismatch prints a line
# starting with FAIL and makes the script exit non-zero; a clean run ends with "ALL PASSED".
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/.gpu_site:$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=()

# run_stage NAME LIMIT_S CMD...: runs CMD under a time limit, its output in $out/NAME.log; PASS or FAIL line.
run_stage() {
    local name=$1 limit=$2 t0=$SECONDS rc why
    shift 2
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    printf '{"stage": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' "$name" "$rc" $((SECONDS - t0)) "$limit" \
        >>"$out/stages.jsonl"
    if [ "$rc" -eq 0 ]; then
        echo "PASS $name ($((SECONDS - t0)) s)"
        return 0
    fi
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then why="timed out after ${limit} s"; else why="exit status $rc"; fi
    echo "FAIL $name: $why; the end of $out/$name.log:"
    tail -25 "$out/$name.log" | grep -v Warning
    failed+=("$name")
    return 1
}

# needs MODULE...: true when python3 imports them all, else a SKIP line for the stage named by $stage.
needs() {
    local m
    for m in "$@"; do
        if ! python3 -c "import $m" 2>/dev/null; then
            echo "SKIP $stage: python3 cannot import $m (put it in .gpu_site/)"
            printf '{"stage": "%s", "skipped": "no %s"}\n' "$stage" "$m" >>"$out/stages.jsonl"
            return 1
        fi
    done
}

: >"$out/stages.jsonl"
nvidia-smi -L
if ! python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
                 torch.cuda.get_device_name())'; then
    echo "FAIL environment: python3 lacks torch or triton, or sees no CUDA device"
    exit 1
fi

stage=kernel-tests
needs pytest && RLHF_TEST_DEVICE=cuda run_stage "$stage" 160 python3 -m pytest tests/kernels -q -p no:cacheprovider -rf
[ -f "$out/$stage.log" ] && grep -E "passed|failed" "$out/$stage.log" | tail -1

stage=kernel-bench
needs rlhf_kernels && run_stage "$stage" 110 python3 -m rlhf_kernels.bench --device cuda --reps 5 \
    --impls naive,triton --json "$out/kernels-cuda.json" \
    --case token_logprobs:16384:50257:0:bfloat16 --case token_logprobs:16384:50304:0:bfloat16 \
    --case token_logprobs:8192:128256:0:bfloat16 --case ppo_loss_inplace:16384:50257:0:bfloat16 \
    --case ppo_loss_inplace:16384:50304:0:bfloat16
[ -f "$out/$stage.log" ] && grep -v Warning "$out/$stage.log"

# Short phases: enough steps to exercise every phase (and the kernels on the Triton path), not to learn much.
short=(--sft-args "--trainer.max_steps=60 --trainer.val_check_interval=30 --trainer.enable_progress_bar=false"
       --rm-args "--trainer.max_steps=40 --trainer.val_check_interval=20 --trainer.enable_progress_bar=false"
       --ppo-args "--model.init_args.iterations=6 --model.init_args.eval.every=3 --trainer.enable_progress_bar=false")

stage=pipeline-tinygpt
needs lightning jsonargparse && run_stage "$stage" 90 python3 -m rlhf_lightning.cli pipeline --out "$out/pipe" \
    "${short[@]}" && cp "$out/pipe/summary.json" "$out/pipeline-tinygpt-summary.json"

stage=pipeline-hf
needs lightning jsonargparse transformers && run_stage "$stage" 100 bash -c '
    python3 -m rlhf_lightning.cli hf-tiny --out "$0/hf_model" &&
    python3 -m rlhf_lightning.cli pipeline --out "$0/pipe_hf" --hf-model "$0/hf_model" "${@}"' "$out" "${short[@]}" \
    && cp "$out/pipe_hf/summary.json" "$out/pipeline-hf-summary.json"
rm -rf "$out/pipe" "$out/pipe_hf" "$out/hf_model"  # checkpoints: too big to bring back, the summaries are kept

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAIL: ${failed[*]}"
    exit 1
fi
echo "ALL PASSED"
