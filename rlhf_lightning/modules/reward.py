"""Phase 2: the Bradley-Terry reward model on the shared backbone.

The backbone starts from the SFT checkpoint (its LM head is not used); a scalar head reads the hidden state of the last
real token of prompt + response (``pooling="last"``, the default) or the mean of their hidden states (``"mean"``).
Loss: ``-log sigmoid(r_chosen - r_rejected - margin)`` (the kernels' fused, stable form). An ensemble of K members
(see :mod:`rlhf_lightning.models.reward`) trains each member on its own bootstrap resample of the pairs: pair i
counts w[i, k] ~ Poisson(1) times in member k's loss (the online bootstrap), drawn once from ``seed`` and kept in the
checkpoint.

Validation logs, on held-out pairs: ``rm/accuracy`` against the labels and, on the world, ``rm/accuracy_gold``
against the gold judge's ordering beside ``rm/bayes_accuracy`` (the best any model can reach under the annotators'
noise), ``rm/margin``, ``rm/ece``, ``rm/len_corr`` (score vs response length), score mean/std and, for ensembles,
``rm/ensemble_std``, and ``rm/baseline_accuracy``: the held-out accuracy of a converged bag-of-words logistic
regression fitted on the same training pairs (:mod:`rlhf_lightning.metrics.baseline`), the simplest model the reward
model must beat to have learned more than which words the annotators like. It then refreshes the normalisation
statistics: each member's score mean and std on responses the SFT policy samples for training prompts, kept in the
model's buffers and so in every checkpoint.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch

import rlhf_kernels
from rlhf_lightning import tags
from rlhf_lightning.data.tokenizer import check_same_tokenizer
from rlhf_lightning.metrics import expected_calibration_error, order_agreement, pairwise_accuracy, pearson
from rlhf_lightning.metrics.baseline import bag_of_words_baseline
from rlhf_lightning.models.backbone import load_sft_backbone
from rlhf_lightning.models.heads import Pooling
from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.models.sampling import SamplingConfig, sample_prompt_responses, sample_responses
from rlhf_lightning.modules.base import PhaseModule
from rlhf_lightning.modules.common import (
    adamw_with_warmup_cosine,
    check_optimizer_settings,
    finite_rank_mean,
    shard_backbone,
)


def pair_scores(model: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw member scores (B, K) of the chosen and of the rejected responses, in one (2B, T) forward pass.

    Args:
        batch: ``chosen_ids``, ``chosen_mask``, ``rejected_ids``, ``rejected_mask``, each (B, T) right-padded.
    """
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    return model.raw_members(ids, mask).chunk(2)


def pair_losses(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of every pair and member, (B, K), from member scores (B, K) (fused kernel)."""
    losses = rlhf_kernels.bradley_terry_loss(r_chosen.flatten(), r_rejected.flatten(), margin, reduction="none")
    return losses.view_as(r_chosen)


class RewardModule(PhaseModule):
    """Bradley-Terry reward model (single or ensemble) initialised from the SFT policy.

    Args:
        sft_checkpoint: the SFT phase's checkpoint (backbone weights and tokenizer).
        ensemble_size: K members (1 = a single reward model).
        ensemble_mode: "heads" (K heads on one shared trunk) or "backbones" (K trunks).
        bootstrap: train each member on its own Poisson(1) bootstrap resample (only with K > 1).
        margin: required score gap in the loss.
        pooling: "last" (the head reads the last real token's hidden state, like a Hugging Face sequence classifier:
            the only kind ``rlhf export`` can write as one) or "mean" (the mean hidden state of prompt + response).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with linear warmup then cosine decay.
        norm_samples: SFT-policy samples (of training prompts) the normalisation statistics are computed on.
        norm_sampling: how those samples are drawn.
        baseline_folds: folds of the cross-validation that picks the bag-of-words baseline's L2 strength (0: no
            baseline, e.g. for data too small to split).
        seed: seed of the heads' initialisation, the bootstrap weights, the normalisation samples and, with the data
            module's ``pair_source: sft_policy``, of the pairs sampled from the SFT policy and their labels.
        shard: shard every trunk and head with FSDP2 (see :func:`~rlhf_lightning.modules.common.shard_backbone`;
            needs ``trainer.strategy: ModelParallelStrategy``).
    """

    PHASE = "reward"

    def __init__(
        self,
        sft_checkpoint: str = "runs/sft/checkpoints/last.ckpt",
        ensemble_size: int = 1,
        ensemble_mode: Literal["heads", "backbones"] = "heads",
        bootstrap: bool = True,
        margin: float = 0.0,
        pooling: Pooling = "last",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        norm_samples: int = 512,
        norm_sampling: SamplingConfig | None = None,
        baseline_folds: int = 5,
        seed: int = 0,
        shard: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_optimizer_settings(self.hparams)
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        if norm_samples < 2:
            raise ValueError(f"norm_samples must be >= 2 (a std needs two samples), got {norm_samples}")
        if baseline_folds < 0 or baseline_folds == 1:
            raise ValueError(f"baseline_folds must be 0 (no baseline) or >= 2, got {baseline_folds}")
        # PPO's default sampling: the statistics describe the responses PPO starts from (which re-measures them with
        # its own sampling settings anyway; see PPOModule's reward_norm_samples).
        self.norm_sampling = norm_sampling or SamplingConfig(max_new_tokens=32, temperature=1.0)
        self.reward_model: RewardModel | None = None
        self._val: list[dict[str, torch.Tensor]] = []
        self._norm_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._norm_step = -1
        self._baseline_accuracy: float | None = None

    # -- model construction ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.built or self._trainer is None:
            return
        h = self.hparams
        backbone, sft_tokenizer = load_sft_backbone(h.sft_checkpoint)
        tokenizer = self.datamodule_tokenizer()
        check_same_tokenizer(
            sft_tokenizer, tokenizer,
            f"the data module's tokenizer differs from the one of {h.sft_checkpoint}; the reward model must read "
            "text exactly as the policy does (point data.tokenizer_path at the SFT checkpoint's folder)",
        )  # fmt: skip
        self.tokenizer = tokenizer
        dm = self.trainer.datamodule
        if getattr(dm, "pair_source", "grammar") == "sft_policy":
            sampling = dm.pair_sampling or SamplingConfig(max_new_tokens=dm.hparams.max_response_len)
            sample = partial(sample_responses, backbone, sampling, tokenizer.eos_id, tokenizer.pad_id)
            dm.sample_policy_pairs(sample, h.seed)  # before the bootstrap weights are sized by the pairs
        self.reward_model = RewardModel(backbone, h.ensemble_size, h.ensemble_mode, h.seed, h.pooling)
        n_train = len(dm.train_examples)
        g = torch.Generator().manual_seed(h.seed)
        use_bootstrap = h.bootstrap and h.ensemble_size > 1
        # On the CPU explicitly: configure_model runs under Lightning's default-device context (CUDA on a GPU).
        ones = torch.ones(n_train, h.ensemble_size, device="cpu")
        weights = torch.poisson(ones, generator=g) if use_bootstrap else None
        self.register_buffer("bootstrap_weights", weights if weights is not None else torch.ones(n_train, 1))
        self._norm_batch = self._sample_sft_responses(backbone)
        if h.shard:  # after the sampling above: every rank samples the same prompts, sharded or not
            for model in (*self.reward_model.backbones, *self.reward_model.heads):
                shard_backbone(self, model)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"reward_model": self.reward_model.spec(), "sft_checkpoint": str(self.hparams.sft_checkpoint)}

    def build_from_checkpoint(self, meta: dict[str, Any]) -> None:
        self.reward_model = RewardModel.from_spec(meta["reward_model"])
        self.register_buffer("bootstrap_weights", torch.ones(0, 1))  # resized by load_state_dict's copy below

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if "bootstrap_weights" in state_dict:  # its length is the training set's, unknown before the load
            self.bootstrap_weights = torch.empty_like(state_dict["bootstrap_weights"])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _sample_sft_responses(self, policy: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation samples: see :func:`sample_prompt_responses`."""
        h = self.hparams
        return sample_prompt_responses(policy, self.trainer.datamodule, self.tokenizer, h.norm_samples,
                                       self.norm_sampling, h.seed)  # fmt: skip

    # -- training ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        r_c, r_r = pair_scores(self.reward_model, batch)  # (B, K)
        losses = pair_losses(r_c, r_r, self.hparams.margin)  # (B, K)
        w = self.bootstrap_weights[batch["index"]].expand(-1, r_c.shape[1])  # (B, K)
        loss = ((losses * w).sum(0) / w.sum(0).clamp(min=1)).mean()
        self.log("rm/loss", finite_rank_mean(self, loss, "rm/loss"), prog_bar=True)
        self.log("rm/train_accuracy", pairwise_accuracy(r_c.mean(1), r_r.mean(1)), sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        r_c, r_r = pair_scores(self.reward_model, batch)
        self._val.append({
            "r_c": r_c.detach().cpu(), "r_r": r_r.detach().cpu(), "index": batch["index"].cpu(),
            "len_c": batch["chosen_response_len"].cpu(), "len_r": batch["rejected_response_len"].cpu(),
        })  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        v = {key: torch.cat([b[key] for b in self._val]) for key in self._val[0]}
        self._val.clear()
        if self.trainer.world_size > 1:
            v = self._gather_val(v)
        r_c, r_r = v["r_c"].mean(1), v["r_r"].mean(1)  # ensemble mean (raw scores)
        scores, lengths = torch.cat([r_c, r_r]), torch.cat([v["len_c"], v["len_r"]])
        metrics = {
            tags.RM_ACCURACY: pairwise_accuracy(r_c, r_r),
            "rm/margin": float((r_c - r_r).mean()),
            "rm/ece": expected_calibration_error(r_c, r_r),
            "rm/len_corr": pearson(scores, lengths.float()),
            "rm/score_mean": float(scores.mean()),
            "rm/score_std": float(scores.std()),
        }
        if v["r_c"].shape[1] > 1:
            metrics["rm/ensemble_std"] = float(torch.cat([v["r_c"], v["r_r"]]).std(dim=1, unbiased=False).mean())
        dm = self.trainer.datamodule
        if getattr(dm, "val_gold", None) is not None:
            g_c, g_r = (g[v["index"]] for g in dm.val_gold)
            metrics["rm/accuracy_gold"] = order_agreement(r_c - r_r, g_c - g_r)
        if getattr(dm, "bayes_accuracy", None) is not None:
            metrics[tags.RM_BAYES_ACCURACY] = dm.bayes_accuracy
        if self.hparams.baseline_folds:
            metrics[tags.RM_BASELINE_ACCURACY] = self.baseline_accuracy()
        if not self.trainer.sanity_checking:
            self.refresh_normalisation()
            metrics["rm/norm_mean"] = float(self.reward_model.norm_mean.mean())
            metrics["rm/norm_std"] = float(self.reward_model.norm_std.mean())
        # Every rank computed these from the same gathered pairs and weights: the sync averages equal values.
        self.log_dict(metrics, sync_dist=True)

    def _gather_val(self, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's validation results, each pair once. The metrics (accuracy, ECE, correlations) are not
        means of per-rank values, so each rank computes them on all pairs. DistributedSampler gives every rank the
        same count by repeating pairs; the pair index drops the repeats."""
        v = {key: self.all_gather(t.to(self.device)).flatten(0, 1).cpu() for key, t in v.items()}
        index, inverse = torch.unique(v["index"], return_inverse=True)
        positions = torch.arange(len(inverse))
        first = torch.full_like(index, len(inverse)).scatter_reduce(0, inverse, positions, "amin")
        return {key: t[first] for key, t in v.items()}

    def on_fit_start(self) -> None:
        if self.hparams.baseline_folds:
            self.baseline_accuracy()  # before any training step: too few pairs fail here, not at validation

    def baseline_accuracy(self) -> float:
        """Held-out accuracy of the bag-of-words baseline on this run's pairs (fitted once, on first use)."""
        if self._baseline_accuracy is None:
            dm, h = self.trainer.datamodule, self.hparams
            if len(dm.train_examples) < h.baseline_folds:
                raise ValueError(f"the bag-of-words baseline needs >= baseline_folds ({h.baseline_folds}) training "
                                 f"pairs, got {len(dm.train_examples)}; set model.baseline_folds=0")  # fmt: skip

            def sides(examples: list) -> tuple[list[list[int]], list[list[int]]]:
                return [e.chosen_ids for e in examples], [e.rejected_ids for e in examples]

            fit = bag_of_words_baseline(sides(dm.train_examples), sides(dm.val_examples), self.tokenizer.vocab_size,
                                        folds=h.baseline_folds, seed=h.seed)  # fmt: skip
            self._baseline_accuracy = fit.accuracy
        return self._baseline_accuracy

    def refresh_normalisation(self) -> None:
        """Sets each member's norm_mean / norm_std to its raw score statistics on the SFT-policy samples."""
        if self._norm_batch is None or self._norm_step == self.global_step:
            return
        self.reward_model.measure_normalisation(*(t.to(self.device) for t in self._norm_batch))
        self._norm_step = self.global_step

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every checkpoint carries statistics measured on its own weights.
        if self._norm_step != self.global_step and self._norm_batch is not None:
            self.refresh_normalisation()
            checkpoint["state_dict"]["reward_model.norm_mean"] = self.reward_model.norm_mean.clone()
            checkpoint["state_dict"]["reward_model.norm_std"] = self.reward_model.norm_std.clone()
        super().on_save_checkpoint(checkpoint)

    def configure_optimizers(self) -> dict:
        h = self.hparams
        return adamw_with_warmup_cosine(
            self.reward_model, h.lr, h.weight_decay, tuple(h.betas), h.warmup_steps,
            self.trainer.estimated_stepping_batches, h.min_lr_ratio,
        )  # fmt: skip
