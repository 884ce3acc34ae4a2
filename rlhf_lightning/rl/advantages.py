"""Masked statistics, the advantage estimators and whitening over right-padded response tokens.

Shapes: B responses of up to R tokens; ``mask`` (B, R) is True on real response tokens (EOS included), which are
contiguous from column 0. A response ends after its last real token: the value after it is 0 (terminal).

The estimators (:data:`ADVANTAGE_ESTIMATORS`, chosen by :class:`AdvantageConfig`): ``gae`` needs a critic's values;
the critic-free ones replace the critic by other samples of the same prompt (``grpo``, ``rloo``: responses come in
groups of ``samples_per_prompt`` consecutive rows, one prompt per group) or of the whole batch (``reinforce_pp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

AdvantageEstimator = Literal["gae", "grpo", "rloo", "reinforce_pp"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)


@dataclass
class AdvantageConfig:
    """How a rollout's advantages are estimated.

    Attributes:
        estimator: "gae" (a critic, Schulman et al. 2016); "grpo" (Shao et al. 2024: a response's sequence reward
            minus its group's mean, over the group's std when ``scale_by_std``; the KL belongs in the loss,
            ``kl.placement: loss``, k3 by default in its config); "rloo" (Ahmadian et al. 2024: minus the mean of
            the group's other responses; the k1 KL in the reward); "reinforce_pp" (Hu 2025, REINFORCE++: per-token
            returns of the shaped rewards, k1 KL per token in the reward, normalised over the whole batch).
        samples_per_prompt: k responses sampled per prompt, consecutive in the rollout (grpo and rloo need >= 2;
            the rollout then holds rollout_batch / k prompts).
        scale_by_std: grpo only: divide by the group's std (False: Dr. GRPO, Liu et al. 2025, which removes the
            std's preference for groups that barely differ).
        loss_aggregation: "token_mean" (every token of the batch weighs the same: longer responses weigh more) or
            "sequence_mean" (every response weighs the same, its tokens sharing its weight), applied as a weight on
            each token's advantage; a KL in the loss stays a token mean.
    """

    estimator: AdvantageEstimator = "gae"
    samples_per_prompt: int = 1
    scale_by_std: bool = True
    loss_aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"

    def __post_init__(self) -> None:
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage.estimator must be one of {ADVANTAGE_ESTIMATORS}, got {self.estimator!r}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"advantage.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.estimator in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"advantage.estimator {self.estimator!r} compares responses to the same prompt: "
                             f"advantage.samples_per_prompt must be >= 2, got {self.samples_per_prompt}")  # fmt: skip
        if self.loss_aggregation not in ("token_mean", "sequence_mean"):
            raise ValueError(
                f"advantage.loss_aggregation must be 'token_mean' or 'sequence_mean', got {self.loss_aggregation!r}"
            )

    @property
    def needs_critic(self) -> bool:
        return self.estimator == "gae"


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (0 when there are none). x, mask: same shape."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the True entries of mask (Bessel-corrected when ``unbiased`` and more than one entry)."""
    m = mask.to(x.dtype)
    n = m.sum()
    centred = (x - masked_mean(x, mask)) * m
    denom = n - 1 if unbiased and n > 1 else n.clamp(min=1)
    return (centred**2).sum() / denom


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x scaled to unit variance over the masked entries (and centred when ``shift_mean``); 0 outside the mask.

    Advantages are whitened per rollout so the policy step size does not depend on the reward's scale.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) along each response.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with V = 0 after the last real token, and
    ``A_t = delta_t + gamma * lam * A_{t+1}``.

    Args:
        rewards: (B, R) per-token rewards (0 at padding).
        values: (B, R) value estimates V(s_t) of the state before token t.
        mask: (B, R) real response tokens.
        gamma: discount; lam: GAE's lambda (1: Monte-Carlo returns, 0: one-step TD).

    Returns:
        advantages (B, R) and returns = advantages + values (B, R), both 0 at padding.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    r = values.shape[1]
    for t in reversed(range(r)):
        next_value = values[:, t + 1] if t + 1 < r else torch.zeros_like(running)  # 0 past the end or at padding
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * m


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - predicted) / Var(target) over the mask: 1 is a perfect critic, <= 0 no better than a constant.
    NaN when the target has no variance."""
    var_t = masked_var(target, mask)
    return 1 - masked_var(target - predicted, mask) / var_t


def group_baseline_advantages(
    rewards: torch.Tensor, group_size: int, leave_one_out: bool, scale_by_std: bool, eps: float = 1e-6
) -> torch.Tensor:
    """Each response's sequence reward against the other samples of its prompt.

    Args:
        rewards: (B,) sequence rewards; rows ``g * group_size`` to ``(g + 1) * group_size - 1`` answer one prompt.
        group_size: k >= 2, dividing B.
        leave_one_out: the baseline is the mean of the group's other k - 1 rewards (RLOO: unbiased, since a
            response's own reward is not in its baseline), else the whole group's mean (GRPO).
        scale_by_std: divide by the group's std (unbiased) + eps; a group of equal rewards then gets 0, not inf.

    Returns:
        (B,) advantages.
    """
    b = rewards.shape[0]
    if group_size < 2 or b % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the batch ({b}), got {group_size}")
    groups = rewards.view(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    # Leave-one-out: r_i - (sum - r_i) / (k - 1) = k / (k - 1) * (r_i - mean).
    centred = (groups - mean) * (group_size / (group_size - 1) if leave_one_out else 1.0)
    if scale_by_std:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(b)


def sequence_mean_weights(mask: torch.Tensor) -> torch.Tensor:
    """(B, R) per-token weights that turn a mean over all real tokens into a mean over responses of each response's
    mean: N / (B * len_i) on response i's tokens (N real tokens in all), 0 at padding."""
    lengths = mask.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)
    return mask.sum() / (mask.shape[0] * lengths) * mask


def estimate_advantages(
    config: AdvantageConfig,
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten_advantages: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of a rollout by ``config``'s estimator.

    Args:
        rewards: (B, R) shaped per-token rewards (the sequence score on the last real token, any in-reward KL
            penalty on every token), 0 at padding.
        values: (B, R) the critic's values (read by "gae" only).
        mask: (B, R) real response tokens.
        gamma, lam: GAE's discount and lambda; "reinforce_pp" discounts its returns by gamma.
        whiten_advantages: whiten over the rollout ("gae", "grpo", "rloo"; "reinforce_pp" always normalises over
            the batch, which is its definition).

    Returns:
        advantages (B, R) (weighted per ``loss_aggregation``) and returns (B, R) (the critic's targets; for the
        critic-free estimators the reward-to-go, logged only), both 0 at padding.
    """
    m = mask.to(rewards.dtype)
    if config.estimator == "gae":
        advantages, returns = gae(rewards, values, mask, gamma, lam)
    else:
        # With no values and lambda 1, GAE's advantages are the discounted reward-to-go.
        returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
        if config.estimator == "reinforce_pp":
            advantages = returns
        else:
            loo, std = config.estimator == "rloo", config.scale_by_std and config.estimator == "grpo"
            sequence = group_baseline_advantages((rewards * m).sum(-1), config.samples_per_prompt, loo, std)
            advantages = sequence[:, None] * m
    if whiten_advantages or config.estimator == "reinforce_pp":
        advantages = whiten(advantages, mask)
    if config.loss_aggregation == "sequence_mean":
        advantages = advantages * sequence_mean_weights(mask).to(advantages.dtype)
    return advantages, returns
