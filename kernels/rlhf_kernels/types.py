"""Small typed containers shared by the references and the fused ops."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

#: Per-token KL estimators from the sampled token's log-probs alone (:func:`~rlhf_kernels.kl_estimate`).
SAMPLED_KL_ESTIMATORS = ("k1", "k2", "k3")
#: Every per-token KL: the sampled ones and "full", the exact KL over the vocabulary (from both models' logits).
KL_ESTIMATORS = (*SAMPLED_KL_ESTIMATORS, "full")


class PPOLossStats(NamedTuple):
    """Diagnostics of one PPO loss evaluation, each a 0-dim tensor: a masked mean over valid tokens (no gradient).

    clip_fraction: share of tokens whose gradient the clip switched off.
    approx_kl: k3 estimate of KL(pi_old || pi) from the sampled tokens, ``(ratio - 1) - log ratio``.
    entropy: mean entropy of the current policy at the valid positions.
    ratio: mean importance ratio pi / pi_old.
    """

    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    entropy: torch.Tensor
    ratio: torch.Tensor


class RowStats(NamedTuple):
    """Per-row statistics of softmax(logits / T) that a forward pass keeps for its backward.

    logp: (N,) log p(target), clamped to <= 0.
    lse: (N,) the row's log-sum-exp in the backend's own units, read back only by the same backend's backward: of
        logits / T for the torch backend, T times that (in the logits' units) for the Triton one.
    entropy: (N,) entropy of each row, or None when it was not asked for.
    """

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None


class PPORows(NamedTuple):
    """Per-row results of a backend's fused PPO forward, each in the compute dtype.

    terms: (5, N) per-token loss, clipped flag, approx_kl, ratio and entropy, each already divided by the number of
        valid tokens and 0 at masked ones, so that a row sum is the batch mean.
    lse, entropy: (N,) as in :class:`RowStats` (0 at masked rows on the Triton backend).
    c_lp: (N,) d loss / d logp(target) (the entropy's coefficient is uniform: -entropy_coef / count at valid rows).
    """

    terms: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    c_lp: torch.Tensor


#: Called by a backend's fused forward per chunk of rows as ``coef_fn(rows, logp, entropy) -> (c_lp, c_h)``: the
#: coefficients of logp(target) and of the entropy in the loss, each (n,) (c_h may be None), from which the backend
#: writes d loss / d logits for those rows while they are still in cache.
CoefFn = Callable[[slice, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, "torch.Tensor | None"]]
