"""The public fused ops: argument checks, backend dispatch and the autograd Functions.

The Functions are backend-agnostic: a backend module (:mod:`~rlhf_kernels.torch_backend` or
:mod:`~rlhf_kernels.triton_backend`) supplies row statistics and gradient writers, and the Functions decide what is
kept between forward and backward. Nothing of size (N, V) is kept except the logits themselves (or, in the PPO loss
with ``inplace=True``, the gradient written into the logits' storage).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rlhf_kernels import reference
from rlhf_kernels.dispatch import resolve_backend
from rlhf_kernels.types import SAMPLED_KL_ESTIMATORS, PPOLossStats
from rlhf_kernels.validate import (
    check_choice,
    check_logits,
    check_positive,
    check_ppo_config,
    check_same,
    check_targets,
    check_tensor,
    check_vector,
)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, backend):  # type: ignore[override]
        stats = backend.logprob_forward(logits, targets, temperature, with_entropy)
        ctx.backend, ctx.temperature, ctx.with_entropy = backend, temperature, with_entropy
        ctx.save_for_backward(logits, targets, stats.lse, stats.entropy if with_entropy else stats.lse)
        return (stats.logp, stats.entropy) if with_entropy else stats.logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):  # type: ignore[override]
        logits, targets, lse, entropy = ctx.saved_tensors
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        c_h = grad_entropy.contiguous() if ctx.with_entropy else None
        ctx.backend.logprob_backward(
            logits, targets, lse, entropy if ctx.with_entropy else None, grad_logp.contiguous(), c_h,
            ctx.temperature, out,
        )  # fmt: skip
        return out, None, None, None, None


class _KLFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, temperature, backend):  # type: ignore[override]
        kl, lse_p, lse_q = backend.kl_forward(logits, ref_logits, temperature)
        ctx.backend, ctx.temperature = backend, temperature
        ctx.save_for_backward(logits, ref_logits, lse_p, lse_q, kl)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):  # type: ignore[override]
        logits, ref_logits, lse_p, lse_q, kl = ctx.saved_tensors
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        ctx.backend.kl_backward(logits, ref_logits, lse_p, lse_q, kl, grad_kl.contiguous(), ctx.temperature, out)
        return out, None, None, None


class _PPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, old_logp, advantages, valid, ref_logp, ref_logits, cfg, temperature, inplace,
                backend):  # type: ignore[override]  # fmt: skip
        cdt = reference.compute_dtype(logits.dtype)
        # Everything stays on the device: no .item(), bool() or nonzero() (each a host sync) anywhere on this path.
        inv_count = 1.0 / valid.sum().clamp(min=1).to(cdt)
        # The exact KL in the loss: its statistics are read before anything overwrites the logits, and its gradient
        # (weight c_kl per row) is the KL op's own, added to the PPO terms' gradient.
        full = ref_logits is not None
        kl_stats = backend.kl_forward(logits, ref_logits, temperature) if full else None
        c_kl = torch.where(valid, cfg["kl_coef"] * inv_count, torch.zeros_like(inv_count)) if full else None
        full_kl = kl_stats[0] if full else None
        grad_now = inplace and ctx.needs_input_grad[0]
        ctx.backend, ctx.temperature, ctx.grad_in_logits, ctx.full = backend, temperature, grad_now, full
        args = (logits, targets, old_logp, advantages, valid, ref_logp, full_kl, inv_count, cfg, temperature)
        if grad_now:
            # The gradient (for a unit upstream gradient, exactly 0 at masked rows) overwrites the logits: the caller
            # promised they are not needed afterwards, so backward is a no-op or one scale. Only the exact KL needs a
            # second (N, V) buffer (its gradient, taken from the logits before they are overwritten).
            kl_grad = _kl_grad(backend, logits, ref_logits, kl_stats, c_kl, temperature, valid) if full else None
            rows = backend.ppo_forward(*args, grad_out=logits)
            if full:
                logits.add_(kl_grad)
            # A kernel's write through the data pointer is invisible to autograd: bump the version counter (shared
            # with every view) explicitly, so a node that saved these logits raises in backward instead of reading
            # the gradient.
            torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(logits)
        else:
            rows = backend.ppo_forward(*args)
            kl_saved = (ref_logits, *kl_stats, c_kl) if full else ()
            ctx.save_for_backward(logits, targets, valid, inv_count, rows.lse, rows.entropy, rows.c_lp, *kl_saved)
            ctx.entropy_coef = cfg["entropy_coef"]
        loss, clip_fraction, approx_kl, ratio, entropy_mean = rows.terms.sum(dim=1).unbind()
        return loss, clip_fraction, approx_kl, entropy_mean, ratio

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        if ctx.grad_in_logits:
            (grad,) = ctx.saved_tensors
            ctx.backend.scale_(grad, grad_loss)
        else:
            logits, targets, valid, inv_count, lse, entropy, c_lp, *kl_saved = ctx.saved_tensors
            c_h = None
            if ctx.entropy_coef != 0.0:
                c_h = torch.where(valid, -ctx.entropy_coef * inv_count * grad_loss, torch.zeros_like(c_lp))
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            ctx.backend.logprob_backward(
                logits, targets, lse, entropy, c_lp * grad_loss, c_h, ctx.temperature, grad, valid
            )
            if ctx.full:
                ref_logits, kl, lse_p, lse_q, c_kl = kl_saved
                grad.add_(_kl_grad(ctx.backend, logits, ref_logits, (kl, lse_p, lse_q), c_kl * grad_loss,
                                   ctx.temperature, valid))  # fmt: skip
        return grad, None, None, None, None, None, None, None, None, None, None


def _kl_grad(
    backend,
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    kl_stats: tuple,
    c: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, V) d/d logits of ``sum_rows c * KL(pi || pi_ref)``; ``kl_stats`` is ``backend.kl_forward``'s (kl, lse_p,
    lse_q), each (N,), and c is (N,); rows not ``valid`` are exact zeros."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    kl, lse_p, lse_q = kl_stats
    backend.kl_backward(logits, ref_logits, lse_p, lse_q, kl, c.contiguous(), temperature, out, valid)
    return out


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target) of each row of softmax(logits / temperature), optionally with each row's entropy.

    Differentiable w.r.t. the logits (also through the entropy). No (N, V) tensor is created in the forward pass.

    Args:
        logits: (N, V) logits, float16 / bfloat16 / float32 / float64, any row stride.
        targets: (N,) integer token ids in [0, V).
        temperature: > 0; logits are divided by it.
        return_entropy: also return the entropy of each row.
        backend: "auto", "triton" or "torch" (see :mod:`rlhf_kernels.dispatch`).

    Returns:
        logp (N,) in fp32 (fp64 for fp64 logits), clamped to <= 0; with ``return_entropy`` also entropy (N,).
    """
    logits = check_logits("logits", logits)
    targets = check_targets(targets, logits)
    temperature = check_positive("temperature", temperature)
    impl = resolve_backend(backend, logits.device)
    return _TokenLogprobs.apply(logits, targets, temperature, bool(return_entropy), impl)


def kl_from_logits(
    logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0, backend: str = "auto"
) -> torch.Tensor:
    """Exact KL(pi || pi_ref) of each row over the whole vocabulary, pi = softmax(logits / T).

    Differentiable w.r.t. ``logits``; ``ref_logits`` are constants (the frozen reference gets no gradient).

    Args:
        logits: (N, V) policy logits.
        ref_logits: (N, V) reference logits, same dtype and device.

    Returns:
        kl (N,) in fp32 (fp64 for fp64 logits).
    """
    logits = check_logits("logits", logits)
    ref_logits = check_logits("ref_logits", ref_logits)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} != logits shape {tuple(logits.shape)}")
    check_same("ref_logits", ref_logits, "logits", logits, check_dtype=True)
    temperature = check_positive("temperature", temperature)
    impl = resolve_backend(backend, logits.device)
    return _KLFromLogits.apply(logits, ref_logits.detach(), temperature, impl)


def ppo_loss_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
    temperature: float = 1.0,
    inplace: bool = False,
    backend: str = "auto",
    ref_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PPOLossStats]:
    """The PPO clipped-ratio loss straight from the logits, with entropy bonus and optional in-loss KL penalty.

    Per valid token: ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) + kl_coef * k(logp, ref_logp)
    - entropy_coef * H`` with r = exp(logp - old_logp); the loss is the mean over valid tokens (0 when none is valid).
    With ``kl_estimator="full"`` the KL term is the exact ``KL(pi || pi_ref)`` of the row over the vocabulary (from
    ``ref_logits``): its gradient is that of the KL itself, exact and free of sampling noise, where a sampled
    estimator's is only right in expectation (k2: KL(pi || ref), k3: the reverse KL).

    The gradient w.r.t. the logits is computed in the forward pass, chunk by chunk while the chunk is in cache. With
    ``inplace=True`` it is written into the logits' own storage (the logits are destroyed: use it in a training step,
    where they are not needed afterwards) so no second (N, V) buffer ever exists and backward is at most one scale.
    With ``inplace=False`` backward recomputes it from the logits (one read, one write).

    Args:
        logits: (N, V) current policy logits.
        targets: (N,) sampled token ids in [0, V) (padding positions too: give them any valid id).
        old_logp: (N,) log-probs of ``targets`` under the rollout policy (no gradient).
        advantages: (N,) advantages (no gradient).
        mask: (N,) bool or numeric; non-zero marks tokens that count.
        clip_eps_low, clip_eps_high: ratio clip range [1 - eps_low, 1 + eps_high] (asymmetric allowed).
        entropy_coef: weight of the entropy bonus.
        ref_logp: (N,) reference log-probs, required when ``kl_coef != 0`` with k1, k2 or k3 (no gradient).
        kl_coef: weight of the KL penalty in the loss (GRPO style; 0 when the KL is in the reward).
        kl_estimator: "k1", "k2", "k3" (see :func:`kl_estimate`) or "full" (exact, see :func:`kl_from_logits`).
        temperature: > 0, the sampling temperature of the rollout.
        inplace: write the gradient into the logits (see above; with "full", one transient (N, V) buffer holds the
            KL's gradient until it is added).
        backend: "auto", "triton" or "torch".
        ref_logits: (N, V) reference logits, same dtype and device, required when ``kl_coef != 0`` with "full"
            (no gradient).

    Returns:
        (loss, stats): the scalar loss and :class:`~rlhf_kernels.types.PPOLossStats`.
    """
    logits = check_logits("logits", logits)
    n = logits.shape[0]
    if inplace and logits.stride(0) < logits.shape[1]:
        logits = logits.contiguous()  # overlapping rows (an expanded tensor) cannot hold a gradient each
    targets = check_targets(targets, logits)
    old_logp = check_vector("old_logp", old_logp, n, logits, "logits")
    advantages = check_vector("advantages", advantages, n, logits, "logits")
    valid = check_vector("mask", mask, n, logits, "logits") != 0
    cfg = check_ppo_config(clip_eps_low, clip_eps_high, entropy_coef, kl_coef, kl_estimator)
    temperature = check_positive("temperature", temperature)
    full = cfg["kl_coef"] != 0.0 and cfg["kl_estimator"] == "full"
    if full:
        if ref_logits is None:
            raise ValueError("ref_logits is required when kl_coef != 0 with kl_estimator 'full'")
        ref_logits = check_logits("ref_logits", ref_logits)
        if ref_logits.shape != logits.shape:
            raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} != logits shape {tuple(logits.shape)}")
        check_same("ref_logits", ref_logits, "logits", logits, check_dtype=True)
        ref_logits = ref_logits.detach()
    else:
        ref_logits = None  # unused: the KL term is off or sampled
    if ref_logp is not None:
        ref_logp = check_vector("ref_logp", ref_logp, n, logits, "logits").detach()
    elif cfg["kl_coef"] != 0.0 and not full:
        raise ValueError("ref_logp is required when kl_coef != 0")
    impl = resolve_backend(backend, logits.device)
    loss, clip_fraction, approx_kl, entropy, ratio = _PPOLoss.apply(
        logits, targets, old_logp.detach(), advantages.detach(), valid, ref_logp, ref_logits, cfg, temperature,
        bool(inplace), impl,
    )  # fmt: skip
    return loss, PPOLossStats(clip_fraction.detach(), approx_kl.detach(), entropy.detach(), ratio.detach())


class _Diff(torch.autograd.Function):
    """f(a - b - c) elementwise on the Triton backend; gradient f' for a, -f' for b (c is a constant)."""

    @staticmethod
    def forward(ctx, a, b, c, mode, backend):  # type: ignore[override]
        value, derivative = backend.diff_forward(a, b, c, mode)
        ctx.save_for_backward(derivative)
        ctx.dtypes = (a.dtype, b.dtype)
        # Same output dtype as the torch path, which computes in the promoted input dtype.
        return value.to(torch.promote_types(a.dtype, b.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (derivative,) = ctx.saved_tensors
        g = grad * derivative
        return g.to(ctx.dtypes[0]), (-g).to(ctx.dtypes[1]), None, None, None


def _elementwise_pair(name_a: str, a: object, name_b: str, b: object) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = check_tensor(name_a, a), check_tensor(name_b, b)
    if a.ndim != 1:
        raise ValueError(f"{name_a} must have shape (N,), got {tuple(a.shape)}")
    return a.contiguous(), check_vector(name_b, b, a.shape[0], a, name_a)


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", backend: str = "auto"
) -> torch.Tensor:
    """Sample-based per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

    With r = ref_logp - logp: k1 = -r (unbiased, may be negative), k2 = r^2 / 2 (biased, low variance),
    k3 = (e^r - 1) - r (unbiased and >= 0). Differentiable w.r.t. both inputs.

    Args:
        logp: (N,) log pi(token).
        ref_logp: (N,) log pi_ref(token).

    Returns:
        (N,) estimates in the inputs' (promoted) dtype; the Triton kernel accumulates in fp32 or fp64.
    """
    check_choice("estimator", estimator, SAMPLED_KL_ESTIMATORS)
    logp, ref_logp = _elementwise_pair("logp", logp, "ref_logp", ref_logp)
    impl = resolve_backend(backend, logp.device)
    if impl.__name__.endswith("torch_backend"):
        return reference.kl_estimate_reference(logp, ref_logp, estimator)
    return _Diff.apply(ref_logp, logp, None, estimator, impl)


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: float | torch.Tensor = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Bradley-Terry preference loss ``-log sigmoid(r_chosen - r_rejected - margin)``, computed stably.

    Args:
        r_chosen: (B,) scores of the preferred responses.
        r_rejected: (B,) scores of the other responses.
        margin: a number or a (B,) tensor: the score gap the pair should show (no gradient).
        reduction: "mean" (scalar) or "none" (B,).

    Returns:
        the loss, a scalar or (B,).
    """
    check_choice("reduction", reduction, ("mean", "none"))
    r_chosen, r_rejected = _elementwise_pair("r_chosen", r_chosen, "r_rejected", r_rejected)
    if isinstance(margin, torch.Tensor):
        margin = check_vector("margin", margin, r_chosen.shape[0], r_chosen, "r_chosen").detach()
    elif not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise ValueError(f"margin must be a number or a (B,) tensor, got {type(margin).__name__}")
    impl = resolve_backend(backend, r_chosen.device)
    if impl.__name__.endswith("torch_backend"):
        return reference.bradley_terry_loss_reference(r_chosen, r_rejected, margin, reduction)
    if not isinstance(margin, torch.Tensor):
        margin = torch.full_like(r_chosen, float(margin)) if margin else None
    losses = _Diff.apply(r_chosen, r_rejected, margin, "bradley_terry", impl)
    return losses.mean() if reduction == "mean" else losses
