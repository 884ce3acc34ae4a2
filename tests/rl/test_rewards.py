"""Reward shaping and running statistics."""

import pytest
import torch

from rlhf_lightning.data.collate import last_token_index
from rlhf_lightning.rl import RunningMoments, remove_length_trend, shape_rewards


def test_score_lands_on_the_last_real_token_and_kl_everywhere() -> None:
    mask = torch.tensor([[True, True, True], [True, False, False]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]]) * mask
    scores = torch.tensor([2.0, -1.0])
    ended = torch.tensor([True, False])
    out = shape_rewards(scores, kl, mask, beta=0.5, ended=ended, missing_eos_score=-3.0)
    want = torch.tensor([[-0.05, -0.1, -0.15 + 2.0], [-0.25 - 3.0, 0.0, 0.0]])
    torch.testing.assert_close(out.rewards, want)
    torch.testing.assert_close(out.score, torch.tensor([2.0, -3.0]))
    # Summed over a response: score - beta * sequence KL.
    torch.testing.assert_close(out.rewards.sum(-1), out.score - 0.5 * kl.sum(-1))
    assert last_token_index(mask).tolist() == [2, 0]


def test_a_response_without_eos_gets_the_missing_eos_score_whatever_its_own_score() -> None:
    # A truncated response that the reward model loves must not beat an average finished one: its score is
    # replaced, not shifted (a shift of -1 left 5 - 1 = 4 > 0 here).
    mask = torch.ones(3, 2, dtype=torch.bool)
    ended = torch.tensor([False, True, False])
    out = shape_rewards(torch.tensor([10.0, 0.0, -10.0]), torch.zeros(3, 2), mask, 0.1, ended,
                        missing_eos_score=-1.0, score_clip=5.0)  # fmt: skip
    assert out.score.tolist() == [-1.0, 0.0, -1.0]
    kept = shape_rewards(torch.tensor([10.0, 0.0, -10.0]), torch.zeros(3, 2), mask, 0.1, ended, score_clip=5.0)
    assert kept.score.tolist() == [5.0, 0.0, -5.0]


def test_score_clip_and_empty_response() -> None:
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = shape_rewards(torch.tensor([10.0, -10.0]), torch.zeros(2, 2), mask, 0.1, torch.ones(2, dtype=torch.bool),
                        score_clip=3.0)  # fmt: skip
    assert out.score.tolist() == [3.0, -3.0]
    with pytest.raises(ValueError, match="at least one token"):
        shape_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool), 0.1,
                      torch.ones(1, dtype=torch.bool))  # fmt: skip


def test_running_moments_match_the_whole_stream() -> None:
    torch.manual_seed(0)
    chunks = [torch.randn(n) * 3 + 1 for n in (5, 1, 17, 40)]
    m = RunningMoments()
    for c in chunks:
        m.update(c)
    whole = torch.cat(chunks).double()
    assert m.count == whole.numel()
    assert m.mean == pytest.approx(float(whole.mean()))
    assert m.std == pytest.approx(float(whole.std()))
    copy = RunningMoments()
    copy.load_state_dict(m.state_dict())
    assert (copy.mean, copy.std, copy.count) == (m.mean, m.std, m.count)


def test_remove_length_trend_takes_out_the_line_and_keeps_the_mean():
    lengths = torch.tensor([4, 8, 12, 16])
    quality = torch.tensor([0.5, -0.5, -0.5, 0.5])  # uncorrelated with length: (x - mean) . quality = 0
    scores = 1.0 + 0.25 * lengths + quality
    out, slope = remove_length_trend(scores, lengths)
    assert slope == pytest.approx(0.25)
    torch.testing.assert_close(out, scores.mean() + quality)
    assert float(out.mean()) == pytest.approx(float(scores.mean()))
    # what is left no longer follows length
    x = lengths.float() - lengths.float().mean()
    assert float((x * (out - out.mean())).sum()) == pytest.approx(0.0, abs=1e-5)


def test_remove_length_trend_leaves_equal_lengths_alone():
    scores = torch.tensor([1.0, -2.0, 3.0])
    out, slope = remove_length_trend(scores, torch.tensor([5, 5, 5]))
    assert slope == 0.0 and torch.equal(out, scores)
