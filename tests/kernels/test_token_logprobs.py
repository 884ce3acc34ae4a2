"""token_logprobs: values and gradients (also through the entropy) against the plain-PyTorch reference."""

import pytest
import torch
from kernel_helpers import (
    EXACT_ON_CPU,
    GRAD_TOL,
    VALUE_TOL,
    assert_finite,
    fp64_leaf,
    leaf,
    make_logits,
    sample_targets,
    upstream,
    weighted_grad,
)

import rlhf_kernels.torch_backend as torch_backend
from rlhf_kernels import token_logprobs
from rlhf_kernels.reference import token_logprobs_reference

NEG_INF = float("-inf")


def check_against_reference(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, backend: str, same_dtype_ref: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the op with random upstream weights on logp and entropy and checks values and gradients against the
    reference (in the input dtype, when asked) and against an fp64 run of the reference. Returns (logp, entropy)."""
    x = leaf(logits)
    logp, entropy = token_logprobs(x, targets, temperature, return_entropy=True, backend=backend)
    weights = upstream(logp, entropy)
    grad = weighted_grad((logp, entropy), weights, x)
    assert grad.dtype == logits.dtype

    x64 = fp64_leaf(logits)
    logp64, entropy64 = token_logprobs_reference(x64, targets, temperature, return_entropy=True)
    grad64 = weighted_grad((logp64, entropy64), weights, x64)
    vtol, gtol = VALUE_TOL[logits.dtype], GRAD_TOL[logits.dtype]
    torch.testing.assert_close(logp.double(), logp64, **vtol)
    torch.testing.assert_close(entropy.double(), entropy64, **vtol)
    torch.testing.assert_close(grad.double(), grad64, **gtol)

    if same_dtype_ref:
        xr = leaf(logits)
        logp_r, entropy_r = token_logprobs_reference(xr, targets, temperature, return_entropy=True)
        grad_r = weighted_grad((logp_r, entropy_r), weights, xr)
        torch.testing.assert_close(logp, logp_r, **vtol)
        torch.testing.assert_close(entropy, entropy_r, **vtol)
        torch.testing.assert_close(grad, grad_r, **gtol)

    # Without the entropy (a separate code path): logp and its gradient alone.
    x = leaf(logits)
    logp_only = token_logprobs(x, targets, temperature, backend=backend)
    grad_only = weighted_grad((logp_only,), weights[:1], x)
    x64 = fp64_leaf(logits)
    grad64_only = weighted_grad((token_logprobs_reference(x64, targets, temperature),), weights[:1], x64)
    torch.testing.assert_close(logp_only.double(), logp64, **vtol)
    torch.testing.assert_close(grad_only.double(), grad64_only, **gtol)
    return logp.detach(), entropy.detach()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("v", [37, 1000, 4099])
def test_matches_reference(backend: str, v: int, temperature: float) -> None:
    logits = make_logits(16, v)
    targets = sample_targets(logits, temperature)
    targets[:4] = torch.randint(0, v, (4,))  # a few unlikely tokens too
    check_against_reference(logits, targets, temperature, backend)


def test_without_entropy_returns_a_tensor(backend: str) -> None:
    logits = make_logits(8, 1000)
    targets = sample_targets(logits)
    logp = token_logprobs(logits, targets, 0.7, backend=backend)
    assert isinstance(logp, torch.Tensor) and logp.shape == (8,)
    logp2, _ = token_logprobs(logits, targets, 0.7, return_entropy=True, backend=backend)
    torch.testing.assert_close(logp, logp2, **VALUE_TOL[torch.float32])


def test_gradient_through_entropy_only(backend: str) -> None:
    logits = make_logits(8, 1000)
    targets = sample_targets(logits)
    x = leaf(logits)
    _, entropy = token_logprobs(x, targets, 1.3, return_entropy=True, backend=backend)
    (grad,) = torch.autograd.grad(entropy.sum(), x)
    xr = fp64_leaf(logits)
    _, entropy_r = token_logprobs_reference(xr, targets, 1.3, return_entropy=True)
    (grad_r,) = torch.autograd.grad(entropy_r.sum(), xr)
    torch.testing.assert_close(grad.double(), grad_r, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_gradcheck(backend: str, temperature: float) -> None:
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 6])

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs(x, targets, temperature, return_entropy=True, backend=backend)

    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_neg_inf_entries_and_whole_neg_inf_blocks(backend: str, small_blocks: int, temperature: float) -> None:
    """Rows span 8 blocks of 128; some blocks (first, middle, trailing) and scattered entries are -inf."""
    n, v = 8, 1000
    logits = make_logits(n, v)
    logits[0, 128:512] = NEG_INF  # whole middle blocks
    logits[1, :128] = NEG_INF  # the first block: the running max starts at -inf
    logits[2, 512:] = NEG_INF  # trailing blocks, including the partial last one
    logits[3, ::3] = NEG_INF  # scattered
    logits[4, :] = NEG_INF
    logits[4, 700] = 0.5  # a single finite entry: a one-hot distribution
    logits[5, 300:] = NEG_INF
    logits[6, 1:] = NEG_INF  # only column 0 is finite
    targets = torch.tensor([5, 600, 100, 1, 700, 10, 0, 999])
    logp, entropy = check_against_reference(logits, targets, temperature, backend)
    zero = torch.zeros(2, dtype=logp.dtype)
    torch.testing.assert_close(logp[[4, 6]], zero, **EXACT_ON_CPU)
    torch.testing.assert_close(entropy[[4, 6]], zero, **EXACT_ON_CPU)


def test_entropy_gradient_with_masked_vocabulary_and_large_upstream_weight(backend: str) -> None:
    """Rows with -inf entries, an upstream entropy gradient of magnitude > 1 (or / T > 1): the gradient must stay
    finite and equal the reference (0 at the -inf entries)."""
    logits = make_logits(4, 37)
    logits[:, 5:20] = NEG_INF
    targets = torch.tensor([0, 25, 30, 36])
    for temperature, weight in [(1.0, 2.0), (0.7, 0.9)]:
        x = leaf(logits)
        _, entropy = token_logprobs(x, targets, temperature, return_entropy=True, backend=backend)
        (grad,) = torch.autograd.grad(entropy.sum() * weight, x)
        xr = fp64_leaf(logits)
        _, entropy_r = token_logprobs_reference(xr, targets, temperature, return_entropy=True)
        (grad_r,) = torch.autograd.grad(entropy_r.sum() * weight, xr)
        assert_finite(grad, f"gradient at T={temperature}, upstream weight {weight}")
        assert torch.equal(grad[:, 5:20], torch.zeros_like(grad[:, 5:20]))
        torch.testing.assert_close(grad.double(), grad_r, **GRAD_TOL[torch.float32])


def test_target_with_neg_inf_logit(backend: str) -> None:
    logits = make_logits(4, 37)
    logits[1, 4] = NEG_INF
    logits[2, 10:] = NEG_INF
    targets = torch.tensor([0, 4, 20, 3])
    x = leaf(logits)
    logp, entropy = token_logprobs(x, targets, return_entropy=True, backend=backend)
    assert logp[1] == NEG_INF and logp[2] == NEG_INF
    assert_finite(logp[[0, 3]], "logp of finite targets")
    assert_finite(entropy, "entropy")
    weights = upstream(logp, entropy)
    grad = weighted_grad((logp, entropy), weights, x)
    assert_finite(grad, "gradient")
    xr = fp64_leaf(logits)
    logp_r, entropy_r = token_logprobs_reference(xr, targets, return_entropy=True)
    grad_r = weighted_grad((logp_r, entropy_r), weights, xr)
    torch.testing.assert_close(logp.double(), logp_r, **VALUE_TOL[torch.float32])
    torch.testing.assert_close(entropy.double(), entropy_r, **VALUE_TOL[torch.float32])
    torch.testing.assert_close(grad.double(), grad_r, **GRAD_TOL[torch.float32])


def test_huge_logits(backend: str) -> None:
    logits = torch.randn(8, 1000) * 1e4
    targets = torch.randint(0, 1000, (8,))
    targets[0] = logits[0].argmax()  # logp ~ 0
    targets[1] = logits[1].argsort()[-2]  # logp ~ -1e4
    logp, entropy = check_against_reference(logits, targets, 1.0, backend)
    assert_finite(logp, "logp")
    assert_finite(entropy, "entropy")
    assert logp[0] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_half_precision_inputs(backend: str, dtype: torch.dtype, temperature: float) -> None:
    logits = make_logits(16, 1000, dtype=dtype)
    targets = sample_targets(logits, temperature)
    logp, entropy = check_against_reference(logits, targets, temperature, backend, same_dtype_ref=False)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32


@pytest.mark.parametrize(
    ("dtype", "out_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_output_dtype_and_logp_nonpositive(backend: str, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    logits = make_logits(32, 37, dtype=dtype, scale=10.0)
    targets = sample_targets(logits)
    targets[:8] = logits[:8].float().argmax(-1)  # near-certain tokens, logp rounds to ~0
    logits[8, :] = -30.0
    logits[8, 3] = 30.0  # logp of token 3 is -(36 e^-60), which rounds to 0 or just above in every dtype
    targets[8] = 3
    logits[9, :] = NEG_INF
    logits[9, 5] = 1.0
    targets[9] = 5  # a single finite entry: logp is exactly 0
    logp, entropy = token_logprobs(logits, targets, return_entropy=True, backend=backend)
    assert logp.dtype == out_dtype and entropy.dtype == out_dtype
    assert (logp <= 0).all()
    assert logp[9] == 0
    ref = token_logprobs_reference(logits.double(), targets)
    torch.testing.assert_close(logp.double(), ref, **VALUE_TOL[dtype])


def _wide(n: int, v: int) -> torch.Tensor:
    return make_logits(n, 2 * v + 6)


# Each view maps a base tensor to (N, V) logits; the gradient is checked w.r.t. the base.
VIEWS = {
    "row_stride_gt_v": lambda base, v: base[:, :v],
    "column_strided": lambda base, v: base[:, : 2 * v : 2],
    "offset_columns": lambda base, v: base[:, 3 : 3 + v],
    "btv_shifted": lambda base, v: base.reshape(2, -1, base.shape[1])[:, :-1, :v].reshape(-1, v),
    "btv_one_position": lambda base, v: base.reshape(2, -1, base.shape[1])[:, 2, :v],
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_strided_views(backend: str, view: str) -> None:
    v = 37
    base = leaf(_wide(12, v))
    logits = VIEWS[view](base, v)
    assert logits.shape[1] == v
    targets = sample_targets(logits.detach(), 0.7)
    logp, entropy = token_logprobs(logits, targets, 0.7, return_entropy=True, backend=backend)
    weights = upstream(logp, entropy)
    grad = weighted_grad((logp, entropy), weights, base)

    base_r = fp64_leaf(base)
    logp_r, entropy_r = token_logprobs_reference(VIEWS[view](base_r, v), targets, 0.7, return_entropy=True)
    grad_r = weighted_grad((logp_r, entropy_r), weights, base_r)
    torch.testing.assert_close(logp.double(), logp_r, **VALUE_TOL[torch.float32])
    torch.testing.assert_close(entropy.double(), entropy_r, **VALUE_TOL[torch.float32])
    torch.testing.assert_close(grad.double(), grad_r, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("v", [37, 1000, 4099])
def test_torch_backend_chunking(monkeypatch: pytest.MonkeyPatch, v: int, return_entropy: bool) -> None:
    """Several row chunks (one row per chunk once V > CHUNK_ELEMENTS) give exactly the unchunked results."""
    logits = make_logits(40, v)
    targets = sample_targets(logits)
    weights = [torch.randn(40), torch.randn(40)]

    def run() -> tuple[torch.Tensor, ...]:
        x = leaf(logits)
        out = token_logprobs(x, targets, 0.7, return_entropy=return_entropy, backend="torch")
        out = out if return_entropy else (out,)
        return (*out, weighted_grad(out, weights[: len(out)], x))

    whole = run()
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 1000)
    assert len(torch_backend._row_chunks(40, v)) > 1
    chunked = run()
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, **EXACT_ON_CPU)


def test_nothing_of_size_n_by_v_saved_but_the_logits(backend: str) -> None:
    n, v, d = 16, 37, 8
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    logits = h @ w.T
    targets = sample_targets(logits.detach())
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = token_logprobs(logits, targets, return_entropy=True, backend=backend)
    big = [t for t in saved if t.numel() >= n * v]
    assert big, "the logits must be saved for backward"
    assert all(t.data_ptr() == logits.data_ptr() for t in big)
    assert not [a for a in vars(logp.grad_fn).values() if isinstance(a, torch.Tensor) and a.numel() >= n * v]
