"""The metric history of a run: one (steps, values) series per TensorBoard tag, plus the module's hyperparameters.

The offline reader (:mod:`rlhf_lightning.diagnose.events`) and the online callback (:mod:`rlhf_lightning.callbacks`)
both build a :class:`History`, so the detectors see the same thing in both places.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np


class Series(NamedTuple):
    """One metric over a run.

    Fields:
        steps: (n,) int64, strictly increasing PPO iterations.
        values: (n,) float64, the metric at each step.
    """

    steps: np.ndarray
    values: np.ndarray


@dataclass
class History:
    """Every metric of a run (tag -> :class:`Series`) and its hyperparameters (``hparams.yaml``; may be empty)."""

    scalars: dict[str, Series] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)

    def get(self, tag: str) -> Series | None:
        """The series of ``tag``, or None when the run never logged it."""
        s = self.scalars.get(tag)
        return s if s is not None and len(s.steps) else None

    def without(self, names: Iterable[str]) -> History:
        """This history without the tags ``names`` (the same hyperparameters)."""
        drop = set(names)
        return History({tag: s for tag, s in self.scalars.items() if tag not in drop}, self.hparams)

    def until(self, step: int) -> History:
        """This history up to and including ``step`` (what an online reader had seen then)."""
        cut = {tag: Series(s.steps[s.steps <= step], s.values[s.steps <= step]) for tag, s in self.scalars.items()}
        return History(cut, self.hparams)

    @property
    def last_step(self) -> int | None:
        """The largest step of any metric (the last iteration seen), None for an empty history."""
        ends = [int(s.steps[-1]) for s in self.scalars.values() if len(s.steps)]
        return max(ends) if ends else None

    @classmethod
    def from_points(cls, points: Mapping[str, Mapping[int, float]], hparams: Mapping[str, Any] | None = None):
        """Builds a history from ``{tag: {step: value}}`` (steps in any order).

        Non-finite values are left out: a NaN (say, the length correlation of a rollout whose responses all have one
        length) carries no evidence, and one would poison every trend computed through it.
        """
        scalars = {}
        for tag, by_step in points.items():
            steps = np.array(sorted(s for s, v in by_step.items() if np.isfinite(v)), dtype=np.int64)
            scalars[tag] = Series(steps, np.array([by_step[int(s)] for s in steps], dtype=np.float64))
        return cls(scalars, dict(hparams or {}))
