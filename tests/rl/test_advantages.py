"""GAE, whitening and masked statistics against hand-computed values."""

import pytest
import torch

from rlhf_lightning.rl import explained_variance, gae, masked_mean, masked_var, whiten


def test_gae_by_hand() -> None:
    # One response of 3 tokens, one of 2 (then padding). gamma 0.9, lambda 0.5.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # Row 0: deltas d2 = 1 - 0.3 = 0.7; d1 = 0 + 0.9*0.3 - 0.2 = 0.07; d0 = 0 + 0.9*0.2 - 0.1 = 0.08
    # A2 = 0.7; A1 = 0.07 + 0.45*0.7 = 0.385; A0 = 0.08 + 0.45*0.385 = 0.25325
    # Row 1 (padding reward/value ignored): d1 = 2 - 1 = 1; d0 = 0.5 + 0.9*1 - 1 = 0.4; A1 = 1; A0 = 0.4 + 0.45 = 0.85
    want = torch.tensor([[0.25325, 0.385, 0.7], [0.85, 1.0, 0.0]])
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, want + values * mask)


def test_gae_lambda_one_gamma_one_is_return_minus_value() -> None:
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    mc = rewards.flip(-1).cumsum(-1).flip(-1)  # reward-to-go
    torch.testing.assert_close(ret, mc)
    torch.testing.assert_close(adv, mc - values)


def test_masked_statistics_and_whiten() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    real = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(masked_mean(x, mask), real.mean())
    torch.testing.assert_close(masked_var(x, mask), real.var())
    w = whiten(x, mask)
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(w[mask], (real - real.mean()) / real.var().sqrt(), rtol=1e-5, atol=1e-6)
    kept = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[mask].mean(), real.mean(), rtol=1e-5, atol=1e-6)  # unit variance, mean kept


def test_explained_variance() -> None:
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert float(explained_variance(target, target, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(target, 2.5), target, mask)) == pytest.approx(0.0)
    assert float(explained_variance(-target, target, mask)) < 0
