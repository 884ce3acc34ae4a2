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

import time
import warnings
from collections import defaultdict
from functools import partial
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from rlhf_lightning import tags
from rlhf_lightning.checkpoint import checkpoint_dir
from rlhf_lightning.models.backbone import backbone_from_spec, backbone_spec
from rlhf_lightning.models.heads import ValueHead
from rlhf_lightning.models.lora import AdaptersDisabled, LoRAConfig
from rlhf_lightning.models.sampling import Generation, SamplingConfig, eval_mode, generate
from rlhf_lightning.modules.base import PhaseModule
from rlhf_lightning.modules.common import (
    check_optimizer_settings,
    mean_over_ranks,
    on_every_rank,
    shard_backbone,
    with_lr_schedule,
)
from rlhf_lightning.modules.ppo_eval import EvalConfig, SFTBaseline, evaluate, rollout_metrics
from rlhf_lightning.modules.ppo_passes import minibatch_loss, score_batch, sequence_scores
from rlhf_lightning.modules.ppo_setup import RENAMED, PPOModels, ScoreFn, build_models, check_config, config_arg
from rlhf_lightning.rl import (
    AdvantageConfig,
    KLConfig,
    RewardConfig,
    Rollout,
    RunningMoments,
    shape_rollout,
)

PPO_STATE_KEY = "ppo_state"


def _iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return (seed * 1_000_003 + iteration) * 1009 + rank


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
        rollout_batch: responses per iteration and rank (one per prompt unless ``advantage.samples_per_prompt``).
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
        advantage: the advantage estimator (:class:`~rlhf_lightning.rl.AdvantageConfig`): GAE with the critic, or a
            critic-free one (GRPO, RLOO, REINFORCE++; then no critic is built or stepped, and ``critic``,
            ``critic_lr``, ``value_clip`` and ``vf_coef`` are unused) with ``samples_per_prompt`` responses per prompt
            (the rollout then holds ``rollout_batch / samples_per_prompt`` prompts).
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
    #: The frozen models: reloaded from their own checkpoints, never saved again (see PhaseModule).
    FROZEN_PREFIXES = ("ref_policy.", "reward_model.")
    #: The flat keys of earlier versions and where each setting lives now (the CLI names the new key).
    RENAMED: ClassVar[dict[str, str]] = RENAMED

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
        advantage: AdvantageConfig | None = None,
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
        check_optimizer_settings(self.hparams, ("lr", "critic_lr"))
        self.automatic_optimization = False
        # The arguments, not hparams: loaded from a checkpoint made under LightningCLI they arrive as dicts.
        self.lora = config_arg(LoRAConfig, lora)
        self.sampling = config_arg(SamplingConfig, sampling) or SamplingConfig(max_new_tokens=32, temperature=1.0)
        self.kl = config_arg(KLConfig, kl) or KLConfig()
        self.rewards = config_arg(RewardConfig, rewards) or RewardConfig()
        self.eval_config = config_arg(EvalConfig, eval) or EvalConfig()
        self.advantage = config_arg(AdvantageConfig, advantage) or AdvantageConfig()
        check_config(self.hparams, self.sampling, self.lora, self.eval_config)
        if rollout_batch % self.advantage.samples_per_prompt:
            raise ValueError(f"advantage.samples_per_prompt ({self.advantage.samples_per_prompt}) must divide "
                             f"rollout_batch ({rollout_batch})")  # fmt: skip
        self.kl_ctl = self.kl.build_controller()
        self.score_moments = RunningMoments()
        self.iteration = 0
        self.policy: nn.Module | None = None
        self.ref_policy: nn.Module | AdaptersDisabled | None = None
        self.reward_model: nn.Module | None = None
        self.critic_backbone: nn.Module | None = None
        self.value_head: ValueHead | None = None
        self._score_fn: ScoreFn | None = None
        self._sft_baseline: SFTBaseline | None = None
        #: The metrics of the last iteration (what was logged), for callbacks such as the online detectors.
        self.last_metrics: dict[str, float] = {}

    # -- model construction ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.built or self._trainer is None:
            return
        tokenizer = self.datamodule_tokenizer()
        models = build_models(self.hparams, self.sampling, self.lora, self.rewards, self.trainer.datamodule, tokenizer,
                              self.advantage.needs_critic)  # fmt: skip
        self.tokenizer = tokenizer
        # In this order: the state dict's (and so a checkpoint's) order of the models.
        self.policy, self.ref_policy, self.reward_model = models.policy, models.ref_policy, models.reward_model
        self.value_head, self.critic_backbone = models.value_head, models.critic_backbone
        self._score_fn = models.score_fn
        # The reference policy and the reward model are frozen in eval mode on purpose (no dropout in the KL or the
        # scores), and Lightning warns about any module in eval mode when training starts.
        warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode at the start", PossibleUserWarning)
        if self.hparams.shard:
            for model in (self.policy, self.critic_backbone, self.value_head):
                if model is not None:
                    shard_backbone(self, model)

    def checkpoint_meta(self) -> dict[str, Any]:
        h = self.hparams
        return {
            "backbone": backbone_spec(self.policy),
            "critic_backbone": backbone_spec(self.critic_backbone) if self.critic_backbone is not None else None,
            "value_head": self.value_head is not None,
            "sft_checkpoint": str(h.sft_checkpoint),
            "reward_checkpoint": str(h.reward_checkpoint) if h.reward_checkpoint else None,
            "reward_source": h.reward_source,
        }

    def build_from_checkpoint(self, meta: dict[str, Any]) -> None:
        """The trainable models only (the policy, the critic); the frozen ones are not in a PPO checkpoint."""
        self.policy = backbone_from_spec(meta["backbone"])
        if meta.get("value_head", True):  # checkpoints of before critic-free estimators all have one
            self.value_head = ValueHead(self.policy.hidden_size)
        if meta.get("critic_backbone"):
            self.critic_backbone = backbone_from_spec(meta["critic_backbone"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
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

    # -- one iteration -----------------------------------------------------------------------------------------------
    @property
    def _rank_and_world(self) -> tuple[int, int]:
        return self.global_rank, max(self.trainer.world_size, 1)

    @property
    def train_batches(self) -> int:
        return self.hparams.iterations  # the train loader's endless ticks: one per iteration

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.iteration >= self.hparams.iterations:
            return -1  # resumed at (or past) the end: nothing left to do
        return None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        it = self.iteration
        t0 = time.perf_counter()
        rollout, metrics_of_rollout, times = self.make_rollout(it)
        t1 = time.perf_counter()
        stats = self.update(rollout, it)
        t2 = time.perf_counter()
        beta = self.kl_ctl.value
        kl_seq = self.trainer.strategy.reduce(rollout.kl.sum(-1).mean(), reduce_op="mean")
        self.kl_ctl.update(float(kl_seq), rollout.size * self._rank_and_world[1])
        metrics = {
            **metrics_of_rollout,
            **stats,
            tags.KL: float(kl_seq),
            tags.KL_COEF: beta,
            tags.KL_COEF_AT_BOUND: float(self._at_bound(beta)),
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
        metrics = mean_over_ranks(self, metrics)
        self._log(metrics, it)
        self.last_metrics = metrics
        self.log("proxy", metrics[tags.PROXY_REWARD], prog_bar=True, logger=False)
        self.log("kl", metrics[tags.KL], prog_bar=True, logger=False)
        if last:
            self.trainer.should_stop = True

    def _at_bound(self, beta: float) -> bool:
        """Whether an adaptive controller's beta sits at kl_min or kl_max (it can no longer do its job)."""
        return self.kl.controller == "adaptive" and (beta <= self.kl.min_coef or beta >= self.kl.max_coef)

    def _log(self, metrics: dict[str, float], iteration: int) -> None:
        """Logs with the iteration as the step (Lightning's global_step counts optimizer steps here)."""
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=iteration)

    def _fail(self, quantity: str, iteration: int, detail: str = "") -> None:
        """Saves the current state (finite: no step was taken with the bad value) and stops the run loudly."""
        path = checkpoint_dir(self.trainer) / "last-good.ckpt"
        self.trainer.save_checkpoint(path, weights_only=False)  # whole, to resume from (explicit: no notice)
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
        h, dm, k = self.hparams, self.trainer.datamodule, self.advantage.samples_per_prompt
        prompts, batch = dm.rollout_prompts(iteration, h.rollout_batch // k, h.seed, *self._rank_and_world)
        # k responses per prompt, consecutive: the group-baseline estimators read rows g * k to g * k + k - 1 as one
        # prompt's (the sampling noise differs per row).
        prompts = [prompt for prompt in prompts for _ in range(k)]
        prompt_ids = batch["prompt_ids"].repeat_interleave(k, 0).to(self.device)
        prompt_mask = batch["prompt_mask"].repeat_interleave(k, 0).to(self.device)
        t0 = time.perf_counter()
        with eval_mode(self.policy):  # sampling and the log-prob passes; the update trains it again
            out = self._sample(prompt_ids, prompt_mask, iteration)
            t1 = time.perf_counter()
            token_lists = [ids[m].tolist() for ids, m in zip(out.response_ids, out.response_mask, strict=True)]
            responses = self.tokenizer.decode_batch(token_lists)
            score = partial(
                sequence_scores, self._models, h.reward_source, self.rewards.ensemble_k, dm.judge, self.device
            )
            scored, ensemble_std = score_batch(self._models, prompts, responses, prompt_ids, prompt_mask, out,
                                               self._temperature, self.kl.metric == "full", score)  # fmt: skip
        self._check_finite("reward (the scores of the reward source)", scored.scores, iteration)
        rollout, stats = shape_rollout(
            scored,
            self.kl,
            self.rewards,
            self.kl_ctl.value,
            h.gamma,
            h.lam,
            h.whiten_advantages,
            self._score_stats,
            self.advantage,
        )
        self._check_finite("reward (shaped per-token rewards)", rollout.rewards, iteration)
        self._check_finite("advantage", rollout.advantages, iteration)
        t2 = time.perf_counter()
        metrics = rollout_metrics(rollout, stats, prompts, responses, token_lists, self.tokenizer.vocab_size, dm.judge,
                                  h.reward_source == "gold", ensemble_std)  # fmt: skip
        return rollout, metrics, RolloutTimes(t1 - t0, t2 - t1, int(out.response_mask.sum()))

    def _sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, iteration: int) -> Generation:
        """Responses to the (B, P) prompts, with the sampling noise of (seed, iteration, rank)."""
        h = self.hparams
        gen = torch.Generator(device=self.device).manual_seed(_iteration_seed(h.seed, iteration, self.global_rank))
        # Sharded, every forward is a collective: the ranks (each with its own prompts) generate until all are done.
        any_alive = (lambda alive: not on_every_rank(self, not alive)) if h.shard else None
        return generate(self.policy, prompt_ids, prompt_mask, self.sampling, self.tokenizer.eos_id,
                        self.tokenizer.pad_id, gen, any_alive=any_alive)  # fmt: skip

    def _score_stats(self, scores: torch.Tensor) -> tuple[float, float] | None:
        """Adds the (B,) scores to the running statistics when anything reads them, all ranks' scores (every rank
        then normalises with the same statistics and checkpoints the same state); their (mean, std) for
        ``rewards.norm: running``."""
        running = self.rewards.norm == "running"
        if running or self._raw_score_units:
            self.score_moments.update(self.trainer.strategy.all_gather(scores))
        return (self.score_moments.mean, self.score_moments.std) if running else None

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

    @property
    def _models(self) -> PPOModels:
        return PPOModels(self.policy, self.ref_policy, self.reward_model, self.critic_backbone, self.value_head,
                         self._score_fn)  # fmt: skip

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
                mb = rollout.select(idx.to(self.device))
                loss, stats = minibatch_loss(self._models, mb, h, self.kl, self.kl_ctl.value, self._temperature,
                                             self._value_clip)  # fmt: skip
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
                epoch_kl.append(stats[tags.APPROX_KL])
                steps += 1
            epochs += 1
            if h.target_approx_kl is not None:
                # Under DDP every rank must run the same number of backward passes (each all-reduces the
                # gradients): the ranks stop on their mean KL, not each on its own.
                approx_kl = mean_over_ranks(self, {"kl": sum(epoch_kl) / len(epoch_kl)})["kl"]
                if approx_kl > h.target_approx_kl:
                    break
        out = {key: value / steps for key, value in sums.items()}
        out["policy/epochs"] = float(epochs)
        out["policy/lr"] = opt.param_groups[0]["lr"]
        return out

    def _clip_gradients(self) -> dict[str, torch.Tensor]:
        """Clips the policy's and the critic's (if any) gradients separately; returns their norms before clipping."""
        groups = {"policy": list(self.policy.parameters())}
        if self.value_head is not None:
            groups["value"] = self._critic_parameters()
        clip = torch.nn.utils.clip_grad_norm_
        return {name: clip([p for p in params if p.grad is not None], self.hparams.max_grad_norm, foreach=True)
                for name, params in groups.items()}  # fmt: skip

    def _critic_parameters(self) -> list[nn.Parameter]:
        """The value head's parameters and the critic backbone's (when the critic has its own)."""
        critic = list(self.value_head.parameters())
        if self.critic_backbone is not None:
            critic += list(self.critic_backbone.parameters())
        return critic

    # -- evaluation --------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The eval/* metrics (see :func:`~rlhf_lightning.modules.ppo_eval.evaluate`); the table of the SFT and the
        current responses goes to TensorBoard."""
        metrics, table, self._sft_baseline = evaluate(
            self.policy, self.ref_policy, self.reward_model, self.tokenizer, self.trainer.datamodule, self.sampling,
            self.eval_config, self.rewards.ensemble_k, self._sft_baseline, self.device,
        )  # fmt: skip
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("eval/sft_vs_policy", table, self.iteration)
        return metrics

    # -- optimisation ------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        h = self.hparams
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": h.lr}]
        if self.value_head is not None:  # a critic-free estimator steps no critic
            groups.append({"params": self._critic_parameters(), "lr": h.critic_lr})
        opt = torch.optim.AdamW(
            groups,
            weight_decay=h.weight_decay, betas=tuple(h.betas), fused=True,  # one kernel per step, not one per tensor
        )  # fmt: skip
        total = h.iterations * h.ppo_epochs * (h.rollout_batch // h.minibatch_size)
        return with_lr_schedule(opt, h.warmup_steps, total, h.min_lr_ratio, "linear")


class RolloutTimes(NamedTuple):
    """Seconds spent sampling and scoring one rollout, and the response tokens it sampled."""

    generate_s: float
    score_s: float
    tokens: int
