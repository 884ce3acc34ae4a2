"""A figure's spread over the seeds of a study (``rlhf pipeline --seeds``): mean, range and a 95% confidence interval
of the mean from Student's t, without scipy (the few quantiles it needs are a table)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

#: T_975[df - 1]: the 0.975 quantile of Student's t with df = 1..30 degrees of freedom (two-sided 95%).
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
#: The normal's 0.975 quantile, used past 30 degrees of freedom: the interval is then at most 4% too narrow
#: (t is 2.04 at 30 df), which a study of more than 31 seeds can afford.
NORMAL_975 = 1.96


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (1.96 past 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T_975[df - 1] if df <= len(T_975) else NORMAL_975


def seed_stats(values: Sequence[float | None]) -> dict[str, Any]:
    """n, mean, sample standard deviation, min, max and the 95% confidence interval of the mean (mean -+ t * sd /
    sqrt(n), t with n - 1 df) of the values that are not None (a figure a run could not measure, e.g. gold without a
    gold judge). With one value there is no interval (None); with none every statistic is None."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "ci95": None}
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if n > 1 else None
    ci = None
    if std is not None:
        half = t_975(n - 1) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"n": n, "mean": mean, "std": std, "min": min(xs), "max": max(xs), "ci95": ci}
