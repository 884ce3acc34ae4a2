"""A rollout's whole shaping (scores -> debias -> normalise -> KL -> rewards -> GAE -> whitening) by hand."""

import math

import pytest
import torch

from rlhf_lightning.rl import KLConfig, RewardConfig, ScoredBatch, shape_rollout


def batch(scores: list[float], full_kl: torch.Tensor | None = None) -> ScoredBatch:
    # Two responses: 2 tokens (ended) and 1 token (not ended); policy log-probs 0 and reference log-probs -1 on every
    # token, so k1 = 1 per token and k3 = e^-1 - 1 + 1 = e^-1.
    mask = torch.tensor([[True, True], [True, False]])
    return ScoredBatch(
        prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.bool),
        response_ids=torch.ones(2, 2, dtype=torch.long), response_mask=mask, ended=torch.tensor([True, False]),
        logprobs=torch.zeros(2, 2), ref_logprobs=-torch.ones(2, 2) * mask, values=torch.zeros(2, 2),
        scores=torch.tensor(scores), full_kl=full_kl,
    )  # fmt: skip


def settings(kl: KLConfig | None = None, whiten_advantages: bool = False, **rewards) -> dict:
    rewards = {"clip": None, "missing_eos_score": None, **rewards}
    return dict(kl=kl or KLConfig(), rewards=RewardConfig(**rewards), beta=0.5, gamma=1.0, lam=1.0,
                whiten_advantages=whiten_advantages)  # fmt: skip


def test_rewards_and_advantages_by_hand() -> None:
    rollout, stats = shape_rollout(batch([2.0, -1.0]), **settings(), score_stats=lambda s: None)
    # rewards: -0.5 per token, the score on the last one; lambda = gamma = 1 and values 0: A_t = sum of rewards from t
    torch.testing.assert_close(rollout.rewards, torch.tensor([[-0.5, 1.5], [-1.5, 0.0]]))
    torch.testing.assert_close(rollout.advantages, torch.tensor([[1.0, 1.5], [-1.5, 0.0]]))
    torch.testing.assert_close(rollout.returns, rollout.advantages)
    torch.testing.assert_close(rollout.kl, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert stats.score == pytest.approx(0.5) and stats.non_score_reward == pytest.approx(-0.75)
    assert stats.rlhf_reward == pytest.approx(-0.25) and stats.length_slope is None
    assert rollout.scores.tolist() == [2.0, -1.0]  # the raw scores are kept


def test_debias_normalise_clip_and_missing_eos_in_order() -> None:
    seen = []

    def stats(scores: torch.Tensor) -> tuple[float, float]:
        seen.append(scores.clone())
        return 1.0, 0.5

    rollout, out = shape_rollout(batch([4.0, 0.0]), **settings(debias=True, clip=3.0, missing_eos_score=-2.0),
                                 score_stats=stats)  # fmt: skip
    # lengths 2, 1: slope 4, the line taken out around the mean length 1.5 -> scores 2, 2 (mean 2 kept)
    torch.testing.assert_close(seen[0], torch.tensor([2.0, 2.0]))
    assert out.length_slope == pytest.approx(4.0)
    # normalised (2 - 1) / 0.5 = 2, clipped at 3 (no effect), then the unended response pays -2
    assert out.score == pytest.approx(0.0)
    torch.testing.assert_close(rollout.rewards[:, -1] + rollout.rewards[:, 0] * torch.tensor([0.0, 1.0]),
                               torch.tensor([2.0 - 0.5, -2.0 - 0.5]))  # fmt: skip


def test_kl_in_the_loss_leaves_the_reward_alone_and_the_metric_is_logged() -> None:
    kl = KLConfig(placement="loss", estimator="k3", metric="k3")
    rollout, stats = shape_rollout(batch([1.0, -1.0]), **settings(kl, True), score_stats=lambda s: None)
    assert stats.non_score_reward == 0.0
    torch.testing.assert_close(rollout.kl, torch.tensor([[math.exp(-1), math.exp(-1)], [math.exp(-1), 0.0]]))
    adv = rollout.advantages[rollout.response_mask]
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-6) and float(adv.std()) == pytest.approx(1.0, abs=1e-4)


def test_full_kl_metric_reads_the_given_exact_kl_and_the_penalty_stays_k1() -> None:
    full = torch.tensor([[0.25, 0.25], [0.25, 9.0]])
    rollout, _ = shape_rollout(batch([0.0, 0.0], full), **settings(KLConfig(metric="full")), score_stats=lambda s: None)
    torch.testing.assert_close(rollout.kl, torch.tensor([[0.25, 0.25], [0.25, 0.0]]))
    torch.testing.assert_close(rollout.rewards, torch.tensor([[-0.5, -0.5], [-0.5, 0.0]]))


def test_kl_config_refuses_estimators_with_the_wrong_gradient() -> None:
    with pytest.raises(ValueError, match=r"kl\.estimator 'k1' cannot be used with kl\.placement 'loss'"):
        KLConfig(placement="loss")
    with pytest.raises(ValueError, match=r"kl\.estimator 'k3' in the reward"):
        KLConfig(estimator="k3")
    with pytest.raises(ValueError, match=r"rewards\.norm_samples must be 0"):
        RewardConfig(norm_samples=1)
