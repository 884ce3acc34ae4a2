"""rl/dpo.py and rl/best_of_n.py against hand-computed values and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhf_lightning.rl.best_of_n import best_of_n_expectation, best_of_n_kl
from rlhf_lightning.rl.dpo import dpo_loss

# One pair: policy log-probs (chosen, rejected) = (-1, -3), reference (-2, -2.5); beta 0.5.
# Log-ratios: chosen +1, rejected -0.5; their difference h = 1.5, beta * h = 0.75.
ARGS = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), 0.5)


def test_sigmoid_dpo_by_hand():
    out = dpo_loss(*ARGS)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.75)))  # -log sigmoid(0.75)
    assert out.chosen_rewards.item() == pytest.approx(0.5)  # beta * (+1)
    assert out.rejected_rewards.item() == pytest.approx(-0.25)  # beta * (-0.5)


def test_cdpo_label_smoothing_by_hand():
    out = dpo_loss(*ARGS, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-0.75)) + 0.1 * math.log1p(math.exp(0.75))
    assert out.losses.item() == pytest.approx(expected)


def test_ipo_by_hand():
    assert dpo_loss(*ARGS, loss_type="ipo").losses.item() == pytest.approx((1.5 - 1 / (2 * 0.5)) ** 2)


def test_policy_equal_to_reference_gives_log_2_and_pushes_the_margin_up():
    logp = torch.tensor([-4.0, -7.0], requires_grad=True)
    out = dpo_loss(logp[:1], logp[1:], torch.tensor([-4.0]), torch.tensor([-7.0]), 0.1)
    assert out.losses.item() == pytest.approx(math.log(2))
    out.losses.sum().backward()
    assert logp.grad[0] < 0 < logp.grad[1]  # descent raises the chosen log-prob and lowers the rejected one


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*ARGS, loss_type="hinge")


def test_best_of_n_expectation_equals_the_mean_over_all_subsets():
    gen = torch.Generator().manual_seed(0)
    proxy, gold = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    for n in range(1, 8):
        subsets = [torch.tensor(c) for c in itertools.combinations(range(7), n)]
        brute = torch.stack([gold[:, c].gather(1, proxy[:, c].argmax(1, keepdim=True))[:, 0] for c in subsets])
        torch.testing.assert_close(best_of_n_expectation(proxy, gold, n), brute.mean(0))
    torch.testing.assert_close(best_of_n_expectation(proxy, gold, 1), gold.mean(1))  # n = 1: the plain mean


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(ValueError, match="n must be in"):
        best_of_n_expectation(torch.zeros(1, 3), torch.zeros(1, 3), 4)
