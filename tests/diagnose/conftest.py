"""Synthetic PPO metric histories: a healthy run, and helpers that break one metric at a time."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

N_ITERATIONS = 60
EVAL_EVERY = 10


def rise(t: np.ndarray, tau: float = 15.0) -> np.ndarray:
    """0 at t=0, saturating towards 1: the shape of most healthy PPO curves."""
    return 1.0 - np.exp(-t / tau)


def healthy_points(seed: int = 0, n: int = N_ITERATIONS) -> dict[str, dict[int, float]]:
    """``{tag: {iteration: value}}`` of a run where proxy and gold rise together, KL settles and diversity holds."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64)

    def noisy(values: np.ndarray, scale: float) -> np.ndarray:
        return values + rng.normal(0.0, scale, size=len(values))

    per_iteration = {
        "objective/proxy_reward": noisy(rise(t), 0.02),
        "objective/gold_reward": noisy(0.8 * rise(t), 0.02),
        "objective/kl": noisy(6.0 * rise(t), 0.05),
        "objective/kl_coef": np.full(n, 0.05),
        "objective/entropy": noisy(2.0 - 0.5 * rise(t, 20.0), 0.02),
        "objective/ensemble_std": np.abs(noisy(np.full(n, 0.1), 0.005)),
        "rollout/length_mean": noisy(12.0 + 2.0 * rise(t), 0.2),
        "rollout/score_length_corr": noisy(np.full(n, 0.1), 0.05),
        "rollout/duplicate_rate": np.abs(noisy(np.zeros(n), 0.01)),
        "diversity/distinct_2": noisy(0.6 - 0.1 * rise(t), 0.01),
    }
    points = {tag: dict(zip(range(n), map(float, v), strict=True)) for tag, v in per_iteration.items()}
    evals = np.arange(EVAL_EVERY - 1, n, EVAL_EVERY)
    per_eval = {
        "eval/proxy_reward": rise(evals),
        "eval/sft_proxy_reward": np.zeros(len(evals)),
        "eval/gold_reward": 0.8 * rise(evals),
        "eval/sft_gold_reward": np.zeros(len(evals)),
        "diversity/per_input_distinct_2": 0.5 - 0.1 * rise(evals),
        "eval/sft_per_input_distinct_2": np.full(len(evals), 0.5),
        "eval/audit_win_rate": 0.5 + 0.25 * rise(evals),
        "eval/audit_labels": np.full(len(evals), 256.0),
        "eval/proxy_win_rate": 0.5 + 0.35 * rise(evals),
    }
    points.update({tag: dict(zip(map(int, evals), map(float, v), strict=True)) for tag, v in per_eval.items()})
    return points


HEALTHY_HPARAMS = {"kl_controller": "fixed", "kl_coef": 0.05, "kl_min": 1e-4, "kl_max": 10.0}


def set_series(points: dict[str, dict[int, float]], tag: str, values: np.ndarray) -> None:
    """Replaces ``tag`` by ``values`` at iterations 0, 1, ... (or at the tag's own iterations when it has as many)."""
    steps = sorted(points[tag]) if tag in points and len(points[tag]) == len(values) else range(len(values))
    points[tag] = dict(zip(steps, map(float, values), strict=True))


def write_events(run_dir: Path, points: dict[str, dict[int, float]], hparams: dict | None = None) -> None:
    """Writes ``points`` as one TensorBoard event file in ``run_dir`` (a new file each call, as a resumed run does)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for tag, by_step in points.items():
        for step, value in by_step.items():
            writer.add_scalar(tag, value, step)
    writer.close()
    if hparams is not None:
        (run_dir / "hparams.yaml").write_text(yaml.safe_dump(hparams))


@pytest.fixture
def synth() -> SimpleNamespace:
    """This module's builders, for tests (test modules cannot import a conftest by name)."""
    return SimpleNamespace(
        healthy_points=healthy_points,
        set_series=set_series,
        rise=rise,
        hparams=dict(HEALTHY_HPARAMS),
        n=N_ITERATIONS,
        write_events=write_events,
    )
