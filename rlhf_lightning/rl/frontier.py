"""The functional forms of gold reward against the distance from the initial policy (Gao, Schulman & Hilton 2022,
"Scaling Laws for Reward Model Overoptimization"), fitted by least squares. Pure functions of the measured points
(``rlhf frontier`` measures them).

The distance is ``d = sqrt(KL(pi || pi_init))`` (nats per response) and the reward is relative to the initial
policy's (so both forms pass through (0, 0)):

- best-of-n: ``R_bon(d) = d (a - b d)``
- RL (and DPO, a policy trained away from its reference): ``R_RL(d) = d (a - b log d)``

Both are linear in (a, b), so the fit is an ordinary least-squares solve without an intercept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

FitForm = Literal["bon", "rl"]


@dataclass(frozen=True)
class FrontierFit:
    """A fitted form: its coefficients and the coefficient of determination of the points it was fitted to (None
    where undefined: all rewards equal)."""

    form: FitForm
    a: float
    b: float
    r2: float | None


def distance(kl: float) -> float:
    """``sqrt(KL)``, the x axis; a sampled KL estimate slightly below 0 (a policy still at its start) counts as 0."""
    return math.sqrt(max(kl, 0.0))


def features(form: FitForm, d: np.ndarray) -> np.ndarray:
    """(N, 2) columns whose combination with (a, b) is the form at ``d``: (d, -d^2) or (d, -d log d), the latter 0
    at d = 0 (its limit)."""
    d = np.asarray(d, dtype=np.float64)
    if form == "bon":
        second = d * d
    elif form == "rl":
        second = d * np.log(np.where(d > 0, d, 1.0))
    else:
        raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")
    return np.stack([d, -second], axis=1)


def predict(form: FitForm, a: float, b: float, d: np.ndarray) -> np.ndarray:
    """The form with coefficients (a, b) at distances ``d`` (relative to the initial policy's reward)."""
    return features(form, d) @ np.array([a, b])


def r_squared(y: np.ndarray, fitted: np.ndarray) -> float | None:
    """``1 - SS_res / SS_tot`` around the mean of ``y`` (negative when the fit is worse than the mean; the forms have no
    intercept); None when ``y`` is constant."""
    y, fitted = np.asarray(y, dtype=np.float64), np.asarray(fitted, dtype=np.float64)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return None
    return 1.0 - float(((y - fitted) ** 2).sum()) / ss_tot


def fit(form: FitForm, d: np.ndarray, reward: np.ndarray) -> FrontierFit | None:
    """Least-squares (a, b) of ``form`` to the points (``d``, ``reward``), the reward relative to the initial
    policy's; None with fewer than two points away from d = 0 (two coefficients need two, and d = 0 says nothing:
    both forms are 0 there)."""
    d, reward = np.asarray(d, dtype=np.float64), np.asarray(reward, dtype=np.float64)
    away = d > 0
    if away.sum() < 2:
        return None
    x = features(form, d[away])
    (a, b), *_ = np.linalg.lstsq(x, reward[away], rcond=None)
    return FrontierFit(form, float(a), float(b), r_squared(reward[away], x @ np.array([a, b])))
