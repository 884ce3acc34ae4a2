"""Backend choice: Triton on CUDA tensors, the chunked PyTorch fallback elsewhere.

``backend="auto"`` picks Triton for CUDA tensors when Triton imports, the torch fallback otherwise. The environment
variable ``RLHF_KERNELS_BACKEND`` (auto, triton or torch) overrides whatever the caller asked for, so a test run or a
debugging session can force one backend everywhere, e.g. Triton on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

import torch

from rlhf_kernels.validate import check_choice

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "RLHF_KERNELS_BACKEND"


@cache
def _triton_backend() -> ModuleType | None:
    try:
        return importlib.import_module("rlhf_kernels.triton_backend")
    except ImportError:
        return None


def triton_available() -> bool:
    """True when the Triton backend imports (triton installed)."""
    return _triton_backend() is not None


def resolve_backend(backend: str, device: torch.device) -> ModuleType:
    """The backend module to run an op on tensors of ``device``.

    Raises:
        ValueError: unknown backend name, or Triton asked for where it cannot run.
    """
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        backend = check_choice(f"environment variable {ENV_VAR}", override, BACKENDS)
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "torch":
        return importlib.import_module("rlhf_kernels.torch_backend")
    module = _triton_backend()
    if module is None:
        raise ValueError("backend 'triton' was asked for but triton cannot be imported; install triton or use 'torch'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 before "
                         "triton is first imported, or use backend 'torch'")  # fmt: skip
    return module
