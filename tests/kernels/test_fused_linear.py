"""fused_linear: the PPO loss, token log-probs and exact KL from hidden states and the LM head, against the
references applied to ``hidden @ weight.T`` (fp64 autograd), over chunkings, dtypes, options and edge cases."""

import math

import pytest
import torch
from kernel_helpers import GRAD_TOL, VALUE_TOL, assert_finite, fp64_leaf, leaf, sample_targets
from test_ppo_loss import old_logp_for, ratios_away_from_clip

from rlhf_kernels import (
    kl_from_hidden,
    ppo_loss_from_hidden,
    ppo_loss_from_logits,
    token_logprobs_from_hidden,
)
from rlhf_kernels.fused_linear import row_chunks
from rlhf_kernels.reference import kl_from_logits_reference, ppo_loss_reference, token_logprobs_reference

DTYPES = (torch.float64, torch.float32, torch.bfloat16)
#: (N, chunk_rows): chunks that do not divide N, N smaller than a chunk, one row per chunk, the default chunking.
SHAPES = ((37, 8), (5, 16), (6, 1), (40, None))
H, V = 24, 50
#: Gradients w.r.t. hidden and weight are sums over V (or N) of d loss / d logits times O(1) entries, which cancel:
#: an fp32 result carries a few roundings of the summed terms, not of the (possibly much smaller) sum, so its
#: absolute tolerance is that of the terms (O(1) here), not of GRAD_TOL's per-logit gradients.
HEAD_GRAD_TOL = {**GRAD_TOL, torch.float32: {"rtol": 1e-4, "atol": 2e-5}}

#: The options of the PPO loss: each builds the keyword arguments of the reference (``ref``) and of the op under
#: test (``ours``) from the batch.
OPTIONS = {
    "plain": {},
    "entropy_temperature_asymmetric": {"entropy_coef": 0.05, "temperature": 0.7, "clip_eps_high": 0.28},
    "k1": {"kl_coef": 0.1, "kl_estimator": "k1", "ref_logp": True},
    "k3": {"kl_coef": 0.1, "kl_estimator": "k3", "ref_logp": True, "entropy_coef": 0.01},
    "full": {"kl_coef": 0.2, "kl_estimator": "full", "temperature": 1.3},
}


def head_batch(n: int, dtype: torch.dtype, temperature: float = 1.0, eps_high: float = 0.2) -> dict:
    """Hidden states, a tied-style LM head and a PPO batch on it: sampled tokens, ratios on both sides of the clip,
    a mask with padding, and a reference model's hidden states, head and log-probs."""
    hidden = torch.randn(n, H, dtype=torch.float64).to(dtype)
    weight = (3.0 * torch.randn(V, H, dtype=torch.float64) / math.sqrt(H)).to(dtype)
    ref_hidden = (hidden.double() + 0.3 * torch.randn(n, H, dtype=torch.float64)).to(dtype)
    ref_weight = (weight.double() + 0.1 * torch.randn(V, H, dtype=torch.float64)).to(dtype)
    logits = hidden.double() @ weight.double().T
    targets = sample_targets(logits, temperature)
    mask = torch.rand(n) > 0.25
    mask[0] = True
    ref_logits = ref_hidden.double() @ ref_weight.double().T
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": targets,
        "old_logp": old_logp_for(logits, targets, ratios_away_from_clip(n, 0.2, eps_high), temperature),
        "advantages": torch.randn(n),
        "mask": mask,
        "ref_hidden": ref_hidden,
        "ref_weight": ref_weight,
        "ref_logp": token_logprobs_reference(ref_logits, targets, temperature).float(),
    }


def split_options(option: dict, batch: dict) -> tuple[dict, dict]:
    """(reference kwargs, from-hidden kwargs) of one OPTIONS entry."""
    common = {k: v for k, v in option.items() if k != "ref_logp"}
    if option.get("ref_logp"):
        common["ref_logp"] = batch["ref_logp"]
    ref, ours = dict(common), dict(common)
    if option.get("kl_estimator") == "full":
        ref["ref_logits"] = batch["ref_hidden"].double() @ batch["ref_weight"].double().T
        ours.update(ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"])
    return ref, ours


def reference_run(batch: dict, ref_kwargs: dict) -> tuple[torch.Tensor, tuple, torch.Tensor, torch.Tensor]:
    """fp64 reference loss, stats and gradients w.r.t. hidden and weight (through logits = hidden @ weight.T)."""
    h, w = fp64_leaf(batch["hidden"]), fp64_leaf(batch["weight"])
    loss, stats = ppo_loss_reference(h @ w.T, batch["targets"], batch["old_logp"], batch["advantages"],
                                     batch["mask"], **ref_kwargs)  # fmt: skip
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), stats, grad_h, grad_w


def assert_grads(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.double(), ref, **HEAD_GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "chunk_rows"), SHAPES)
@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_ppo_loss_from_hidden_matches_reference(
    option: str, n: int, chunk_rows: int | None, dtype: torch.dtype
) -> None:
    opts = OPTIONS[option]
    batch = head_batch(n, dtype, opts.get("temperature", 1.0), opts.get("clip_eps_high", 0.2))
    ref_kwargs, our_kwargs = split_options(opts, batch)
    loss_ref, stats_ref, gh_ref, gw_ref = reference_run(batch, ref_kwargs)
    h, w = leaf(batch["hidden"]), leaf(batch["weight"])
    loss, stats = ppo_loss_from_hidden(h, w, batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"],
                                       chunk_rows=chunk_rows, backend="torch", **our_kwargs)  # fmt: skip
    loss.backward()
    tol = VALUE_TOL[dtype]
    torch.testing.assert_close(loss.double(), loss_ref, **tol)
    for ours, ref in zip(stats, stats_ref, strict=True):
        torch.testing.assert_close(ours.double(), ref.double(), **tol)
    assert_grads(h.grad, gh_ref, dtype)
    assert_grads(w.grad, gw_ref, dtype)
    assert not h.grad[~batch["mask"]].any()  # masked rows: exactly zero


@pytest.mark.parametrize("option", ["k3", "full"])
def test_every_backend(backend: str, option: str) -> None:
    """The row ops of each backend (Triton under the interpreter on CPU) inside the fused head: PPO loss with the
    options that touch most of them, log-probs with entropy and the exact KL, fp32, chunks not dividing N."""
    opts = OPTIONS[option] | {"entropy_coef": 0.02}
    batch = head_batch(11, torch.float32, opts.get("temperature", 1.0))
    ref_kwargs, our_kwargs = split_options(opts, batch)
    loss_ref, _, gh_ref, gw_ref = reference_run(batch, ref_kwargs)
    h, w = leaf(batch["hidden"]), leaf(batch["weight"])
    loss, _ = ppo_loss_from_hidden(h, w, batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"],
                                   chunk_rows=4, backend=backend, **our_kwargs)  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.double(), loss_ref, **VALUE_TOL[torch.float32])
    assert_grads(h.grad, gh_ref, torch.float32)
    assert_grads(w.grad, gw_ref, torch.float32)
    h64 = fp64_leaf(batch["hidden"])
    logits_ref = h64 @ batch["weight"].double().T
    logp_ref, entropy_ref = token_logprobs_reference(logits_ref, batch["targets"], return_entropy=True)
    kl_ref = kl_from_logits_reference(logits_ref, batch["ref_hidden"].double() @ batch["ref_weight"].double().T)
    h = leaf(batch["hidden"])
    logp, entropy = token_logprobs_from_hidden(h, batch["weight"], batch["targets"], return_entropy=True,
                                               chunk_rows=4, backend=backend)  # fmt: skip
    kl = kl_from_hidden(h, batch["weight"], batch["ref_hidden"], batch["ref_weight"], chunk_rows=4, backend=backend)
    for ours, ref in ((logp, logp_ref), (entropy, entropy_ref), (kl, kl_ref)):
        torch.testing.assert_close(ours.double(), ref.detach(), **VALUE_TOL[torch.float32])
    (gh,) = torch.autograd.grad((logp + entropy + kl).sum(), h)
    (gh_ref,) = torch.autograd.grad((logp_ref + entropy_ref + kl_ref).sum(), h64)
    assert_grads(gh, gh_ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ppo_loss_from_hidden_matches_the_logits_op(dtype: torch.dtype) -> None:
    """The same loss as today's fused path with the matmul outside (ppo_loss_from_logits on fp32 logits of the
    same values), to fp32 rounding."""
    batch = head_batch(29, dtype, temperature=0.9)
    args = (batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"])
    kwargs = {"entropy_coef": 0.02, "temperature": 0.9}
    h, w = leaf(batch["hidden"]), leaf(batch["weight"])
    loss, stats = ppo_loss_from_hidden(h, w, *args, chunk_rows=7, backend="torch", **kwargs)
    h32, w32 = fp64_leaf(batch["hidden"]), fp64_leaf(batch["weight"])
    loss_l, stats_l = ppo_loss_from_logits((h32 @ w32.T).float(), *args, backend="torch", **kwargs)
    torch.testing.assert_close(loss.float(), loss_l.float(), **VALUE_TOL[torch.float32])
    torch.testing.assert_close(torch.stack(stats).float(), torch.stack(stats_l).float(), **VALUE_TOL[torch.float32])


def test_ppo_loss_from_hidden_fully_masked_and_nan_padding() -> None:
    """No valid token: loss and stats 0, zero gradients. NaN hidden states at masked rows never reach a gradient."""
    batch = head_batch(9, torch.float32)
    h, w = leaf(batch["hidden"]), leaf(batch["weight"])
    args = (batch["targets"], batch["old_logp"], batch["advantages"])
    loss, stats = ppo_loss_from_hidden(h, w, *args, torch.zeros(9, dtype=torch.bool), entropy_coef=0.1, backend="torch")
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(float(s) == 0.0 for s in stats)
    assert not h.grad.any() and not w.grad.any()

    nan_hidden = batch["hidden"].clone()
    nan_hidden[~batch["mask"]] = float("nan")
    h = leaf(nan_hidden)
    w.grad = None
    loss, _ = ppo_loss_from_hidden(h, w, *args, batch["mask"], entropy_coef=0.1, chunk_rows=4, backend="torch")
    loss.backward()
    assert_finite(loss.detach(), "loss")
    assert_finite(h.grad, "grad hidden")
    assert_finite(w.grad, "grad weight")
    assert not h.grad[~batch["mask"]].any()


def test_ppo_loss_from_hidden_upstream_gradient_and_tied_embedding() -> None:
    """The weight gradient reaches a tied embedding (added to its input-side gradient), and backward scales the
    gradients computed in forward by the upstream gradient."""
    torch.manual_seed(1)
    n, scale = 13, 2.5
    emb_ref = torch.nn.Embedding(V, H, dtype=torch.float64)
    emb = torch.nn.Embedding(V, H, dtype=torch.float64)
    emb.load_state_dict(emb_ref.state_dict())
    ids = torch.randint(0, V, (n,))
    batch = head_batch(n, torch.float64)

    def hidden_of(e: torch.nn.Embedding) -> torch.Tensor:
        return torch.tanh(e(ids))  # (n, H): the embedding is used on the input side too

    args = (batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"])
    h_ref = hidden_of(emb_ref)
    loss_ref, _ = ppo_loss_reference(h_ref @ emb_ref.weight.T, *args, entropy_coef=0.03)
    (scale * loss_ref).backward()
    loss, _ = ppo_loss_from_hidden(hidden_of(emb), emb.weight, *args, entropy_coef=0.03, chunk_rows=5, backend="torch")
    (scale * loss).backward()
    torch.testing.assert_close(emb.weight.grad, emb_ref.weight.grad, **GRAD_TOL[torch.float64])


def test_ppo_loss_from_hidden_second_backward_refused() -> None:
    """The gradients computed in forward are handed over (not copied) in backward: a second backward raises."""
    batch = head_batch(7, torch.float32)
    h = leaf(batch["hidden"])
    loss, _ = ppo_loss_from_hidden(h, batch["weight"], batch["targets"], batch["old_logp"], batch["advantages"],
                                   batch["mask"], backend="torch")  # fmt: skip
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_ppo_loss_from_hidden_without_gradient() -> None:
    """Under no_grad (or with frozen inputs) the forward computes no gradient and gives the same loss and stats."""
    batch = head_batch(11, torch.float64)
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"])
    with torch.no_grad():
        loss, stats = ppo_loss_from_hidden(*args, entropy_coef=0.1, chunk_rows=3, backend="torch")
    loss_ref, stats_ref, _, _ = reference_run(batch, {"entropy_coef": 0.1})
    torch.testing.assert_close(loss, loss_ref, **VALUE_TOL[torch.float64])
    torch.testing.assert_close(torch.stack(stats), torch.stack(stats_ref), **VALUE_TOL[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "chunk_rows"), SHAPES)
def test_token_logprobs_from_hidden_matches_reference(n: int, chunk_rows: int | None, dtype: torch.dtype) -> None:
    batch = head_batch(n, dtype, temperature=0.8)
    h, w = leaf(batch["hidden"]), leaf(batch["weight"])
    logp, entropy = token_logprobs_from_hidden(h, w, batch["targets"], 0.8, True, chunk_rows, backend="torch")
    h64, w64 = fp64_leaf(batch["hidden"]), fp64_leaf(batch["weight"])
    logp_ref, entropy_ref = token_logprobs_reference(h64 @ w64.T, batch["targets"], 0.8, return_entropy=True)
    tol = VALUE_TOL[dtype]
    torch.testing.assert_close(logp.double(), logp_ref.detach(), **tol)
    torch.testing.assert_close(entropy.double(), entropy_ref.detach(), **tol)
    c_lp, c_h = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    gh_ref, gw_ref = torch.autograd.grad((logp_ref * c_lp).sum() + (entropy_ref * c_h).sum(), (h64, w64))
    cdt = logp.dtype
    gh, gw = torch.autograd.grad((logp * c_lp.to(cdt)).sum() + (entropy * c_h.to(cdt)).sum(), (h, w))
    assert_grads(gh, gh_ref, dtype)
    assert_grads(gw, gw_ref, dtype)


def test_token_logprobs_from_hidden_logp_only_frozen_weight() -> None:
    """Without the entropy, and with a frozen head (a LoRA policy's): only the hidden states get a gradient."""
    batch = head_batch(10, torch.float64)
    h = leaf(batch["hidden"])
    logp = token_logprobs_from_hidden(h, batch["weight"], batch["targets"], chunk_rows=4, backend="torch")
    h64 = fp64_leaf(batch["hidden"])
    logp_ref = token_logprobs_reference(h64 @ batch["weight"].T, batch["targets"])
    torch.testing.assert_close(logp, logp_ref.detach(), **VALUE_TOL[torch.float64])
    (gh,) = torch.autograd.grad(logp.sum(), h)
    (gh_ref,) = torch.autograd.grad(logp_ref.sum(), h64)
    torch.testing.assert_close(gh, gh_ref, **GRAD_TOL[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "chunk_rows"), SHAPES)
def test_kl_from_hidden_matches_reference(n: int, chunk_rows: int | None, dtype: torch.dtype) -> None:
    batch = head_batch(n, dtype)
    h, w = leaf(batch["hidden"]), leaf(batch["weight"])
    kl = kl_from_hidden(h, w, batch["ref_hidden"], batch["ref_weight"], 1.2, chunk_rows, backend="torch")
    h64, w64 = fp64_leaf(batch["hidden"]), fp64_leaf(batch["weight"])
    ref_logits = batch["ref_hidden"].double() @ batch["ref_weight"].double().T
    kl_ref = kl_from_logits_reference(h64 @ w64.T, ref_logits, 1.2)
    torch.testing.assert_close(kl.double(), kl_ref.detach(), **VALUE_TOL[dtype])
    c = torch.randn(n, dtype=torch.float64)
    gh_ref, gw_ref = torch.autograd.grad((kl_ref * c).sum(), (h64, w64))
    gh, gw = torch.autograd.grad((kl * c.to(kl.dtype)).sum(), (h, w))
    assert_grads(gh, gh_ref, dtype)
    assert_grads(gw, gw_ref, dtype)


def test_row_chunks_cover_the_rows() -> None:
    assert row_chunks(10, 5, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert row_chunks(0, 5, 4) == []
    assert row_chunks(3, 1 << 30) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # a huge vocabulary: one row a chunk


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight": torch.zeros(V, H + 1)}, "lm_head_weight must have shape"),
        ({"weight": torch.zeros(V, H, dtype=torch.float64)}, "dtype"),
        ({"hidden": torch.zeros(3, 2, H)}, "hidden must have shape"),
        ({"targets": torch.full((12,), V)}, "outside the vocabulary"),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"kl_coef": 0.1, "kl_estimator": "full"}, "ref_hidden and ref_weight are required"),
        ({"kl_coef": 0.1}, "ref_logp is required"),
        ({"kl_coef": 0.1, "kl_estimator": "full", "ref_hidden": torch.zeros(11, H), "ref_weight": torch.zeros(V, H)},
         "must match"),
    ],
)  # fmt: skip
def test_ppo_loss_from_hidden_rejects_bad_arguments(change: dict, message: str) -> None:
    batch = head_batch(12, torch.float32)
    kwargs = {"hidden": batch["hidden"], "weight": batch["weight"], "targets": batch["targets"], **change}
    hidden, weight, targets = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets")
    with pytest.raises(ValueError, match=message):
        ppo_loss_from_hidden(hidden, weight, targets, batch["old_logp"], batch["advantages"], batch["mask"], **kwargs)
