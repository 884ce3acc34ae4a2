"""ppo_loss_from_logits: loss, stats and gradients against the reference, the clip, the options and inplace."""

import math

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
)

import rlhf_kernels.torch_backend as torch_backend
from rlhf_kernels import PPOLossStats, ppo_loss_from_logits
from rlhf_kernels.reference import ppo_loss_reference, token_logprobs_reference

NEG_INF = float("-inf")


def ratios_away_from_clip(n: int, eps_low: float, eps_high: float, low: float = 0.5, high: float = 1.6) -> torch.Tensor:
    """(n,) fp64 ratios in [low, high], none within 0.02 of a clip boundary (so fp32 rounding never flips a clip)."""
    r = torch.empty(n, dtype=torch.float64).uniform_(low, high)
    for bound in (1.0 - eps_low, 1.0 + eps_high):
        near = (r - bound).abs() < 0.02
        r[near] = torch.where(r[near] < bound, bound - 0.05, bound + 0.05).double()
    return r


def old_logp_for(
    logits: torch.Tensor, targets: torch.Tensor, ratios: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """old_logp such that pi / pi_old = ratios exactly (up to fp32 rounding): logp_true - log r."""
    logp = token_logprobs_reference(logits.double(), targets, temperature)
    return (logp - ratios.log()).float()


def ppo_batch(
    n: int,
    v: int,
    dtype: torch.dtype = torch.float32,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> dict:
    """A batch as a PPO update sees it: sampled tokens, ratios on both sides of the clip, a mask with padding."""
    logits = make_logits(n, v, dtype=dtype)
    targets = sample_targets(logits, temperature)
    ratios = ratios_away_from_clip(n, eps_low, eps_high)
    mask = torch.rand(n) > 0.25
    mask[0] = True
    return {
        "logits": logits,
        "targets": targets,
        "old_logp": old_logp_for(logits, targets, ratios, temperature),
        "advantages": torch.randn(n),
        "mask": mask,
        "ref_logp": old_logp_for(logits, targets, torch.empty(n, dtype=torch.float64).uniform_(0.5, 2.0), temperature),
        "temperature": temperature,
        "clip_eps_low": eps_low,
        "clip_eps_high": eps_high,
    }


def run_op(
    batch: dict, backend: str, inplace: bool = False, **options
) -> tuple[torch.Tensor, PPOLossStats, torch.Tensor]:
    """The op on a fresh copy of the logits; returns (loss, stats, d loss / d logits)."""
    logits = leaf(batch["logits"])
    x = logits * 1  # a non-leaf, as a model's output is: inplace may overwrite it
    loss, stats = ppo_loss_from_logits(x, **{**_args(batch), **options}, inplace=inplace, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), stats, grad


def run_reference(batch: dict, fp64: bool = False, **options) -> tuple[torch.Tensor, PPOLossStats, torch.Tensor]:
    logits = fp64_leaf(batch["logits"]) if fp64 else leaf(batch["logits"])
    loss, stats = ppo_loss_reference(logits, **{**_args(batch), **options})
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), stats, grad


def _args(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "logits"}


def assert_same_result(result: tuple, expected: tuple, dtype: torch.dtype) -> None:
    """(loss, stats, grad) against the expected triple, at the tolerances of the logits' dtype."""
    loss, stats, grad = result
    loss_e, stats_e, grad_e = expected
    vtol = VALUE_TOL[dtype]
    torch.testing.assert_close(loss.to(loss_e.dtype), loss_e, **vtol)
    for name in PPOLossStats._fields:
        torch.testing.assert_close(
            getattr(stats, name).to(loss_e.dtype), getattr(stats_e, name), **vtol, msg=lambda m, n=name: f"{n}: {m}"
        )
    torch.testing.assert_close(grad.to(grad_e.dtype), grad_e, **GRAD_TOL[dtype])


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("v", [37, 1000, 4099])
def test_matches_reference(backend: str, v: int, temperature: float, inplace: bool) -> None:
    batch = ppo_batch(24, v, temperature=temperature)
    options = {"entropy_coef": 0.01}
    result = run_op(batch, backend, inplace, **options)
    assert_same_result(result, run_reference(batch, **options), torch.float32)
    assert_same_result(result, run_reference(batch, fp64=True, **options), torch.float32)
    assert 0 < result[1].clip_fraction < 1


@pytest.mark.parametrize("inplace", [False, True])
def test_clip_both_sides_asymmetric(backend: str, inplace: bool) -> None:
    """Known ratios on both sides of an asymmetric clip range [0.9, 1.3], with positive and negative advantages."""
    eps_low, eps_high = 0.1, 0.3
    cases = [  # (ratio, advantage, clipped)
        (1.5, 1.0, True),  # A > 0, r > 1 + eps_high
        (1.1, 1.0, False),  # inside
        (1.25, 0.5, False),  # inside only because eps_high = 0.3 (0.2 would clip it)
        (0.5, 2.0, False),  # A > 0, r below the range: the unclipped term is the larger, it keeps its gradient
        (0.5, -1.0, True),  # A < 0, r < 1 - eps_low
        (0.85, -0.5, True),  # clipped only because eps_low = 0.1 (0.2 would keep it)
        (0.95, -1.0, False),  # inside
        (1.6, -1.5, False),  # A < 0, r above the range: unclipped, keeps its gradient
    ]
    n, v = len(cases), 37
    logits = make_logits(n, v)
    targets = sample_targets(logits)
    ratios = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    clipped = torch.tensor([c[2] for c in cases])
    batch = {
        "logits": logits,
        "targets": targets,
        "old_logp": old_logp_for(logits, targets, ratios),
        "advantages": torch.tensor([c[1] for c in cases]),
        "mask": torch.ones(n, dtype=torch.bool),
        "clip_eps_low": eps_low,
        "clip_eps_high": eps_high,
    }
    loss, stats, grad = run_op(batch, backend, inplace)
    assert torch.equal(grad[clipped], torch.zeros(int(clipped.sum()), v))
    assert (grad[~clipped].abs().sum(dim=1) > 0).all()
    torch.testing.assert_close(stats.clip_fraction, torch.tensor(3 / 8), rtol=0, atol=1e-7)
    torch.testing.assert_close(stats.ratio, ratios.mean().float(), rtol=1e-6, atol=0)
    expected_loss = sum(
        max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)) for r, a, _ in cases
    ) / n  # fmt: skip
    torch.testing.assert_close(loss, torch.tensor(expected_loss, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    assert_same_result((loss, stats, grad), run_reference(batch, fp64=True), torch.float32)
    assert_same_result((loss, stats, grad), run_reference(batch), torch.float32)


def test_gradcheck(backend: str) -> None:
    """float64, tiny sizes, ratios away from the clip boundary, with entropy bonus and KL penalty on."""
    n, v = 4, 7
    logits = torch.randn(n, v, dtype=torch.float64)
    targets = torch.tensor([0, 3, 6, 2])
    ratios = torch.tensor([0.5, 1.05, 1.6, 0.9], dtype=torch.float64)  # clipped, inside, clipped, inside
    old_logp = token_logprobs_reference(logits, targets) - ratios.log()
    ref_logp = old_logp + 0.3
    advantages = torch.tensor([-1.0, 0.7, 0.5, -0.3], dtype=torch.float64)
    mask = torch.tensor([True, True, True, False])

    def fn(x: torch.Tensor) -> torch.Tensor:
        loss, _ = ppo_loss_from_logits(
            x, targets, old_logp, advantages, mask, entropy_coef=0.1, ref_logp=ref_logp, kl_coef=0.05,
            kl_estimator="k3", temperature=1.3, inplace=False, backend=backend,
        )  # fmt: skip
        return loss

    assert torch.autograd.gradcheck(fn, (logits.requires_grad_(),))


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_options(backend: str, kl_estimator: str, entropy_coef: float) -> None:
    batch = ppo_batch(16, 1000, temperature=0.7, eps_low=0.15, eps_high=0.28)
    options = {"entropy_coef": entropy_coef, "kl_coef": 0.1, "kl_estimator": kl_estimator}
    result = run_op(batch, backend, **options)
    assert_same_result(result, run_reference(batch, **options), torch.float32)
    assert_same_result(result, run_reference(batch, fp64=True, **options), torch.float32)
    # The penalty really is in the loss and in the gradient.
    loss_without, _, grad_without = run_op(batch, backend, entropy_coef=entropy_coef)
    assert not torch.allclose(result[0], loss_without)
    assert not torch.allclose(result[2], grad_without)


def test_entropy_bonus_changes_loss_and_gradient(backend: str) -> None:
    batch = ppo_batch(16, 37)
    plain = run_op(batch, backend)
    bonus = run_op(batch, backend, entropy_coef=0.2)
    torch.testing.assert_close(bonus[0], plain[0] - 0.2 * bonus[1].entropy, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(bonus[2], plain[2])
    assert_same_result(bonus, run_reference(batch, fp64=True, entropy_coef=0.2), torch.float32)


def test_ref_logp_required_with_kl_coef(backend: str) -> None:
    batch = ppo_batch(4, 37)
    del batch["ref_logp"]
    with pytest.raises(ValueError, match="ref_logp"):
        ppo_loss_from_logits(batch["logits"], **_args(batch), kl_coef=0.1, backend=backend)
    loss, _ = ppo_loss_from_logits(batch["logits"], **_args(batch), kl_coef=0.0, backend=backend)  # fine without
    assert torch.isfinite(loss)


@pytest.mark.parametrize("inplace", [False, True])
def test_masked_tokens_contribute_nothing(backend: str, inplace: bool) -> None:
    batch = ppo_batch(16, 37)
    batch["mask"] = torch.tensor([True, False] * 8)
    loss, stats, grad = run_op(batch, backend, inplace, entropy_coef=0.01)
    masked = ~batch["mask"]
    assert torch.equal(grad[masked], torch.zeros(8, 37))
    assert_same_result((loss, stats, grad), run_reference(batch, fp64=True, entropy_coef=0.01), torch.float32)
    # The same as a batch of only the valid tokens.
    valid_only = {k: (v[batch["mask"]] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    loss_v, stats_v, grad_v = run_op(valid_only, backend, inplace, entropy_coef=0.01)
    torch.testing.assert_close(loss, loss_v, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats.entropy, stats_v.entropy, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad[batch["mask"]], grad_v, rtol=1e-6, atol=1e-8)


def test_numeric_mask_equals_bool_mask(backend: str) -> None:
    batch = ppo_batch(16, 37)
    as_bool = run_op(batch, backend)
    as_float = run_op({**batch, "mask": batch["mask"].float()}, backend)
    for a, b in zip((as_bool[0], *as_bool[1], as_bool[2]), (as_float[0], *as_float[1], as_float[2]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
@pytest.mark.parametrize("inplace", [False, True])
def test_masked_rows_with_nan_logits_and_inf_advantages(backend: str, inplace: bool, entropy_coef: float) -> None:
    """Padding rows holding NaN logits and inf advantages must leave the loss, the stats and every gradient (of the
    logits, and through a matmul of the model's weights) as if they were finite."""
    n, v, d = 8, 37, 16
    batch = ppo_batch(n, v)
    mask = torch.tensor([True, True, False, True, False, True, True, False])
    pad_rows = torch.tensor([2, 4])  # logits NaN; row 7 is masked with finite logits but an inf advantage
    batch["mask"] = mask
    batch["advantages"][[4, 7]] = torch.tensor([float("inf"), float("-inf")])
    batch["old_logp"][2] = float("nan")
    h = torch.randn(n, d)
    w = torch.randn(v, d)
    nan_rows = torch.zeros(n, v)
    nan_rows[pad_rows] = float("nan")

    hl, wl = leaf(h), leaf(w)
    logits = hl @ wl.T + nan_rows
    loss, stats = ppo_loss_from_logits(
        logits, **_args(batch), entropy_coef=entropy_coef, inplace=inplace, backend=backend
    )
    logits.retain_grad()
    loss.backward()
    assert_finite(loss, "loss")

    # Expected: the reference on the same batch with the padding replaced by finite values.
    clean = {**batch, "advantages": batch["advantages"].clone(), "old_logp": batch["old_logp"].clone()}
    clean["advantages"][~mask] = 0.0
    clean["old_logp"][~mask] = -1.0
    hr, wr = fp64_leaf(h), fp64_leaf(w)
    loss_r, stats_r = ppo_loss_reference(hr @ wr.T, **_args(clean), entropy_coef=entropy_coef)
    loss_r.backward()
    torch.testing.assert_close(loss.double(), loss_r, **VALUE_TOL[torch.float32])
    for name in PPOLossStats._fields:
        torch.testing.assert_close(getattr(stats, name).double(), getattr(stats_r, name), **VALUE_TOL[torch.float32])
    grad = logits if inplace else logits.grad  # inplace: the logits hold the gradient
    assert_finite(grad[mask], "gradient of the valid rows")
    assert_finite(grad[~mask], "gradient of the masked rows")
    assert torch.equal(grad[~mask], torch.zeros(int((~mask).sum()), v))
    assert_finite(wl.grad, "gradient of the output matrix")
    torch.testing.assert_close(wl.grad.double(), wr.grad, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(hl.grad[mask].double(), hr.grad[mask], **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("inplace", [False, True])
def test_all_masked(backend: str, inplace: bool) -> None:
    batch = ppo_batch(8, 37)
    batch["mask"] = torch.zeros(8, dtype=torch.bool)
    loss, stats, grad = run_op(batch, backend, inplace, entropy_coef=0.1, kl_coef=0.1)
    assert loss == 0
    assert all(s == 0 for s in stats)
    assert torch.equal(grad, torch.zeros(8, 37))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_half_precision_inputs(backend: str, dtype: torch.dtype, inplace: bool) -> None:
    batch = ppo_batch(16, 1000, dtype=dtype, temperature=0.7)
    loss, stats, grad = run_op(batch, backend, inplace, entropy_coef=0.01)
    assert loss.dtype == torch.float32 and all(s.dtype == torch.float32 for s in stats)
    assert grad.dtype == dtype
    assert_same_result((loss, stats, grad), run_reference(batch, fp64=True, entropy_coef=0.01), dtype)


def test_float64(backend: str) -> None:
    batch = ppo_batch(8, 37, dtype=torch.float64, temperature=0.7)
    result = run_op(batch, backend, entropy_coef=0.01, kl_coef=0.1)
    assert result[0].dtype == torch.float64
    assert_same_result(result, run_reference(batch, fp64=True, entropy_coef=0.01, kl_coef=0.1), torch.float64)


@pytest.mark.parametrize("inplace", [False, True])
def test_neg_inf_blocks_and_huge_logits(backend: str, small_blocks: int, inplace: bool) -> None:
    batch = ppo_batch(8, 1000, temperature=0.7)
    logits = batch["logits"]
    logits[0, 128:512] = NEG_INF
    logits[1, :128] = NEG_INF
    logits[2, 512:] = NEG_INF
    logits[3, ::3] = NEG_INF
    logits[4] *= 1e3
    logits[5] = torch.randn(1000) * 1e4
    batch["targets"] = sample_targets(logits, 0.7)
    batch["old_logp"] = old_logp_for(logits, batch["targets"], ratios_away_from_clip(8, 0.2, 0.2), 0.7)
    options = {"entropy_coef": 0.01, "kl_coef": 0.05, "kl_estimator": "k3"}
    result = run_op(batch, backend, inplace, **options)
    assert_finite(result[2], "gradient")
    assert_same_result(result, run_reference(batch, fp64=True, **options), torch.float32)


def test_large_entropy_coefficient_with_masked_vocabulary(backend: str) -> None:
    """A masked vocabulary (-inf logits) and an entropy coefficient whose per-token weight exceeds 1."""
    batch = ppo_batch(2, 37)
    batch["logits"][:, 10:30] = NEG_INF
    batch["targets"] = torch.tensor([3, 31])
    batch["old_logp"] = old_logp_for(batch["logits"], batch["targets"], torch.tensor([1.0, 1.05], dtype=torch.float64))
    batch["mask"] = torch.tensor([True, False])
    result = run_op(batch, backend, entropy_coef=2.0)
    assert_finite(result[2], "gradient")
    assert_same_result(result, run_reference(batch, fp64=True, entropy_coef=2.0), torch.float32)


VIEWS = {
    "row_stride_gt_v": lambda base, v: base[:, :v],
    "column_strided": lambda base, v: base[:, : 2 * v : 2],
    "btv_shifted": lambda base, v: base.reshape(2, -1, base.shape[1])[:, :-1, :v].reshape(-1, v),
    "btv_one_position": lambda base, v: base.reshape(2, -1, base.shape[1])[:, 2, :v],
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("view", list(VIEWS))
def test_strided_views(backend: str, view: str, inplace: bool) -> None:
    v = 37
    base_values = make_logits(12, 2 * v + 6)
    logits_values = VIEWS[view](base_values, v)
    n = logits_values.shape[0]
    targets = sample_targets(logits_values)
    args = {
        "targets": targets,
        "old_logp": old_logp_for(logits_values, targets, ratios_away_from_clip(n, 0.2, 0.2)),
        "advantages": torch.randn(n),
        "mask": torch.rand(n) > 0.2,
        "entropy_coef": 0.01,
    }
    base = leaf(base_values)
    base_copy = base * 1  # non-leaf: inplace may write into it
    loss, stats = ppo_loss_from_logits(VIEWS[view](base_copy, v), **args, inplace=inplace, backend=backend)
    (grad,) = torch.autograd.grad(loss, base)

    base64 = fp64_leaf(base_values)
    loss_r, stats_r = ppo_loss_reference(VIEWS[view](base64, v), **args)
    (grad_r,) = torch.autograd.grad(loss_r, base64)
    assert_same_result((loss, stats, grad), (loss_r, stats_r, grad_r), torch.float32)
    if inplace and view == "row_stride_gt_v":
        # The gradient went into the view's own columns of the wider storage, and nowhere else.
        torch.testing.assert_close(base_copy[:, :v].detach().double(), grad_r[:, :v], **GRAD_TOL[torch.float32])
        assert torch.equal(base_copy[:, v:], base_values[:, v:])


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("v", [37, 1000, 4099])
def test_torch_backend_chunking(monkeypatch: pytest.MonkeyPatch, v: int, inplace: bool) -> None:
    batch = ppo_batch(40, v)
    options = {"entropy_coef": 0.01, "kl_coef": 0.1, "kl_estimator": "k2"}
    whole = run_op(batch, "torch", inplace, **options)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 1000)
    assert len(torch_backend._row_chunks(40, v)) > 1
    chunked = run_op(batch, "torch", inplace, **options)
    for a, b in zip((whole[0], *whole[1], whole[2]), (chunked[0], *chunked[1], chunked[2]), strict=True):
        torch.testing.assert_close(a, b, **EXACT_ON_CPU)


# ---------------------------------------------------------------------------------------------------------------------
# inplace=True


def _model(n: int, v: int, d: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.randn(n, d, dtype=dtype, requires_grad=True),
        (torch.randn(v, d) / math.sqrt(d)).to(dtype).requires_grad_(),
    )


@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_inplace_overwrites_logits_with_gradient(backend: str, upstream: float) -> None:
    n, v, d = 16, 37, 8
    h, w = _model(n, v, d)
    batch = ppo_batch(n, v)
    options = {**_args(batch), "entropy_coef": 0.01, "kl_coef": 0.05}

    # Reference gradients (for this upstream gradient) w.r.t. the logits and through the matmul.
    h_r, w_r = leaf(h), leaf(w)
    logits_r = h_r @ w_r.T
    logits_r.retain_grad()
    loss_r, stats_r = ppo_loss_reference(logits_r, **options)
    (loss_r * upstream).backward()

    # The op without inplace.
    h_o, w_o = leaf(h), leaf(w)
    loss_o, stats_o = ppo_loss_from_logits(h_o @ w_o.T, **options, inplace=False, backend=backend)
    (loss_o * upstream).backward()

    logits = h @ w.T  # a non-leaf, as a model's output
    logits_before = logits.detach().clone()
    loss, stats = ppo_loss_from_logits(logits, **options, inplace=True, backend=backend)
    # Right after the forward, the logits' storage holds d loss / d logits for a unit upstream gradient.
    torch.testing.assert_close(logits.detach(), logits_r.grad / upstream, **GRAD_TOL[torch.float32])
    assert not torch.allclose(logits.detach(), logits_before)
    (loss * upstream).backward()
    # Backward scales it in place: still the very same storage, now the gradient for this upstream gradient.
    torch.testing.assert_close(logits.detach(), logits_r.grad, **GRAD_TOL[torch.float32])

    torch.testing.assert_close(loss, loss_o, rtol=0, atol=0)
    for name in PPOLossStats._fields:
        torch.testing.assert_close(getattr(stats, name), getattr(stats_o, name), rtol=0, atol=0)
        torch.testing.assert_close(getattr(stats, name), getattr(stats_r, name), **VALUE_TOL[torch.float32])
    torch.testing.assert_close(loss, loss_r.detach(), **VALUE_TOL[torch.float32])
    for got, out_of_place, ref in ((h.grad, h_o.grad, h_r.grad), (w.grad, w_o.grad, w_r.grad)):
        torch.testing.assert_close(got, out_of_place, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_nothing_else_of_size_n_by_v_is_kept(backend: str, inplace: bool) -> None:
    n, v, d = 16, 37, 8  # n * v = 592, n * d = 128, v * d = 296: only the logits have n * v elements
    h, w = _model(n, v, d)
    logits = h @ w.T
    batch = ppo_batch(n, v)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = ppo_loss_from_logits(logits, **_args(batch), entropy_coef=0.01, inplace=inplace, backend=backend)
    big = [t for t in saved if t.numel() >= n * v]
    assert len(big) >= 1
    assert all(t.data_ptr() == logits.data_ptr() for t in big), [tuple(t.shape) for t in big]
    # No (N, V) tensor hides in an attribute of the autograd node either.
    assert not [a for a in vars(loss.grad_fn).values() if isinstance(a, torch.Tensor) and a.numel() >= n * v]
    loss.backward()
    assert h.grad is not None and w.grad is not None


def test_inplace_without_grad_leaves_logits_alone(backend: str) -> None:
    batch = ppo_batch(8, 37)
    logits = batch["logits"].clone()
    loss, _ = ppo_loss_from_logits(logits, **_args(batch), inplace=True, backend=backend)
    assert torch.equal(logits, batch["logits"])
    with torch.no_grad():
        x = leaf(batch["logits"]) * 1
        loss_ng, _ = ppo_loss_from_logits(x, **_args(batch), inplace=True, backend=backend)
    assert torch.equal(x, batch["logits"])
    assert loss == loss_ng


def test_stats_carry_no_gradient(backend: str) -> None:
    batch = ppo_batch(8, 37)
    x = leaf(batch["logits"])
    loss, stats = ppo_loss_from_logits(x, **_args(batch), entropy_coef=0.01, backend=backend)
    assert loss.requires_grad
    assert not any(s.requires_grad for s in stats)
    assert all(s.shape == () for s in (loss, *stats))


@pytest.mark.parametrize("all_valid", [False, True])
def test_inplace_write_invalidates_other_consumers_of_the_logits(backend: str, all_valid: bool) -> None:
    """The in-place gradient destroys the logits: a second node that saved them (or a view) must raise in backward,
    not silently differentiate the gradient instead of the logits."""
    batch = ppo_batch(6, 37)
    if all_valid:  # no padding row to clear: the kernel's write alone must be seen by autograd
        batch["mask"] = torch.ones(6, dtype=torch.bool)
    logits = leaf(batch["logits"])
    x = logits * 1
    other = (x[:, :5] ** 2).sum()  # saves a view of the logits
    loss, _ = ppo_loss_from_logits(x, **_args(batch), inplace=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_exact_kl_in_the_loss_matches_a_naive_reference(backend: str, inplace: bool) -> None:
    """kl_estimator="full": loss and gradient of the exact per-row KL(pi || pi_ref), written out with log_softmax."""
    t, kl_coef = 1.3, 0.3
    batch = ppo_batch(12, 300, temperature=t)
    ref_logits = batch["logits"] + 0.7 * torch.randn_like(batch["logits"])
    options = {"kl_coef": kl_coef, "kl_estimator": "full", "entropy_coef": 0.01}
    result = run_op(batch, backend, inplace, ref_logits=ref_logits, **options)
    logits = fp64_leaf(batch["logits"])
    no_kl, stats = ppo_loss_reference(logits, **_args(batch), entropy_coef=0.01)
    logp, logq = torch.log_softmax(logits / t, -1), torch.log_softmax(ref_logits.double() / t, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (N,)
    valid = batch["mask"]
    loss = no_kl + kl_coef * kl[valid].sum() / valid.sum()
    (grad,) = torch.autograd.grad(loss, logits)
    assert_same_result(result, (loss.detach(), stats, grad), torch.float32)
    reference = run_reference(batch, fp64=True, ref_logits=ref_logits.double(), **options)
    assert_same_result(reference, (loss.detach(), stats, grad), torch.float64)


def test_exact_kl_in_the_loss_needs_the_reference_logits(backend: str) -> None:
    batch = ppo_batch(4, 37)
    with pytest.raises(ValueError, match="ref_logits is required"):
        run_op(batch, backend, kl_coef=0.1, kl_estimator="full")
