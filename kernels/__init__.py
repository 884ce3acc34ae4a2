"""rlhf_kernels: fused token log-probs, full-vocabulary KL and the PPO clipped loss, with PyTorch references.

Lightning-free on purpose: the training package imports these ops, never the other way round. Installed from the
folder ``kernels/`` under the name ``rlhf_kernels`` (a Hugging Face package called ``kernels`` exists).

Every op takes ``backend="auto" | "triton" | "torch"``; see :mod:`rlhf_kernels.dispatch`.
"""

if __name__ != "rlhf_kernels":
    # Run from the repository root, this folder would also be importable as `kernels`, shadowing the Hugging Face
    # package of that name that transformers imports. Refuse, rather than load a second copy under a wrong name.
    raise ImportError(f"the folder kernels/ is the package rlhf_kernels; it cannot be imported as {__name__!r}")

from rlhf_kernels.dispatch import BACKENDS, ENV_VAR, resolve_backend, triton_available
from rlhf_kernels.ops import (
    bradley_terry_loss,
    kl_estimate,
    kl_from_logits,
    ppo_loss_from_logits,
    token_logprobs,
)
from rlhf_kernels.reference import apply_temperature
from rlhf_kernels.types import KL_ESTIMATORS, PPOLossStats

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "KL_ESTIMATORS",
    "PPOLossStats",
    "apply_temperature",
    "bradley_terry_loss",
    "kl_estimate",
    "kl_from_logits",
    "ppo_loss_from_logits",
    "resolve_backend",
    "token_logprobs",
    "triton_available",
]
