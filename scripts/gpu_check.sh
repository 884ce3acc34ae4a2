#!/usr/bin/env bash
# GPU checks for a lent CUDA machine whose python3 already has torch, triton, lightning and pytest (packages it lacks,
# e.g. jsonargparse and omegaconf for the CLI, can be put in .gpu_site/ and are added to PYTHONPATH):
#   1. the kernel test suite with compiled Triton on CUDA tensors (RLHF_TEST_DEVICE=cuda, no interpreter);
#   2. a short pipeline (world -> SFT -> RM -> PPO -> diagnose) on the GPU, kernels on the Triton path;
#   3. the PPO throughput benchmark at the peer's shape on the GPU;
#   4. the kernel benchmark's CUDA cases (outputs checked against the naive path first).
# Logs and JSON go to ${OUT:-gpu-out}/. Each stage has its own time limit so one slow stage cannot eat the others.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/.gpu_site:$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
RLHF_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-150}" python3 -m pytest tests/kernels -q -p no:cacheprovider \
    2>&1 | tee "$out/kernel-tests.log" | tail -15
timeout "${PIPELINE_TIMEOUT:-200}" python3 -m rlhf_lightning.cli pipeline --out "$out/pipe" \
    --sft-args "--trainer.max_steps=150 --trainer.val_check_interval=75 --trainer.enable_progress_bar=false" \
    --rm-args "--trainer.max_steps=100 --trainer.val_check_interval=50 --trainer.enable_progress_bar=false" \
    --ppo-args "--model.init_args.iterations=20 --model.init_args.eval.every=10 --trainer.enable_progress_bar=false" \
    2>&1 | grep -v Warning | tail -25 > "$out/pipeline.log"; cat "$out/pipeline.log"
cp "$out/pipe/summary.json" "$out/pipeline-summary.json" 2>/dev/null
rm -rf "$out/pipe"
timeout "${PPO_BENCH_TIMEOUT:-120}" python3 benchmarks/bench_ppo.py --accelerator gpu 2>&1 | grep -v Warn | tail -8 \
    | tee "$out/bench-ppo.log"
timeout "${BENCH_TIMEOUT:-150}" python3 -m rlhf_kernels.bench --device cuda --reps 10 --json "$out/kernels-cuda.json" \
    --case token_logprobs:16384:50257:0:bfloat16 --case ppo_loss:16384:50257:1024:bfloat16 \
    --case token_logprobs:8192:128256:0:bfloat16 --case ppo_loss_logits:16384:50257:0:bfloat16 \
    2>&1 | tee "$out/bench.log"
