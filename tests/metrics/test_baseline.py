"""The bag-of-words baseline: a converged pairwise logistic regression, its L2 chosen without the held-out pairs."""

import pytest
import torch

from rlhf_lightning.metrics.baseline import bag_of_words_baseline, count_vectors, fit_pairwise_logistic


def _pairs(n: int, w: torch.Tensor, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """n pairs of random 3-8-token responses over len(w) words, labelled by Bradley-Terry on the linear reward w."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    for _ in range(n):
        a, b = ([int(t) for t in torch.randint(len(w), (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)]
                for _ in range(2))  # fmt: skip
        p_a = torch.sigmoid(w[a].sum() - w[b].sum())
        pick = bool(torch.rand((), generator=g) < p_a)
        chosen.append(a if pick else b)
        rejected.append(b if pick else a)
    return chosen, rejected


def test_count_vectors_count_every_occurrence() -> None:
    counts = count_vectors([[0, 2, 2], [], [1]], 4)
    assert counts.tolist() == [[1, 0, 2, 0], [0, 0, 0, 0], [0, 1, 0, 0]]


def test_the_fit_is_converged_the_gradient_vanishes_at_the_optimum() -> None:
    w = torch.linspace(-2, 2, 12)
    c, r = _pairs(400, w, 0)
    diff = count_vectors(c, 12) - count_vectors(r, 12)
    fit = fit_pairwise_logistic(diff, l2=1e-2).requires_grad_(True)
    loss = -torch.nn.functional.logsigmoid(diff @ fit).mean() + 0.5 * 1e-2 * (fit @ fit)
    (grad,) = torch.autograd.grad(loss, fit)
    assert float(grad.abs().max()) < 1e-6


def test_the_baseline_recovers_a_linear_reward_near_the_bayes_accuracy() -> None:
    w = torch.linspace(-1.5, 1.5, 20)
    train, val = _pairs(3000, w, 1), _pairs(1000, w, 2)
    fit = bag_of_words_baseline(train, val, 20)
    x_val = count_vectors(val[0], 20) - count_vectors(val[1], 20)
    bayes = float(torch.sigmoid((x_val @ w.double()).abs()).mean())  # the true model's expected accuracy on these pairs
    assert fit.accuracy > bayes - 0.04
    assert torch.corrcoef(torch.stack([fit.weights, w.double()]))[0, 1] > 0.95


def test_the_held_out_pairs_play_no_part_in_the_fit() -> None:
    w = torch.linspace(-1.0, 1.0, 10)
    train, val = _pairs(300, w, 3), _pairs(200, w, 4)
    fit = bag_of_words_baseline(train, val, 10)
    swapped = bag_of_words_baseline(train, (val[1], val[0]), 10)  # every held-out label flipped
    assert torch.equal(fit.weights, swapped.weights) and fit.l2 == swapped.l2
    assert swapped.accuracy == pytest.approx(1.0 - fit.accuracy)


def test_too_few_pairs_for_the_folds_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 5 training pairs"):
        bag_of_words_baseline(([[0]] * 3, [[1]] * 3), ([[0]], [[1]]), 2)
