"""Export a checkpoint as a Hugging Face model directory: ``rlhf export CHECKPOINT --out DIR``.

* A policy checkpoint (phase "sft", "ppo" or "dpo") becomes a causal LM that
  ``AutoModelForCausalLM.from_pretrained(DIR)`` loads and that gives the checkpoint's logits, hence its greedy tokens. A
  Hugging Face backbone is saved as it is; a TinyGPT is converted to the equivalent ``GPT2LMHeadModel``: both are
  pre-norm transformers with learned positions, LayerNorm (eps 1e-5) with bias, biased linear layers, exact GELU in a 4x
  MLP, attention scaled by 1/sqrt(head_dim) and an LM head tied to the token embedding. TinyGPT's ``qkv`` (q, k, v in
  that order, heads contiguous) is GPT-2's fused ``c_attn``; GPT-2's ``Conv1D`` stores weights as (in, out), so every
  linear weight is transposed. A LoRA policy (PPO with ``lora``) is exported with its adapters merged into the weights
  (peft's ``merge_and_unload``): a plain model of its backbone's kind, checked on a probe against the adapted one.
* A reward checkpoint (phase "reward") becomes a sequence-classification model (``AutoModelForSequenceClassification``)
  with one label per ensemble member: ``logits[:, k]`` is member k's *raw* score, ``RewardModel.raw_members``, of the
  last non-pad token of a right-padded sequence (``config.pad_token_id`` is the tokenizer's pad). The normalisation
  statistics are in the config (``rlhf_norm_mean``, ``rlhf_norm_std``): ``(logits - mean) / std`` are the members'
  normalised scores and their mean is ``RewardModel.score(...).mean``. Hugging Face's score layer has no bias, so the
  heads' biases are folded into the final LayerNorm's bias (which only the score layer reads in that model): the
  exported backbone's last hidden states differ from the policy's, its scores do not.

The tokenizer embedded in the checkpoint is saved beside the model (``tokenizer.json`` and ``tokenizer_config.json``
with its EOS and pad tokens), so ``AutoTokenizer.from_pretrained(DIR)`` loads it. The directory is built in a
temporary sibling and renamed into place, so ``DIR`` is never half-written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_lightning.checkpoint import RLHF_KEY, load_checkpoint
from rlhf_lightning.data.tokenizer import Tokenizer
from rlhf_lightning.errors import ArgumentParser, UsageError
from rlhf_lightning.models.backbone import backbone_from_spec
from rlhf_lightning.models.hf import HFCausalLM
from rlhf_lightning.models.lora import LoRABackbone
from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.models.tinygpt import TinyGPT

#: The state-dict prefix of the policy backbone in each policy phase's checkpoint.
POLICY_PREFIXES = {"sft": "model.", "ppo": "policy.", "dpo": "policy."}
REWARD_PREFIX = "reward_model."
#: The largest difference (relative to the largest value, or absolute below 1) the exported model's logits may show
#: on a probe input before the export is refused. The conversion is exact in practice (0.0 on CPU); tanh GELU in
#: place of exact GELU alone shows ~3e-4.
CHECK_TOL = 1e-5
# Names a transformers base model gives its final norm (GPT-2 and friends, Llama-likes, OPT, GPT-NeoX).
_FINAL_NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "final_layernorm")


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Writes the checkpoint at ``path`` as a Hugging Face model directory ``out`` (safetensors + tokenizer).

    Args:
        path: an rlhf-lightning checkpoint of phase "sft", "ppo", "dpo" (a causal LM) or "reward" (sequence
            classification).
        out: the directory to create.
        force: replace ``out`` when it exists and is not an empty directory.

    Returns:
        ``out`` as a Path.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        FileExistsError: ``out`` exists, is not an empty directory, and ``force`` is False.
        ValueError: a corrupt checkpoint, an unsupported phase, weights that do not fit the recorded model, or a
            reward model that cannot be expressed as one sequence-classification model.
    """
    out = check_output_dir(out, force)
    ckpt = load_checkpoint(path)
    meta = ckpt[RLHF_KEY]
    phase = meta.get("phase")
    if phase not in (*POLICY_PREFIXES, "reward"):
        supported = "'sft', 'ppo', 'dpo' and 'reward'"
        raise ValueError(f"checkpoint {path} is of phase {phase!r}; export supports {supported}")
    state = ckpt.get("state_dict") or {}
    try:
        tokenizer = Tokenizer.from_json_str(meta["tokenizer"], meta["eos_token"], meta["pad_token"])
        if phase == "reward":
            reward_model = RewardModel.from_spec(meta["reward_model"])
        else:
            backbone = backbone_from_spec(meta["backbone"])
    except KeyError as err:
        raise ValueError(f"checkpoint {path} lacks the {err} entry of its {RLHF_KEY!r} record") from err
    if phase == "reward":
        _load_weights(reward_model, state, REWARD_PREFIX, path)
        model = reward_to_hf(reward_model.eval(), tokenizer)
    else:
        _load_weights(backbone, state, POLICY_PREFIXES[phase], path)
        model = policy_to_hf(backbone.eval(), tokenizer)
    model.config.rlhf_phase = phase
    write_hf_directory(model, tokenizer, out, padding_side="right" if phase == "reward" else "left")
    return out


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    """``out`` as a Path, refused (FileExistsError) when it exists, is not an empty directory, and not ``force``."""
    out = Path(out)
    if out.exists() and not force and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; pass --force (force=True) to replace it")
    return out


@torch.no_grad()
def policy_to_hf(backbone: nn.Module, tokenizer: Tokenizer) -> nn.Module:
    """A transformers causal LM with the logits of ``backbone`` (a TinyGPT, an HFCausalLM, or either with LoRA
    adapters) and the tokenizer's EOS and pad ids in its config and generation config."""
    if isinstance(backbone, LoRABackbone):
        merged = backbone.merged().eval()
        ids = _probe(merged)
        _check_close(backbone(ids) @ backbone.lm_head_weight.T, merged(ids) @ merged.lm_head_weight.T,
                     "merged LoRA logits")  # fmt: skip
        backbone = merged
    if isinstance(backbone, HFCausalLM):
        model = backbone.model
    elif isinstance(backbone, TinyGPT):
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel(_gpt2_config(backbone, tokenizer))
        _load_converted(model, _tinygpt_to_gpt2(backbone), allowed_missing={"lm_head.weight"})
        if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
            raise ValueError("the converted GPT-2's LM head is not tied to its token embedding")
        ids = _probe(backbone)
        _check_close(backbone.logits(backbone(ids)), model(ids).logits, "policy logits")
    else:
        raise ValueError(f"cannot export a {type(backbone).__name__} backbone")
    _set_special_ids(model, tokenizer)
    return model.eval()


@torch.no_grad()
def reward_to_hf(reward_model: RewardModel, tokenizer: Tokenizer) -> nn.Module:
    """A transformers sequence-classification model whose logits (B, K) are the K members' raw scores of right-padded
    sequences (pooled at the last token that is not the pad token)."""
    if reward_model.mode == "backbones" and reward_model.n_members > 1:
        raise ValueError(
            "a reward ensemble with one backbone per member ('backbones' mode) is not one sequence-classification "
            "model; export supports single reward models and 'heads' ensembles"
        )
    if tokenizer.pad_id == tokenizer.eos_id:
        raise ValueError(
            f"the tokenizer's pad token is its EOS token {tokenizer.eos_token!r}: a Hugging Face sequence classifier "
            "pools the last token that is not the pad token, which would skip the EOS the reward model scores"
        )
    if reward_model.pooling != "last":
        raise ValueError(
            f"a reward model with pooling {reward_model.pooling!r} is not a sequence-classification model (those read "
            "the last token); train it with model.init_args.pooling=last to export it"
        )
    backbone = reward_model.backbones[0]
    n_labels = reward_model.n_members
    if isinstance(backbone, TinyGPT):
        from transformers import GPT2ForSequenceClassification

        config = _gpt2_config(backbone, tokenizer)
        config.num_labels = n_labels
        model = GPT2ForSequenceClassification(config)
        _load_converted(model, _tinygpt_to_gpt2(backbone), allowed_missing={"score.weight"})
    elif isinstance(backbone, HFCausalLM):
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(backbone.model.config)
        config.num_labels = n_labels
        model = AutoModelForSequenceClassification.from_config(config)
        model.base_model.load_state_dict(backbone.model.base_model.state_dict())
    else:
        raise ValueError(f"cannot export a reward model on a {type(backbone).__name__} backbone")
    _set_special_ids(model, tokenizer)
    weight = torch.cat([head.proj.weight for head in reward_model.heads])  # (K, D)
    bias = torch.cat([head.proj.bias for head in reward_model.heads])  # (K,)
    model.score.weight.copy_(weight)
    _fold_bias(model.base_model, weight, bias)
    model.config.rlhf_norm_mean = reward_model.norm_mean.tolist()
    model.config.rlhf_norm_std = reward_model.norm_std.tolist()
    model.eval()
    ids = _probe(backbone, avoid=tokenizer.pad_id)
    _check_close(reward_model.raw_members(ids, torch.ones_like(ids)), model(ids).logits, "reward scores")
    return model


def _load_weights(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, path: str | os.PathLike) -> None:
    """Loads the entries of ``state`` under ``prefix`` into ``module``, strictly."""
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path}: its weights do not fit the model it records: {err}") from err


def _gpt2_config(backbone: TinyGPT, tokenizer: Tokenizer) -> Any:
    """The GPT2Config of the architecture equivalent to ``backbone``."""
    from transformers import GPT2Config

    c = backbone.config
    return GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=4 * c.d_model, activation_function="gelu", layer_norm_epsilon=backbone.ln_f.eps,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    )  # fmt: skip


def _tinygpt_to_gpt2(backbone: TinyGPT) -> dict[str, torch.Tensor]:
    """TinyGPT's weights under the names of GPT-2's heads' models (base model ``transformer``), Conv1D weights
    transposed to (in, out)."""
    prefix = "transformer."
    linear = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}
    norms = {"ln1": "ln_1", "ln2": "ln_2"}
    out = {f"{prefix}wte.weight": backbone.tok_emb.weight, f"{prefix}wpe.weight": backbone.pos_emb.weight}
    out |= {f"{prefix}ln_f.{p}": getattr(backbone.ln_f, p) for p in ("weight", "bias")}
    for i, block in enumerate(backbone.blocks):
        modules = dict(block.named_modules())
        for ours, theirs in linear.items():
            out[f"{prefix}h.{i}.{theirs}.weight"] = modules[ours].weight.T
            out[f"{prefix}h.{i}.{theirs}.bias"] = modules[ours].bias
        for ours, theirs in norms.items():
            out |= {f"{prefix}h.{i}.{theirs}.{p}": getattr(modules[ours], p) for p in ("weight", "bias")}
    return {k: v.detach().contiguous() for k, v in out.items()}


def _load_converted(model: nn.Module, weights: dict[str, torch.Tensor], allowed_missing: set[str]) -> None:
    """Loads converted weights, requiring that they cover every parameter but ``allowed_missing`` and nothing else."""
    result = model.load_state_dict(weights, strict=False)
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        unexpected = sorted(result.unexpected_keys)
        raise ValueError(f"TinyGPT -> {type(model).__name__}: missing {sorted(missing)}, unexpected {unexpected}")


def _fold_bias(base_model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Moves the score biases (K,) into the final norm's bias beta: with W beta' = W beta + b, the bias-free score
    layer gives W h' = W h + b. beta' = beta + W^T (W W^T)^-1 b, the smallest such change."""
    if not bias.any():
        return
    norm = next((getattr(base_model, n) for n in _FINAL_NORM_NAMES if hasattr(base_model, n)), None)
    if getattr(norm, "bias", None) is None:
        raise ValueError(
            f"{type(base_model).__name__} has no final norm with a bias to carry the reward head's bias; "
            "export supports reward models on backbones with a biased final LayerNorm (TinyGPT, GPT-2)"
        )
    w, b = weight.double(), bias.double()
    gram = w @ w.T  # (K, K)
    if torch.linalg.matrix_rank(gram) < len(b):
        raise ValueError("the reward heads' weights are linearly dependent; their biases cannot be folded")
    norm.bias.add_((w.T @ torch.linalg.solve(gram, b)).to(norm.bias.dtype))


def _set_special_ids(model: nn.Module, tokenizer: Tokenizer) -> None:
    """The tokenizer's EOS and pad ids in the model's config and generation config."""
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.eos_token_id, config.pad_token_id = tokenizer.eos_id, tokenizer.pad_id


def _probe(backbone: nn.Module, avoid: int | None = None) -> torch.Tensor:
    """(2, T) deterministic token ids for checking a conversion (T <= 8, within the position table)."""
    n_positions = getattr(getattr(backbone, "config", None), "max_seq_len", 8)
    vocab = backbone.lm_head_weight.shape[0]
    ids = torch.randint(0, vocab, (2, min(8, n_positions)), generator=torch.Generator().manual_seed(0))
    if avoid is not None:
        ids = torch.where(ids == avoid, (ids + 1) % vocab, ids)
    return ids


def _check_close(expected: torch.Tensor, actual: torch.Tensor, what: str) -> None:
    """Refuses an export whose model disagrees with the checkpoint's."""
    diff = (expected.float() - actual.float()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if diff > CHECK_TOL * scale:
        raise ValueError(
            f"the exported model's {what} differ from the checkpoint's by {diff:.3g} (> {CHECK_TOL * scale:.3g})"
        )


def write_hf_directory(model: nn.Module, tokenizer: Tokenizer, out: Path, padding_side: str) -> None:
    """Saves the model (safetensors) and the tokenizer into a temporary sibling of ``out``, then renames it into
    place; an existing ``out`` is moved aside first and deleted after the rename."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer.to_json_str()),
        eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, padding_side=padding_side,
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = tmp.with_suffix(".old") if out.exists() or out.is_symlink() else None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        hf_tokenizer.save_pretrained(tmp)
        if old is not None:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)  # put the previous export back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def export_main(argv: list[str]) -> None:
    """``rlhf export CHECKPOINT --out DIR [--force]``: prints what was written."""
    parser = ArgumentParser(
        prog="rlhf export", description="Export a checkpoint as a Hugging Face model directory (safetensors)."
    )
    parser.add_argument("checkpoint", type=Path, help="an sft, ppo, dpo or reward checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="the model directory to create")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise UsageError(f"export: {err}") from err  # rlhf's one line, naming the command
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    print(json.dumps({"out": str(out), "phase": config["rlhf_phase"], "architectures": config["architectures"]}))
