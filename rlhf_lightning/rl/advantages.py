"""Masked statistics, generalised advantage estimation and whitening over right-padded response tokens.

Shapes: B responses of up to R tokens; ``mask`` (B, R) is True on real response tokens (EOS included), which are
contiguous from column 0. A response ends after its last real token: the value after it is 0 (terminal).
"""

from __future__ import annotations

import torch


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
