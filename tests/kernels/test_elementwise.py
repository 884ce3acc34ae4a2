"""kl_estimate (k1 / k2 / k3) and bradley_terry_loss: values and gradients against the reference and by hand."""

import math

import pytest
import torch
from kernel_helpers import assert_finite, leaf

from rlhf_kernels import bradley_terry_loss, kl_estimate
from rlhf_kernels.reference import bradley_terry_loss_reference, kl_estimate_reference

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-14}}


def logp_pair(n: int, dtype: torch.dtype = torch.float32, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token log-probs of a policy and of a reference that differ by log-ratios of about ``spread``."""
    logp = -torch.rand(n, dtype=torch.float64) * 5
    ref_logp = logp + spread * torch.randn(n, dtype=torch.float64)
    return logp.to(dtype), ref_logp.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate_matches_reference(backend: str, estimator: str, dtype: torch.dtype) -> None:
    n = 3000  # several elementwise blocks, the last one partial
    logp, ref_logp = logp_pair(n, dtype)
    ref_logp[:100] = logp[:100] + 0.05 * torch.randn(100, dtype=dtype)  # the small-|r| branch of k3
    a, b = leaf(logp), leaf(ref_logp)
    k = kl_estimate(a, b, estimator, backend=backend)
    assert k.dtype == dtype and k.shape == (n,)
    weight = torch.randn(n, dtype=dtype)
    grad_a, grad_b = torch.autograd.grad((k * weight).sum(), (a, b))
    assert grad_a.dtype == dtype and grad_b.dtype == dtype

    for ref_dtype in (dtype, torch.float64):
        ar, br = leaf(logp.to(ref_dtype)), leaf(ref_logp.to(ref_dtype))
        kr = kl_estimate_reference(ar, br, estimator)
        grad_ar, grad_br = torch.autograd.grad((kr * weight.to(ref_dtype)).sum(), (ar, br))
        torch.testing.assert_close(k.to(ref_dtype), kr, **TOL[dtype])
        torch.testing.assert_close(grad_a.to(ref_dtype), grad_ar, **TOL[dtype])
        torch.testing.assert_close(grad_b.to(ref_dtype), grad_br, **TOL[dtype])


@pytest.mark.parametrize(
    ("estimator", "expected", "d_logp"),
    [  # r = ref_logp - logp = -1
        ("k1", 1.0, 1.0),
        ("k2", 0.5, 1.0),  # d/dlogp r^2 / 2 = -r
        ("k3", math.exp(-1) - 1 + 1, -math.expm1(-1)),
    ],
)
def test_kl_estimate_by_hand(backend: str, estimator: str, expected: float, d_logp: float) -> None:
    logp, ref_logp = leaf(torch.tensor([-1.0])), leaf(torch.tensor([-2.0]))
    k = kl_estimate(logp, ref_logp, estimator, backend=backend)
    torch.testing.assert_close(k, torch.tensor([expected]), rtol=1e-6, atol=1e-7)
    grad_logp, grad_ref = torch.autograd.grad(k.sum(), (logp, ref_logp))
    torch.testing.assert_close(grad_logp, torch.tensor([d_logp]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_ref, torch.tensor([-d_logp]), rtol=1e-6, atol=1e-7)


def test_k1_signed_k2_k3_nonnegative(backend: str) -> None:
    logp, ref_logp = logp_pair(2000, spread=5.0)
    ref_logp[:500] = logp[:500] + torch.randn(500) * 1e-3
    ref_logp[500] = logp[500]
    k1 = kl_estimate(logp, ref_logp, "k1", backend=backend)
    assert (k1 < 0).any() and (k1 > 0).any()
    for estimator in ("k2", "k3"):
        k = kl_estimate(logp, ref_logp, estimator, backend=backend)
        assert_finite(k, estimator)
        assert (k >= 0).all(), f"{estimator} min {k.min()}"
        assert k[500] == 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_k3_accurate_for_tiny_differences(backend: str, sign: float) -> None:
    """|r| ~ 1e-4: k3 ~ r^2 / 2 ~ 5e-9, where expm1(r) - r in fp32 loses most digits to cancellation."""
    n = 1024
    logp = -0.5 - torch.rand(n)
    r = sign * (0.5 + torch.rand(n)) * 1e-4
    ref_logp = logp + r
    r64 = ref_logp.double() - logp.double()  # the log-ratio the inputs really hold (exact in fp32, Sterbenz)
    expected = torch.expm1(r64) - r64
    k = kl_estimate(logp, ref_logp, "k3", backend=backend)
    assert (k > 0).all()
    torch.testing.assert_close(k.double(), expected, rtol=1e-3, atol=0)


def test_kl_estimate_mixed_dtypes(backend: str) -> None:
    """Output in the promoted dtype, each gradient in its input's dtype."""
    logp, ref_logp = logp_pair(64)
    a, b = leaf(logp), leaf(ref_logp.double())
    k = kl_estimate(a, b, "k3", backend=backend)
    assert k.dtype == torch.float64
    grad_a, grad_b = torch.autograd.grad(k.sum(), (a, b))
    assert grad_a.dtype == torch.float32 and grad_b.dtype == torch.float64
    torch.testing.assert_close(k, kl_estimate_reference(logp.double(), ref_logp.double(), "k3"), rtol=1e-5, atol=1e-6)


def test_bradley_terry_by_hand(backend: str) -> None:
    chosen, rejected = leaf(torch.tensor([1.0])), leaf(torch.tensor([0.0]))
    loss = bradley_terry_loss(chosen, rejected, backend=backend)
    assert loss.shape == ()
    torch.testing.assert_close(loss, torch.tensor(-math.log(1 / (1 + math.exp(-1)))), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, torch.tensor(0.31326168751822286), rtol=1e-6, atol=0)
    grad_c, grad_r = torch.autograd.grad(loss, (chosen, rejected))
    sigmoid_neg1 = 1 / (1 + math.exp(1))  # d/dx -log sigmoid(x) = -sigmoid(-x)
    torch.testing.assert_close(grad_c, torch.tensor([-sigmoid_neg1]), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_r, torch.tensor([sigmoid_neg1]), rtol=1e-6, atol=0)


def test_bradley_terry_stable_for_large_differences(backend: str) -> None:
    chosen = leaf(torch.tensor([100.0, -100.0, 50.0, 0.0]))
    rejected = leaf(torch.tensor([0.0, 0.0, -50.0, 30.0]))  # differences +100, -100, +100, -30
    loss = bradley_terry_loss(chosen, rejected, reduction="none", backend=backend)
    assert_finite(loss, "loss")
    torch.testing.assert_close(loss, torch.tensor([0.0, 100.0, 0.0, 30.0]), rtol=1e-6, atol=1e-6)
    assert (loss >= 0).all()
    grad_c, grad_r = torch.autograd.grad(loss.sum(), (chosen, rejected))
    assert_finite(grad_c, "gradient")
    torch.testing.assert_close(grad_c, torch.tensor([0.0, -1.0, 0.0, -1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_r, -grad_c, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("margin_kind", ["none", "float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bradley_terry_matches_reference(backend: str, reduction: str, margin_kind: str, dtype: torch.dtype) -> None:
    b = 2500  # several elementwise blocks
    chosen = torch.randn(b, dtype=dtype) * 3
    rejected = torch.randn(b, dtype=dtype) * 3
    margin = {"none": 0.0, "float": 0.5, "tensor": torch.rand(b, dtype=dtype)}[margin_kind]
    c, r = leaf(chosen), leaf(rejected)
    loss = bradley_terry_loss(c, r, margin, reduction, backend=backend)
    assert loss.shape == (() if reduction == "mean" else (b,))
    assert loss.dtype == dtype
    weight = torch.randn(loss.shape, dtype=dtype)
    grad_c, grad_r = torch.autograd.grad((loss * weight).sum(), (c, r))
    for ref_dtype in (dtype, torch.float64):
        cr, rr = leaf(chosen.to(ref_dtype)), leaf(rejected.to(ref_dtype))
        ref_margin = margin.to(ref_dtype) if isinstance(margin, torch.Tensor) else margin
        loss_r = bradley_terry_loss_reference(cr, rr, ref_margin, reduction)
        grad_cr, grad_rr = torch.autograd.grad((loss_r * weight.to(ref_dtype)).sum(), (cr, rr))
        torch.testing.assert_close(loss.to(ref_dtype), loss_r, **TOL[dtype])
        torch.testing.assert_close(grad_c.to(ref_dtype), grad_cr, **TOL[dtype])
        torch.testing.assert_close(grad_r.to(ref_dtype), grad_rr, **TOL[dtype])


def test_bradley_terry_margin(backend: str) -> None:
    chosen, rejected = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    expected = torch.tensor([-math.log(1 / (1 + math.exp(-0.5)))] * 2)  # -log sigmoid(1 - 0.5)
    as_float = bradley_terry_loss(chosen, rejected, 0.5, "none", backend=backend)
    torch.testing.assert_close(as_float, expected, rtol=1e-6, atol=0)
    margin = torch.tensor([0.5, 0.5], requires_grad=True)
    c = leaf(chosen)
    as_tensor = bradley_terry_loss(c, rejected, margin, "none", backend=backend)
    torch.testing.assert_close(as_tensor, expected, rtol=1e-6, atol=0)
    as_tensor.sum().backward()
    assert margin.grad is None  # the margin is a constant
    assert c.grad is not None
    # A larger required gap costs more.
    assert (bradley_terry_loss(chosen, rejected, 2.0, "none", backend=backend) > as_float).all()
