"""What PPOModule checks and builds before its first iteration: its settings, and its models from the SFT and
reward-model checkpoints (policy, frozen reference, frozen reward model or another reward source, critic)."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from rlhf_lightning.data.tokenizer import Tokenizer, check_same_tokenizer
from rlhf_lightning.models.backbone import disable_dropout, freeze, load_sft_backbone
from rlhf_lightning.models.heads import ValueHead
from rlhf_lightning.models.lora import AdaptersDisabled, LoRABackbone, LoRAConfig, require_peft
from rlhf_lightning.models.reward import RewardModel, load_reward_model
from rlhf_lightning.models.sampling import SamplingConfig, sample_prompt_responses
from rlhf_lightning.modules.ppo_eval import EvalConfig
from rlhf_lightning.rl import RewardConfig

ScoreFn = Callable[[list[str], list[str]], Any]
KL_KEYS = ("coef", "controller", "target", "horizon", "floor", "anneal_iterations", "schedule", "estimator", "metric")
#: PPOModule's flat keys of earlier versions and where each setting lives now (the CLI names the new key).
RENAMED: dict[str, str] = {
    **{f"kl_{k}": f"kl.{k}" for k in KL_KEYS},
    "kl_min": "kl.min_coef",
    "kl_max": "kl.max_coef",
    "kl_in_loss": "kl.placement",
    "score_clip": "rewards.clip",
    "score_norm": "rewards.norm",
    "length_debias": "rewards.debias",
    "missing_eos_score": "rewards.missing_eos_score",
    "ensemble_k": "rewards.ensemble_k",
    "reward_norm_samples": "rewards.norm_samples",
    **{f"eval_{k}": f"eval.{k}" for k in ("every", "table_rows", "groups", "samples_per_prompt", "seed")},
}


def config_arg(cls: type, value: Any) -> Any:
    """A config dataclass argument as an instance: a dict (hyperparameters saved under LightningCLI) is converted."""
    return cls(**value) if isinstance(value, dict) else value


def import_score_fn(path: str) -> ScoreFn:
    """The callable named ``package.module:function`` (or ``package.module.function``)."""
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward_source {path!r}: expected 'model', 'gold' or 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward_source {path!r} cannot be imported: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward_source {path!r} is not callable")
    return fn


def check_config(h: Any, sampling: SamplingConfig, lora: LoRAConfig | None, eval_config: EvalConfig) -> None:
    """Mistakes that would otherwise surface minutes into a run (``h``: PPOModule's hyperparameters)."""
    sizes = {name: getattr(h, name) for name in ("iterations", "rollout_batch", "minibatch_size", "ppo_epochs")}
    sizes.update({"eval.every": eval_config.every, "eval.samples_per_prompt": eval_config.samples_per_prompt})
    for name, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if h.rollout_batch % h.minibatch_size:
        raise ValueError(f"minibatch_size ({h.minibatch_size}) must divide rollout_batch ({h.rollout_batch})")
    # The rollout's log-probs (and the update's) are those of the full softmax(logits / T): sampling from another
    # distribution would make the first ratio differ from 1 and the k1 KL biased.
    s = sampling
    if s.temperature == 0:
        raise ValueError("sampling.temperature 0 (greedy) cannot be used by PPO: its log-probs are those of "
                         "softmax(logits / T), not of the greedy choice; use a temperature > 0")  # fmt: skip
    for name, value, off in (("top_k", s.top_k, 0), ("top_p", s.top_p, 1.0)):
        if value != off:
            raise ValueError(
                f"sampling.{name} {value} cannot be used by PPO: its log-probs are those of the whole "
                f"temperature-scaled distribution, not the truncated one; set {name}: {off}"
            )
    if h.shard and h.lora is not None:
        raise ValueError("shard and lora together are not supported yet (sharding a peft-wrapped policy is untested)")
    if h.critic not in ("separate", "shared"):
        raise ValueError(f"critic must be 'separate' or 'shared', got {h.critic!r}")
    if lora is not None:
        require_peft()  # at configuration time, not minutes later in configure_model
    paths = {"sft_checkpoint": h.sft_checkpoint}
    if h.reward_source == "model":
        if not h.reward_checkpoint:
            raise ValueError("reward_source 'model' needs reward_checkpoint")
        paths["reward_checkpoint"] = h.reward_checkpoint
    for name, path in paths.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name} {path} does not exist (run that phase first, or fix the path)")


class PPOModels(NamedTuple):
    """PPO's models: the policy, the frozen reference (a module, or the LoRA policy with its adapters off), the frozen
    reward model (None for another reward source), the critic's own trunk (None for a shared critic or none), the
    value head (None when the advantage estimator needs no critic), and the callable reward source (None unless
    ``reward_source`` names one)."""

    policy: nn.Module
    ref_policy: nn.Module | AdaptersDisabled
    reward_model: RewardModel | None
    critic_backbone: nn.Module | None
    value_head: ValueHead | None
    score_fn: ScoreFn | None


def build_models(
    h: Any, sampling: SamplingConfig, lora: LoRAConfig | None, rewards: RewardConfig, dm: Any, tokenizer: Tokenizer,
    needs_critic: bool = True,
) -> PPOModels:  # fmt: skip
    """PPO's models from the checkpoints that ``h`` (PPOModule's hyperparameters) names; ``dm`` is the prompt data
    module and ``tokenizer`` its tokenizer, which must be the checkpoints' own. Without ``needs_critic`` (a
    critic-free advantage estimator) no critic is built: no value head, no critic trunk."""
    policy, sft_tokenizer = load_sft_backbone(h.sft_checkpoint)
    check_same_tokenizer(
        sft_tokenizer, tokenizer,
        f"the data module's tokenizer differs from the one of {h.sft_checkpoint}; point data.tokenizer_path at the "
        "SFT checkpoint's folder",
    )  # fmt: skip
    budget = dm.hparams.max_prompt_len + sampling.max_new_tokens
    max_len = getattr(getattr(policy, "config", None), "max_seq_len", None)
    if max_len is not None and budget > max_len:
        raise ValueError(
            f"max_prompt_len + sampling.max_new_tokens = {budget} exceeds the policy's max_seq_len {max_len}"
        )
    disable_dropout(policy)  # before the copies below: the reference and a critic copied from it inherit it
    ref_policy = freeze(copy.deepcopy(policy)) if lora is None else None
    trunk, reward_model, score_fn = policy, None, None
    if h.reward_source == "model":
        reward_model, rm_tokenizer = load_reward_model(h.reward_checkpoint)
        check_same_tokenizer(
            rm_tokenizer, tokenizer,
            f"the tokenizers of {h.sft_checkpoint} and {h.reward_checkpoint} differ: the reward model must read text "
            "exactly as the policy writes it",
        )  # fmt: skip
        if rewards.norm_samples:
            # The SFT policy, before any adapter or training: what the first rollout samples from.
            batch = sample_prompt_responses(policy, dm, tokenizer, rewards.norm_samples, sampling, h.seed)
            reward_model.measure_normalisation(*batch)
        reward_model = freeze(reward_model)
        trunk = reward_model.backbones[0]
    elif h.reward_source == "gold":
        if dm.judge is None:
            raise ValueError("reward_source 'gold' needs the world's gold judge (data_dir holds no world)")
    else:
        score_fn = import_score_fn(h.reward_source)
    value_head = ValueHead(policy.hidden_size) if needs_critic else None
    critic_backbone = None
    if needs_critic and h.critic == "separate":
        critic_backbone = copy.deepcopy(trunk)
        critic_backbone.requires_grad_(True)
        disable_dropout(critic_backbone)
        if reward_model is not None:
            init_value_head_from_reward(value_head, reward_model)
    if lora is not None:
        # Wrapped last: peft changes the backbone in place, and a critic copied from it must not carry adapters.
        policy = LoRABackbone(policy, lora, seed=h.seed)
        disable_dropout(policy)  # again: peft adds its own dropout (lora.dropout) on the adapters' input
        ref_policy = AdaptersDisabled(policy)
    return PPOModels(policy, ref_policy, reward_model, critic_backbone, value_head, score_fn)


@torch.no_grad()
def init_value_head_from_reward(value_head: ValueHead, reward_model: RewardModel) -> None:
    """The value head starts as the reward model's head on its normalised scale, so the critic's first estimates
    are the reward model's opinion of each prefix rather than 0: for an ensemble of heads on one trunk, the
    members' mean (exactly the ensemble's mean score; the conservative ``ensemble_k`` term is not linear and is
    left to the critic to learn); for an ensemble of backbones, member 0's, whose trunk the critic copies
    (see :meth:`RewardModel.normalised_mean_head`)."""
    weight, bias = reward_model.normalised_mean_head()
    value_head.proj.weight.copy_(weight)
    value_head.proj.bias.copy_(bias)
