"""The seed-study statistics: the t table against Student's t distribution itself, intervals by hand."""

from __future__ import annotations

import math

import pytest

from rlhf_lightning.stats import NORMAL_975, T_975, seed_stats, t_975


def student_t_cdf(x: float, df: int, steps: int = 2000) -> float:
    """P(T <= x) for x >= 0: 1/2 plus the density integrated over [0, x] (Simpson's rule, smooth integrand)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / steps
    inner = sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return 0.5 + h / 3 * (pdf(0.0) + inner + pdf(x))


@pytest.mark.parametrize("df", range(1, 31))
def test_t_table_holds_the_975_quantiles(df):
    # The table has 4 decimals: its entries are within 5e-5 of the quantile, so the CDF there is within
    # 5e-5 * density of 0.975.
    assert t_975(df) == T_975[df - 1]
    assert student_t_cdf(t_975(df), df) == pytest.approx(0.975, abs=5e-5 * 0.06 + 1e-7)


def test_t_quantiles_known_values_and_the_normal_tail():
    # The closed forms of df 1 (Cauchy: tan(pi (p - 1/2))) and df 2 (a sqrt(2 / (1 - a^2)), a = 2p - 1), textbook values
    assert t_975(1) == pytest.approx(math.tan(0.475 * math.pi), abs=5e-5)
    assert t_975(2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), abs=5e-5)
    assert (t_975(4), t_975(10), t_975(30)) == (2.7764, 2.2281, 2.0423)
    assert t_975(31) == t_975(1000) == NORMAL_975 == 1.96
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_975(0)


def test_seed_stats_by_hand():
    s = seed_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), half width 2.7764 * sqrt(2.5) / sqrt(5) = 2.7764 / sqrt(2)
    assert (s["n"], s["mean"], s["min"], s["max"]) == (5, 3.0, 1.0, 5.0)
    assert s["std"] == pytest.approx(math.sqrt(2.5))
    assert s["ci95"] == pytest.approx([3 - 2.7764 / math.sqrt(2), 3 + 2.7764 / math.sqrt(2)])
    # A run that could not measure the figure (None) is left out; one value gives no interval; none, nothing.
    assert seed_stats([None, 2.0, 4.0])["ci95"] == pytest.approx([3 - 12.7062, 3 + 12.7062])
    assert seed_stats([2.5, None]) == {"n": 1, "mean": 2.5, "std": None, "min": 2.5, "max": 2.5, "ci95": None}
    assert seed_stats([None]) == {"n": 0, "mean": None, "std": None, "min": None, "max": None, "ci95": None}
