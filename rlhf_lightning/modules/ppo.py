"""Phase 3: PPO against a reward, with a per-token KL penalty towards the frozen SFT policy.

One ``training_step`` is one PPO iteration (manual optimisation):

1. rollout: prompts of this iteration -> responses sampled with the KV cache (no grad, the training temperature);
2. scoring, in batched no-grad passes: the sampling policy's log-probs ("old"), the reference's, the critic's values,
   the sequence scores (reward model, its ensemble's conservative aggregate, the world's gold judge, or a callable);
3. rewards: ``-beta * KL_t`` per token (or the KL in the loss instead, GRPO style) plus the clipped score at the last
   real token and a penalty for responses without EOS; GAE advantages and returns; advantage whitening;
4. ``ppo_epochs`` passes of shuffled minibatches: the fused clipped-ratio loss from the logits (rlhf_kernels, with the
   entropy bonus) + the clipped value loss -> ``manual_backward`` -> per-model gradient clipping -> optimizer and
   scheduler step; optionally stop the epochs early once the approximate KL to the rollout policy exceeds a bound;
5. the KL controller's update from the measured (all-reduced) KL, and the iteration's metrics.

Everything an iteration draws (prompts, sampling noise, minibatch order) comes from generators seeded by (seed,
iteration, rank), so a run resumed from a checkpoint repeats exactly what an uninterrupted run does; the checkpoint
holds the trainable models, the optimizer and scheduler, the KL controller and the running score statistics, not the
frozen reference and reward model (they are reloaded from their own checkpoints).

With ``lora`` set, the policy is the SFT backbone with peft LoRA adapters (only they train) and the reference is that
same model with its adapters disabled: the SFT weights, without a second copy of them.
"""

from __future__ import annotations

import copy
import importlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn

import rlhf_kernels
from rlhf_lightning.data.collate import pad_sequences
from rlhf_lightning.metrics import distinct_n, diversity_metrics, duplicate_rate, pearson, win_rate
from rlhf_lightning.models.backbone import backbone_from_spec, backbone_spec, disable_dropout, freeze
from rlhf_lightning.models.heads import ValueHead
from rlhf_lightning.models.lora import AdaptersDisabled, LoRABackbone, LoRAConfig, require_peft
from rlhf_lightning.models.reward import load_reward_model
from rlhf_lightning.models.sampling import Generation, SamplingConfig, eval_mode, generate
from rlhf_lightning.modules.base import PhaseModule
from rlhf_lightning.modules.common import (
    EvalSamples,
    comparison_table,
    on_every_rank,
    response_hidden,
    response_token_logprobs,
    sample_eval,
    shard_backbone,
    unflatten_masked,
    with_lr_schedule,
)
from rlhf_lightning.modules.reward import join_left_right, load_sft_backbone, sample_prompt_responses
from rlhf_lightning.rl import (
    KLConfig,
    RewardConfig,
    Rollout,
    RolloutStats,
    RunningMoments,
    ScoredBatch,
    explained_variance,
    policy_loss,
    shape_rollout,
    value_loss,
)

ScoreFn = Callable[[list[str], list[str]], Any]
PPO_STATE_KEY = "ppo_state"
#: Prefixes of the frozen models in the state dict: reloaded from their own checkpoints, never saved again.
FROZEN_PREFIXES = ("ref_policy.", "reward_model.")


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


def _iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return (seed * 1_000_003 + iteration) * 1009 + rank


@dataclass
class EvalConfig:
    """Evaluation on the held-out prompts, against the SFT policy.

    every: iterations between evaluations (and the last iteration).
    table_rows: rows of the TensorBoard text table (SFT response beside the current one).
    groups, samples_per_prompt: per-input diversity is measured on this many held-out prompts with this many samples
        each (collapse shows first within one prompt's samples); 0 groups switches it off.
    seed: seed of the evaluation samples (the same for the SFT policy and the current one).
    """

    every: int = 10
    table_rows: int = 8
    groups: int = 16
    samples_per_prompt: int = 4
    seed: int = 1234


KL_KEYS = ("coef", "controller", "target", "horizon", "floor", "anneal_iterations", "schedule", "estimator", "metric")


torch.serialization.add_safe_globals([EvalConfig])  # in the checkpoints' hyperparameters (see modules/base.py)


class PPOModule(PhaseModule):
    """PPO with a KL penalty against the frozen SFT policy.

    Args:
        sft_checkpoint: the SFT phase's checkpoint: the policy's start and the frozen reference.
        reward_checkpoint: the reward-model phase's checkpoint (needed when ``reward_source="model"``).
        reward_source: "model" (the reward model; an ensemble gives ``mean - rewards.ensemble_k * std``), "gold" (the
            world's gold judge: an oracle baseline) or "package.module:function", a callable
            ``(prompts, responses) -> scores``.
        critic: "separate" (a value head on its own backbone, initialised from the reward model's trunk and head,
            InstructGPT style: an ensemble's mean head on its shared trunk, or member 0 of an ensemble of backbones;
            from the SFT backbone for other reward sources) or "shared" (a value head on the policy's trunk).
        iterations: PPO iterations of the run (one rollout + its epochs each).
        rollout_batch: prompts (responses) per iteration and rank.
        minibatch_size: responses per optimizer step; must divide rollout_batch.
        ppo_epochs: passes over each rollout.
        sampling: how responses are sampled (its temperature is also the one the loss uses). Greedy (temperature 0),
            top_k and top_p < 1 are refused: PPO's log-probs are those of the whole softmax(logits / T).
        lora: train LoRA adapters on the frozen SFT weights instead of the whole policy (needs the ``lora`` extra,
            peft); the reference is then the policy with its adapters disabled. None: full fine-tuning. Its dropout is
            switched off like every dropout of the policy (see :func:`~rlhf_lightning.models.backbone.disable_dropout`).
        kl: the KL penalty (:class:`~rlhf_lightning.rl.KLConfig`).
        rewards: what the policy is paid (:class:`~rlhf_lightning.rl.RewardConfig`).
        eval: evaluation on the held-out prompts (:class:`EvalConfig`).
        lr, critic_lr: learning rates of the policy and of the critic (value head and its backbone).
        weight_decay, betas: AdamW settings.
        warmup_steps: optimizer steps of linear warmup; then linear decay to ``min_lr_ratio * lr`` at the last step.
        min_lr_ratio: 1.0 keeps the learning rate constant after warmup.
        max_grad_norm: gradient clipping, applied to the policy and to the critic separately.
        clip_eps, clip_eps_high: ratio clip range [1 - clip_eps, 1 + clip_eps_high] (clip_eps_high None: symmetric).
        value_clip: the value loss is clipped to +- value_clip around the rollout's values (None: no clipping), in
            units of a typical score: as given for normalised scores (the reward model's, or ``rewards.norm:
            running``), times the running std of the raw scores otherwise (gold judge, callable).
        vf_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus (a fix for mode collapse).
        gamma, lam: GAE's discount and lambda.
        whiten_advantages: normalise the advantages of each rollout to zero mean and unit variance.
        target_approx_kl: stop an iteration's epochs once the mean approximate KL to the rollout policy exceeds it.
        seed: seed of the prompts, sampling noise and minibatch order of every iteration.
        shard: shard the trainable models (policy, critic trunk, value head) with FSDP2 (see
            :func:`~rlhf_lightning.modules.common.shard_backbone`; needs ``trainer.strategy: ModelParallelStrategy``).
    """

    PHASE = "ppo"
    #: The flat keys of earlier versions and where each setting lives now (the CLI names the new key).
    RENAMED: ClassVar[dict[str, str]] = {
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

    def __init__(
        self,
        sft_checkpoint: str = "runs/sft/checkpoints/last.ckpt",
        reward_checkpoint: str | None = "runs/rm/checkpoints/last.ckpt",
        reward_source: str = "model",
        critic: Literal["separate", "shared"] = "separate",
        iterations: int = 100,
        rollout_batch: int = 64,
        minibatch_size: int = 16,
        ppo_epochs: int = 4,
        sampling: SamplingConfig | None = None,
        lora: LoRAConfig | None = None,
        kl: KLConfig | None = None,
        rewards: RewardConfig | None = None,
        eval: EvalConfig | None = None,
        lr: float = 1e-4,
        critic_lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        max_grad_norm: float = 1.0,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        value_clip: float | None = 0.2,
        vf_coef: float = 0.5,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        target_approx_kl: float | None = None,
        seed: int = 0,
        shard: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        # The arguments, not hparams: loaded from a checkpoint made under LightningCLI they arrive as dicts.
        self.lora = _config(LoRAConfig, lora)
        self.sampling = _config(SamplingConfig, sampling) or SamplingConfig(max_new_tokens=32, temperature=1.0)
        self.kl, self.rewards = _config(KLConfig, kl) or KLConfig(), _config(RewardConfig, rewards) or RewardConfig()
        self.eval_config = _config(EvalConfig, eval) or EvalConfig()
        self._check_config()
        self.kl_ctl = self.kl.build_controller()
        self.score_moments = RunningMoments()
        self.iteration = 0
        self.policy: nn.Module | None = None
        self.ref_policy: nn.Module | AdaptersDisabled | None = None
        self.reward_model: nn.Module | None = None
        self.critic_backbone: nn.Module | None = None
        self.value_head: ValueHead | None = None
        self._score_fn: ScoreFn | None = None
        self._sft_eval: EvalSamples | None = None
        self._sft_eval_proxy: torch.Tensor | None = None
        self._sft_per_input: dict[str, float] | None = None
        #: The metrics of the last iteration (what was logged), for callbacks such as the online detectors.
        self.last_metrics: dict[str, float] = {}

    def _check_config(self) -> None:
        """Mistakes that would otherwise surface minutes into a run."""
        h = self.hparams
        sizes = {name: getattr(h, name) for name in ("iterations", "rollout_batch", "minibatch_size", "ppo_epochs")}
        sizes.update(
            {"eval.every": self.eval_config.every, "eval.samples_per_prompt": self.eval_config.samples_per_prompt}
        )
        for name, value in sizes.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if h.rollout_batch % h.minibatch_size:
            raise ValueError(f"minibatch_size ({h.minibatch_size}) must divide rollout_batch ({h.rollout_batch})")
        # The rollout's log-probs (and the update's) are those of the full softmax(logits / T): sampling from another
        # distribution would make the first ratio differ from 1 and the k1 KL biased.
        s = self.sampling
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
            raise ValueError(
                "shard and lora together are not supported yet (sharding a peft-wrapped policy is untested)"
            )
        if h.critic not in ("separate", "shared"):
            raise ValueError(f"critic must be 'separate' or 'shared', got {h.critic!r}")
        if self.lora is not None:
            require_peft()  # at configuration time, not minutes later in configure_model
        paths = {"sft_checkpoint": h.sft_checkpoint}
        if h.reward_source == "model":
            if not h.reward_checkpoint:
                raise ValueError("reward_source 'model' needs reward_checkpoint")
            paths["reward_checkpoint"] = h.reward_checkpoint
        for name, path in paths.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"{name} {path} does not exist (run that phase first, or fix the path)")

    # -- model construction ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.built or self._trainer is None:
            return
        h = self.hparams
        tokenizer = self.datamodule_tokenizer()
        policy, sft_tokenizer = load_sft_backbone(h.sft_checkpoint)
        if sft_tokenizer.fingerprint() != tokenizer.fingerprint():
            raise ValueError(
                f"the data module's tokenizer differs from the one of {h.sft_checkpoint}; point data.tokenizer_path "
                "at the SFT checkpoint's folder"
            )
        budget = self.trainer.datamodule.hparams.max_prompt_len + self.sampling.max_new_tokens
        max_len = getattr(getattr(policy, "config", None), "max_seq_len", None)
        if max_len is not None and budget > max_len:
            raise ValueError(
                f"max_prompt_len + sampling.max_new_tokens = {budget} exceeds the policy's max_seq_len {max_len}"
            )
        self.tokenizer = tokenizer
        disable_dropout(policy)  # before the copies below: the reference and a critic copied from it inherit it
        self.policy = policy
        if self.lora is None:
            self.ref_policy = freeze(copy.deepcopy(policy))
        trunk, head_init = policy, None
        if h.reward_source == "model":
            reward_model, rm_tokenizer = load_reward_model(h.reward_checkpoint)
            if rm_tokenizer.fingerprint() != tokenizer.fingerprint():
                raise ValueError(
                    f"the tokenizers of {h.sft_checkpoint} and {h.reward_checkpoint} differ: the reward model must "
                    "read text exactly as the policy writes it"
                )
            if self.rewards.norm_samples:
                # The SFT policy, before any adapter or training: what the first rollout samples from.
                dm = self.trainer.datamodule
                batch = sample_prompt_responses(policy, dm, tokenizer, self.rewards.norm_samples, self.sampling, h.seed)
                reward_model.measure_normalisation(*batch)
            self.reward_model = freeze(reward_model)
            trunk, head_init = reward_model.backbones[0], reward_model
        elif h.reward_source == "gold":
            if self.trainer.datamodule.judge is None:
                raise ValueError("reward_source 'gold' needs the world's gold judge (data_dir holds no world)")
        else:
            self._score_fn = import_score_fn(h.reward_source)
        self.value_head = ValueHead(policy.hidden_size)
        if h.critic == "separate":
            self.critic_backbone = copy.deepcopy(trunk)
            self.critic_backbone.requires_grad_(True)
            disable_dropout(self.critic_backbone)
            if head_init is not None:
                self._init_value_head_from_reward(head_init)
        if self.lora is not None:
            # Wrapped last: peft changes the backbone in place, and a critic copied from it must not carry adapters.
            self.policy = LoRABackbone(policy, self.lora, seed=h.seed)
            disable_dropout(self.policy)  # again: peft adds its own dropout (lora.dropout) on the adapters' input
            self.ref_policy = AdaptersDisabled(self.policy)
        if h.shard:
            for model in (self.policy, self.critic_backbone, self.value_head):
                if model is not None:
                    shard_backbone(self, model)

    @torch.no_grad()
    def _init_value_head_from_reward(self, reward_model: nn.Module) -> None:
        """The value head starts as the reward model's head on its normalised scale, so the critic's first estimates
        are the reward model's opinion of each prefix rather than 0: for an ensemble of heads on one trunk, the
        members' mean (exactly the ensemble's mean score; the conservative ``ensemble_k`` term is not linear and is
        left to the critic to learn); for an ensemble of backbones, member 0's, whose trunk the critic copies
        (see :meth:`RewardModel.normalised_mean_head`)."""
        weight, bias = reward_model.normalised_mean_head()
        self.value_head.proj.weight.copy_(weight)
        self.value_head.proj.bias.copy_(bias)

    def checkpoint_meta(self) -> dict[str, Any]:
        h = self.hparams
        return {
            "backbone": backbone_spec(self.policy),
            "critic_backbone": backbone_spec(self.critic_backbone) if self.critic_backbone is not None else None,
            "sft_checkpoint": str(h.sft_checkpoint),
            "reward_checkpoint": str(h.reward_checkpoint) if h.reward_checkpoint else None,
            "reward_source": h.reward_source,
        }

    def build_from_checkpoint(self, meta: dict[str, Any]) -> None:
        """The trainable models only (the policy, the critic); the frozen ones are not in a PPO checkpoint."""
        self.policy = backbone_from_spec(meta["backbone"])
        self.value_head = ValueHead(self.policy.hidden_size)
        if meta.get("critic_backbone"):
            self.critic_backbone = backbone_from_spec(meta["critic_backbone"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        checkpoint[PPO_STATE_KEY] = {
            "iteration": self.iteration,
            "kl_controller": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(PPO_STATE_KEY)
        if state is None:
            raise ValueError("the checkpoint has no PPO state (iteration, KL controller): not a PPO checkpoint")
        self.iteration = int(state["iteration"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.score_moments.load_state_dict(state["score_moments"])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # The frozen models are rebuilt from their own checkpoints; a PPO checkpoint does not carry them.
        own = super().state_dict()
        state_dict = dict(state_dict)
        for key, value in own.items():
            if key.startswith(FROZEN_PREFIXES):
                state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- one iteration -----------------------------------------------------------------------------------------------
    @property
    def _rank_and_world(self) -> tuple[int, int]:
        return self.global_rank, max(self.trainer.world_size, 1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.iteration >= self.hparams.iterations:
            return -1  # resumed at (or past) the end: nothing left to do
        return None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        it = self.iteration
        t0 = time.perf_counter()
        rollout, rollout_metrics, times = self.make_rollout(it)
        t1 = time.perf_counter()
        stats = self.update(rollout, it)
        t2 = time.perf_counter()
        beta = self.kl_ctl.value
        kl_seq = self.trainer.strategy.reduce(rollout.kl.sum(-1).mean(), reduce_op="mean")
        self.kl_ctl.update(float(kl_seq), rollout.size * self._rank_and_world[1])
        metrics = {
            **rollout_metrics,
            **stats,
            "objective/kl": float(kl_seq),
            "objective/kl_coef": beta,
            "objective/kl_coef_at_bound": float(self._at_bound(beta)),
            "perf/rollout_s": times.generate_s,
            "perf/score_s": times.score_s,
            "perf/update_s": t2 - t1,
            "perf/iteration_s": t2 - t0,
            "perf/tokens_per_s": times.tokens / max(times.generate_s, 1e-9),
            "perf/samples_per_s": rollout.size / max(t2 - t0, 1e-9),
        }
        self.iteration += 1
        last = self.iteration >= self.hparams.iterations
        if self.iteration % self.eval_config.every == 0 or last:
            metrics.update(self.evaluate())
        metrics = self._mean_over_ranks(metrics)
        self._log(metrics, it)
        self.last_metrics = metrics
        self.log("proxy", metrics["objective/proxy_reward"], prog_bar=True, logger=False)
        self.log("kl", metrics["objective/kl"], prog_bar=True, logger=False)
        if last:
            self.trainer.should_stop = True

    def _at_bound(self, beta: float) -> bool:
        """Whether an adaptive controller's beta sits at kl_min or kl_max (it can no longer do its job)."""
        return self.kl.controller == "adaptive" and (beta <= self.kl.min_coef or beta >= self.kl.max_coef)

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Each value's mean over the ranks, in one all-reduce (the values themselves in a single process).

        Under DDP the logger writes on rank 0 only, and a rollout's statistics are one rank's share: the mean over
        the ranks' equal-sized rollouts is the statistic of the whole batch for means (rewards, lengths, losses) and
        the mean of the ranks' values for the others (diversity, correlations). Every rank gets the same numbers,
        so the online detectors agree too. The keys depend on the configuration only, never on the data, so every
        rank sends the same vector.
        """
        keys = list(values)
        local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        return dict(zip(keys, self.trainer.strategy.reduce(local, reduce_op="mean").tolist(), strict=True))

    def _log(self, metrics: dict[str, float], iteration: int) -> None:
        """Logs with the iteration as the step (Lightning's global_step counts optimizer steps here)."""
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=iteration)

    def _fail(self, quantity: str, iteration: int, detail: str = "") -> None:
        """Saves the current state (finite: no step was taken with the bad value) and stops the run loudly."""
        where = getattr(self.trainer.checkpoint_callback, "dirpath", None) or self.trainer.default_root_dir
        path = Path(where) / "last-good.ckpt"
        self.trainer.save_checkpoint(path)
        raise FloatingPointError(
            f"{quantity} is not finite at iteration {iteration}{detail}; stopping. The state before it is saved in "
            f"{path} (resume with --ckpt_path after fixing the cause)"
        )

    def _check_finite(self, quantity: str, x: torch.Tensor, iteration: int) -> None:
        if not on_every_rank(self, bool(torch.isfinite(x).all())):  # _fail's checkpoint is a collective
            self._fail(quantity, iteration)

    # -- rollout and scoring -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_rollout(self, iteration: int) -> tuple[Rollout, dict[str, float], RolloutTimes]:
        """Samples, scores and shapes one iteration's rollout (see the module doc): the rollout, its metrics and
        timings."""
        h, dm = self.hparams, self.trainer.datamodule
        prompts, batch = dm.rollout_prompts(iteration, h.rollout_batch, h.seed, *self._rank_and_world)
        prompt_ids, prompt_mask = batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device)
        t0 = time.perf_counter()
        with eval_mode(self.policy):  # sampling and the log-prob passes; the update trains it again
            out = self._sample(prompt_ids, prompt_mask, iteration)
            t1 = time.perf_counter()
            token_lists = [ids[m].tolist() for ids, m in zip(out.response_ids, out.response_mask, strict=True)]
            responses = self.tokenizer.decode_batch(token_lists)
            scored, ensemble_std = self._score_batch(prompts, responses, prompt_ids, prompt_mask, out)
        self._check_finite("reward (the scores of the reward source)", scored.scores, iteration)
        rollout, stats = shape_rollout(
            scored, self.kl, self.rewards, self.kl_ctl.value, h.gamma, h.lam, h.whiten_advantages, self._score_stats
        )
        self._check_finite("reward (shaped per-token rewards)", rollout.rewards, iteration)
        self._check_finite("advantage", rollout.advantages, iteration)
        t2 = time.perf_counter()
        metrics = self._rollout_metrics(rollout, stats, prompts, responses, token_lists, ensemble_std)
        return rollout, metrics, RolloutTimes(t1 - t0, t2 - t1, int(out.response_mask.sum()))

    def _sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, iteration: int) -> Generation:
        """Responses to the (B, P) prompts, with the sampling noise of (seed, iteration, rank)."""
        h = self.hparams
        gen = torch.Generator(device=self.device).manual_seed(_iteration_seed(h.seed, iteration, self.global_rank))
        # Sharded, every forward is a collective: the ranks (each with its own prompts) generate until all are done.
        any_alive = (lambda alive: not on_every_rank(self, not alive)) if h.shard else None
        return generate(self.policy, prompt_ids, prompt_mask, self.sampling, self.tokenizer.eos_id,
                        self.tokenizer.pad_id, gen, any_alive=any_alive)  # fmt: skip

    def _score_batch(
        self, prompts: list[str], responses: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
        out: Generation,
    ) -> tuple[ScoredBatch, torch.Tensor | None]:  # fmt: skip
        """The no-grad passes over sampled responses: log-probs under the policy and the reference (and their exact
        KL for the "full" metric), values and scores; also the reward ensemble's mean disagreement (None without a
        reward model)."""
        resp_ids, resp_mask = out.response_ids, out.response_mask
        ids = torch.cat([prompt_ids, resp_ids], 1)  # (B, P + R)
        mask = torch.cat([prompt_mask.bool(), resp_mask], 1)
        want_full = self.kl.metric == "full"
        args = (ids, mask, resp_ids, resp_mask, self._temperature, want_full)
        logp, logits = response_token_logprobs(self.policy, *args)
        ref_logp, ref_logits = response_token_logprobs(self.ref_policy, *args)
        full_kl = None
        if want_full:
            full_kl = unflatten_masked(rlhf_kernels.kl_from_logits(logits, ref_logits, self._temperature), resp_mask)
        trunk = self.critic_backbone if self.critic_backbone is not None else self.policy
        values = self.value_head(response_hidden(trunk, ids, mask, prompt_ids.shape[1], resp_mask.shape[1])).float()
        scores, ensemble_std = self._scores(prompts, responses, prompt_ids, prompt_mask, resp_ids, resp_mask,
                                            out.ended)  # fmt: skip
        batch = ScoredBatch(prompt_ids, prompt_mask, resp_ids, resp_mask, out.ended, logp, ref_logp, values, scores,
                            full_kl)  # fmt: skip
        return batch, ensemble_std

    def _score_stats(self, scores: torch.Tensor) -> tuple[float, float] | None:
        """Adds the (B,) scores to the running statistics when anything reads them, all ranks' scores (every rank
        then normalises with the same statistics and checkpoints the same state); their (mean, std) for
        ``rewards.norm: running``."""
        running = self.rewards.norm == "running"
        if running or self._raw_score_units:
            self.score_moments.update(self.trainer.strategy.all_gather(scores))
        return (self.score_moments.mean, self.score_moments.std) if running else None

    def _rollout_metrics(
        self, rollout: Rollout, stats: RolloutStats, prompts: list[str], responses: list[str],
        token_lists: list[list[int]], ensemble_std: torch.Tensor | None,
    ) -> dict[str, float]:  # fmt: skip
        """The rollout's objective/*, rollout/* and diversity/* metrics."""
        lengths = rollout.response_mask.sum(-1).float()
        metrics = {
            "objective/proxy_reward": float(rollout.scores.mean()),
            "objective/score": stats.score,
            "objective/non_score_reward": stats.non_score_reward,
            "objective/rlhf_reward": stats.rlhf_reward,
            "rollout/length_mean": float(lengths.mean()),
            "rollout/eos_rate": float(rollout.ended.float().mean()),
            "rollout/score_length_corr": pearson(rollout.scores, lengths),
            "rollout/duplicate_rate": duplicate_rate(prompts, responses),
            **diversity_metrics(token_lists, self.tokenizer.vocab_size),
        }
        judge = self.trainer.datamodule.judge
        if judge is not None:  # with the judge as the reward source its scores are already at hand
            gold = rollout.scores if self.hparams.reward_source == "gold" else judge.score(
                prompts, responses, rollout.ended.cpu().numpy())  # fmt: skip
            metrics["objective/gold_reward"] = float(gold.mean())
        if stats.length_slope is not None:
            metrics["objective/length_slope"] = stats.length_slope
        if self.reward_model is not None and self.reward_model.n_members > 1:
            metrics["objective/ensemble_std"] = float(ensemble_std)
        return metrics

    @property
    def _raw_score_units(self) -> bool:
        """Whether the scores the policy sees are in the reward source's own units (not normalised: neither the
        reward model's SFT-centred scores nor ``rewards.norm: running``)."""
        return self.hparams.reward_source != "model" and self.rewards.norm == "none"

    @property
    def _value_clip(self) -> float | None:
        """``value_clip`` in the units of the values: times the running std of the scores when they are raw (a
        constant reward so far, std 0, leaves it as given)."""
        h = self.hparams
        if h.value_clip is None or not self._raw_score_units:
            return h.value_clip
        std = self.score_moments.std
        return h.value_clip * std if std > 0 else h.value_clip

    @property
    def _temperature(self) -> float:
        return self.sampling.temperature or 1.0

    def _scores(
        self, prompts: list[str], responses: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
        response_ids: torch.Tensor, response_mask: torch.Tensor, ended: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """(B,) sequence scores from the configured reward source, and the reward ensemble's mean disagreement (None
        without a reward model)."""
        source = self.hparams.reward_source
        if source == "model":
            ids, mask = join_left_right(prompt_ids, prompt_mask, response_ids, response_mask)
            scores = self.reward_model.score(ids, mask)
            return scores.conservative(self.rewards.ensemble_k).float(), scores.std.mean()
        if source == "gold":
            gold = self.trainer.datamodule.judge.score(prompts, responses, ended.cpu().numpy())
            return torch.as_tensor(gold, dtype=torch.float32, device=self.device), None
        out = torch.as_tensor(self._score_fn(prompts, responses), dtype=torch.float32, device=self.device).flatten()
        if out.shape != (len(prompts),):
            shape = tuple(out.shape)
            raise ValueError(f"reward_source {source!r} returned {shape} scores for {len(prompts)} responses")
        return out, None

    # -- the PPO update ----------------------------------------------------------------------------------------------
    def update(self, rollout: Rollout, iteration: int) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches over the rollout; returns the mean statistics."""
        h = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        rank = self._rank_and_world[0]
        gen = torch.Generator().manual_seed(_iteration_seed(h.seed, iteration, rank) + 1)
        self.policy.train()
        if self.critic_backbone is not None:
            self.critic_backbone.train()
        sums: dict[str, float] = defaultdict(float)
        steps = epochs = 0
        for _ in range(h.ppo_epochs):
            epoch_kl = []
            for idx in torch.randperm(rollout.size, generator=gen, device="cpu").split(h.minibatch_size):
                loss, stats = self._minibatch_loss(rollout.select(idx.to(self.device)))
                if not on_every_rank(self, bool(torch.isfinite(loss))):
                    self._fail("loss", iteration, f" (epoch {epochs}, minibatch step {steps})")
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                norms = self._clip_gradients()
                for name, norm in norms.items():  # of the all-reduced gradients: the same on every rank
                    if not bool(torch.isfinite(norm)):
                        self._fail(f"{name} gradient norm", iteration, f" (epoch {epochs}, minibatch step {steps})")
                    stats[f"{name}/grad_norm"] = float(norm)
                opt.step()
                sched.step()
                for key, value in stats.items():
                    sums[key] += value
                epoch_kl.append(stats["policy/approx_kl"])
                steps += 1
            epochs += 1
            if h.target_approx_kl is not None:
                # Under DDP every rank must run the same number of backward passes (each all-reduces the
                # gradients): the ranks stop on their mean KL, not each on its own.
                approx_kl = self._mean_over_ranks({"kl": sum(epoch_kl) / len(epoch_kl)})["kl"]
                if approx_kl > h.target_approx_kl:
                    break
        out = {key: value / steps for key, value in sums.items()}
        out["policy/epochs"] = float(epochs)
        out["policy/lr"] = opt.param_groups[0]["lr"]
        return out

    def _clip_gradients(self) -> dict[str, torch.Tensor]:
        """Clips the policy's and the critic's gradients separately; returns their norms before clipping."""
        groups = {"policy": list(self.policy.parameters()), "value": self._critic_parameters()}
        clip = torch.nn.utils.clip_grad_norm_
        return {name: clip([p for p in params if p.grad is not None], self.hparams.max_grad_norm, foreach=True)
                for name, params in groups.items()}  # fmt: skip

    def _critic_parameters(self) -> list[nn.Parameter]:
        """The value head's parameters and the critic backbone's (when the critic has its own)."""
        critic = list(self.value_head.parameters())
        if self.critic_backbone is not None:
            critic += list(self.critic_backbone.parameters())
        return critic

    def _minibatch_loss(self, mb: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """Policy loss (fused, from the logits) + vf_coef * clipped value loss of one minibatch, and its stats."""
        h = self.hparams
        ids, mask = mb.input_ids, mb.attention_mask
        p, r = mb.prompt_ids.shape[1], mb.response_ids.shape[1]
        sel = mb.response_mask
        hidden = self.policy(ids, mask)  # (b, P + R, D)
        logits = hidden[:, p - 1 : p + r - 1][sel] @ self.policy.lm_head_weight.T  # (N, V)
        ref_logits = None
        kl = self.kl
        if kl.in_loss and kl.estimator == "full":
            with torch.no_grad():  # the exact KL in the loss reads the reference's logits at the same positions
                ref_logits = self.ref_policy(ids, mask)[:, p - 1 : p + r - 1][sel] @ self.ref_policy.lm_head_weight.T
        beta = self.kl_ctl.value
        pg_loss, pstats = policy_loss(
            logits, mb.response_ids[sel], mb.logprobs[sel], mb.advantages[sel], clip_eps_low=h.clip_eps,
            clip_eps_high=h.clip_eps if h.clip_eps_high is None else h.clip_eps_high, entropy_coef=h.entropy_coef,
            temperature=self._temperature, ref_logprobs=mb.ref_logprobs[sel] if kl.in_loss else None,
            kl_coef=beta if kl.in_loss else 0.0, kl_estimator=kl.estimator if kl.in_loss else "k1",
            ref_logits=ref_logits,
        )  # fmt: skip
        if self.critic_backbone is not None:
            values = self.value_head(self.critic_backbone(ids, mask)[:, p - 1 : p + r - 1])  # (b, R)
        else:
            values = self.value_head(hidden[:, p - 1 : p + r - 1])
        v_loss, v_clipfrac = value_loss(values.float(), mb.values, mb.returns, sel, self._value_clip)
        loss = pg_loss + h.vf_coef * v_loss
        stats = {
            "policy/loss": float(pg_loss.detach()),
            "policy/clipfrac": float(pstats.clip_fraction),
            "policy/approx_kl": float(pstats.approx_kl),
            "policy/ratio": float(pstats.ratio),
            "objective/entropy": float(pstats.entropy),
            "value/loss": float(v_loss.detach()),
            "value/clipfrac": float(v_clipfrac),
            "value/explained_variance": float(explained_variance(mb.values, mb.returns, sel)),
        }
        return loss, stats

    # -- evaluation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Samples the held-out prompts with the current and the SFT policy (same seed); gold reward and win rate
        against SFT under the gold judge (ties count half), proxy reward, and a text table of both side by side."""
        h, dm = self.eval_config, self.trainer.datamodule
        prompts, batch = dm.eval_prompts()
        args = (self.tokenizer, prompts, batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device),
                self.sampling, h.seed, dm.judge)  # fmt: skip
        if self._sft_eval is None:  # the reference never changes: its samples are drawn once
            self._sft_eval = sample_eval(self.ref_policy, *args)
            self._sft_eval_proxy = self._eval_proxy(self._sft_eval, batch)
        cur = sample_eval(self.policy, *args)
        proxy = self._eval_proxy(cur, batch)
        metrics = {
            "eval/length_mean": float(cur.lengths.float().mean()),
            "eval/eos_rate": float(cur.ended.float().mean()),
            "eval/distinct_2": distinct_n(cur.token_ids, 2),
        }
        if proxy is not None:
            metrics["eval/proxy_reward"] = float(proxy.mean())
            metrics["eval/sft_proxy_reward"] = float(self._sft_eval_proxy.mean())
        if cur.gold is not None:
            metrics["eval/gold_reward"] = float(cur.gold.mean())
            metrics["eval/sft_gold_reward"] = float(self._sft_eval.gold.mean())
            metrics["eval/win_rate"] = win_rate(cur.gold, self._sft_eval.gold)
        if h.groups > 0:
            if self._sft_per_input is None:
                self._sft_per_input = self._per_input_diversity(self.ref_policy, prompts, batch, "eval/sft_per_input")
            metrics.update(self._sft_per_input)
            metrics.update(self._per_input_diversity(self.policy, prompts, batch, "diversity/per_input"))
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            table = comparison_table(self._sft_eval, cur, self._sft_eval_proxy, proxy, h.table_rows)
            experiment.add_text("eval/sft_vs_policy", table, self.iteration)
        return metrics

    def _per_input_diversity(
        self, model: nn.Module, prompts: list[str], batch: dict[str, torch.Tensor], prefix: str
    ) -> dict[str, float]:
        """Diversity within each prompt's samples: ``eval_samples_per_prompt`` responses to each of the first
        ``eval_groups`` held-out prompts, scored per prompt and averaged. Keys ``{prefix}_distinct_2`` etc."""
        h = self.eval_config
        g, k = min(h.groups, len(prompts)), h.samples_per_prompt
        ids = batch["prompt_ids"][:g].repeat_interleave(k, 0).to(self.device)  # (g * k, P)
        mask = batch["prompt_mask"][:g].repeat_interleave(k, 0).to(self.device)
        texts = [t for t in prompts[:g] for _ in range(k)]
        samples = sample_eval(model, self.tokenizer, texts, ids, mask, self.sampling, h.seed + 1)
        groups = torch.arange(g).repeat_interleave(k)
        scores = diversity_metrics(samples.token_ids, self.tokenizer.vocab_size, groups, prefix="x")
        return {f"{prefix}_{name[2:]}": value for name, value in scores.items()}

    def _eval_proxy(self, samples: EvalSamples, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B,) proxy scores of evaluation samples (None unless the reward source is the reward model)."""
        if self.reward_model is None:
            return None
        padded = pad_sequences(samples.token_ids, self.tokenizer.pad_id, left=False)
        resp_ids, resp_mask = (t.to(self.device) for t in padded)
        ids, mask = join_left_right(batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device),
                                    resp_ids, resp_mask)  # fmt: skip
        return self.reward_model.score(ids, mask).conservative(self.rewards.ensemble_k).float().cpu()

    # -- optimisation ------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        h = self.hparams
        opt = torch.optim.AdamW(
            [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": h.lr},
             {"params": self._critic_parameters(), "lr": h.critic_lr}],
            weight_decay=h.weight_decay, betas=tuple(h.betas), fused=True,  # one kernel per step, not one per tensor
        )  # fmt: skip
        total = h.iterations * h.ppo_epochs * (h.rollout_batch // h.minibatch_size)
        return with_lr_schedule(opt, h.warmup_steps, total, h.min_lr_ratio, "linear")


def _config(cls: type, value: Any) -> Any:
    """A config dataclass argument as an instance: a dict (hyperparameters saved under LightningCLI) is converted."""
    return cls(**value) if isinstance(value, dict) else value


class RolloutTimes(NamedTuple):
    """Seconds spent sampling and scoring one rollout, and the response tokens it sampled."""

    generate_s: float
    score_s: float
    tokens: int
