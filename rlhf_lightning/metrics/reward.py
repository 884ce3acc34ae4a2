"""Reward-model metrics as pure functions on score tensors.

Conventions: ``r_chosen``, ``r_rejected`` (B,) are a model's scores of the labelled-better and labelled-worse
responses of B pairs; the model's probability that the label is right is sigmoid(r_chosen - r_rejected).
"""

from __future__ import annotations

import torch


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs the model orders like the label (ties count half)."""
    diff = r_chosen - r_rejected
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def order_agreement(diff: torch.Tensor, reference_diff: torch.Tensor) -> float:
    """Share of pairs where ``diff`` has the sign of ``reference_diff`` (e.g. the gold judge's), over the pairs the
    reference does not tie; NaN when it ties them all.

    Args:
        diff: (B,) model score differences; reference_diff: (B,) reference score differences.
    """
    keep = reference_diff != 0
    if not bool(keep.any()):
        return float("nan")
    d, r = diff[keep], reference_diff[keep]
    return float(((d * r > 0).float() + 0.5 * (d == 0).float()).mean())  # a model tie counts half


def expected_calibration_error(r_chosen: torch.Tensor, r_rejected: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of the Bradley-Terry probabilities against the labels.

    Each pair predicts its more likely side with confidence c = max(p, 1 - p), p = sigmoid(r_chosen - r_rejected),
    and is right when p > 0.5. Pairs are binned by c over [0.5, 1]; ECE = sum over bins of
    (bin size / B) * |accuracy(bin) - mean confidence(bin)|.
    """
    p = torch.sigmoid((r_chosen - r_rejected).double())
    conf = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double()
    bins = ((conf - 0.5) * 2 * n_bins).long().clamp(max=n_bins - 1)  # c in [0.5, 1] -> 0 .. n_bins - 1
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        sel = bins == b
        if bool(sel.any()):
            ece += sel.double().mean() * (correct[sel].mean() - conf[sel].mean()).abs()
    return float(ece)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two (N,) tensors; 0 when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if float(denom) > 0 else 0.0


def win_rate(policy_scores: torch.Tensor, baseline_scores: torch.Tensor) -> float:
    """Share of prompts where the policy's response scores above the baseline's (ties count half). Both (B,)."""
    wins = (policy_scores > baseline_scores).float() + 0.5 * (policy_scores == baseline_scores).float()
    return float(wins.mean())
