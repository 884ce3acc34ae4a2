"""Heads on a backbone's hidden states: a scalar reward head and a per-token value head."""

from __future__ import annotations

import torch
from torch import nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token, for right-padded sequences (and left-padded ones).

    Args:
        attention_mask: (B, T) 1 for real tokens; each row needs at least one.
    """
    t = attention_mask.shape[1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).amax(-1)


class ScalarHead(nn.Module):
    """Reward head: one score per sequence from the hidden state of its last real token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden: (B, T, D), attention_mask: (B, T) -> scores (B,)."""
        idx = last_token_index(attention_mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, D)
        return self.proj(last).squeeze(-1)


class ValueHead(nn.Module):
    """Critic head: a value estimate for every position."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, T, D) -> values (B, T)."""
        return self.proj(hidden).squeeze(-1)
