"""The frontier's functional forms and their least-squares fits, against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_lightning.rl.frontier import distance, features, fit, predict, r_squared


def test_distance_is_the_root_of_the_kl_and_zero_for_a_slightly_negative_estimate():
    assert distance(4.0) == 2.0
    assert distance(0.0) == 0.0 and distance(-0.01) == 0.0


def test_the_forms_at_hand_picked_distances():
    # bon: d (a - b d) at d = 2, a = 1, b = 0.25: 2 * (1 - 0.5) = 1; rl: d (a - b log d) at d = e: e (1 - 0.5) = e / 2
    assert predict("bon", 1.0, 0.25, np.array([2.0]))[0] == pytest.approx(1.0)
    assert predict("rl", 1.0, 0.5, np.array([math.e]))[0] == pytest.approx(math.e / 2)
    # both are 0 at d = 0 (d log d -> 0)
    assert features("rl", np.array([0.0])).tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="form must be"):
        features("linear", np.array([1.0]))  # type: ignore[arg-type]


def test_bon_fit_through_two_points_solves_them_exactly():
    # a - b = 1 (d = 1) and 2a - 4b = 0 (d = 2): b = 1, a = 2, every residual 0
    result = fit("bon", np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 0.0]))
    assert (result.a, result.b) == pytest.approx((2.0, 1.0))
    assert result.r2 == pytest.approx(1.0)


def test_rl_fit_of_an_overdetermined_set():
    # d = 1 twice (rewards 1 and 3; the form is a there) and d = e (the form is e (a - b)): a = 2 (their mean), b = a;
    # SS_res = 1 + 1 = 2; mean reward 4/3, SS_tot = 1/9 + 25/9 + 16/9 = 14/3; R^2 = 1 - 2 / (14/3) = 4/7
    result = fit("rl", np.array([1.0, 1.0, math.e]), np.array([1.0, 3.0, 0.0]))
    assert (result.a, result.b) == pytest.approx((2.0, 2.0))
    assert result.r2 == pytest.approx(4 / 7)


def test_r_squared_of_a_fit_worse_than_the_mean_is_negative_and_of_constant_points_undefined():
    # y = (0, 2), mean 1, SS_tot 2; fitted (2, 0): SS_res 8; 1 - 8 / 2 = -3
    assert r_squared(np.array([0.0, 2.0]), np.array([2.0, 0.0])) == pytest.approx(-3.0)
    assert r_squared(np.array([1.0, 1.0]), np.array([0.0, 2.0])) is None


def test_no_fit_from_fewer_than_two_points_away_from_the_start():
    assert fit("rl", np.array([0.0, 1.0]), np.array([0.0, 0.5])) is None
