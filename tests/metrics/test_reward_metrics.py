"""The reward-model metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.metrics import expected_calibration_error, order_agreement, pairwise_accuracy, pearson, win_rate

LOG4 = math.log(4.0)  # sigmoid(log 4) = 0.8
LOG1_5 = math.log(1.5)  # sigmoid(log 1.5) = 0.6
LOG7_3 = math.log(7.0 / 3.0)  # sigmoid(log 7/3) = 0.7


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# -- pairwise_accuracy ---------------------------------------------------------------------------------------------
def test_pairwise_accuracy_counts_ties_half():
    # diffs: +1 (right), 0 (tie: half), -1 (wrong), +3 (right) -> (1 + 0.5 + 0 + 1) / 4
    assert pairwise_accuracy(t(2, 1, 0, 3), t(1, 1, 1, 0)) == pytest.approx(0.625)
    assert pairwise_accuracy(t(1, 2), t(0, 1)) == 1.0
    assert pairwise_accuracy(t(0, 1), t(1, 2)) == 0.0
    assert pairwise_accuracy(t(5, 5, 5), t(5, 5, 5)) == 0.5  # a constant model is a coin flip


def test_pairwise_accuracy_accepts_float32_and_returns_a_float():
    acc = pairwise_accuracy(torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.1]))
    assert isinstance(acc, float) and acc == 0.5


# -- order_agreement -----------------------------------------------------------------------------------------------
def test_order_agreement_excludes_pairs_the_reference_ties():
    # reference ties pair 1: it is left out whatever the model says; pairs 0 and 3 agree, pair 2 does not -> 2/3
    assert order_agreement(t(1, -1, 2, -3), t(2, 0, -1, -5)) == pytest.approx(2 / 3)
    # flipping the model's verdict on the excluded pair changes nothing
    assert order_agreement(t(1, 1, 2, -3), t(2, 0, -1, -5)) == pytest.approx(2 / 3)
    assert order_agreement(t(1, 2), t(3, 4)) == 1.0
    assert order_agreement(t(-1, 2), t(3, -4)) == 0.0


def test_order_agreement_is_nan_when_the_reference_ties_everything():
    assert math.isnan(order_agreement(t(1, -2, 3), t(0, 0, 0)))


def test_order_agreement_treats_a_model_tie_the_same_whatever_the_reference_sign():
    """Swapping the two responses of every pair (negating both differences) must not change the agreement. A model
    that ties a pair has not ordered it like the reference; like pairwise_accuracy, a tie counts one half."""
    diff, ref = t(0, 0), t(-1, -2)
    assert order_agreement(diff, ref) == order_agreement(-diff, -ref)
    assert order_agreement(diff, ref) == 0.5


# -- expected_calibration_error ------------------------------------------------------------------------------------
def test_ece_hand_worked_two_bins():
    # Bins over the confidence c = max(p, 1 - p): [0.5, 0.75) and [0.75, 1].
    #   bin 1: p = 0.8, 0.8, 0.2 -> c = 0.8 each, right, right, wrong: |2/3 - 0.8| = 2/15, weight 3/5
    #   bin 0: p = 0.6, 0.3      -> c = 0.6, 0.7,  right, wrong:        |1/2 - 0.65| = 0.15, weight 2/5
    # ECE = 3/5 * 2/15 + 2/5 * 0.15 = 0.08 + 0.06 = 0.14
    diff = t(LOG4, LOG4, -LOG4, LOG1_5, -LOG7_3)
    assert expected_calibration_error(diff, torch.zeros(5, dtype=torch.float64), n_bins=2) == pytest.approx(0.14)
    # only the difference of the two scores matters
    shifted = expected_calibration_error(diff + 3.0, torch.full((5,), 3.0, dtype=torch.float64), n_bins=2)
    assert shifted == pytest.approx(0.14)


def test_ece_of_a_perfectly_calibrated_model_is_zero():
    # confidence 0.82 on 50 pairs, 41 of them right; confidence 0.62 on 50 pairs, 31 of them right (confidences away
    # from the bin edges 0.5 + k / 20, where rounding could split a group)
    hi, lo = math.log(0.82 / 0.18), math.log(0.62 / 0.38)
    diff = t(*[hi] * 41, *[-hi] * 9, *[lo] * 31, *[-lo] * 19)
    assert expected_calibration_error(diff, torch.zeros_like(diff)) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(diff, torch.zeros_like(diff), n_bins=2) == pytest.approx(0.0, abs=1e-9)


def test_ece_of_an_overconfident_wrong_model_is_large():
    diff = torch.full((16,), -10.0)  # confidence ~1 on every pair, every pair wrong
    assert expected_calibration_error(diff, torch.zeros(16)) > 0.99
    # the same confidence, always right: calibrated
    assert expected_calibration_error(-diff, torch.zeros(16)) < 1e-4


def test_ece_puts_confidence_one_in_the_last_bin():
    # sigmoid(+-50) rounds to exactly 1 / 0: c = 1 must land in the last bin (not past it), right half the time
    assert expected_calibration_error(t(50, -50), t(0, 0)) == pytest.approx(0.5)


# -- pearson -------------------------------------------------------------------------------------------------------
def test_pearson_perfect_and_hand_worked():
    x = t(1, 2, 3, 4, 5)
    assert pearson(x, 2 * x + 3) == pytest.approx(1.0)
    assert pearson(x, -0.5 * x + 7) == pytest.approx(-1.0)
    # centred x = (-1, 0, 1), y = (-1, 1, 0): sum xy = 1, |x|^2 = |y|^2 = 2 -> 0.5
    assert pearson(t(1, 2, 3), t(1, 3, 2)) == pytest.approx(0.5)
    # integer lengths are accepted
    assert pearson(torch.tensor([0.1, 0.2, 0.4]), torch.tensor([3, 4, 6])) == pytest.approx(1.0)


def test_pearson_of_a_constant_is_zero():
    assert pearson(t(1, 2, 3), t(4, 4, 4)) == 0.0
    assert pearson(t(2, 2, 2), t(1, 5, 3)) == 0.0


def test_win_rate_by_hand():
    assert win_rate(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == pytest.approx(0.625)
