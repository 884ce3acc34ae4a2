"""GAE, the critic-free estimators, whitening and masked statistics against hand-computed values."""

import pytest
import torch

from rlhf_lightning.rl import explained_variance, gae, masked_mean, masked_var, whiten
from rlhf_lightning.rl.advantages import (
    AdvantageConfig,
    estimate_advantages,
    group_baseline_advantages,
    sequence_mean_weights,
)


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


def test_group_baselines_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])  # two prompts, two responses each
    grpo = group_baseline_advantages(rewards, 2, leave_one_out=False, scale_by_std=True)
    # group 1: mean 2, std sqrt(2); group 2: no spread, no signal
    torch.testing.assert_close(grpo, torch.tensor([-(2**-0.5), 2**-0.5, 0.0, 0.0]), rtol=1e-5, atol=1e-5)
    dr_grpo = group_baseline_advantages(rewards, 2, leave_one_out=False, scale_by_std=False)
    torch.testing.assert_close(dr_grpo, torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    # RLOO: each minus the mean of the others
    rloo = group_baseline_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, leave_one_out=True, scale_by_std=False)
    torch.testing.assert_close(rloo, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    # a group of equal rewards has no signal, and no division by zero
    assert group_baseline_advantages(torch.ones(4), 4, False, True).abs().max() == 0
    with pytest.raises(ValueError, match="divide the batch"):
        group_baseline_advantages(torch.ones(5), 2, False, True)


def test_critic_free_estimators_by_hand():
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    rewards = torch.tensor([[-0.5, 1.5], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]) * mask
    values = torch.full((4, 2), 100.0)  # never read by the critic-free estimators
    rloo, returns = estimate_advantages(AdvantageConfig("rloo", samples_per_prompt=2), rewards, values, mask, 1.0,
                                        0.95, whiten_advantages=False)  # fmt: skip
    # sequence rewards 1, 2 | 1, 3 -> leave-one-out advantages -1, 1 | -2, 2, on every real token
    torch.testing.assert_close(rloo, torch.tensor([[-1.0, -1.0], [1.0, 0.0], [-2.0, -2.0], [2.0, 2.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.5], [2.0, 0.0], [1.0, 1.0], [3.0, 3.0]]))
    rpp, _ = estimate_advantages(AdvantageConfig("reinforce_pp"), rewards, values, mask, 1.0, 0.95, False)
    torch.testing.assert_close(rpp, whiten(returns, mask))  # the reward-to-go, normalised over the batch
    assert AdvantageConfig("reinforce_pp").needs_critic is False and AdvantageConfig().needs_critic
    gae_adv, _ = estimate_advantages(AdvantageConfig(), rewards, values, mask, 1.0, 0.95, False)
    torch.testing.assert_close(gae_adv, gae(rewards, values, mask, 1.0, 0.95)[0])


def test_sequence_mean_gives_every_response_the_same_weight():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    weights = sequence_mean_weights(mask)
    # 4 tokens, 2 responses: response 0's tokens weigh 4 / (2 * 3), response 1's 4 / (2 * 1); the token mean of the
    # weighted values is the mean over responses of each response's mean
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    assert float((x * weights).sum() / mask.sum()) == pytest.approx((2.0 + 10.0) / 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"estimator": "grpo"}, "samples_per_prompt must be >= 2"), ({"estimator": "ppo"}, "must be one of"),
     ({"samples_per_prompt": 0}, ">= 1"), ({"loss_aggregation": "sum"}, "loss_aggregation")],
)  # fmt: skip
def test_advantage_config_refuses_what_cannot_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdvantageConfig(**kwargs)
