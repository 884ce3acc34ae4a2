"""The PPO losses of one minibatch: the clipped-ratio policy loss (fused, from the hidden states and the LM head) and
the clipped value loss.

The policy loss per real response token t, with ratio ``r_t = exp(logp_t - old_logp_t)`` and advantage ``A_t``:

    max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)) + kl_coef * k(logp_t, ref_logp_t) - entropy_coef * H_t

averaged over the tokens. ``rlhf_kernels.ppo_loss_from_hidden`` evaluates it from the (N, D) hidden states and the
LM head, a chunk of rows at a time (the (N, V) logits never exist at once), and computes its gradient in the forward
pass (``kernels/rlhf_kernels/reference.py`` is the same formula in plain autograd PyTorch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import rlhf_kernels
from rlhf_lightning.rl.advantages import masked_mean
from rlhf_lightning.rl.kl import KLEstimator


def policy_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    entropy_coef: float,
    temperature: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k1",
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    adapted_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, rlhf_kernels.PPOLossStats]:
    """The policy loss of the module docstring over N response tokens, all of which count.

    Args:
        hidden: (N, D) the current policy's final hidden states at the response positions.
        lm_head_weight: (V, D) its LM head (logits = hidden @ lm_head_weight.T).
        targets: (N,) the sampled tokens; old_logprobs: (N,) their log-probs at sampling; advantages: (N,).
        ref_logprobs: (N,) the reference's log-probs, for a sampled KL estimator in the loss (else None).
        kl_coef, kl_estimator: the KL in the loss (0: the KL is in the reward).
        ref_hidden: (N, D) the reference's hidden states and ref_weight: (V, D) its LM head, for the exact ("full")
            KL in the loss (ignored otherwise).
        adapted_head: the policy's LM head module when its logits are not ``hidden @ lm_head_weight.T`` (a
            LoRA-adapted head): the logits are then built by it and the loss taken from them, overwritten with
            their gradient (``inplace``, no second (N, V) buffer).

    Returns:
        The scalar loss and the kernel's statistics (clip fraction, approximate KL, mean ratio, entropy).
    """
    options = {
        "clip_eps_low": clip_eps_low,
        "clip_eps_high": clip_eps_high,
        "entropy_coef": entropy_coef,
        "ref_logp": ref_logprobs,
        "kl_coef": kl_coef,
        "kl_estimator": kl_estimator,
        "temperature": temperature,
    }
    every = torch.ones_like(targets, dtype=torch.bool)
    if adapted_head is None:
        return rlhf_kernels.ppo_loss_from_hidden(
            hidden,
            lm_head_weight,
            targets,
            old_logprobs,
            advantages,
            every,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            **options,
        )
    ref_logits = None if ref_hidden is None else ref_hidden @ ref_weight.T
    return rlhf_kernels.ppo_loss_from_logits(
        adapted_head(hidden), targets, old_logprobs, advantages, every, inplace=True, ref_logits=ref_logits, **options
    )


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - G)^2, (V_clipped - G)^2), masked mean, with V_clipped = V_old + clip(V - V_old, -c, c): the
    critic cannot move further than ``clip`` from the rollout's values in one iteration.

    Args:
        values: (B, R) current values (with gradient); old_values: (B, R) the rollout's; returns: (B, R) targets.
        mask: (B, R) real response tokens.
        clip: c, or None for the plain squared error.

    Returns:
        (loss, fraction of tokens where the clipped term was the larger one).
    """
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(err, mask), torch.zeros((), device=values.device)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err_clipped = (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(err, err_clipped), mask), masked_mean((err_clipped > err).float(), mask)
