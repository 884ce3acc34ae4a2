"""Plain PyTorch references: the specification every backend is tested against.

Each function is written to be obviously correct, not fast: full (N, V) log-softmax tensors, autograd for the
gradients. They accept the same arguments as the public ops in :mod:`rlhf_kernels.ops` (without ``backend`` and
``inplace``) and compute in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_kernels.types import SAMPLED_KL_ESTIMATORS, PPOLossStats


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype all kernels accumulate in: fp64 for fp64 inputs, fp32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits scaled for sampling and scoring at ``temperature``, in the compute dtype.

    Every path (sampler, references, fused kernels) divides by the temperature, the same way, so that the log-probs
    a rollout records and the log-probs the update recomputes agree.

    Args:
        logits: (..., V) raw logits.
    """
    return logits.to(compute_dtype(logits.dtype)) / temperature


def token_logprobs_reference(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target) per row, and optionally the entropy of each row's distribution.

    Args:
        logits: (N, V) logits.
        targets: (N,) token ids in [0, V).

    Returns:
        logp (N,), clamped to <= 0; with ``return_entropy`` also entropy (N,).
    """
    logp_all = torch.log_softmax(apply_temperature(logits, temperature), dim=-1)  # (N, V)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).clamp(max=0.0)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # 0 log 0 = 0: entries masked to -inf contribute nothing. Zeroing log p (not the product) before multiplying keeps
    # the gradient free of 0 * inf = NaN.
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(p))).sum(-1)
    return logp, entropy


def kl_from_logits_reference(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL(pi || pi_ref) per row over the whole vocabulary.

    Args:
        logits: (N, V) policy logits (differentiable).
        ref_logits: (N, V) reference logits (treated as constants).

    Returns:
        kl (N,).
    """
    logp = torch.log_softmax(apply_temperature(logits, temperature), dim=-1)  # (N, V)
    logq = torch.log_softmax(apply_temperature(ref_logits.detach(), temperature), dim=-1)  # (N, V)
    p = logp.exp()
    # Where p == 0 the term is 0 whatever log q is (0 log 0 convention); the log-ratio is zeroed there before the
    # product so that neither the value nor the gradient sees -inf - -inf or 0 * inf.
    log_ratio = torch.where(p > 0, logp - logq, torch.zeros_like(p))
    return (p * log_ratio).sum(-1)


def expm1_minus_x(x: torch.Tensor) -> torch.Tensor:
    """(e^x - 1) - x without the cancellation that ruins it in fp32 for small |x| (computed in fp64)."""
    return (torch.expm1(x.double()) - x.double()).to(x.dtype)


def kl_estimate_reference(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Sample-based per-token estimates of KL(pi || pi_ref) from the sampled token's log-probs (Schulman's k1/k2/k3).

    With r = ref_logp - logp (the log of pi_ref / pi at the sampled token):
    k1 = -r (unbiased, can be negative), k2 = r^2 / 2 (biased, low variance), k3 = (e^r - 1) - r (unbiased, >= 0).

    Args:
        logp: (N,) log pi(token).
        ref_logp: (N,) log pi_ref(token).

    Returns:
        (N,) estimates.
    """
    if estimator not in SAMPLED_KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {SAMPLED_KL_ESTIMATORS}, got {estimator!r}")
    r = ref_logp - logp
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * r.square()
    return expm1_minus_x(r)


def bradley_terry_loss_reference(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float | torch.Tensor = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Bradley-Terry preference loss ``-log sigmoid(r_chosen - r_rejected - margin)``.

    Args:
        r_chosen: (B,) scores of the preferred responses.
        r_rejected: (B,) scores of the other responses.
        margin: scalar or (B,) required score gap (no gradient).

    Returns:
        the mean loss (scalar) with ``reduction="mean"``, the per-pair losses (B,) with ``"none"``.
    """
    losses = -F.logsigmoid(r_chosen - r_rejected - margin)
    return losses.mean() if reduction == "mean" else losses


def ppo_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
    temperature: float = 1.0,
    ref_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PPOLossStats]:
    """PPO clipped-ratio objective with optional entropy bonus and in-loss KL penalty, as a masked token mean.

    Per valid token: ``max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)) + kl_coef * k(logp, ref_logp)
    - entropy_coef * H``, with ratio = exp(logp - old_logp); with ``kl_estimator="full"`` the KL term is the exact
    ``KL(pi || pi_ref)`` of the row over the vocabulary.

    Args:
        logits: (N, V) current policy logits.
        targets: (N,) sampled tokens.
        old_logp: (N,) log-probs of ``targets`` under the rollout policy.
        advantages: (N,) advantage per token.
        mask: (N,) true (non-zero) for tokens that count.
        ref_logp: (N,) reference log-probs; required when ``kl_coef != 0`` with a sampled estimator.
        ref_logits: (N, V) reference logits; required when ``kl_coef != 0`` with ``kl_estimator="full"``.

    Returns:
        (loss, stats): the scalar loss and :class:`PPOLossStats` (masked token means).
    """
    logp, entropy = token_logprobs_reference(logits, targets, temperature, return_entropy=True)
    cdt = logp.dtype
    valid = mask.bool()
    count = valid.sum().clamp(min=1).to(cdt)
    adv = advantages.to(cdt)
    log_ratio = logp - old_logp.to(cdt)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = torch.maximum(unclipped, clipped) - entropy_coef * entropy
    if kl_coef != 0.0 and kl_estimator == "full":
        per_token = per_token + kl_coef * kl_from_logits_reference(logits, ref_logits, temperature).to(cdt)
    elif kl_coef != 0.0:
        per_token = per_token + kl_coef * kl_estimate_reference(logp, ref_logp.to(cdt), kl_estimator)
    zero = torch.zeros_like(per_token)
    loss = torch.where(valid, per_token, zero).sum() / count

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x.detach(), zero).sum() / count

    stats = PPOLossStats(
        clip_fraction=masked_mean((clipped > unclipped).to(cdt)),
        approx_kl=masked_mean(expm1_minus_x(log_ratio)),
        entropy=masked_mean(entropy),
        ratio=masked_mean(ratio),
    )
    return loss, stats
