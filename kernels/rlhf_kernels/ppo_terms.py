"""Per-token PPO math on (n,) tensors: the loss terms and their derivatives w.r.t. logp(target) and the entropy.

Shared by every backend: a backend computes logp and the entropy from the logits, this module turns them into the
per-token loss and the two coefficients, and the backend writes d loss / d logits from those coefficients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_kernels.reference import expm1_minus_x
from rlhf_kernels.types import SAMPLED_KL_ESTIMATORS


class PPOTokenTerms(NamedTuple):
    """Per-token quantities of the PPO loss, each (n,), zero at invalid tokens.

    loss: the token's contribution to the loss (already divided by the number of valid tokens).
    c_lp: d loss / d logp(target).
    c_h: d loss / d entropy, or None when the entropy bonus is off.
    clipped: 1 where the clip switched the policy-gradient term off.
    approx_kl: (ratio - 1) - log ratio, the k3 estimate of KL(pi_old || pi).
    ratio: pi / pi_old.
    """

    loss: torch.Tensor
    c_lp: torch.Tensor
    c_h: torch.Tensor | None
    clipped: torch.Tensor
    approx_kl: torch.Tensor
    ratio: torch.Tensor


def kl_estimate_and_grad(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample-based KL estimate and its derivative w.r.t. logp.

    With r = ref_logp - logp: k1 = -r (d/dlogp = 1), k2 = r^2 / 2 (d/dlogp = -r), k3 = expm1(r) - r
    (d/dlogp = -expm1(r)).

    Args:
        logp: (n,) policy log-probs of the sampled tokens.
        ref_logp: (n,) reference log-probs of the same tokens.

    Returns:
        value (n,), derivative (n,).
    """
    if estimator not in SAMPLED_KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {SAMPLED_KL_ESTIMATORS}, got {estimator!r}")
    r = ref_logp - logp
    if estimator == "k1":
        return -r, torch.ones_like(r)
    if estimator == "k2":
        return 0.5 * r.square(), -r
    return expm1_minus_x(r), -torch.expm1(r)


def ppo_token_terms(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    inv_count: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    entropy_coef: float,
    ref_logp: torch.Tensor | None,
    kl_coef: float,
    kl_estimator: str,
    full_kl: torch.Tensor | None = None,
) -> PPOTokenTerms:
    """The clipped-ratio objective, in-loss KL penalty and entropy bonus of each token, with their derivatives.

    loss_t = [max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) + kl_coef * k(logp, ref_logp) - entropy_coef * H]
    / n_valid, with r = exp(logp - old_logp). Where the clipped branch is strictly larger the policy-gradient term is
    constant in logp, so its derivative is exactly 0; otherwise it is -A r.

    Args:
        logp: (n,) log-probs of the sampled tokens under the current policy.
        entropy: (n,) entropy of the current policy at each position.
        old_logp: (n,) log-probs under the rollout policy.
        advantages: (n,) advantages.
        valid: (n,) bool, the tokens that count.
        inv_count: 0-dim, 1 / number of valid tokens in the whole batch.
        ref_logp: (n,) reference log-probs, required when kl_coef != 0 with a sampled estimator.
        full_kl: (n,) exact KL(pi || pi_ref) of each row, required when kl_coef != 0 with ``kl_estimator="full"``:
            it does not depend on logp(target) (its gradient reaches the logits directly; the caller writes it).

    Returns:
        PPOTokenTerms, all (n,) in logp's dtype.
    """
    cdt = logp.dtype
    adv = advantages.to(cdt)
    log_ratio = logp - old_logp.to(cdt)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_value = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    clipped = clipped_value > unclipped
    loss = torch.maximum(unclipped, clipped_value)
    c_lp = torch.where(clipped, torch.zeros_like(unclipped), unclipped)
    if kl_coef != 0.0 and kl_estimator == "full":
        loss = loss + kl_coef * full_kl.to(cdt)
    elif kl_coef != 0.0:
        kl, dkl = kl_estimate_and_grad(logp, ref_logp.to(cdt), kl_estimator)
        loss = loss + kl_coef * kl
        c_lp = c_lp + kl_coef * dkl
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * entropy
    zero = torch.zeros_like(loss)

    def per_valid(x: torch.Tensor) -> torch.Tensor:
        # torch.where, not a product: masked positions may hold inf or NaN (padding) and must contribute 0.
        return torch.where(valid, x * inv_count, zero)

    c_h = torch.where(valid, -entropy_coef * inv_count, zero) if entropy_coef != 0.0 else None
    return PPOTokenTerms(
        loss=per_valid(loss),
        c_lp=per_valid(c_lp),
        c_h=c_h,
        clipped=per_valid(clipped.to(cdt)),
        approx_kl=per_valid(expm1_minus_x(log_ratio)),
        ratio=per_valid(ratio),
    )
