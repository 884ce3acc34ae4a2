"""A callback the SIGKILL test adds to a PPO run in a subprocess (imported by name from ``tests/modules``, on the
subprocess's PYTHONPATH): once ``after`` iterations are done and their checkpoints written, it writes ``marker`` and
blocks, so the test kills the run at a point the run is guaranteed to reach and cannot pass, however fast the
machine is.

It acts at the start of the next iteration's batch: Lightning runs the checkpoint callbacks of a batch's end after
every other callback, so by the next batch's start the iteration's checkpoints are on disk (written synchronously).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class HangAfterIterations(Callback):
    """Writes ``marker`` and blocks forever once the PPO module has finished ``after`` iterations."""

    def __init__(self, after: int, marker: str):
        self.after = after
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if pl_module.iteration != self.after:
            return
        self.marker.write_text(f"{self.after}\n")
        parent = os.getppid()
        # Blocks until the test kills it; exits if the test process died first, so no run is left hanging.
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
