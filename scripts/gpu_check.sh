#!/usr/bin/env bash
# GPU checks of the kernels, for a lent CUDA machine whose python3 already has torch, triton and pytest:
#   1. the kernel test suite with compiled Triton on CUDA tensors (RLHF_TEST_DEVICE=cuda, no interpreter);
#   2. the kernel benchmark's CUDA cases (outputs checked against the naive path first).
# Logs and JSON go to ${OUT:-gpu-out}/.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
RLHF_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/kernels -q -p no:cacheprovider \
    2>&1 | tee "$out/kernel-tests.log" | tail -40
timeout "${BENCH_TIMEOUT:-200}" python3 -m rlhf_kernels.bench --device cuda --reps 10 --json "$out/kernels-cuda.json" \
    --case token_logprobs:16384:50257:0:bfloat16 --case ppo_loss:16384:50257:1024:bfloat16 \
    --case token_logprobs:8192:128256:0:bfloat16 --case ppo_loss:16384:50257:1024:float32 \
    2>&1 | tee "$out/bench.log"
