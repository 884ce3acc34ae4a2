"""Phase 1: supervised fine-tuning on demonstrations.

Next-token loss on response tokens only (the prompt is context, not a target), through the fused token log-prob
kernel. Validation adds what a loss cannot show: responses sampled for held-out prompts, scored by the world's gold
judge when one exists (``eval/gold_reward``), their well-formedness, EOS rate and distinct-n, and a TensorBoard text
table of samples. The checkpoint is what the reward-model and PPO phases start from.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_lightning.models.backbone import backbone_from_spec, backbone_spec, build_backbone
from rlhf_lightning.models.sampling import SamplingConfig
from rlhf_lightning.models.tinygpt import GPTConfig
from rlhf_lightning.modules.base import PhaseModule
from rlhf_lightning.modules.common import (
    adamw_with_warmup_cosine,
    check_optimizer_settings,
    eval_metrics,
    finite_rank_mean,
    response_logprobs,
    sample_eval,
    samples_table,
    shard_backbone,
)


class SFTModule(PhaseModule):
    """Supervised fine-tuning of the policy backbone.

    Args:
        backbone: TinyGPT shape (vocab_size 0 = the tokenizer's); ignored when ``hf_model_path`` is set.
        hf_model_path: a local Hugging Face causal-LM directory to fine-tune instead of a TinyGPT.
        lr, weight_decay, betas: AdamW settings (no decay on biases and norms).
        warmup_steps, min_lr_ratio: linear warmup, then cosine decay to ``min_lr_ratio * lr`` at the last step.
        eval_sampling: how validation samples responses.
        eval_seed: seed of the private RNG validation samples with (the same samples every epoch for a given model).
        eval_table_rows: samples shown in the TensorBoard text table.
        shard: shard the backbone with FSDP2 (see :func:`~rlhf_lightning.modules.common.shard_backbone`; needs
            ``trainer.strategy: ModelParallelStrategy``), for a model too large for one device.
    """

    PHASE = "sft"

    def __init__(
        self,
        backbone: GPTConfig | None = None,
        hf_model_path: str | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        eval_sampling: SamplingConfig | None = None,
        eval_seed: int = 1234,
        eval_table_rows: int = 8,
        shard: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_optimizer_settings(self.hparams)
        self.backbone_config = backbone or GPTConfig()
        self.eval_sampling = eval_sampling or SamplingConfig(max_new_tokens=32, temperature=1.0)
        self.model: torch.nn.Module | None = None

    # -- model construction ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Builds the backbone once the data module's tokenizer is known (its vocabulary sizes the embeddings)."""
        if self.built or self._trainer is None:
            return  # already built, or loading a checkpoint outside a Trainer (build_from_checkpoint does it)
        self.tokenizer = self.datamodule_tokenizer()
        self.model = build_backbone(self.backbone_config, self.tokenizer.vocab_size, self.hparams.hf_model_path)
        if self.hparams.shard:
            shard_backbone(self, self.model)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"backbone": backbone_spec(self.model)}

    def build_from_checkpoint(self, meta: dict[str, Any]) -> None:
        self.model = backbone_from_spec(meta["backbone"])

    # -- training ----------------------------------------------------------------------------------------------------
    def _nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        mask = batch["loss_mask"]
        logp = response_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["targets"], mask)
        return -logp.mean(), int(mask.sum())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n_tokens = self._nll(batch)
        self.log("sft/loss", finite_rank_mean(self, loss, "sft/loss"), prog_bar=True, batch_size=n_tokens)
        self.log("sft/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = self._nll(batch)
        # batch_size = tokens, so the epoch value is the token-weighted mean (the true held-out loss).
        # sync_dist: under DDP each rank validates its own shard; the sums and token counts are added across ranks.
        self.log("sft/val_loss", loss, prog_bar=True, batch_size=n_tokens, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        val_loss = self.trainer.callback_metrics.get("sft/val_loss")
        if val_loss is not None:
            self.log("sft/val_ppl", math.exp(min(float(val_loss), 50.0)), sync_dist=True)
        if self.trainer.sanity_checking:
            return
        dm = self.trainer.datamodule
        prompts, batch = dm.eval_prompts()
        samples = sample_eval(
            self.model, self.tokenizer, prompts, batch["prompt_ids"].to(self.device),
            batch["prompt_mask"].to(self.device), self.eval_sampling, self.hparams.eval_seed, dm.judge,
        )  # fmt: skip
        # Every rank samples the same prompts with the same weights and seed: the sync averages equal values.
        self.log_dict(eval_metrics(samples), sync_dist=True)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("eval/samples", samples_table(samples, self.hparams.eval_table_rows), self.global_step)

    def configure_optimizers(self) -> dict:
        h = self.hparams
        return adamw_with_warmup_cosine(
            self.model, h.lr, h.weight_decay, tuple(h.betas), h.warmup_steps,
            self.trainer.estimated_stepping_batches, h.min_lr_ratio,
        )  # fmt: skip
