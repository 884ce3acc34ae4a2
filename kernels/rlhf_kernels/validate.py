"""Argument checks for the public ops: bad input is a ValueError naming the argument, never a wrong answer or a
device-side assert inside a kernel.

Checks of shapes, dtypes and devices are free. A check of tensor *values* (target ids in range) reads the data on
the host, which for a GPU tensor is a device synchronisation that stalls the training step: it runs on CPU tensors
always, on other devices only when the environment variable :data:`CHECK_VALUES_ENV` is 1 (debugging). Unchecked,
an out-of-range id reads nothing out of bounds in a Triton kernel: its log-prob is NaN.
"""

from __future__ import annotations

import math
import os

import torch

from rlhf_kernels.types import KL_ESTIMATORS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Set to 1 to check tensor values on every device, at the cost of a host sync per call (see the module docstring).
CHECK_VALUES_ENV = "RLHF_KERNELS_CHECK_VALUES"


def values_checked(t: torch.Tensor) -> bool:
    """Whether value checks run for tensors on the device of ``t``."""
    return t.device.type == "cpu" or os.environ.get(CHECK_VALUES_ENV) == "1"


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_logits(name: str, logits: object) -> torch.Tensor:
    """Checks a (N, V) floating logits matrix and returns it with a unit stride along V (copying only if needed)."""
    logits = check_tensor(name, logits)
    if logits.ndim != 2:
        raise ValueError(f"{name} must have shape (N, V), got {tuple(logits.shape)}; flatten leading dims first")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits


def check_same(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor, check_dtype: bool = False) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")
    if check_dtype and value.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}")


def check_vector(name: str, value: object, n: int, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Checks a (n,) floating or boolean vector on the device of ``like``; returns it contiguous."""
    value = check_tensor(name, value)
    if value.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match {like_name}, got {tuple(value.shape)}")
    check_same(name, value, like_name, like)
    if value.dtype not in (*FLOAT_DTYPES, torch.bool):
        raise ValueError(f"{name} must be a floating (or bool) tensor, got {value.dtype}")
    return value.contiguous()


def check_targets(targets: object, logits: torch.Tensor, name: str = "targets") -> torch.Tensor:
    """Checks (N,) integer token ids on the logits' device, and that they lie in [0, V) where
    :func:`values_checked`; returns them as contiguous int64."""
    targets = check_tensor(name, targets)
    n, v = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match logits (N, V) = {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}")  # fmt: skip
    check_same(name, targets, "logits", logits)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {targets.dtype}")
    targets = targets.to(torch.int64).contiguous()
    if n and values_checked(targets):
        bad = ((targets < 0) | (targets >= v)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{name}[{i}] = {int(targets[i])} is outside the vocabulary [0, {v}) "
                             f"({bad.shape[0]} out-of-range ids in all)")  # fmt: skip
    return targets


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_ppo_config(
    clip_eps_low: float, clip_eps_high: float, entropy_coef: float, kl_coef: float, kl_estimator: str
) -> dict:
    """The PPO loss's settings, checked, as the keyword arguments of :func:`rlhf_kernels.ppo_terms.ppo_token_terms`
    that configure it (what the logits and the from-hidden losses pass to the backends)."""
    return {
        "clip_eps_low": check_nonnegative("clip_eps_low", clip_eps_low),
        "clip_eps_high": check_nonnegative("clip_eps_high", clip_eps_high),
        "entropy_coef": float(entropy_coef),
        "kl_coef": float(kl_coef),
        "kl_estimator": check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS),
    }
