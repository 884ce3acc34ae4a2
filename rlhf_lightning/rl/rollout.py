"""A rollout's shaping, in one pure function: scores -> length debias -> normalisation -> KL -> shaped rewards ->
advantages (GAE or a critic-free estimator) -> whitening.

The PPO module samples and scores a batch (:class:`ScoredBatch`); everything from there to the advantages the update
reads happens here, so the whole path from a score to an advantage can be read (and tested) in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from rlhf_lightning.rl.advantages import AdvantageConfig, estimate_advantages
from rlhf_lightning.rl.kl import KLConfig, per_token_kl
from rlhf_lightning.rl.rewards import RewardConfig, remove_length_trend, shape_rewards
from rlhf_lightning.rl.types import Rollout

#: Given the (B,) scores after the length debias, the (mean, std) to standardise them with, or None to leave them.
#: The PPO module's one records them in its running statistics (over all ranks) first.
ScoreStats = Callable[[torch.Tensor], "tuple[float, float] | None"]


class ScoredBatch(NamedTuple):
    """B sampled responses with what the no-grad passes measured on them.

    prompt_ids, prompt_mask: (B, P) left-padded prompts.
    response_ids, response_mask: (B, R) right-padded responses; the mask is True on generated tokens (EOS included).
    ended: (B,) True where the response emitted EOS.
    logprobs, ref_logprobs: (B, R) log-probs of the response tokens under the sampling policy and the reference.
    values: (B, R) the critic's V(s_t) before each response token.
    scores: (B,) the reward source's raw sequence scores.
    full_kl: (B, R) the exact per-position KL over the vocabulary, or None (only the "full" KL metric needs it).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    full_kl: torch.Tensor | None


class RolloutStats(NamedTuple):
    """The shaping's scalars, means over the rollout's responses.

    score: the score actually paid (clipped; the missing-EOS score for a response without EOS).
    non_score_reward: the KL penalty summed over a response (0 when the KL is in the loss).
    rlhf_reward: the shaped reward summed over a response (score + non-score reward).
    length_slope: the slope of the score's trend in length that was removed, or None without length debias.
    """

    score: float
    non_score_reward: float
    rlhf_reward: float
    length_slope: float | None


def shape_rollout(
    batch: ScoredBatch,
    kl: KLConfig,
    rewards: RewardConfig,
    beta: float,
    gamma: float,
    lam: float,
    whiten_advantages: bool,
    score_stats: ScoreStats,
    advantage: AdvantageConfig | None = None,
) -> tuple[Rollout, RolloutStats]:
    """The rollout the PPO update reads, from a scored batch.

    1. scores: the raw ones, minus their straight-line trend in response length when ``rewards.debias``
       (:func:`remove_length_trend`), then standardised by ``score_stats``'s (mean, std) when it gives one;
    2. KL: per token with the ``kl.metric`` estimator (logged and fed to the KL controller); the reward's penalty is
       always k1's (the one estimator whose score-function gradient is the KL's), and 0 when the KL is in the loss;
    3. rewards: ``-beta * KL_t`` per token plus the clipped score at the last real token (:func:`shape_rewards`,
       with ``rewards.clip`` and ``rewards.missing_eos_score``);
    4. advantages and returns by ``advantage``'s estimator (default GAE with ``gamma``, ``lam``; see
       :func:`~rlhf_lightning.rl.advantages.estimate_advantages`), whitened over the rollout when asked.

    Args:
        batch: the sampled responses and their measurements, shapes as in :class:`ScoredBatch`.
        beta: the KL coefficient of this iteration.
        score_stats: see :data:`ScoreStats`.

    Returns:
        The :class:`Rollout` (its ``scores`` the raw ones, its ``kl`` the ``kl.metric`` estimate) and its
        :class:`RolloutStats`.
    """
    mask = batch.response_mask
    scores, length_slope = batch.scores, None
    if rewards.debias:
        scores, length_slope = remove_length_trend(scores, mask.sum(-1))
    stats = score_stats(scores)
    if stats is not None:
        scores = (scores - stats[0]) / stats[1]
    measured = per_token_kl(batch.logprobs, batch.ref_logprobs, mask, kl.metric, batch.full_kl)  # (B, R)
    if kl.in_loss:
        penalty_kl = torch.zeros_like(measured)
    else:
        penalty_kl = measured if kl.metric == "k1" else per_token_kl(batch.logprobs, batch.ref_logprobs, mask, "k1")
    shaped = shape_rewards(scores, penalty_kl, mask, beta, batch.ended, rewards.missing_eos_score, rewards.clip)
    advantages, returns = estimate_advantages(advantage or AdvantageConfig(), shaped.rewards, batch.values, mask,
                                              gamma, lam, whiten_advantages)  # fmt: skip
    rollout = Rollout(batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask, batch.ended, batch.logprobs,
                      batch.ref_logprobs, batch.values, batch.scores, measured, shaped.rewards, advantages,
                      returns)  # fmt: skip
    stats_out = RolloutStats(
        score=float(shaped.score.mean()),
        non_score_reward=float(shaped.penalty.sum(-1).mean()),
        rlhf_reward=float(shaped.rewards.sum(-1).mean()),
        length_slope=length_slope,
    )
    return rollout, stats_out
