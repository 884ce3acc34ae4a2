"""Building a policy backbone from a config, and rebuilding it from what a checkpoint recorded.

A checkpoint records ``backbone_spec(model)``: the kind ("tinygpt", "hf", or "lora": the spec of the adapted backbone
and the adapters' config) and the full model config, so the weights in its state dict can be loaded into a freshly
built model without any file besides the checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from rlhf_lightning.checkpoint import RLHF_KEY, load_checkpoint
from rlhf_lightning.data.tokenizer import Tokenizer, tokenizer_from_meta
from rlhf_lightning.models.hf import HFCausalLM
from rlhf_lightning.models.lora import LoRABackbone, LoRAConfig
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT


def build_backbone(config: GPTConfig, vocab_size: int, hf_model_path: str | None = None) -> nn.Module:
    """A TinyGPT of ``config`` with the tokenizer's vocabulary, or the local Hugging Face model at ``hf_model_path``.

    Raises:
        FileNotFoundError: ``hf_model_path`` is not a directory holding a config.json.
        ValueError: config.vocab_size is set and differs from the tokenizer's, or the HF model's vocabulary is
            smaller than the tokenizer's.
    """
    if hf_model_path:
        if not (Path(hf_model_path) / "config.json").is_file():
            raise FileNotFoundError(
                f"hf_model_path {hf_model_path}: not a local Hugging Face model directory (no config.json there); "
                "`rlhf hf-tiny --out DIR` writes a tiny one"
            )
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode: without train() the model's
        # dropout would stay off during training, unlike a freshly built TinyGPT's.
        model = HFCausalLM.from_pretrained(Path(hf_model_path)).train()
        if model.vocab_size < vocab_size:
            raise ValueError(
                f"hf_model_path {hf_model_path}: the model has {model.vocab_size} token embeddings but the tokenizer "
                f"has {vocab_size} tokens"
            )
        return model
    if config.vocab_size and config.vocab_size != vocab_size:
        raise ValueError(
            f"model vocab_size {config.vocab_size} != tokenizer vocabulary size {vocab_size} (leave it 0 to follow "
            "the tokenizer)"
        )
    return TinyGPT(replace(config, vocab_size=vocab_size))


def backbone_spec(model: nn.Module) -> dict:
    """What a checkpoint needs to rebuild ``model`` before loading its weights."""
    if isinstance(model, TinyGPT):
        return {"kind": "tinygpt", "config": model.config.to_dict()}
    if isinstance(model, HFCausalLM):
        return {"kind": "hf", "config": model.model.config.to_dict()}
    if isinstance(model, LoRABackbone):
        return {"kind": "lora", "base": backbone_spec(model.base), "lora": model.config.to_dict()}
    raise TypeError(f"unsupported backbone type {type(model).__name__}")


def backbone_from_spec(spec: dict) -> nn.Module:
    """A freshly initialised backbone of the recorded shape (its weights come from the checkpoint's state dict)."""
    if spec.get("kind") == "tinygpt":
        return TinyGPT(GPTConfig(**spec["config"]))
    if spec.get("kind") == "hf":
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(spec["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        return HFCausalLM(AutoModelForCausalLM.from_config(config))
    if spec.get("kind") == "lora":
        return LoRABackbone(backbone_from_spec(spec["base"]), LoRAConfig(**spec["lora"]))
    raise ValueError(f"unknown backbone kind {spec.get('kind')!r} in checkpoint")


def freeze(model: nn.Module) -> nn.Module:
    """``model`` without gradients, in eval mode (a frozen reference or reward model)."""
    model.requires_grad_(False)
    return model.eval()


def disable_dropout(model: nn.Module) -> None:
    """Sets every dropout probability of ``model`` to 0.

    PPO's ratio compares the update's log-probs with the rollout's: with dropout on in the update (a Hugging Face
    GPT-2 ships with 0.1), the first ratio is not 1 and the clipping acts on noise; it also makes a resumed run differ
    from an uninterrupted one.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_sft_backbone(path: str | Path) -> tuple[nn.Module, Tokenizer]:
    """(backbone with the SFT weights, its tokenizer) from an SFT checkpoint."""
    ckpt = load_checkpoint(path, phase="sft")
    meta = ckpt[RLHF_KEY]
    backbone = backbone_from_spec(meta["backbone"])
    backbone.load_state_dict({k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    return backbone, tokenizer_from_meta(meta)
