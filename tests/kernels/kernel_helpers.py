"""Helpers of the kernel tests: tolerances, realistic logits, reference gradients.

Imported by name (``from kernel_helpers import ...``): pytest puts this folder on sys.path for its tests.
"""

import math
import os
from collections.abc import Sequence

import pytest
import torch

import rlhf_kernels

#: "cpu" (Triton under the interpreter) or "cuda" (compiled Triton on the GPU); see tests/conftest.py.
TEST_DEVICE = os.environ.get("RLHF_TEST_DEVICE", "cpu")

#: Tolerance of comparisons that are exact on CPU: one reduction done two ways (chunked or whole rows; a softmax over
#: a single finite entry, whose log-probability and entropy are exactly 0). CUDA's reductions may order and round
#: such sums differently, so there they agree to a few fp32 roundings of the summed terms, not bit for bit (seen on
#: an H200: up to 1.8e-6 absolute on log-probs of magnitude ~1).
EXACT_ON_CPU = {"rtol": 0.0, "atol": 0.0} if TEST_DEVICE == "cpu" else {"rtol": 1e-5, "atol": 1e-5}

#: The backends every op is tested on; the Triton one only where triton imports.
BACKEND_PARAMS = (
    "torch",
    pytest.param(
        "triton", marks=pytest.mark.skipif(not rlhf_kernels.triton_available(), reason="triton is not installed")
    ),
)

#: assert_close tolerances of outputs against an fp64 run of the reference. Outputs are computed in fp32 (fp64 for
#: fp64 inputs) whatever the input dtype, so a half-precision input is no less accurate here: the reference sees the
#: same (exactly upcast) values.
VALUE_TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.float16: {"rtol": 2e-5, "atol": 2e-5},
    torch.bfloat16: {"rtol": 2e-5, "atol": 2e-5},
}

#: Tolerances of gradients (which come back in the input dtype) against an fp64 reference: a half-precision gradient
#: carries the rounding of its own dtype (2^-11 for fp16, 2^-8 for bf16, relative).
GRAD_TOL = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-12},
    # On CUDA torch's own exp/log and reduction order differ from the CPU's; in the KL gradient
    # p * (log p - log q - KL) the bracket cancels, and one element of a strided-view case was seen 2.6e-6 off.
    torch.float32: {"rtol": 1e-4, "atol": 1e-6 if TEST_DEVICE == "cpu" else 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
}


def make_logits(
    n: int, v: int, dtype: torch.dtype = torch.float32, scale: float = 3.0, hidden: int = 32
) -> torch.Tensor:
    """(n, v) logits shaped like a language model's: a hidden state times an output matrix, plus a Zipf-like prior
    that makes low token ids frequent. Returned as a leaf tensor without gradient."""
    h = torch.randn(n, hidden, dtype=torch.float64)
    w = torch.randn(v, hidden, dtype=torch.float64) / math.sqrt(hidden)
    prior = -torch.log1p(torch.arange(v, dtype=torch.float64))
    return (scale * (h @ w.T) + prior).to(dtype)


def sample_targets(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(n,) token ids sampled from softmax(logits / T), as a rollout would record them."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    return torch.multinomial(probs, 1).squeeze(1)


def upstream(*like: torch.Tensor) -> list[torch.Tensor]:
    """Random upstream gradient weights, one per output, in each output's dtype."""
    return [torch.randn(x.shape, dtype=x.dtype) for x in like]


def weighted_grad(
    outputs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor:
    """d/d inputs of sum_i <outputs_i, weights_i>: a backward pass with the given upstream gradients."""
    total = sum((o * w.to(o.dtype)).sum() for o, w in zip(outputs, weights, strict=True))
    (grad,) = torch.autograd.grad(total, inputs)
    return grad


def fp64_leaf(x: torch.Tensor) -> torch.Tensor:
    """A detached fp64 copy of x that requires grad, for reference runs."""
    return x.detach().double().requires_grad_()


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A detached copy of x (same dtype) that requires grad."""
    return x.detach().clone().requires_grad_()


def assert_finite(x: torch.Tensor, what: str) -> None:
    """Asserts x has no inf / NaN, naming the first offending indices."""
    bad = (~torch.isfinite(x)).nonzero()
    if bad.numel():
        pytest.fail(f"{what}: {bad.shape[0]} non-finite entries, first at {bad[:5].tolist()}", pytrace=False)
