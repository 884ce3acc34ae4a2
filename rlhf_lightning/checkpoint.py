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
    """Saves to a temporary file in the same folder, fsyncs, then renames: a crash never leaves half a checkpoint.

    Loads (``fit(ckpt_path=...)``) check the file whole first, as :func:`load_checkpoint` does, so resuming from a
    truncated or corrupt file is a ValueError naming it, not a zip reader's error or a silently damaged tensor.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        with atomic_open(path, binary=True) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> dict[str, Any]:
        check_whole(path)
        return super().load_checkpoint(path, *args, **kwargs)


def check_whole(path: str | os.PathLike) -> None:
    """Checks that ``path`` is a whole checkpoint file: present, a zip archive (torch.save's format) whose every
    member passes its CRC check. torch.load checks no CRC: a flipped bit in a tensor loads as a wrong weight, and one
    in a header can make it try to allocate petabytes. Reading the file once more costs little beside loading it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty, truncated or corrupt file (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint {path} is truncated or corrupt (not a whole torch.save archive: {err})") from err
    if bad is not None:
        raise ValueError(f"checkpoint {path} is corrupt: its member {bad!r} fails its CRC check")


def load_checkpoint(path: str | os.PathLike, phase: str | None = None) -> dict[str, Any]:
    """Loads an rlhf-lightning checkpoint on CPU, checking that it is whole and of the expected phase.

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated or corrupt file, not an rlhf-lightning checkpoint, or a different phase.
    """
    path = Path(path)
    check_whole(path)
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


def checkpoint_dir(trainer: Any) -> Path:
    """Where a run's own checkpoints go: the ModelCheckpoint's folder, else the trainer's ``default_root_dir``."""
    return Path(getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir)
