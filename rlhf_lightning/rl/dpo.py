"""Direct preference optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023) as a pure function of sequence
log-probs. No models and no Lightning here: the DPO module feeds it the policy's and the cached reference's
log-probs."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo"]


class DPOLoss(NamedTuple):
    """Per-pair DPO results, each (B,).

    losses: the loss of every pair (the module takes their mean).
    chosen_rewards, rejected_rewards: the implicit rewards ``beta * (log pi(y|x) - log pi_ref(y|x))``, detached: the
        reward under which the policy is optimal for the KL-regularised objective (up to a per-prompt constant, which
        cancels in a pair's margin).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: DPOLossType = "sigmoid",
) -> DPOLoss:
    """The DPO loss of each pair from summed response log-probs, each (B,).

    With ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``:

    - ``"sigmoid"``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, ``eps = label_smoothing``: the
      Bradley-Terry likelihood of the implicit reward; eps > 0 is conservative DPO (cDPO), which assumes a label is
      flipped with probability eps, so the loss has a finite optimum instead of pushing the margin to infinity.
    - ``"ipo"``: ``(h - 1 / (2 beta))^2``: regresses the log-ratio margin to a finite target, so it cannot grow without
      bound even on pairs the policy already separates (beta is the regulariser's strength: smaller beta, larger
      target). Log-probs are sums over the response, as in the paper (TRL averages them over tokens).
    """
    chosen_ratio = policy_chosen_logp - ref_chosen_logp
    rejected_ratio = policy_rejected_logp - ref_rejected_logp
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    return DPOLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
