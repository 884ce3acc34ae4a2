"""PhaseModule: what every phase's LightningModule does the same way — the tokenizer it shares with its data
module, a self-contained checkpoint (phase, tokenizer, model specs), and the run bookkeeping at train start."""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from rlhf_lightning.checkpoint import RLHF_KEY
from rlhf_lightning.data.tokenizer import Tokenizer, check_same_tokenizer, tokenizer_from_meta, tokenizer_meta
from rlhf_lightning.models.lora import LoRAConfig
from rlhf_lightning.models.sampling import SamplingConfig
from rlhf_lightning.models.tinygpt import GPTConfig
from rlhf_lightning.rl import AdvantageConfig, KLConfig, RewardConfig
from rlhf_lightning.world import AnnotatorConfig, JudgeConfig, WorldConfig

# The config dataclasses end up in the checkpoints' saved hyperparameters; resuming loads them with torch.load's
# weights_only unpickler, which accepts only allow-listed classes. These are plain data of this package.
torch.serialization.add_safe_globals(
    [
        SamplingConfig,
        GPTConfig,
        LoRAConfig,
        WorldConfig,
        AnnotatorConfig,
        JudgeConfig,
        KLConfig,
        RewardConfig,
        AdvantageConfig,
    ]
)


def _for_users(record: logging.LogRecord) -> bool:
    """Whether one of Lightning's INFO lines is for a user: not its advertisements for its cloud services ("💡 Tip:
    ... litlogger / litmodels", on each Trainer), nor that the phases' progress bar takes the place of its own."""
    message = record.getMessage()
    return not message.startswith("💡 Tip:") and not message.endswith(
        "will override existing callbacks passed to Trainer: RichProgressBar"
    )


def silence_expected_notices() -> None:
    """Silences, by its message alone, what Lightning says on every phase's run that a user need not act on (each
    filter matches one notice and nothing else; installing them again changes nothing)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_for_users)
    # torch's deprecation of LeafSpec, which Lightning's own CombinedLoader still builds (for Lightning to fix)
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # "does not have many workers": the data modules read and tokenise every record in setup, so a batch is only a
    # collation in memory (num_workers stays available for a data set that needs it)
    warnings.filterwarnings("ignore", r"The '\w+' does not have many workers", PossibleUserWarning)
    # "The number of training batches (N) is smaller than the logging interval": the phases are bounded in steps,
    # and Lightning counts log_every_n_steps across epoch boundaries, so a small data set is logged all the same
    warnings.filterwarnings("ignore", r"The number of training batches \(\d+\) is smaller than the logging",
                            PossibleUserWarning)  # fmt: skip


class PhaseProgressBar(RichProgressBar):
    """Lightning's progress bar, saying what a phase's run has: no epoch bound for a run bounded in steps (Lightning
    writes ``Epoch N/max_epochs - 1``, ``Epoch 9/-2`` there), and the module's own count of training batches where
    its train loader has no length (the PPO phase's iteration ticks: ``2/--`` and no time left otherwise)."""

    @property
    def total_train_batches(self) -> int | float:
        total = self.trainer.lightning_module.train_batches
        return super().total_train_batches if total is None else total

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 0:  # -1: epochs unbounded
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)


class PhaseModule(L.LightningModule):
    """Base of the phase modules. Subclasses set ``PHASE``, build their models in ``configure_model`` (inside a
    Trainer) and in ``build_from_checkpoint`` (when loaded on their own), and add entries with ``checkpoint_meta``."""

    PHASE = ""
    #: State-dict prefixes of frozen models that checkpoints leave out (they are reloaded from their own checkpoints).
    FROZEN_PREFIXES: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer: Tokenizer | None = None
        # Here, before the Trainer is built (LightningCLI makes the module first), for the whole run.
        silence_expected_notices()

    @property
    def built(self) -> bool:
        return self.tokenizer is not None

    @property
    def train_batches(self) -> int | None:
        """The training batches of the run, for the progress bar where the train loader has no length; None: the
        loader's own count."""
        return None

    def configure_callbacks(self) -> list[L.Callback]:
        # In place of Lightning's default progress bar only: one the user configured, or none, stays as it is.
        return [PhaseProgressBar()] if type(self.trainer.progress_bar_callback) is RichProgressBar else []

    def datamodule_tokenizer(self) -> Tokenizer:
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a data module with a tokenizer (see rlhf_lightning.data)")
        return tokenizer

    def checkpoint_meta(self) -> dict[str, Any]:
        """Phase-specific entries of the checkpoint's ``rlhf`` record (model specs, statistics)."""
        return {}

    def build_from_checkpoint(self, meta: dict[str, Any]) -> None:
        """Builds the (untrained) models the checkpoint's state dict will be loaded into."""
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RLHF_KEY] = {"phase": self.PHASE, **tokenizer_meta(self.tokenizer), **self.checkpoint_meta()}
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(self.FROZEN_PREFIXES)]:
            del state[key]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # A checkpoint without the frozen models: they keep the weights they were built with.
        if self.FROZEN_PREFIXES:
            state_dict = dict(state_dict)
            for key, value in super().state_dict().items():
                if key.startswith(self.FROZEN_PREFIXES):
                    state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(RLHF_KEY) or {}
        # Resuming (fit(ckpt_path=...)) is the case where a user may give the wrong file: name it.
        path = getattr(self._trainer, "ckpt_path", None)
        which = f"checkpoint {path}" if path else "the checkpoint"
        if meta.get("phase") != self.PHASE:
            raise ValueError(
                f"{type(self).__name__} cannot load {which}: it is from the {meta.get('phase')!r} phase, but a "
                f"{self.PHASE!r} checkpoint is needed here"
            )
        saved = tokenizer_from_meta(meta)
        if not self.built:  # loaded outside a Trainer: the checkpoint alone rebuilds everything
            self.tokenizer = saved
            self.build_from_checkpoint(meta)
        else:
            message = f"the tokenizer of {which} differs from the data module's; resume with the same one"
            check_same_tokenizer(saved, self.tokenizer, message)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A step-bounded run whose max_steps is not a multiple of val_check_interval would end without validating
        # its final weights (a short reward-model run: no rm/accuracy at all, and no refreshed normalisation in its
        # checkpoint). Lightning validates at a step where a stop was asked for; the run ends at this step anyway.
        if 0 < self.trainer.max_steps <= self.trainer.global_step:
            self.trainer.should_stop = True

    def on_train_start(self) -> None:
        # Skipped and truncated records are counted by the data module; the logger keeps them with the run.
        stats = getattr(self.trainer.datamodule, "data_stats", {})
        if stats and self.logger is not None:
            self.logger.log_metrics(stats, step=self.global_step)
        # The tokenizer also sits beside the checkpoints as files (each checkpoint embeds it as well).
        ckpt_dir = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        if ckpt_dir and self.trainer.is_global_zero:
            self.tokenizer.save(ckpt_dir)
