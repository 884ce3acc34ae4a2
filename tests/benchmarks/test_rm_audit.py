"""benchmarks/rm_audit.py: the agreement of a preference with labels counts ties half."""

from __future__ import annotations

import numpy as np


def test_agreement_counts_ties_half(load_bench):
    agreement = load_bench("rm_audit").agreement
    preferred = np.array([True, False, True, True])
    tie = np.array([False, False, False, True])
    truth = np.array([True, True, False, False])
    assert agreement(preferred, tie, truth) == (1 + 0 + 0 + 0.5) / 4
