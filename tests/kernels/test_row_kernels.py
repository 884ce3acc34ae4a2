"""The Triton row kernels' own paths: tiles of several rows (small V), the aligned main loop with its masked edge
pass (odd V, misaligned rows), the fused PPO kernel against the torch backend term by term, out-of-range targets,
and the absence of host synchronisation on the PPO path."""

import pytest
import torch
from kernel_helpers import GRAD_TOL, VALUE_TOL, fp64_leaf, leaf, make_logits, sample_targets, upstream, weighted_grad

import rlhf_kernels
import rlhf_kernels.torch_backend as torch_backend
from rlhf_kernels import kl_from_logits, ppo_loss_from_logits, token_logprobs, validate
from rlhf_kernels.reference import kl_from_logits_reference, token_logprobs_reference

pytestmark = pytest.mark.skipif(not rlhf_kernels.triton_available(), reason="triton is not installed")


@pytest.fixture
def triton_backend():
    import rlhf_kernels.triton_backend as module

    return module


def _check_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    x = leaf(logits)
    logp, entropy = token_logprobs(x, targets, temperature, return_entropy=True, backend="triton")
    weights = upstream(logp, entropy)
    grad = weighted_grad((logp, entropy), weights, x)
    x64 = fp64_leaf(logits)
    logp64, entropy64 = token_logprobs_reference(x64, targets, temperature, return_entropy=True)
    grad64 = weighted_grad((logp64, entropy64), weights, x64)
    torch.testing.assert_close(logp.double(), logp64, **VALUE_TOL[logits.dtype])
    torch.testing.assert_close(entropy.double(), entropy64, **VALUE_TOL[logits.dtype])
    torch.testing.assert_close(grad.double(), grad64, **GRAD_TOL[logits.dtype])


@pytest.mark.parametrize("n", [1, 5, 19])
@pytest.mark.parametrize("v", [81, 320])
def test_several_rows_per_program(triton_backend, n: int, v: int) -> None:
    """A small vocabulary puts several rows in one program; the last tile is partly past N."""
    _, rows, _ = triton_backend._launch_config(n, v)
    assert rows > 1 or n == 1
    logits = make_logits(n, v)
    logits[n // 2, ::4] = float("-inf")
    _check_logprobs(logits, sample_targets(logits, 0.7), 0.7)
    ref_logits = logits + torch.randn_like(logits)
    x = leaf(logits)
    kl = kl_from_logits(x, ref_logits, 1.3, backend="triton")
    (weights,) = upstream(kl)
    grad = weighted_grad((kl,), (weights,), x)
    x64 = fp64_leaf(logits)
    kl64 = kl_from_logits_reference(x64, ref_logits.double(), 1.3)
    torch.testing.assert_close(kl.double(), kl64, **VALUE_TOL[torch.float32])
    torch.testing.assert_close(grad.double(), weighted_grad((kl64,), (weights,), x64), **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_odd_vocabulary_main_loop_and_edge(triton_backend, dtype: torch.dtype) -> None:
    """V = 50257 (GPT-2): rows start at every alignment, each row has a head before its aligned main loop and a
    tail after it, and the extreme logits sit in the head, the main loop and the tail."""
    n, v = 3, 50257
    logits = make_logits(n, v, dtype=dtype, hidden=8)
    logits[0, 0] = 40.0  # in row 0's main loop (row 0 is aligned: no head)
    logits[1, 2] = 40.0  # in row 1's head (row 1 starts 1 element past an alignment boundary)
    logits[2, v - 1] = 40.0  # in the tail
    targets = torch.tensor([0, 2, 7])
    _check_logprobs(logits, targets, 1.0)


def test_misaligned_view_with_small_blocks(triton_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A view starting 3 elements into its storage, rows of stride 2 V + 6, many 128-wide blocks per row."""
    monkeypatch.setattr(triton_backend, "MAX_BLOCK", 128)
    v = 1000
    base = make_logits(6, 2 * v + 6)
    logits = base[:, 3 : 3 + v]
    assert triton_backend._launch_config(6, v)[:2] == (128, 1)
    _check_logprobs(logits, sample_targets(logits, 1.3), 1.3)


def _ppo_inputs(n: int, v: int, dtype: torch.dtype = torch.float32) -> dict:
    logits = make_logits(n, v, dtype=dtype)
    valid = torch.rand(n) > 0.3
    valid[0] = True
    logits[~valid] = float("nan")  # padding: must never be read
    targets = sample_targets(torch.nan_to_num(logits.float(), nan=0.0))
    return {
        "logits": logits,
        "targets": targets,
        "old_logp": -torch.rand(n) * 4,
        "advantages": torch.randn(n),
        "valid": valid,
        "ref_logp": -torch.rand(n) * 4,
    }


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "full"])
@pytest.mark.parametrize(("n", "v"), [(19, 81), (4, 1000)])
def test_ppo_kernel_matches_torch_backend_terms(triton_backend, n: int, v: int, kl_estimator: str, inplace: bool):
    """The kernel's epilogue (ratio, clip, advantages, KL, entropy bonus) against the shared PPO-terms math of the
    torch backend, row by row, and its in-place gradient with masked NaN rows zeroed."""
    x = _ppo_inputs(n, v)
    full = kl_estimator == "full"
    full_kl = torch.rand(n) if full else None
    cfg = {"clip_eps_low": 0.15, "clip_eps_high": 0.25, "entropy_coef": 0.02, "kl_coef": 0.1,
           "kl_estimator": kl_estimator}  # fmt: skip
    inv_count = 1.0 / x["valid"].sum().float()
    args = (x["targets"], x["old_logp"], x["advantages"], x["valid"], None if full else x["ref_logp"], full_kl,
            inv_count, cfg, 0.7)  # fmt: skip
    want_grad = torch.empty_like(x["logits"])
    want = torch_backend.ppo_forward(x["logits"], *args, grad_out=want_grad)
    logits = x["logits"].clone()
    got = triton_backend.ppo_forward(logits, *args, grad_out=logits if inplace else None)
    tol = VALUE_TOL[torch.float32]
    torch.testing.assert_close(got.terms, want.terms, **tol)
    torch.testing.assert_close(got.c_lp, want.c_lp, **tol)
    valid = x["valid"]
    torch.testing.assert_close(got.entropy[valid], want.entropy[valid], **tol)
    if inplace:
        torch.testing.assert_close(logits, want_grad, **GRAD_TOL[torch.float32])
        assert torch.equal(logits[~valid], torch.zeros_like(logits[~valid]))
    else:
        assert torch.equal(torch.nan_to_num(logits, nan=7.0), torch.nan_to_num(x["logits"], nan=7.0))


def test_out_of_range_targets_give_nan_without_a_check(triton_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unchecked (as on a GPU by default), an id outside [0, V) reads nothing out of bounds: its log-prob is NaN."""
    monkeypatch.setattr(validate, "values_checked", lambda t: False)
    logits = make_logits(4, 81)
    targets = torch.tensor([3, -1, 81, 10**9])
    logp = token_logprobs(logits, targets, backend="triton")
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()


SYNCING = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kl_estimator", ["k3", "full"])
def test_ppo_path_never_syncs_with_the_host(monkeypatch: pytest.MonkeyPatch, kl_estimator: str, inplace: bool):
    """Forward and backward of the PPO loss on the Triton backend read no tensor value on the host (each such read
    is a device synchronisation on a GPU). Target ids are value-checked on CPU tensors by design, so that check is
    switched off here, as it is on a GPU."""
    monkeypatch.setattr(validate, "values_checked", lambda t: False)
    x = _ppo_inputs(12, 81)
    logits = leaf(torch.nan_to_num(x["logits"], nan=0.0))
    ref_logits = torch.randn(12, 81)
    calls: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    h = logits * 1
    loss, _ = ppo_loss_from_logits(
        h, x["targets"], x["old_logp"], x["advantages"], x["valid"], entropy_coef=0.01, ref_logp=x["ref_logp"],
        kl_coef=0.1, kl_estimator=kl_estimator, inplace=inplace, backend="triton", ref_logits=ref_logits,
    )  # fmt: skip
    (loss * 2.0).backward()
    monkeypatch.undo()
    assert not calls, calls
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
