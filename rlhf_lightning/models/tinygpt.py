"""TinyGPT: a small decoder-only transformer, the built-in policy backbone for the default task.

Pre-norm blocks, causal scaled-dot-product attention, learned positions, embeddings tied to the LM head. The model
returns final hidden states; logits are ``hidden @ lm_head_weight.T``, so heads and the fused kernels can work from
the hidden states and the weight without materialising logits twice.

Left padding is first-class: position ids come from the attention mask (the first real token is position 0), and
padded keys are masked, so a left-padded prompt gives the same hidden states for its real tokens as the unpadded one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    """Shape of a TinyGPT.

    vocab_size: number of token ids; 0 (the default in configs) means "the tokenizer's vocabulary size".
    n_layer, n_head, d_model: depth, attention heads, width (d_model divisible by n_head).
    max_seq_len: longest prompt + response the position table covers.
    dropout: dropout on attention and residual branches during training.
    """

    vocab_size: int = 0
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    max_seq_len: int = 96
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.vocab_size < 0:
            raise ValueError(f"GPTConfig.vocab_size must be >= 0 (0: from the tokenizer), got {self.vocab_size}")
        for name in ("n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Preallocated keys and values of every layer, filled left to right during generation.

    keys, values: (n_layer, B, n_head, max_len, head_dim). ``length`` positions are filled.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (config.n_layer, batch, config.n_head, max_len, config.d_model // config.n_head)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k, v (B, H, T_new, Dh) after the filled positions; returns all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Marks n more positions filled (called once per forward, after every layer has stored its keys)."""
        self.length += n


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.attn_drop = nn.Dropout(config.dropout)  # its p is what SDPA uses (a module, so it can be switched off)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """x: (B, T, D); mask: (B, 1, T, S) bool, True where a query may attend (S = cached + T keys)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for y in (q, k, v))  # (B, H, T, Dh)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, Dh)
        drop = self.attn_drop.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask, cache, layer)
        return x + self.mlp(self.ln2(x))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) position ids that start at 0 on each row's first real token (left padding gets 0).

    Args:
        attention_mask: (B, S) 1/True for real tokens.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask_4d(key_mask: torch.Tensor, t: int) -> torch.Tensor:
    """(B, 1, T, S) boolean attention mask for the last T of S positions: causal and no padded keys.

    A query whose every visible key is padding (a padding query at the start of a left-padded row) may attend to
    itself, so the softmax never sees an all -inf row; its output is never used.

    Args:
        key_mask: (B, S) 1/True for real tokens (cached and new).
        t: number of new (query) positions, the last t of the S.
    """
    s = key_mask.shape[1]
    q_pos = torch.arange(s - t, s, device=key_mask.device).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(s, device=key_mask.device).unsqueeze(0)  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    mask = causal.unsqueeze(0) & key_mask.bool().unsqueeze(1)  # (B, T, S)
    mask = mask | (k_pos == q_pos).unsqueeze(0) & ~mask.any(-1, keepdim=True)
    return mask.unsqueeze(1)


class TinyGPT(nn.Module):
    """Decoder-only transformer returning final hidden states (B, T, D); logits = hidden @ lm_head_weight.T."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("TinyGPT needs GPTConfig.vocab_size > 0 (set it from the tokenizer)")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2's scaled init of residual projections keeps the residual stream's variance depth-independent.
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, D) output projection, tied to the token embedding."""
        return self.tok_emb.weight

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, batch, max_len, p.dtype, p.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states of the new tokens.

        Args:
            input_ids: (B, T) new token ids.
            attention_mask: (B, S) 1 for real tokens over cached + new positions (S = cache.length + T); None means
                no padding.
            position_ids: (B, T) positions of the new tokens; default from the attention mask.
            cache: a KVCache to read and extend, or None for a full forward.

        Returns:
            hidden (B, T, D).
        """
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.bool, device=input_ids.device)
        if attention_mask.shape != (b, past + t):
            shape = tuple(attention_mask.shape)
            raise ValueError(f"attention_mask must be (B, cached + T) = {(b, past + t)}, got {shape}")
        # A shape check (no device sync): positions never exceed the sequence length, padding included.
        if past + t > self.config.max_seq_len:
            raise ValueError(f"{past + t} positions exceed max_seq_len {self.config.max_seq_len}")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, past:]
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(position_ids))  # (B, T, D)
        mask = attention_mask_4d(attention_mask, t)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i)
        if cache is not None:
            cache.advance(t)
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., V) logits from hidden (..., D)."""
        return hidden @ self.lm_head_weight.T
