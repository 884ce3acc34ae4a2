"""Heads on a backbone's hidden states: a scalar reward head and a per-token value head."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rlhf_lightning.data.collate import last_token_index

#: How a reward head reads a sequence: the hidden state of its last real token, or the mean over its real tokens.
Pooling = Literal["last", "mean"]


class ScalarHead(nn.Module):
    """Reward head: one score per sequence, a linear map of its pooled hidden states.

    ``pooling="last"``: the hidden state of the last real token (the usual RLHF reward model; what a Hugging Face
    sequence classifier computes). ``pooling="mean"``: the mean over the real tokens, i.e. the mean of the per-token
    scores ``proj(h_t)``: every token's state gets its own gradient, so the model learns what each word contributes
    (what a bag-of-words model sees) with the trunk's context on top, instead of having to route everything through
    one position's attention.
    """

    def __init__(self, hidden_size: int, pooling: Pooling = "last"):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden: (B, T, D), attention_mask: (B, T) -> scores (B,)."""
        if self.pooling == "mean":
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, D)
        else:
            idx = last_token_index(attention_mask)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, D)
        return self.proj(pooled).squeeze(-1)


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
