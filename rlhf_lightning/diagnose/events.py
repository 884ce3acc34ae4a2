"""Reads a run's TensorBoard event files (and ``hparams.yaml``) into a :class:`History`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from rlhf_lightning.diagnose.history import History

EVENT_GLOB = "events.out.tfevents.*"


class NoEventsError(FileNotFoundError):
    """A run directory holds no TensorBoard event files."""


def event_files(run_dir: str | os.PathLike) -> list[Path]:
    """The event files directly in ``run_dir``, oldest first.

    A resumed run appends a new file to the same folder; the file name carries its creation time
    (``events.out.tfevents.<unix time>.<host>.<pid>.<n>``), which orders them even when copies changed the mtimes.

    Raises:
        NoEventsError: ``run_dir`` is missing or holds no event file (the message names sub-folders that do, e.g.
            ``lightning_logs/version_0`` of a logger with default settings).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NoEventsError(f"{run_dir}: no such directory")
    files = [p for p in run_dir.glob(EVENT_GLOB) if p.is_file()]
    if not files:
        nested = sorted({str(p.parent) for p in run_dir.rglob(EVENT_GLOB)})
        hint = f"; sub-folders with event files: {', '.join(nested[:5])}" if nested else ""
        raise NoEventsError(f"{run_dir}: no TensorBoard event files ({EVENT_GLOB}){hint}")
    return sorted(files, key=_creation_key)


def _creation_key(path: Path) -> tuple[float, int, str]:
    m = re.match(r"events\.out\.tfevents\.(\d+(?:\.\d+)?)\..*?(\d+)$", path.name)
    if m is None:
        return (path.stat().st_mtime, 0, path.name)
    return (float(m.group(1)), int(m.group(2)), path.name)


def read_file_scalars(path: str | os.PathLike) -> dict[str, dict[int, float]]:
    """Every scalar of one event file as ``{tag: {step: value}}``; a step logged twice keeps its last value."""
    # Imported here: tensorboard's import is slow and only the offline reader needs it.
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0: keep every point, no reservoir sampling
    acc.Reload()
    return {tag: {int(e.step): float(e.value) for e in acc.Scalars(tag)} for tag in acc.Tags()[SCALARS]}


def read_hparams(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``hparams.yaml`` of the run (the module's init args), or {} when there is none or it is not a mapping.

    Python-specific tags (``!!python/...``) that a logger may write are read as plain values, not executed.
    """
    path = Path(run_dir) / "hparams.yaml"
    if not path.is_file():
        return {}
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlainLoader)  # safe: see _PlainLoader
    return data if isinstance(data, dict) else {}


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that reads unknown tags as the plain node under them instead of failing."""


def _plain(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_PlainLoader.add_multi_constructor("", _plain)


def read_scalars(run_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """Every scalar of a run as ``{tag: {step: value}}``: its event files merged by step, a later file winning a
    step both hold (a resumed run re-logs the iterations after its checkpoint).

    Raises:
        NoEventsError: see :func:`event_files`.
    """
    merged: dict[str, dict[int, float]] = {}
    for path in event_files(run_dir):
        for tag, points in read_file_scalars(path).items():
            merged.setdefault(tag, {}).update(points)
    return merged


def read_run(run_dir: str | os.PathLike) -> History:
    """All metrics of a run (:func:`read_scalars`) and its hparams (:func:`read_hparams`).

    Raises:
        NoEventsError: see :func:`event_files`.
    """
    return History.from_points(read_scalars(run_dir), read_hparams(run_dir))
