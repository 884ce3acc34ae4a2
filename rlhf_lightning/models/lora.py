"""LoRA adapters (peft) on a policy backbone, with the un-adapted weights as the PPO reference.

``LoRABackbone`` wraps a TinyGPT or HFCausalLM that already holds the SFT weights: peft freezes them and adds low-rank
adapters whose B matrices start at zero, so at the start the adapted policy *is* the SFT policy. The reference policy
is the same model with its adapters switched off (:class:`AdaptersDisabled`), not a second copy of the weights and
not the base model the SFT run started from: comparing against the pre-SFT base would charge the policy a KL for
everything SFT taught it.

peft is an optional dependency (the ``lora`` extra), imported only when a LoRA backbone is built.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rlhf_lightning.models.hf import HFCausalLM
from rlhf_lightning.models.tinygpt import TinyGPT

#: TinyGPT's linear layers: attention's fused q/k/v and output projection, the MLP's two layers.
TINYGPT_TARGETS = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")


@dataclass
class LoRAConfig:
    """LoRA adapters on a policy backbone.

    Args:
        r: rank of the adapters.
        alpha: scaling numerator: the update is ``(alpha / r) * B @ A``.
        dropout: dropout on the adapters' input (PPO sets it to 0 like every dropout of its policy: with dropout on,
            its first ratio would not be 1).
        target_modules: names (suffixes) of the linear layers to adapt; None: every linear layer of a TinyGPT block,
            or peft's default for the Hugging Face model's type (GPT-2: ``c_attn``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r must be > 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("lora.target_modules must name at least one module (or be null for the default)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_peft():
    """The peft module, or an ImportError naming the extra that installs it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "LoRA (the PPO module's `lora` argument) needs peft: pip install 'rlhf-lightning[lora]' (or peft>=0.13)"
        ) from err
    return peft


def default_target_modules(backbone: nn.Module) -> tuple[str, ...]:
    """The layers adapted when ``LoRAConfig.target_modules`` is None."""
    if isinstance(backbone, TinyGPT):
        return TINYGPT_TARGETS
    if isinstance(backbone, HFCausalLM):
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        model_type = backbone.model.config.model_type
        if model_type not in defaults:
            raise ValueError(f"peft has no default LoRA target modules for model type {model_type!r}; set "
                             "lora.target_modules")  # fmt: skip
        return tuple(defaults[model_type])
    raise TypeError(f"LoRA supports TinyGPT and HFCausalLM backbones, not {type(backbone).__name__}")


class LoRABackbone(nn.Module):
    """A backbone with peft LoRA adapters; its own weights frozen, only the adapters train.

    Offers the backbone interface (``forward``, ``lm_head_weight``, ``new_cache``, ``hidden_size``), so the sampler,
    the heads and the fused kernels use it like the backbone itself. The LM head is never adapted, so logits stay
    ``hidden @ lm_head_weight.T``.

    Args:
        backbone: a TinyGPT or HFCausalLM holding the weights the adapters start from (the SFT policy); it is
            modified in place (peft swaps its target layers for LoRA layers).
        config: the adapters.
        seed: seed of the A matrices' random initialisation (B starts at zero), so that a run's start depends on its
            seed only, not on what the process drew before.
    """

    def __init__(self, backbone: nn.Module, config: LoRAConfig, seed: int = 0):
        super().__init__()
        peft = require_peft()
        targets = config.target_modules or default_target_modules(backbone)
        lora = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=list(targets), bias="none")  # fmt: skip
        self.config = LoRAConfig(config.r, config.alpha, config.dropout, tuple(targets))
        # The adapters may be created on the current GPU (Lightning's configure_model device context): fork its RNG
        # too (only its: forking every visible GPU would open a context on each), so that neither the CPU's nor this
        # GPU's global stream moves.
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            self.peft = peft.get_peft_model(backbone, lora)

    @property
    def base(self) -> nn.Module:
        """The wrapped backbone (with its LoRA layers in place)."""
        return self.peft.get_base_model()

    @property
    def hidden_size(self) -> int:
        return self.base.hidden_size

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, D) output projection (not adapted)."""
        return self.base.lm_head_weight

    def new_cache(self, batch: int, max_len: int):
        return self.base.new_cache(batch, max_len)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, D) with the adapters applied; see :meth:`TinyGPT.forward` for the arguments."""
        return self.base(input_ids, attention_mask, position_ids, cache)

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Within the block the model computes with its frozen weights only."""
        with self.peft.disable_adapter():
            yield

    def merged(self) -> nn.Module:
        """A copy of the backbone with the adapters folded into its weights (this model is left as it is)."""
        return copy.deepcopy(self.peft).merge_and_unload()


class AdaptersDisabled:
    """The reference policy of a LoRA run: ``policy`` with its adapters switched off, i.e. the SFT weights.

    A view, not a module: it holds no weights of its own (so nothing is copied, saved or moved twice) and answers
    the backbone interface by running ``policy`` inside :meth:`LoRABackbone.adapters_disabled`.
    """

    def __init__(self, policy: LoRABackbone):
        self.policy = policy

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        with self.policy.adapters_disabled():
            return self.policy(*args, **kwargs)

    @property
    def training(self) -> bool:
        return self.policy.training

    def train(self, mode: bool = True) -> AdaptersDisabled:
        self.policy.train(mode)
        return self

    def eval(self) -> AdaptersDisabled:
        return self.train(False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.policy.lm_head_weight

    def new_cache(self, batch: int, max_len: int):
        return self.policy.new_cache(batch, max_len)
