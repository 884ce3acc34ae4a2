"""KL estimators on known distributions, and the KL controllers against their formulas."""

import itertools
import math

import pytest
import torch

import rlhf_kernels
from rlhf_lightning.rl import DEFAULT_KL_HORIZON, AdaptiveKL, AnnealedKL, FixedKL, kl_controller, per_token_kl


def _categorical_pair() -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    return p, q


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_unbiased_estimators_average_to_the_exact_kl(estimator: str) -> None:
    p, q = _categorical_pair()
    exact = float((p * (p / q).log()).sum())
    # Expectation under p: weight each token's estimate by p (no sampling noise).
    logp, logq = p.log().unsqueeze(0), q.log().unsqueeze(0)  # (1, 3): three "positions", one per token
    est = per_token_kl(logp, logq, torch.ones(1, 3, dtype=torch.bool), estimator)
    assert float((est[0] * p).sum()) == pytest.approx(exact, rel=1e-9)


def test_k2_and_k3_by_formula_and_k3_nonnegative() -> None:
    p, q = _categorical_pair()
    logp, logq = p.log().unsqueeze(0), q.log().unsqueeze(0)
    mask = torch.ones(1, 3, dtype=torch.bool)
    log_r = logq - logp
    torch.testing.assert_close(per_token_kl(logp, logq, mask, "k2"), 0.5 * log_r**2)
    k3 = per_token_kl(logp, logq, mask, "k3")
    torch.testing.assert_close(k3, log_r.exp() - 1 - log_r)
    assert (k3 >= 0).all()


def test_full_kl_from_logits_and_padding_zeroed() -> None:
    p, q = _categorical_pair()
    exact = float((p * (p / q).log()).sum())
    full = rlhf_kernels.kl_from_logits(p.log().unsqueeze(0), q.log().unsqueeze(0))  # (1,)
    assert float(full[0]) == pytest.approx(exact, rel=1e-9)
    mask = torch.tensor([[True, False]])
    out = per_token_kl(torch.zeros(1, 2), torch.zeros(1, 2), mask, "full", torch.tensor([[0.3, 0.7]]))
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.0]]))
    with pytest.raises(ValueError, match="full_kl"):
        per_token_kl(torch.zeros(1, 2), torch.zeros(1, 2), mask, "full")


def test_adaptive_controller_matches_ziegler_formula() -> None:
    ctl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    ctl.update(kl=9.0, n_samples=64)  # error = clip(9/6 - 1) = 0.2 (clipped from 0.5)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    ctl.update(kl=5.4, n_samples=64)  # error = -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000) * (1 - 0.1 * 64 / 10000))
    low = AdaptiveKL(0.01, target=1.0, horizon=1, min_value=0.005)
    low.update(kl=0.0, n_samples=100)  # a huge step down, held at the floor
    assert low.value == 0.005


def test_the_default_horizon_lets_beta_act_within_a_default_run() -> None:
    # configs/ppo.yaml's run: 120 iterations of 64 responses. A KL held at twice the target must be able to raise
    # beta several-fold (Ziegler et al.'s horizon of 10,000 allowed 1.17x: no control at all at this size).
    ctl = kl_controller("adaptive", 0.05, target=4.0)
    for _ in range(120):
        ctl.update(kl=8.0, n_samples=64)
    assert ctl.value > 4 * 0.05
    assert ctl.horizon == DEFAULT_KL_HORIZON


def test_annealed_controller_schedules() -> None:
    cos = AnnealedKL(1.0, 0.1, iterations=4)
    values = []
    for _ in range(6):
        values.append(cos.value)
        cos.update(0.0, 1)
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.1) and values[4] == pytest.approx(0.1)
    assert values[2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in itertools.pairwise(values))
    exp = AnnealedKL(1.0, 0.01, iterations=2, schedule="exponential")
    exp.update(0.0, 1)
    assert exp.value == pytest.approx(0.1)
    lin = AnnealedKL(1.0, 0.0, iterations=4, schedule="linear")
    lin.update(0.0, 1)
    assert lin.value == pytest.approx(0.75)


def test_controller_state_round_trip_and_config_errors() -> None:
    a = AnnealedKL(1.0, 0.1, iterations=10)
    for _ in range(3):
        a.update(0.0, 1)
    b = AnnealedKL(1.0, 0.1, iterations=10)
    b.load_state_dict(a.state_dict())
    a.update(0.0, 1)
    b.update(0.0, 1)
    assert a.value == b.value
    fixed = kl_controller("fixed", 0.2)
    fixed.update(100.0, 64)
    assert isinstance(fixed, FixedKL) and fixed.value == 0.2
    with pytest.raises(ValueError, match="target"):
        kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError, match="fixed, adaptive or annealed"):
        kl_controller("pid", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floor"):
        AnnealedKL(0.1, 0.5, iterations=3)
