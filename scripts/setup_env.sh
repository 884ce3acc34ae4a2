#!/usr/bin/env bash
# Creates the virtualenv $1 (default .venv) and installs the package with its test tools, its optional LoRA support
# (peft) and its optional Parquet / datasets-folder reading (pyarrow, datasets): the tests cover both.
# On a machine without an NVIDIA GPU, torch is installed first from TORCH_SPEC (default torch==2.13.0, a CPU
# wheel on this project's machines), so that the package's plain `torch` requirement is already satisfied and pip
# never downloads a multi-GB CUDA build. Set TORCH_SPEC to pick another build (e.g. on a laptop).
set -euo pipefail
venv=${1:-.venv}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # A GPU machine: the CUDA build of torch brings the triton version it was built against.
    "${pip[@]}" ${TORCH_SPEC:+"$TORCH_SPEC"} -e "$root[dev,lora,data]"
else
    "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
    # triton >= 3.8: its CPU interpreter (TRITON_INTERPRET=1) runs the kernel tests.
    "${pip[@]}" -e "$root[dev,lora,data]" "triton>=3.8"
fi
"$venv/bin/python" -c "import torch, rlhf_kernels, rlhf_lightning; print('torch', torch.__version__, 'ready in $venv')"
