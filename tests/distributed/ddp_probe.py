"""A callback the distributed tests add to a phase's CLI run: each rank writes what it saw to ``OUT/rank<r>.json``.

It runs inside the ranks Lightning launches, so it is imported by name from ``tests/distributed`` (on PYTHONPATH in
the launching test). It records, per rank: a digest of the module's parameters and buffers at the start and the end
of training, the final ``callback_metrics``, the checkpoint files this rank's CheckpointIO wrote, this rank's own
share of the last validation (SFT: token-weighted loss sums; reward model: pair scores), and for PPO the prompts,
local rollout statistics, beta and running score statistics of every iteration.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.tensor import DTensor

from rlhf_lightning.modules import PPOModule, RewardModule, SFTModule
from rlhf_lightning.modules.reward import pair_scores


def digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, by name: equal digests mean bit-identical models. Sharded (FSDP2)
    tensors are gathered whole first (a collective: every rank calls this)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DDPProbe(Callback):
    """Records what this rank saw (see the module doc) and writes it to ``out/rank<r>.json`` at the end of fit."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.record: dict[str, Any] = {"saved": [], "val": {}, "iterations": []}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.record.update(rank=trainer.global_rank, world_size=trainer.world_size)
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def recording_save(checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            self.record["saved"].append(Path(path).name)
            save(checkpoint, path, storage_options)

        io.save_checkpoint = recording_save
        if isinstance(pl_module, PPOModule):
            self._wrap_ppo(trainer, pl_module)

    def _wrap_ppo(self, trainer: Trainer, module: PPOModule) -> None:
        """Records each iteration's prompts and this rank's rollout statistics before any cross-rank reduction."""
        dm, make_rollout, rollout_prompts = trainer.datamodule, module.make_rollout, trainer.datamodule.rollout_prompts

        def recording_prompts(iteration: int, *args: Any, **kwargs: Any):
            prompts, batch = rollout_prompts(iteration, *args, **kwargs)
            self.record["iterations"].append({"iteration": iteration, "prompts": prompts})
            return prompts, batch

        def recording_rollout(iteration: int):
            rollout, metrics, times = make_rollout(iteration)
            local = {"kl": float(rollout.kl.sum(-1).mean()), **metrics}
            self.record["iterations"][-1]["local"] = local
            return rollout, metrics, times

        dm.rollout_prompts, module.make_rollout = recording_prompts, recording_rollout

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["digest_start"] = digest(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if isinstance(pl_module, PPOModule):
            last = self.record["iterations"][-1]
            last["beta"] = pl_module.kl_ctl.value
            last["score_moments"] = pl_module.score_moments.state_dict()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["val"] = {"loss_sum": 0.0, "tokens": 0, "index": [], "margin": []}

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        val = self.record["val"]
        if isinstance(pl_module, SFTModule):
            loss, tokens = pl_module._nll(batch)
            val["loss_sum"] += float(loss) * tokens
            val["tokens"] += tokens
        elif isinstance(pl_module, RewardModule):
            r_c, r_r = pair_scores(pl_module.reward_model, batch)
            val["index"] += batch["index"].tolist()
            val["margin"] += (r_c.mean(1) - r_r.mean(1)).tolist()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["digest_end"] = digest(pl_module)
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
