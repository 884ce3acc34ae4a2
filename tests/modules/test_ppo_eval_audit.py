"""The audit of PPO's evaluation: fresh annotator labels of the policy's held-out responses against SFT's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf_lightning.modules.common import EvalSamples
from rlhf_lightning.modules.ppo_eval import EvalConfig, audit_win_rate


class WordCountJudge:
    """A stand-in gold judge: a response's score is its number of words."""

    def score(self, prompts, responses, *ended):
        return np.array([len(r.split()) for r in responses], dtype=np.float64)


def samples(responses: list[str]) -> EvalSamples:
    n = len(responses)
    return EvalSamples([f"prompt {i}" for i in range(n)], responses, torch.ones(n, dtype=torch.bool),
                       torch.full((n,), 3), [[1]] * n, None, None)  # fmt: skip


def test_audit_prefers_the_better_responses_with_reproducible_noise():
    sft = samples(["a b"] * 400)
    better = samples(["a b c d e f g h"] * 400)  # 6 more words of gold: labels near-certain, but for the flip rate
    config = EvalConfig(audit_labels=300)
    rate = audit_win_rate(WordCountJudge(), better, sft, config)
    assert 0.85 < rate < 1.0  # the default annotators' 5% flips
    assert rate == audit_win_rate(WordCountJudge(), better, sft, config)  # same seed, same labels
    same = audit_win_rate(WordCountJudge(), sft, sft, config)
    assert 0.4 < same < 0.6  # identical responses: a coin per label
    assert audit_win_rate(WordCountJudge(), sft, better, config) < 0.15


def test_audit_labels_must_not_be_negative():
    with pytest.raises(ValueError, match=r"eval\.audit_labels"):
        EvalConfig(audit_labels=-1)
