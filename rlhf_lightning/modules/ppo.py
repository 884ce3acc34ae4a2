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
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import rlhf_kernels
from rlhf_lightning.data.collate import pad_sequences
from rlhf_lightning.metrics import distinct_n, diversity_metrics, pearson
from rlhf_lightning.models.backbone import backbone_from_spec, backbone_spec
from rlhf_lightning.models.heads import ValueHead
from rlhf_lightning.models.lora import AdaptersDisabled, LoRABackbone, LoRAConfig, require_peft
from rlhf_lightning.models.reward import load_reward_model
from rlhf_lightning.models.sampling import SamplingConfig, generate
from rlhf_lightning.modules.base import PhaseModule
from rlhf_lightning.modules.common import EvalSamples, on_every_rank, sample_eval, shard_backbone
from rlhf_lightning.modules.reward import join_left_right, load_sft_backbone, sample_prompt_responses
from rlhf_lightning.rl import (
    DEFAULT_KL_HORIZON,
    KL_ESTIMATORS,
    KLEstimator,
    Rollout,
    RunningMoments,
    explained_variance,
    gae,
    kl_controller,
    masked_mean,
    per_token_kl,
    remove_length_trend,
    shape_rewards,
    whiten,
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


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, R) tensor with ``values`` (N,) at the True entries of ``mask`` (B, R) (row-major order), 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


def _freeze(model: nn.Module) -> nn.Module:
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


class PPOModule(PhaseModule):
    """PPO with a KL penalty against the frozen SFT policy.

    Args:
        sft_checkpoint: the SFT phase's checkpoint: the policy's start and the frozen reference.
        reward_checkpoint: the reward-model phase's checkpoint (needed when ``reward_source="model"``).
        reward_source: "model" (the reward model; an ensemble gives ``mean - ensemble_k * std``), "gold" (the world's
            gold judge: an oracle baseline) or "package.module:function", a callable ``(prompts, responses) -> scores``.
        ensemble_k: weight of the ensemble's disagreement in the conservative reward (0: the ensemble mean).
        reward_norm_samples: at the start, the reward model's normalisation statistics are re-measured on this many
            responses of the SFT policy to training prompts, sampled with this phase's ``sampling`` (seeded from
            ``seed``), so the scores start centred with unit spread on exactly the distribution PPO samples (the
            reward phase measured them with its own sampling settings, e.g. another response length). 0: keep the
            checkpoint's statistics.
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
            peft); the reference is then the policy with its adapters disabled. None: full fine-tuning. The adapters'
            dropout (``lora.dropout``) is switched off like every dropout of the policy (see :func:`disable_dropout`).
        lr, critic_lr: learning rates of the policy and of the critic (value head and its backbone).
        weight_decay, betas: AdamW settings.
        warmup_steps: optimizer steps of linear warmup; then linear decay to ``min_lr_ratio * lr`` at the last step.
        min_lr_ratio: 1.0 keeps the learning rate constant after warmup.
        max_grad_norm: gradient clipping, applied to the policy and to the critic separately.
        clip_eps, clip_eps_high: ratio clip range [1 - clip_eps, 1 + clip_eps_high] (clip_eps_high None: symmetric).
        value_clip: the value loss is clipped to +- value_clip around the rollout's values (None: no clipping), in
            units of a typical score: as given for normalised scores (the reward model's, or ``score_norm:
            running``), times the running std of the raw scores otherwise (gold judge, callable), so that a reward
            on another scale neither freezes the critic nor leaves it unclipped.
        vf_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus (a fix for mode collapse).
        gamma, lam: GAE's discount and lambda.
        whiten_advantages: normalise the advantages of each rollout to zero mean and unit variance.
        kl_coef: beta, the KL coefficient (the controller's start).
        kl_controller: "fixed", "adaptive" (towards ``kl_target`` over ``kl_horizon`` samples, within
            [kl_min, kl_max]) or "annealed" (from kl_coef to ``kl_floor`` over ``kl_anneal_iterations`` with
            ``kl_schedule``).
        kl_estimator: the per-token KL penalised. In the reward (``kl_in_loss`` false) only "k1": the reward is a
            constant to the policy gradient, whose score-function estimate then has the KL's own gradient only for
            k1 (k2 and k3 give a biased one, "full" none at the sampled token). In the loss: "k2" (gradient of
            KL(pi || ref) in expectation), "k3" (of the reverse KL, GRPO's choice) or "full" (the exact KL over the
            vocabulary from both models' logits: the exact gradient, no sampling noise; one more reference forward
            per minibatch); k1 is refused there (its gradient is zero in expectation).
        kl_in_loss: put ``beta * k(logp, ref_logp)`` in the loss instead of the reward (GRPO style).
        kl_metric: the estimator logged as ``objective/kl`` and fed to the KL controller: "k1", "k2", "k3" or "full"
            (k3 or full: a low-noise, non-negative measurement; full costs both models' (N, V) logits per rollout).
        score_clip: scores are clipped to +- score_clip (None: no clipping).
        score_norm: "none", or "running": scores standardised by running statistics of all scores so far.
        length_debias: take out of each rollout's scores their straight-line trend in response length (a fix for a
            length-biased reward model; see :func:`~rlhf_lightning.rl.rewards.remove_length_trend`). The proxy
            reward logged stays the reward source's own; ``objective/length_slope`` logs the slope removed.
        missing_eos_score: the score of a response that never emitted EOS, replacing the reward source's (None: keep
            it; see :func:`~rlhf_lightning.rl.rewards.shape_rewards`).
        target_approx_kl: stop an iteration's epochs once the mean approximate KL to the rollout policy exceeds it.
        eval_every: iterations between evaluations on the held-out prompts (and the last iteration).
        eval_table_rows: rows of the TensorBoard text table (SFT response beside the current one).
        eval_groups, eval_samples_per_prompt: per-input diversity is measured on this many held-out prompts with
            this many samples each (collapse shows first within one prompt's samples); 0 groups switches it off.
        eval_seed: seed of the evaluation samples (the same for the SFT policy and the current one).
        seed: seed of the prompts, sampling noise and minibatch order of every iteration.
        shard: shard the trainable models (policy, critic trunk, value head) with FSDP2 (see
            :func:`~rlhf_lightning.modules.common.shard_backbone`; needs ``trainer.strategy: ModelParallelStrategy``).
            The frozen reference and reward model stay whole on every rank.
    """

    PHASE = "ppo"

    def __init__(
        self,
        sft_checkpoint: str = "runs/sft/checkpoints/last.ckpt",
        reward_checkpoint: str | None = "runs/rm/checkpoints/last.ckpt",
        reward_source: str = "model",
        ensemble_k: float = 0.0,
        reward_norm_samples: int = 512,
        critic: Literal["separate", "shared"] = "separate",
        iterations: int = 100,
        rollout_batch: int = 64,
        minibatch_size: int = 16,
        ppo_epochs: int = 4,
        sampling: SamplingConfig | None = None,
        lora: LoRAConfig | None = None,
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
        kl_coef: float = 0.05,
        kl_controller: Literal["fixed", "adaptive", "annealed"] = "fixed",
        kl_target: float | None = None,
        kl_horizon: int = DEFAULT_KL_HORIZON,
        kl_min: float = 1e-4,
        kl_max: float = 10.0,
        kl_floor: float = 0.0,
        kl_anneal_iterations: int = 100,
        kl_schedule: Literal["cosine", "linear", "exponential"] = "cosine",
        kl_estimator: KLEstimator = "k1",
        kl_in_loss: bool = False,
        kl_metric: KLEstimator = "k1",
        score_clip: float | None = 5.0,
        score_norm: Literal["none", "running"] = "none",
        length_debias: bool = False,
        missing_eos_score: float | None = -1.0,
        target_approx_kl: float | None = None,
        eval_every: int = 10,
        eval_table_rows: int = 8,
        eval_groups: int = 16,
        eval_samples_per_prompt: int = 4,
        eval_seed: int = 1234,
        seed: int = 0,
        shard: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        # The argument, not hparams.lora: under LightningCLI the saved hyperparameters hold the parsed config (dicts).
        self.lora = lora
        self.sampling = sampling or SamplingConfig(max_new_tokens=32, temperature=1.0)
        self._check_config()
        self.kl_ctl = kl_controller_from(self.hparams)
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
        self._last_ensemble_std = torch.zeros(())  # (ensembles) members' disagreement on the last rollout
        self._sft_per_input: dict[str, float] | None = None
        #: The metrics of the last iteration (what was logged), for callbacks such as the online detectors.
        self.last_metrics: dict[str, float] = {}

    def _check_config(self) -> None:
        """Mistakes that would otherwise surface minutes into a run."""
        h = self.hparams
        for name in ("iterations", "rollout_batch", "minibatch_size", "ppo_epochs", "eval_every",
                     "eval_samples_per_prompt"):  # fmt: skip
            if getattr(h, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(h, name)}")
        if h.reward_norm_samples == 1 or h.reward_norm_samples < 0:
            raise ValueError(f"reward_norm_samples must be 0 (keep the checkpoint's) or >= 2, got "
                             f"{h.reward_norm_samples}")  # fmt: skip
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
        for name in ("kl_estimator", "kl_metric"):
            if getattr(h, name) not in KL_ESTIMATORS:
                raise ValueError(f"{name} must be one of {KL_ESTIMATORS}, got {getattr(h, name)!r}")
        if h.kl_in_loss and h.kl_estimator == "k1":
            # In the loss only the estimator's gradient acts: k1's is zero in expectation (no pull towards the
            # reference at all), k2's is that of KL(pi || ref), k3's that of KL(ref || pi), full's the exact one.
            raise ValueError("kl_estimator 'k1' cannot be used with kl_in_loss: its gradient is zero in expectation; "
                             "use k2, k3 or full")  # fmt: skip
        if not h.kl_in_loss and h.kl_estimator != "k1":
            # In the reward the penalty acts through the score-function gradient E[kl_t grad log pi(y_t)], which is
            # grad KL only for k1 (docs/kl_penalty.md).
            raise ValueError(f"kl_estimator {h.kl_estimator!r} in the reward has a biased (or zero) policy gradient; "
                             "use k1 in the reward, or kl_in_loss: true with it (set kl_metric to log another "
                             "estimator)")  # fmt: skip
        if h.critic not in ("separate", "shared"):
            raise ValueError(f"critic must be 'separate' or 'shared', got {h.critic!r}")
        if h.score_norm not in ("none", "running"):
            raise ValueError(f"score_norm must be 'none' or 'running', got {h.score_norm!r}")
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
            self.ref_policy = _freeze(copy.deepcopy(policy))
        trunk, head_init = policy, None
        if h.reward_source == "model":
            reward_model, rm_tokenizer = load_reward_model(h.reward_checkpoint)
            if rm_tokenizer.fingerprint() != tokenizer.fingerprint():
                raise ValueError(
                    f"the tokenizers of {h.sft_checkpoint} and {h.reward_checkpoint} differ: the reward model must "
                    "read text exactly as the policy writes it"
                )
            if h.reward_norm_samples:
                # The SFT policy, before any adapter or training: what the first rollout samples from.
                dm = self.trainer.datamodule
                batch = sample_prompt_responses(policy, dm, tokenizer, h.reward_norm_samples, self.sampling, h.seed)
                reward_model.measure_normalisation(*batch)
            self.reward_model = _freeze(reward_model)
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
        rollout, info = self.make_rollout(it)
        t1 = time.perf_counter()
        stats = self.update(rollout, it)
        t2 = time.perf_counter()
        beta = self.kl_ctl.value
        kl_seq = self.trainer.strategy.reduce(rollout.kl.sum(-1).mean(), reduce_op="mean")
        self.kl_ctl.update(float(kl_seq), rollout.size * self._rank_and_world[1])
        metrics = {
            **info["metrics"],
            **stats,
            "objective/kl": float(kl_seq),
            "objective/kl_coef": beta,
            "objective/kl_coef_at_bound": float(self._at_bound(beta)),
            "perf/rollout_s": info["generate_s"],
            "perf/score_s": info["score_s"],
            "perf/update_s": t2 - t1,
            "perf/iteration_s": t2 - t0,
            "perf/tokens_per_s": info["tokens"] / max(info["generate_s"], 1e-9),
            "perf/samples_per_s": rollout.size / max(t2 - t0, 1e-9),
        }
        self.iteration += 1
        last = self.iteration >= self.hparams.iterations
        if self.iteration % self.hparams.eval_every == 0 or last:
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
        h = self.hparams
        return h.kl_controller == "adaptive" and (beta <= h.kl_min or beta >= h.kl_max)

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
    def make_rollout(self, iteration: int) -> tuple[Rollout, dict[str, Any]]:
        """Samples, scores and shapes one iteration's rollout (see the module doc). Returns it and its metrics."""
        h, dm = self.hparams, self.trainer.datamodule
        rank, world = self._rank_and_world
        prompts, batch = dm.rollout_prompts(iteration, h.rollout_batch, h.seed, rank, world)
        prompt_ids, prompt_mask = batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(_iteration_seed(h.seed, iteration, rank))
        t0 = time.perf_counter()
        self.policy.eval()
        # Sharded, every forward is a collective: the ranks (each with its own prompts) generate until all are done.
        any_alive = (lambda alive: not on_every_rank(self, not alive)) if h.shard else None
        out = generate(self.policy, prompt_ids, prompt_mask, self.sampling, self.tokenizer.eos_id,
                       self.tokenizer.pad_id, gen, any_alive=any_alive)  # fmt: skip
        t1 = time.perf_counter()
        resp_mask = out.response_mask
        token_lists = [ids[m].tolist() for ids, m in zip(out.response_ids, resp_mask, strict=True)]
        responses = self.tokenizer.decode_batch(token_lists)
        ids = torch.cat([prompt_ids, out.response_ids], 1)  # (B, P + R)
        mask = torch.cat([prompt_mask.bool(), resp_mask], 1)
        p = prompt_ids.shape[1]
        want_full = h.kl_metric == "full"
        score = (ids, mask, p, out.response_ids, resp_mask, self._temperature, want_full)
        logp, logits = self._response_logprobs(self.policy, *score)
        ref_logp, ref_logits = self._response_logprobs(self.ref_policy, *score)
        full_kl = None
        if want_full:
            full_kl = _scatter(rlhf_kernels.kl_from_logits(logits, ref_logits, self._temperature), resp_mask)
        values = self._values(ids, mask, p, resp_mask.shape[1])
        raw_scores = self._scores(prompts, responses, prompt_ids, prompt_mask, out.response_ids, resp_mask, out.ended)
        self._check_finite("reward (the scores of the reward source)", raw_scores, iteration)
        scores, length_slope = raw_scores, None
        if h.length_debias:
            scores, length_slope = remove_length_trend(raw_scores, resp_mask.sum(-1))
        if h.score_norm == "running" or self._raw_score_units:
            # All ranks' scores: every rank normalises with the same statistics and checkpoints the same state.
            self.score_moments.update(self.trainer.strategy.all_gather(scores))
        if h.score_norm == "running":
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        kl = per_token_kl(logp, ref_logp, resp_mask, h.kl_metric, full_kl)  # (B, R) logged, and the controller's
        if h.kl_in_loss:
            penalty_kl = torch.zeros_like(kl)
        else:  # k1, the one estimator with the right gradient in the reward (_check_config)
            penalty_kl = kl if h.kl_metric == "k1" else per_token_kl(logp, ref_logp, resp_mask, "k1")
        beta = self.kl_ctl.value
        shaped = shape_rewards(scores, penalty_kl, resp_mask, beta, out.ended, h.missing_eos_score,
                               h.score_clip)  # fmt: skip
        self._check_finite("reward (shaped per-token rewards)", shaped.rewards, iteration)
        advantages, returns = gae(shaped.rewards, values, resp_mask, h.gamma, h.lam)
        if h.whiten_advantages:
            advantages = whiten(advantages, resp_mask)
        self._check_finite("advantage", advantages, iteration)
        rollout = Rollout(prompt_ids, prompt_mask, out.response_ids, resp_mask, out.ended, logp, ref_logp, values,
                          raw_scores, kl, shaped.rewards, advantages, returns)  # fmt: skip
        t2 = time.perf_counter()
        lengths = resp_mask.sum(-1).float()
        metrics = {
            "objective/proxy_reward": float(raw_scores.mean()),
            "objective/score": float(shaped.score.mean()),
            "objective/non_score_reward": float(shaped.penalty.sum(-1).mean()),
            "objective/rlhf_reward": float(shaped.rewards.sum(-1).mean()),
            "rollout/length_mean": float(lengths.mean()),
            "rollout/eos_rate": float(out.ended.float().mean()),
            "rollout/score_length_corr": pearson(raw_scores, lengths),
            "rollout/duplicate_rate": duplicate_rate(prompts, responses),
            **diversity_metrics(token_lists, self.tokenizer.vocab_size),
        }
        judge = dm.judge
        if judge is not None:  # with the judge as the reward source its scores are already at hand
            gold = raw_scores if h.reward_source == "gold" else judge.score(prompts, responses, out.ended.cpu().numpy())
            metrics["objective/gold_reward"] = float(gold.mean())
        if length_slope is not None:
            metrics["objective/length_slope"] = length_slope
        if self.reward_model is not None and self.reward_model.n_members > 1:
            metrics["objective/ensemble_std"] = float(self._last_ensemble_std)
        info = {"metrics": metrics, "generate_s": t1 - t0, "score_s": t2 - t1, "tokens": int(resp_mask.sum())}
        return rollout, info

    @property
    def _raw_score_units(self) -> bool:
        """Whether the scores the policy sees are in the reward source's own units (not normalised: neither the
        reward model's SFT-centred scores nor ``score_norm: running``)."""
        h = self.hparams
        return h.reward_source != "model" and h.score_norm == "none"

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

    @staticmethod
    def _response_logprobs(
        model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, p: int, response_ids: torch.Tensor,
        response_mask: torch.Tensor, temperature: float, keep_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """(B, R) log-probs of the response tokens under ``model`` at ``temperature`` (0 at padding), and the (N, V)
        logits at the real response positions when ``keep_logits``. They must equal :func:`generate`'s log-probs
        (the importance ratio starts at 1).

        Args:
            ids, mask: (B, P + R) prompt + response; p: P.
            response_ids, response_mask: (B, R).
        """
        hidden = PPOModule._response_hidden(model, ids, mask, p, response_ids.shape[1])  # (B, R, D)
        logits = hidden[response_mask] @ model.lm_head_weight.T  # (N, V)
        logp = rlhf_kernels.token_logprobs(logits, response_ids[response_mask], temperature)
        return _scatter(logp.float(), response_mask), logits if keep_logits else None

    @staticmethod
    def _response_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, p: int, r: int) -> torch.Tensor:
        """(B, R, D) hidden states that predict the R response tokens: positions P - 1 .. P + R - 2."""
        return model(ids, mask)[:, p - 1 : p + r - 1]

    def _values(self, ids: torch.Tensor, mask: torch.Tensor, p: int, r: int) -> torch.Tensor:
        """(B, R) critic values V(s_t) of the state before each response token."""
        trunk = self.critic_backbone if self.critic_backbone is not None else self.policy
        return self.value_head(self._response_hidden(trunk, ids, mask, p, r)).float()

    def _scores(
        self, prompts: list[str], responses: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
        response_ids: torch.Tensor, response_mask: torch.Tensor, ended: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """(B,) sequence scores from the configured reward source."""
        source = self.hparams.reward_source
        if source == "model":
            ids, mask = join_left_right(prompt_ids, prompt_mask, response_ids, response_mask)
            scores = self.reward_model.score(ids, mask)
            self._last_ensemble_std = scores.std.mean()
            return scores.conservative(self.hparams.ensemble_k).float()
        if source == "gold":
            gold = self.trainer.datamodule.judge.score(prompts, responses, ended.cpu().numpy())
            return torch.as_tensor(gold, dtype=torch.float32, device=self.device)
        out = torch.as_tensor(self._score_fn(prompts, responses), dtype=torch.float32, device=self.device).flatten()
        if out.shape != (len(prompts),):
            shape = tuple(out.shape)
            raise ValueError(f"reward_source {source!r} returned {shape} scores for {len(prompts)} responses")
        return out

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
        h = self.hparams
        critic = list(self.value_head.parameters())
        if self.critic_backbone is not None:
            critic += list(self.critic_backbone.parameters())
        groups = {"policy": list(self.policy.parameters()), "value": critic}
        clip = torch.nn.utils.clip_grad_norm_
        return {name: clip([p for p in params if p.grad is not None], h.max_grad_norm, foreach=True)
                for name, params in groups.items()}  # fmt: skip

    def _minibatch_loss(self, mb: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """Policy loss (fused, from the logits) + vf_coef * clipped value loss of one minibatch, and its stats."""
        h = self.hparams
        ids, mask = mb.input_ids, mb.attention_mask
        p, r = mb.prompt_ids.shape[1], mb.response_ids.shape[1]
        sel = mb.response_mask
        hidden = self.policy(ids, mask)  # (b, P + R, D)
        logits = hidden[:, p - 1 : p + r - 1][sel] @ self.policy.lm_head_weight.T  # (N, V)
        ref_logits = None
        if h.kl_in_loss and h.kl_estimator == "full":
            with torch.no_grad():  # the exact KL in the loss reads the reference's logits at the same positions
                ref_logits = self.ref_policy(ids, mask)[:, p - 1 : p + r - 1][sel] @ self.ref_policy.lm_head_weight.T
        beta = self.kl_ctl.value
        pg_loss, pstats = rlhf_kernels.ppo_loss_from_logits(
            logits, mb.response_ids[sel], mb.logprobs[sel], mb.advantages[sel], torch.ones_like(sel[sel]),
            clip_eps_low=h.clip_eps, clip_eps_high=h.clip_eps if h.clip_eps_high is None else h.clip_eps_high,
            entropy_coef=h.entropy_coef, ref_logp=mb.ref_logprobs[sel] if h.kl_in_loss else None,
            kl_coef=beta if h.kl_in_loss else 0.0, kl_estimator=h.kl_estimator if h.kl_in_loss else "k1",
            temperature=self._temperature, inplace=True, ref_logits=ref_logits,
        )  # fmt: skip
        if self.critic_backbone is not None:
            values = self.value_head(self.critic_backbone(ids, mask)[:, p - 1 : p + r - 1])  # (b, R)
        else:
            values = self.value_head(hidden[:, p - 1 : p + r - 1])
        v_loss, v_clipfrac = clipped_value_loss(values.float(), mb.values, mb.returns, sel, self._value_clip)
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
        h, dm = self.hparams, self.trainer.datamodule
        prompts, batch = dm.eval_prompts()
        args = (self.tokenizer, prompts, batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device),
                self.sampling, h.eval_seed, dm.judge)  # fmt: skip
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
        if h.eval_groups > 0:
            if self._sft_per_input is None:
                self._sft_per_input = self._per_input_diversity(self.ref_policy, prompts, batch, "eval/sft_per_input")
            metrics.update(self._sft_per_input)
            metrics.update(self._per_input_diversity(self.policy, prompts, batch, "diversity/per_input"))
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            table = comparison_table(self._sft_eval, cur, self._sft_eval_proxy, proxy, h.eval_table_rows)
            experiment.add_text("eval/sft_vs_policy", table, self.iteration)
        return metrics

    def _per_input_diversity(
        self, model: nn.Module, prompts: list[str], batch: dict[str, torch.Tensor], prefix: str
    ) -> dict[str, float]:
        """Diversity within each prompt's samples: ``eval_samples_per_prompt`` responses to each of the first
        ``eval_groups`` held-out prompts, scored per prompt and averaged. Keys ``{prefix}_distinct_2`` etc."""
        h = self.hparams
        g, k = min(h.eval_groups, len(prompts)), h.eval_samples_per_prompt
        ids = batch["prompt_ids"][:g].repeat_interleave(k, 0).to(self.device)  # (g * k, P)
        mask = batch["prompt_mask"][:g].repeat_interleave(k, 0).to(self.device)
        texts = [t for t in prompts[:g] for _ in range(k)]
        samples = sample_eval(model, self.tokenizer, texts, ids, mask, self.sampling, h.eval_seed + 1)
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
        return self.reward_model.score(ids, mask).conservative(self.hparams.ensemble_k).float().cpu()

    # -- optimisation ------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        h = self.hparams
        critic = list(self.value_head.parameters())
        if self.critic_backbone is not None:
            critic += list(self.critic_backbone.parameters())
        opt = torch.optim.AdamW(
            [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": h.lr},
             {"params": critic, "lr": h.critic_lr}],
            weight_decay=h.weight_decay, betas=tuple(h.betas), fused=True,  # one kernel per step, not one per tensor
        )  # fmt: skip
        total = h.iterations * h.ppo_epochs * (h.rollout_batch // h.minibatch_size)

        def factor(step: int) -> float:
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            progress = min(1.0, (step - h.warmup_steps) / max(1, total - h.warmup_steps))
            return 1.0 - (1.0 - h.min_lr_ratio) * progress

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def kl_controller_from(h: Any):
    """The KL controller the module's hyperparameters describe."""
    return kl_controller(
        h.kl_controller, h.kl_coef, target=h.kl_target, horizon=h.kl_horizon, floor=h.kl_floor,
        anneal_iterations=h.kl_anneal_iterations, schedule=h.kl_schedule, min_value=h.kl_min, max_value=h.kl_max,
    )  # fmt: skip


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - G)^2, (V_clipped - G)^2), masked mean, with V_clipped = V_old + clip(V - V_old, -c, c): the
    critic cannot move further than ``clip`` from the rollout's values in one iteration.

    Args:
        values: (B, R) current values (with gradient); old_values: (B, R) the rollout's; returns: (B, R) targets.
        mask: (B, R) real response tokens.

    Returns:
        (loss, fraction of tokens where the clipped term was the larger one).
    """
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(err, mask), torch.zeros((), device=values.device)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err_clipped = (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(err, err_clipped), mask), masked_mean((err_clipped > err).float(), mask)


def duplicate_rate(prompts: list[str], responses: list[str]) -> float:
    """Share of responses that some response to a *different* prompt repeats word for word: near 0 for a healthy
    policy, high when it answers everything with the same text (mode collapse across inputs)."""
    by_text: dict[str, set[str]] = defaultdict(set)
    for prompt, response in zip(prompts, responses, strict=True):
        by_text[response].add(prompt)
    return sum(len(by_text[r]) > 1 for r in responses) / max(len(responses), 1)


def win_rate(policy_scores: torch.Tensor, baseline_scores: torch.Tensor) -> float:
    """Share of prompts where the policy's response scores above the baseline's (ties count half). Both (B,)."""
    wins = (policy_scores > baseline_scores).float() + 0.5 * (policy_scores == baseline_scores).float()
    return float(wins.mean())


def comparison_table(
    sft: EvalSamples, cur: EvalSamples, sft_proxy: torch.Tensor | None, proxy: torch.Tensor | None, rows: int
) -> str:
    """Markdown table: prompt, SFT response and its scores, current response and its scores."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def scores(i: int, gold: torch.Tensor | None, prox: torch.Tensor | None) -> str:
        parts = [f"proxy {float(prox[i]):.2f}" if prox is not None else "", f"gold {float(gold[i]):.2f}" if gold is
                 not None else ""]  # fmt: skip
        return ", ".join(x for x in parts if x)

    lines = ["| prompt | SFT response | SFT scores | policy response | policy scores |", "|---|---|---|---|---|"]
    for i in range(min(rows, len(cur.prompts))):
        lines.append(
            f"| {cell(cur.prompts[i])} | {cell(sft.responses[i])} | {scores(i, sft.gold, sft_proxy)} "
            f"| {cell(cur.responses[i])} | {scores(i, cur.gold, proxy)} |"
        )
    return "\n".join(lines)
