"""The simple baseline a reward model must beat: a converged bag-of-words logistic regression on the same pairs.

Each response is a vector of token counts, x(response) in R^V; the baseline scores a response by w . x and models
P(chosen preferred) = sigmoid(w . (x(chosen) - x(rejected))), the Bradley-Terry model of a linear reward. The prompt
cancels out of the difference (both responses answer it), so the baseline sees only which words each response uses
and how often. It is fitted to convergence (L-BFGS on the full batch, in float64) with an L2 penalty chosen by k-fold
cross-validation on the training pairs alone, so its held-out accuracy is a fair bar: what the pairs teach a model
with no notion of word order, context or prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

#: L2 strengths tried by cross-validation (per pair: the penalty is l2 * |w|^2 / 2 against the mean loss).
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


class BaselineFit(NamedTuple):
    """A fitted baseline: ``weights`` (V,), the chosen ``l2``, and its accuracies on the training and held-out pairs."""

    weights: torch.Tensor
    l2: float
    train_accuracy: float
    accuracy: float


def count_vectors(sequences: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """(B, V) float64 token counts of B token-id sequences."""
    counts = torch.zeros(len(sequences), vocab_size, dtype=torch.float64)
    for row, seq in enumerate(sequences):
        ids = torch.as_tensor(list(seq), dtype=torch.long)
        counts[row].index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    return counts


def fit_pairwise_logistic(diff: torch.Tensor, l2: float, max_iter: int = 500) -> torch.Tensor:
    """Weights (V,) minimising mean(-log sigmoid(diff @ w)) + l2 * |w|^2 / 2 (strictly convex: one optimum).

    Args:
        diff: (B, V) feature differences chosen - rejected.
    """
    w = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(diff @ w).mean() + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _accuracy(diff: torch.Tensor, w: torch.Tensor) -> float:
    """Share of pairs with diff @ w > 0 (ties count half), as :func:`~rlhf_lightning.metrics.pairwise_accuracy`."""
    margin = diff @ w
    return float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


def bag_of_words_baseline(
    train: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]],
    val: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]],
    vocab_size: int,
    folds: int = 5,
    l2_grid: Sequence[float] = L2_GRID,
    seed: int = 0,
) -> BaselineFit:
    """Fits the baseline on the training pairs and measures it on the held-out ones.

    The L2 strength is the one of ``l2_grid`` with the best mean accuracy over ``folds`` folds of the training pairs
    (ties: the stronger penalty); the final weights are refitted on all training pairs with it. The held-out pairs
    play no part in the choice.

    Args:
        train, val: (chosen responses, rejected responses), each a sequence of B token-id sequences.
        vocab_size: V.
        seed: seed of the fold assignment.
    """
    x_train = count_vectors(train[0], vocab_size) - count_vectors(train[1], vocab_size)  # (B, V)
    x_val = count_vectors(val[0], vocab_size) - count_vectors(val[1], vocab_size)
    n = x_train.shape[0]
    if n < folds:
        raise ValueError(f"the baseline needs at least {folds} training pairs, got {n}")
    fold = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % folds  # (B,) fold of each pair
    best_l2, best_score = None, -1.0
    for l2 in sorted(l2_grid, reverse=True):  # strongest first: a tie keeps the simpler model
        score = sum(_accuracy(x_train[fold == k], fit_pairwise_logistic(x_train[fold != k], l2)) for k in range(folds))
        if score / folds > best_score:
            best_l2, best_score = l2, score / folds
    w = fit_pairwise_logistic(x_train, best_l2)
    return BaselineFit(w, best_l2, _accuracy(x_train, w), _accuracy(x_val, w))
