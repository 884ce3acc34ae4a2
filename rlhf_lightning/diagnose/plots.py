"""PNG plots of one or more runs, each run one colour on shared axes (legend: the run directory).

Matplotlib is used through its object-oriented API (``Figure`` with the Agg canvas), never pyplot, so plotting
neither needs a display nor changes the backend of a program that imports this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_lightning import tags
from rlhf_lightning.diagnose.history import History
from rlhf_lightning.io import atomic_open

SQRT_KL = f"sqrt({tags.KL})"
ITERATION = "iteration"

#: file name -> (x axis, panels as (title, tag)); a panel no run has is left out, a figure without panels too.
FIGURES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "overoptimisation.png": (
        SQRT_KL,
        (
            ("proxy reward against sqrt(KL)", tags.PROXY_REWARD),
            ("gold reward against sqrt(KL)", tags.GOLD_REWARD),
        ),
    ),
    "diversity.png": (
        ITERATION,
        (
            ("distinct-2 across inputs", tags.DISTINCT_2),
            ("self-BLEU across inputs", tags.SELF_BLEU),
            ("EAD across inputs", tags.EAD),
            ("distinct-2 per input", tags.PER_INPUT_DISTINCT_2),
            ("self-BLEU per input", tags.PER_INPUT_SELF_BLEU),
            ("duplicates across prompts", tags.DUPLICATE_RATE),
            ("entropy", tags.ENTROPY),
        ),
    ),
    "length.png": (
        ITERATION,
        (("rollout length", tags.LENGTH_MEAN), ("held-out length", tags.EVAL_LENGTH_MEAN)),
    ),
    "beta.png": (ITERATION, (("beta (KL coefficient)", tags.KL_COEF), ("KL", tags.KL))),
}


def _xy(h: History, x_axis: str, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
    y = h.get(tag)
    if y is None:
        return None
    if x_axis == ITERATION:
        return y.steps, y.values
    kl = h.get(tags.KL)
    if kl is None:
        return None
    steps, iy, ik = np.intersect1d(y.steps, kl.steps, return_indices=True)
    if not len(steps):
        return None
    return np.sqrt(np.clip(kl.values[ik], 0.0, None)), y.values[iy]


def plot_runs(runs: Sequence[tuple[str, History]], out: str | os.PathLike) -> list[Path]:
    """Writes the :data:`FIGURES` that any of ``runs`` (label, history) has data for into ``out``; returns their
    paths. Each file is written atomically."""
    out = Path(out)
    written = []
    for name, (x_axis, panels) in FIGURES.items():
        present = [(title, tag) for title, tag in panels if any(_xy(h, x_axis, tag) is not None for _, h in runs)]
        if not present:
            continue
        cols = min(len(present), 3)
        rows = -(-len(present) // cols)
        width, height = 4.8 * cols, 3.4 * rows
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        # Fixed margins (in inches) rather than a layout engine: those measure every label and take twice as long.
        margins = {"left": 0.75 / width, "right": 1 - 0.2 / width, "bottom": 0.55 / height, "top": 1 - 0.35 / height}
        axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"wspace": 0.35, "hspace": 0.45, **margins}).ravel()
        for ax, (title, tag) in zip(axes, present, strict=False):
            for i, (label, h) in enumerate(runs):
                xy = _xy(h, x_axis, tag)
                if xy is not None:
                    # Markers: against sqrt(KL) the x is not monotone, and sparse evaluations are few points.
                    ax.plot(*xy, color=f"C{i}", marker=".", markersize=3, linewidth=1, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(x_axis)
            ax.set_ylabel(tag, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[len(present) :]:
            ax.set_visible(False)
        path = out / name
        with atomic_open(path, binary=True) as f:
            fig.savefig(f, format="png", dpi=100)
        written.append(path)
    return written
