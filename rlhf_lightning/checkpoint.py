"""Checkpoints: written atomically, read back with clear errors, self-contained.

Every phase stores, beside Lightning's state, a ``"rlhf"`` entry: the phase name, the tokenizer (its JSON and special
tokens) and the backbone spec, so a checkpoint alone rebuilds the model and its tokenizer.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rlhf_lightning.io import atomic_open

RLHF_KEY = "rlhf"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the same folder, fsyncs, then renames: a crash never leaves half a checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        with atomic_open(path, binary=True) as f:
            torch.save(checkpoint, f)


def load_checkpoint(path: str | os.PathLike, phase: str | None = None) -> dict[str, Any]:
    """Loads an rlhf-lightning checkpoint on CPU, checking that it is whole and of the expected phase.

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated or corrupt file, not an rlhf-lightning checkpoint, or a different phase.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"checkpoint {path} is truncated or corrupt: {err}") from err
    if not isinstance(ckpt, dict) or RLHF_KEY not in ckpt:
        raise ValueError(f"checkpoint {path} is not an rlhf-lightning checkpoint (no {RLHF_KEY!r} entry)")
    found = ckpt[RLHF_KEY].get("phase")
    if phase is not None and found != phase:
        raise ValueError(f"checkpoint {path} is from the {found!r} phase, but a {phase!r} checkpoint is needed here")
    return ckpt
