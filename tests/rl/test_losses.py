"""The PPO losses against hand computations."""

import math

import pytest
import torch

from rlhf_kernels.reference import ppo_loss_reference
from rlhf_lightning.rl import policy_loss, value_loss


def test_value_loss_clipping_by_hand() -> None:
    values = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    mask = torch.tensor([[True, False]])
    loss, frac = value_loss(values, old, returns, mask, clip=0.2)
    # token 0: unclipped (1 - 2)^2 = 1, clipped (0.2 - 2)^2 = 3.24 -> max 3.24, halved; token 1 is padding
    assert float(loss.detach()) == pytest.approx(1.62) and float(frac) == 1.0
    loss, frac = value_loss(values, old, returns, mask, clip=None)
    assert float(loss.detach()) == pytest.approx(0.5) and float(frac) == 0.0


def test_policy_loss_by_hand() -> None:
    # Two tokens over a vocabulary of 2 with equal logits: logp = log 0.5 for both; old log-probs chosen so that the
    # ratios are 2 (clipped to 1.2 for A > 0) and 0.5 (clipped to 0.8 for A < 0 ... the max picks the unclipped).
    hidden, weight = torch.zeros(2, 3), torch.zeros(2, 3)  # logits = hidden @ weight.T = 0
    targets = torch.tensor([0, 1])
    logp = math.log(0.5)
    old = torch.tensor([logp - math.log(2.0), logp + math.log(2.0)])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = policy_loss(hidden, weight, targets, old, adv, clip_eps_low=0.2, clip_eps_high=0.2,
                              entropy_coef=0.1, temperature=1.0)  # fmt: skip
    # token 0: max(-1 * 2, -1 * 1.2) = -1.2; token 1: max(1 * 0.5, 1 * 0.8) = 0.8; entropy log 2 on both
    want = (-1.2 + 0.8) / 2 - 0.1 * math.log(2.0)
    assert float(loss) == pytest.approx(want, abs=1e-6)
    assert float(stats.clip_fraction) == pytest.approx(1.0)
    assert float(stats.ratio) == pytest.approx(1.25)


def test_policy_loss_from_an_adapted_head_takes_the_logits_path() -> None:
    """A head whose logits are not hidden @ W.T (here: with a bias, as a LoRA-adapted head adds a term) is evaluated
    through its own forward: the loss and the gradients are those of the reference on its logits, and its own
    parameters get their gradient; the fused path on the bare weight would miss the bias."""
    torch.manual_seed(0)
    n, d, v = 7, 5, 11
    head = torch.nn.Linear(d, v, dtype=torch.float64)
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    targets, old, adv = torch.randint(0, v, (n,)), -torch.rand(n, dtype=torch.float64) - 2, torch.randn(n)
    options = {"clip_eps_low": 0.2, "clip_eps_high": 0.3, "entropy_coef": 0.05, "temperature": 0.8}
    loss, _ = policy_loss(hidden, head.weight, targets, old, adv, adapted_head=head, **options)
    grads = torch.autograd.grad(loss, (hidden, head.bias))
    want, _ = ppo_loss_reference(head(hidden), targets, old, adv, torch.ones(n, dtype=torch.bool), **options)
    torch.testing.assert_close(loss, want)
    for got, expected in zip(grads, torch.autograd.grad(want, (hidden, head.bias)), strict=True):
        torch.testing.assert_close(got, expected)
    fused, _ = policy_loss(hidden, head.weight, targets, old, adv, **options)
    assert not torch.allclose(fused, want)
