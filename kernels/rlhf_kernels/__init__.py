"""rlhf_kernels: fused token log-probs, full-vocabulary KL and the PPO clipped loss (from the logits, or from hidden
states and the LM head without the logits), with PyTorch references.

Lightning-free on purpose: the training package imports these ops, never the other way round. Lives in the source
root ``kernels/`` (which has no ``__init__.py``, so it never passes for the Hugging Face package called ``kernels``).

Every op takes ``backend="auto" | "triton" | "torch"``; see :mod:`rlhf_kernels.dispatch`.
"""

from rlhf_kernels.dispatch import BACKENDS, ENV_VAR, resolve_backend, triton_available
from rlhf_kernels.fused_linear import kl_from_hidden, ppo_loss_from_hidden, token_logprobs_from_hidden
from rlhf_kernels.ops import (
    bradley_terry_loss,
    kl_estimate,
    kl_from_logits,
    ppo_loss_from_logits,
    token_logprobs,
)
from rlhf_kernels.reference import apply_temperature
from rlhf_kernels.types import KL_ESTIMATORS, SAMPLED_KL_ESTIMATORS, PPOLossStats

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "KL_ESTIMATORS",
    "SAMPLED_KL_ESTIMATORS",
    "PPOLossStats",
    "apply_temperature",
    "bradley_terry_loss",
    "kl_estimate",
    "kl_from_hidden",
    "kl_from_logits",
    "ppo_loss_from_hidden",
    "ppo_loss_from_logits",
    "resolve_backend",
    "token_logprobs",
    "token_logprobs_from_hidden",
    "triton_available",
]
