"""Phase "dpo": direct preference optimisation on the preference pairs, from the SFT checkpoint.

The policy starts as the SFT policy; the reference is a frozen copy of it. DPO's loss needs the reference's summed
response log-probs of both sides of every pair, and they never change: they are computed once, in
``configure_model``, for every training and validation pair (the fused ``rlhf_kernels.token_logprobs``, batched), and
kept in (N, 2) buffers indexed by the pairs' ``index``. A training step runs the policy alone. The reference still
serves the evaluation (its held-out samples are the SFT baseline, and the KL to SFT needs its log-probs).

Logged: ``dpo/loss``, ``rewards/{chosen,rejected,margins,accuracies}`` (the implicit reward ``beta * log pi / pi_ref``
and how often it orders a pair like its label) on training batches and, as ``dpo/val_loss`` and
``rewards/val_*``, on the validation pairs (with ``rewards/val_accuracy_gold`` against the gold judge's ordering on
the world); then PPO's evaluation on the held-out prompts under the same ``eval/*`` tags (gold reward, win rate
against the SFT policy, proxy reward with a reward checkpoint, per-input diversity) and the KL of the policy's
held-out responses to the SFT policy (``eval/kl``), so DPO and PPO runs read side by side in TensorBoard and
``rlhf diagnose``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from rlhf_lightning import tags
from rlhf_lightning.data.collate import collate_pairs
from rlhf_lightning.data.tokenizer import check_same_tokenizer
from rlhf_lightning.metrics import order_agreement, pairwise_accuracy
from rlhf_lightning.models.backbone import backbone_from_spec, backbone_spec, disable_dropout, freeze, load_sft_backbone
from rlhf_lightning.models.reward import RewardModel, load_reward_model
from rlhf_lightning.models.sampling import SamplingConfig
from rlhf_lightning.modules.base import PhaseModule
from rlhf_lightning.modules.common import (
    adamw_with_warmup_cosine,
    check_optimizer_settings,
    finite_rank_mean,
    response_logprobs,
    unflatten_masked,
)
from rlhf_lightning.modules.ppo_eval import EvalConfig, SFTBaseline, evaluate
from rlhf_lightning.modules.ppo_setup import config_arg
from rlhf_lightning.rl.dpo import DPOLossType, dpo_loss


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 2) summed log-probs of the chosen (column 0) and the rejected (column 1) responses under ``model``, in one
    (2B, T) pass through the fused token log-prob kernel.

    Args:
        batch: :func:`~rlhf_lightning.data.collate.collate_pairs`'s ``{chosen,rejected}_ids`` and ``_mask`` (B, T),
            right-padded prompt + response, and ``{chosen,rejected}_response_len`` (B,).
    """
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T)
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    response_len = torch.cat([batch["chosen_response_len"], batch["rejected_response_len"]])  # (2B,)
    seq_len = mask.sum(1)
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]  # position t predicts token t + 1
    pos = torch.arange(ids.shape[1], device=ids.device)
    # The response's tokens sit at seq_len - response_len .. seq_len - 1; the positions before each predict them.
    loss_mask = (pos >= (seq_len - response_len - 1)[:, None]) & (pos < (seq_len - 1)[:, None])  # (2B, T)
    logp = response_logprobs(model, ids, mask, targets, loss_mask)  # (N,)
    return unflatten_masked(logp.float(), loss_mask).sum(1).view(2, -1).T


@torch.no_grad()
def reference_logps(model: nn.Module, examples: list, pad_id: int, batch_size: int) -> torch.Tensor:
    """(N, 2) :func:`pair_logps` of every pair of ``examples`` (PreferenceExample), in batches of ``batch_size``, on
    the CPU (where the caller's buffers start; Lightning moves them with the module)."""
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(examples[lo : lo + batch_size], pad_id).items()}
        out.append(pair_logps(model, batch).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


class DPOModule(PhaseModule):
    """Direct preference optimisation of the SFT policy on preference pairs (offline: no sampling in training).

    Args:
        sft_checkpoint: the SFT phase's checkpoint: the policy's start and the frozen reference.
        reward_checkpoint: optional reward-model checkpoint, only to report ``eval/proxy_reward`` beside PPO's (DPO
            itself never reads a reward model).
        beta: the KL regulariser's strength; the implicit reward is ``beta * log pi / pi_ref``. Small beta lets the
            policy move far from the reference for a given margin (see docs/dpo.md).
        label_smoothing: cDPO's assumed label-flip probability eps in [0, 0.5) (sigmoid loss only).
        loss: "sigmoid" (DPO, cDPO) or "ipo" (see :func:`~rlhf_lightning.rl.dpo.dpo_loss`).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with linear warmup then cosine decay.
        ref_batch_size: pairs per batch when the reference's log-probs are computed at the start.
        sampling: how evaluation samples responses (as PPO's ``sampling``: the held-out figures compare).
        eval: evaluation on the held-out prompts (PPO's :class:`~rlhf_lightning.modules.ppo_eval.EvalConfig`; its
            ``every`` is unused: DPO evaluates at each validation, ``trainer.val_check_interval``).
        ensemble_k: with an ensemble reward checkpoint, the proxy reported is ``mean - ensemble_k * std``.
    """

    PHASE = "dpo"
    #: The frozen models: reloaded from their own checkpoints, never saved again (see PhaseModule).
    FROZEN_PREFIXES = ("ref_policy.", "reward_model.")

    def __init__(
        self,
        sft_checkpoint: str = "runs/sft/checkpoints/last.ckpt",
        reward_checkpoint: str | None = None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss: DPOLossType = "sigmoid",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        ref_batch_size: int = 256,
        sampling: SamplingConfig | None = None,
        eval: EvalConfig | None = None,
        ensemble_k: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_optimizer_settings(self.hparams)
        if not beta > 0:
            raise ValueError(f"model.init_args.beta must be > 0, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"model.init_args.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if loss not in ("sigmoid", "ipo"):
            raise ValueError(f"model.init_args.loss must be 'sigmoid' or 'ipo', got {loss!r}")
        if loss == "ipo" and label_smoothing:
            raise ValueError("model.init_args.label_smoothing applies to loss 'sigmoid' only (IPO smooths no labels)")
        if ref_batch_size < 1:
            raise ValueError(f"model.init_args.ref_batch_size must be >= 1, got {ref_batch_size}")
        for name, path in (("sft_checkpoint", sft_checkpoint), ("reward_checkpoint", reward_checkpoint)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{name} {path} does not exist (run that phase first, or fix the path)")
        # The arguments, not hparams: loaded from a checkpoint made under LightningCLI they arrive as dicts.
        self.sampling = config_arg(SamplingConfig, sampling) or SamplingConfig(max_new_tokens=32, temperature=1.0)
        self.eval_config = config_arg(EvalConfig, eval) or EvalConfig()
        self.policy: nn.Module | None = None
        self.ref_policy: nn.Module | None = None
        self.reward_model: RewardModel | None = None
        self._sft_baseline: SFTBaseline | None = None
        self._val: list[torch.Tensor] = []

    # -- model construction ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.built or self._trainer is None:
            return
        h = self.hparams
        tokenizer = self.datamodule_tokenizer()
        policy, sft_tokenizer = load_sft_backbone(h.sft_checkpoint)
        check_same_tokenizer(
            sft_tokenizer, tokenizer,
            f"the data module's tokenizer differs from the one of {h.sft_checkpoint}; point data.tokenizer_path at "
            "the SFT checkpoint's folder",
        )  # fmt: skip
        # No dropout: the implicit reward compares the policy's log-probs with the reference's, which has none.
        disable_dropout(policy)
        self.tokenizer = tokenizer
        self.policy = policy
        self.ref_policy = freeze(copy.deepcopy(policy))
        if h.reward_checkpoint is not None:
            reward_model, rm_tokenizer = load_reward_model(h.reward_checkpoint)
            message = f"the tokenizers of {h.sft_checkpoint} and {h.reward_checkpoint} differ"
            check_same_tokenizer(rm_tokenizer, tokenizer, f"{message}: the reward model must read the policy's text")
            self.reward_model = freeze(reward_model)
        dm = self.trainer.datamodule
        # Once, here: the reference is frozen, so its log-probs of a pair are the same in every epoch.
        for split in ("train", "val"):
            examples = getattr(dm, f"{split}_examples")
            cache = reference_logps(self.ref_policy, examples, tokenizer.pad_id, h.ref_batch_size)
            self.register_buffer(f"ref_logps_{split}", cache, persistent=False)
        # The frozen reference and reward model stay in eval mode on purpose; Lightning warns about any such module.
        warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode at the start", PossibleUserWarning)

    def checkpoint_meta(self) -> dict[str, Any]:
        h = self.hparams
        return {"backbone": backbone_spec(self.policy), "sft_checkpoint": str(h.sft_checkpoint),
                "reward_checkpoint": str(h.reward_checkpoint) if h.reward_checkpoint else None}  # fmt: skip

    def build_from_checkpoint(self, meta: dict[str, Any]) -> None:
        """The policy only; the frozen reference and reward model are not in a DPO checkpoint."""
        self.policy = backbone_from_spec(meta["backbone"])

    # -- training ----------------------------------------------------------------------------------------------------
    def _pair_loss(self, batch: dict[str, torch.Tensor], ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss of a batch of pairs, and its (B, 2) implicit rewards (chosen, rejected); ``ref`` (N, 2) is
        the split's cached reference log-probs."""
        h = self.hparams
        logp, ref_logp = pair_logps(self.policy, batch), ref[batch["index"]]  # (B, 2) each
        out = dpo_loss(logp[:, 0], logp[:, 1], ref_logp[:, 0], ref_logp[:, 1], h.beta, h.label_smoothing, h.loss)
        return out.losses.mean(), torch.stack([out.chosen_rewards, out.rejected_rewards], 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, rewards = self._pair_loss(batch, self.ref_logps_train)
        self.log(tags.DPO_LOSS, finite_rank_mean(self, loss, tags.DPO_LOSS), prog_bar=True)
        self.log_dict(reward_metrics(rewards, "rewards/"), sync_dist=True)
        self.log("dpo/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, rewards = self._pair_loss(batch, self.ref_logps_val)
        self.log("dpo/val_loss", loss, sync_dist=True, batch_size=len(rewards))
        self._val.append(torch.cat([rewards, batch["index"][:, None].to(rewards.dtype)], 1).cpu())

    def on_validation_epoch_end(self) -> None:
        if self._val:
            val = torch.cat(self._val)  # (N, 3): chosen reward, rejected reward, pair index
            self._val.clear()
            metrics = reward_metrics(val[:, :2], "rewards/val_")
            gold = getattr(self.trainer.datamodule, "val_gold", None)
            if gold is not None:
                index = val[:, 2].long()
                metrics["rewards/val_accuracy_gold"] = order_agreement(val[:, 0] - val[:, 1],
                                                                       gold[0][index] - gold[1][index])  # fmt: skip
            self.log_dict(metrics, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.log_dict(self.evaluate(), sync_dist=True)

    def evaluate(self) -> dict[str, float]:
        """PPO's held-out evaluation against the SFT policy (:func:`~rlhf_lightning.modules.ppo_eval.evaluate`, with
        ``eval/kl``); the table of the SFT and the current responses goes to TensorBoard."""
        dm = self.trainer.datamodule
        metrics, table, self._sft_baseline = evaluate(
            self.policy, self.ref_policy, self.reward_model, self.tokenizer, dm, self.sampling, self.eval_config,
            self.hparams.ensemble_k, self._sft_baseline, self.device,
        )  # fmt: skip
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("eval/sft_vs_policy", table, self.global_step)
        return metrics

    def configure_optimizers(self) -> dict:
        h = self.hparams
        return adamw_with_warmup_cosine(
            self.policy, h.lr, h.weight_decay, tuple(h.betas), h.warmup_steps,
            self.trainer.estimated_stepping_batches, h.min_lr_ratio,
        )  # fmt: skip


def reward_metrics(rewards: torch.Tensor, prefix: str) -> dict[str, float]:
    """Means of the implicit rewards (B, 2) (chosen, rejected), their margin, and the share of pairs they order like
    the label: ``{prefix}chosen``, ``rejected``, ``margins``, ``accuracies`` (TRL's names)."""
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return {
        f"{prefix}chosen": float(chosen.mean()),
        f"{prefix}rejected": float(rejected.mean()),
        f"{prefix}margins": float((chosen - rejected).mean()),
        f"{prefix}accuracies": pairwise_accuracy(chosen, rejected),
    }
