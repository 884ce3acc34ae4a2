"""Reward shaping: per-token rewards from a sequence score and the KL penalty, and running score statistics.

The policy is penalised ``beta * KL_t`` at every generated token and receives the (clipped) score at its last real
token: summed over a response this is ``score - beta * KL(pi || pi_sft)`` of the whole sequence, the KL-regularised
objective whose optimum is ``pi_sft * exp(score / beta) / Z``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from rlhf_lightning.data.collate import last_token_index


@dataclass
class RewardConfig:
    """What the policy is paid: the reward source's score, transformed.

    clip: scores are clipped to +- clip (None: no clipping).
    norm: "none", or "running": scores standardised by running statistics of all scores so far.
    debias: take out of each rollout's scores their straight-line trend in response length (a fix for a
        length-biased reward model; see :func:`remove_length_trend`). The proxy reward logged stays the reward
        source's own; ``objective/length_slope`` logs the slope removed.
    missing_eos_score: the score of a response that never emitted EOS, replacing the reward source's (None: keep it;
        see :func:`shape_rewards`).
    ensemble_k: weight of a reward-model ensemble's disagreement in the conservative reward ``mean - k * std`` (0:
        the ensemble mean).
    norm_samples: at the start, the reward model's normalisation statistics are re-measured on this many responses
        of the SFT policy to training prompts, sampled with the phase's sampling settings, so the scores start
        centred with unit spread on exactly the distribution PPO samples. 0: keep the checkpoint's statistics.
    """

    clip: float | None = 5.0
    norm: Literal["none", "running"] = "none"
    debias: bool = False
    missing_eos_score: float | None = -1.0
    ensemble_k: float = 0.0
    norm_samples: int = 512

    def __post_init__(self) -> None:
        if self.norm not in ("none", "running"):
            raise ValueError(f"rewards.norm must be 'none' or 'running', got {self.norm!r}")
        if self.norm_samples == 1 or self.norm_samples < 0:
            raise ValueError(f"rewards.norm_samples must be 0 (keep the checkpoint's) or >= 2, got {self.norm_samples}")


class ShapedRewards(NamedTuple):
    """rewards: (B, R) per-token rewards; score: (B,) the score actually paid (clipped; the missing-EOS score for a
    response without EOS);
    penalty: (B, R) the KL part alone, -beta * KL_t (0 when the KL is in the loss instead)."""

    rewards: torch.Tensor
    score: torch.Tensor
    penalty: torch.Tensor


def shape_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    ended: torch.Tensor,
    missing_eos_score: float | None = None,
    score_clip: float | None = None,
) -> ShapedRewards:
    """Per-token rewards of a rollout.

    Args:
        scores: (B,) sequence scores (reward model, judge or callable).
        kl: (B, R) per-token KL (0 at padding); pass zeros when the KL is in the loss instead.
        mask: (B, R) real response tokens, contiguous from column 0; each row has at least one.
        beta: the KL coefficient.
        ended: (B,) True where the response emitted EOS.
        missing_eos_score: the score of a response that never emitted EOS, in place of the reward source's (None:
            keep that). Replacing rather than adding (lm-human-preferences' ``penalty_reward_value``) means a
            truncated response is worth the same whatever the reward model thinks of it: a fixed amount added to a
            high score could still beat an average finished response, and length-hacking policies learn to stop
            never.
        score_clip: clip scores to [-score_clip, score_clip] (None: no clip); the missing-EOS score is not clipped.
    """
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("every response needs at least one token to receive its score")
    score = scores.float()
    if score_clip is not None:
        score = score.clamp(-score_clip, score_clip)
    if missing_eos_score is not None:
        score = torch.where(ended, score, float(missing_eos_score))
    penalty = -beta * kl.float() * mask
    rewards = penalty.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += score
    return ShapedRewards(rewards, score, penalty)


def remove_length_trend(scores: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Scores with their least-squares straight line in response length taken out, and that line's slope.

    A reward model trained on length-biased labels pays for length itself, and PPO learns to ramble for it. Fitting
    the line on each rollout's own responses makes length worth nothing on average at every iteration, whatever the
    size of the bias, so nothing needs tuning; the price is that a length preference the gold raters share is
    removed too. The batch mean of the scores is kept, so the reward's level (and its running statistics) is not
    shifted.

    Args:
        scores: (B,) sequence scores.
        lengths: (B,) response lengths in tokens.
    Returns:
        (B,) ``scores - slope * (lengths - mean length)``, and ``slope`` (0 when every length is the same).
    """
    x = lengths.to(scores.dtype) - lengths.to(scores.dtype).mean()
    var = float((x * x).mean())
    if var == 0.0:
        return scores, 0.0
    slope = float(((scores - scores.mean()) * x).mean()) / var
    return scores - slope * x, slope


class RunningMoments:
    """Running mean and standard deviation of a stream of scores (Chan et al.'s parallel update, in fp64).

    Used to rescale the scores the policy sees when ``score_norm="running"``; its state is part of the checkpoint
    so a resumed run scales exactly as an uninterrupted one.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def update(self, x: torch.Tensor) -> None:
        """Adds the values of x (any shape)."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        mean, m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
