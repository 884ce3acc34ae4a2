"""Adapter that presents a Hugging Face causal LM with the policy-backbone interface of TinyGPT.

Loaded from a local directory only (``local_files_only=True``): the package never reaches a model hub. The adapter
exposes the base model's final hidden states (B, T, D), the output-embedding weight (V, D) and a KV cache, so the
sampler, the heads and the fused kernels treat it exactly like TinyGPT.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from rlhf_lightning.models.tinygpt import positions_from_mask


class HFCausalLM(nn.Module):
    """A transformers ``*ForCausalLM`` model behind the backbone interface.

    Only models whose logits are exactly ``hidden @ W.T`` are accepted (no output bias, no logit soft-capping),
    because the fused kernels start from the hidden states and that weight.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(model).__name__} has no output embedding; a causal LM with an LM head is needed")
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"{type(model).__name__}'s LM head has a bias; logits must be hidden @ W.T")
        if getattr(model.config, "final_logit_softcapping", None):
            raise ValueError(f"{type(model).__name__} soft-caps its logits; logits must be hidden @ W.T")
        # transformers renamed `past_key_values` to `cache` (5.x); pass the KV cache under the name this version uses.
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> HFCausalLM:
        """Loads ``AutoModelForCausalLM`` from a local directory (never from a hub)."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a local Hugging Face model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        return cls(model)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head_weight.shape[0])

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, D) output projection."""
        return self.model.get_output_embeddings().weight

    def new_cache(self, batch: int, max_len: int):
        """A transformers DynamicCache (it grows as needed, so ``batch`` and ``max_len`` are not preallocated)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, D) of the new tokens; see :meth:`TinyGPT.forward` for the arguments.

        Without ``position_ids`` the positions come from the attention mask, as in TinyGPT: transformers would
        number every column from 0 (GPT-2), so a left-padded row's real tokens would sit at shifted positions and
        score differently from the sampler, which passes mask-derived positions (PPO's ratio would not start at 1).
        """
        if position_ids is None and attention_mask is not None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = positions_from_mask(attention_mask)[:, past:]
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=None if attention_mask is None else attention_mask.long(),
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_arg: cache},
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., V) logits from hidden (..., D)."""
        return hidden @ self.lm_head_weight.T
