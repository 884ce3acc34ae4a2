"""kl_from_logits: the exact full-vocabulary KL(pi || pi_ref), values and gradients against the reference."""

import pytest
import torch
from kernel_helpers import EXACT_ON_CPU, GRAD_TOL, VALUE_TOL, assert_finite, fp64_leaf, leaf, make_logits

import rlhf_kernels.torch_backend as torch_backend
from rlhf_kernels import kl_from_logits
from rlhf_kernels.reference import kl_from_logits_reference

NEG_INF = float("-inf")


def policy_and_ref(n: int, v: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy logits and reference logits that differ as a fine-tuned model differs from its starting point."""
    ref = make_logits(n, v, dtype=torch.float64)
    policy = ref + 0.5 * torch.randn(n, v, dtype=torch.float64)
    return policy.to(dtype), ref.to(dtype)


def check_against_reference(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    temperature: float,
    backend: str,
    same_dtype_ref: bool = True,
    grad_atol: float | None = None,
) -> torch.Tensor:
    """Checks values and the gradient (random upstream weights) against the reference in the input dtype and in fp64
    (``grad_atol`` overrides the gradient's absolute tolerance). Returns the KL."""
    x = leaf(logits)
    kl = kl_from_logits(x, ref_logits, temperature, backend=backend)
    weight = torch.randn(kl.shape, dtype=kl.dtype)
    (grad,) = torch.autograd.grad((kl * weight).sum(), x)
    assert grad.dtype == logits.dtype

    x64 = fp64_leaf(logits)
    kl64 = kl_from_logits_reference(x64, ref_logits.double(), temperature)
    (grad64,) = torch.autograd.grad((kl64 * weight.double()).sum(), x64)
    vtol, gtol = VALUE_TOL[logits.dtype], dict(GRAD_TOL[logits.dtype])
    if grad_atol is not None:
        gtol["atol"] = grad_atol
    torch.testing.assert_close(kl.double(), kl64, **vtol)
    torch.testing.assert_close(grad.double(), grad64, **gtol)
    if same_dtype_ref:
        xr = leaf(logits)
        kl_r = kl_from_logits_reference(xr, ref_logits, temperature)
        (grad_r,) = torch.autograd.grad((kl_r * weight.to(kl_r.dtype)).sum(), xr)
        torch.testing.assert_close(kl, kl_r, **vtol)
        torch.testing.assert_close(grad, grad_r, **gtol)
    return kl.detach()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("v", [37, 1000, 4099])
def test_matches_reference(backend: str, v: int, temperature: float) -> None:
    logits, ref_logits = policy_and_ref(16, v)
    kl = check_against_reference(logits, ref_logits, temperature, backend)
    assert (kl > 0).all()


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_gradcheck(backend: str, temperature: float) -> None:
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(3, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: kl_from_logits(x, ref_logits, temperature, backend=backend), (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nonnegative(backend: str, dtype: torch.dtype) -> None:
    logits, ref_logits = policy_and_ref(32, 1000, dtype)
    logits[:8] = ref_logits[:8] + 1e-3 * torch.randn(8, 1000).to(dtype)  # nearly equal: KL ~ 1e-7, cancellation
    kl = kl_from_logits(logits, ref_logits, backend=backend)
    assert (kl >= -1e-6).all(), kl.min()
    torch.testing.assert_close(
        kl.double(), kl_from_logits_reference(logits.double(), ref_logits.double()), **VALUE_TOL[dtype]
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_zero_for_identical_logits(backend: str, temperature: float) -> None:
    logits = make_logits(16, 1000)
    logits[3, 100:700] = NEG_INF
    x = leaf(logits)
    kl = kl_from_logits(x, logits, temperature, backend=backend)
    torch.testing.assert_close(kl, torch.zeros(16), rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(kl.sum(), x)  # KL has its minimum there: the gradient vanishes
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)


def test_ref_logits_get_no_gradient(backend: str) -> None:
    logits, ref_logits = policy_and_ref(8, 37)
    x, r = leaf(logits), leaf(ref_logits)
    kl = kl_from_logits(x, r, backend=backend)
    grad_x, grad_r = torch.autograd.grad(kl.sum(), (x, r), allow_unused=True)
    assert grad_r is None
    assert grad_x.abs().sum() > 0
    # With only the reference requiring grad, the KL is a constant.
    assert not kl_from_logits(logits, r, backend=backend).requires_grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_neg_inf_entries_and_whole_neg_inf_blocks(backend: str, small_blocks: int, temperature: float) -> None:
    """Vocabulary masks shared by both models (whole blocks of 128 too), and entries only the policy excludes."""
    n, v = 8, 1000
    logits, ref_logits = policy_and_ref(n, v)
    for x in (logits, ref_logits):
        x[0, 128:512] = NEG_INF  # whole middle blocks
        x[1, :128] = NEG_INF  # the first block
        x[2, 512:] = NEG_INF  # trailing blocks, including the partial last one
        x[3, ::3] = NEG_INF
        x[4, 1:] = NEG_INF  # one-hot in both: KL 0
    logits[5, 200:900] = NEG_INF  # p = 0 where q > 0: finite KL
    logits[6, 7] = NEG_INF
    kl = check_against_reference(logits, ref_logits, temperature, backend)
    assert_finite(kl, "kl")
    assert kl[4] == 0


def test_huge_logits(backend: str) -> None:
    ref_logits = torch.randn(8, 1000) * 1e4
    logits = ref_logits + torch.randn(8, 1000) * 10
    logits[1] = torch.randn(1000) * 1e4  # unrelated peaks: a KL of order 1e4
    # The gradient p * (log p - log q - KL) cancels terms of size |logit| ~ 4e4, which fp32 holds to ~ulp(4e4) = 4e-3:
    # two kernels that round the same bracket differently (a GPU's statistics and gradient kernels) may differ by a
    # few ulps there. The tolerance is 4 ulps of the largest logit; on CPU the backends agree exactly.
    grad_atol = 4 * torch.finfo(torch.float32).eps * float(logits.abs().max())
    kl = check_against_reference(logits, ref_logits, 1.0, backend, grad_atol=grad_atol)
    assert_finite(kl, "kl")
    assert kl[1] > 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend: str, dtype: torch.dtype) -> None:
    logits, ref_logits = policy_and_ref(16, 1000, dtype)
    kl = check_against_reference(logits, ref_logits, 0.7, backend, same_dtype_ref=False)
    assert kl.dtype == torch.float32


def test_output_dtype_fp64(backend: str) -> None:
    logits, ref_logits = policy_and_ref(4, 37, torch.float64)
    assert kl_from_logits(logits, ref_logits, backend=backend).dtype == torch.float64


@pytest.mark.parametrize(
    ("policy_view", "ref_view"),
    [
        ("row_stride_gt_v", "contiguous"),
        ("contiguous", "row_stride_gt_v"),
        ("column_strided", "offset_columns"),
        ("btv_shifted", "btv_shifted"),
    ],
)
def test_strided_views(backend: str, policy_view: str, ref_view: str) -> None:
    v = 37
    views = {
        "contiguous": lambda base: base[:, :v].contiguous(),
        "row_stride_gt_v": lambda base: base[:, :v],
        "column_strided": lambda base: base[:, : 2 * v : 2],
        "offset_columns": lambda base: base[:, 5 : 5 + v],
        "btv_shifted": lambda base: base.reshape(2, -1, base.shape[1])[:, :-1, :v].reshape(-1, v),
    }
    base_ref = make_logits(12, 2 * v + 6)
    base = leaf(base_ref + 0.5 * torch.randn_like(base_ref))
    kl = kl_from_logits(views[policy_view](base), views[ref_view](base_ref), 0.7, backend=backend)
    weight = torch.randn(kl.shape)
    (grad,) = torch.autograd.grad((kl * weight).sum(), base)

    base64 = fp64_leaf(base)
    kl64 = kl_from_logits_reference(views[policy_view](base64), views[ref_view](base_ref.double()), 0.7)
    (grad64,) = torch.autograd.grad((kl64 * weight.double()).sum(), base64)
    torch.testing.assert_close(kl.double(), kl64, **VALUE_TOL[torch.float32])
    torch.testing.assert_close(grad.double(), grad64, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("v", [37, 1000, 4099])
def test_torch_backend_chunking(monkeypatch: pytest.MonkeyPatch, v: int) -> None:
    logits, ref_logits = policy_and_ref(40, v)
    weight = torch.randn(40)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x = leaf(logits)
        kl = kl_from_logits(x, ref_logits, 0.7, backend="torch")
        (grad,) = torch.autograd.grad((kl * weight).sum(), x)
        return kl, grad

    whole = run()
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 1000)
    assert len(torch_backend._row_chunks(40, v)) > 1
    chunked = run()
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, **EXACT_ON_CPU)


def test_nothing_of_size_n_by_v_saved_but_the_inputs(backend: str) -> None:
    n, v = 16, 37
    logits, ref_logits = policy_and_ref(n, v)
    x = leaf(logits)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kl = kl_from_logits(x, ref_logits, backend=backend)
    big = {t.data_ptr() for t in saved if t.numel() >= n * v}
    assert big == {x.data_ptr(), ref_logits.data_ptr()}
    assert not [a for a in vars(kl.grad_fn).values() if isinstance(a, torch.Tensor) and a.numel() >= n * v]
