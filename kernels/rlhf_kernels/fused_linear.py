"""The LM-head matmul fused with the row ops: log-probs, exact KL and the PPO loss straight from hidden states.

``logits = hidden @ weight.T`` is computed a chunk of rows at a time, the chunk goes through the backend's row op and
is dropped: the (N, V) logits never exist at once, only one (rows, V) chunk (plus, for the exact KL, the reference's).
The PPO loss is a scalar, so its forward pass also writes each chunk's d loss / d logits (into the chunk's own
storage) and turns it into ``grad_hidden[chunk] = dlogits @ W`` and ``grad_W += dlogits.T @ hidden[chunk]`` at once,
as Liger-Kernel's fused linear cross entropy does; backward only scales those by the upstream gradient. The
log-prob and KL ops return (N,) vectors whose upstream gradient is unknown in forward: their backward recomputes the
chunk's logits instead of keeping them.

Matmuls and gradient accumulation run in the compute dtype (fp32, fp64 for fp64 inputs): half-precision hidden
states and weights are upcast, so results match an fp32 evaluation of the same values, and the gradients are cast
back to the inputs' dtypes at the end. Only bias-free heads without logit soft-capping fit ``hidden @ weight.T``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rlhf_kernels.dispatch import resolve_backend
from rlhf_kernels.ops import _kl_grad
from rlhf_kernels.reference import compute_dtype
from rlhf_kernels.types import PPOLossStats
from rlhf_kernels.validate import (
    FLOAT_DTYPES,
    check_positive,
    check_ppo_config,
    check_same,
    check_targets,
    check_tensor,
    check_vector,
)

#: Logit elements of one row chunk: 2^23 fp32 elements = 32 MiB. Large enough that the chunk's three matmuls run at
#: full GEMM speed (the weight-gradient update reads and writes all of grad_W once per chunk, so fewer, taller chunks
#: cost less), small against the (N, V) logits it replaces at LM sizes.
CHUNK_ELEMENTS = 1 << 23


def row_chunks(n: int, v: int, chunk_rows: int | None = None) -> list[slice]:
    """Slices of ``chunk_rows`` rows (default: CHUNK_ELEMENTS // v, at least 1) covering range(n)."""
    rows = chunk_rows if chunk_rows is not None else max(1, CHUNK_ELEMENTS // v)
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, V) logits ``hidden @ weight.T`` in weight's dtype, the compute dtype (hidden (n, H) is upcast to it)."""
    return hidden.to(weight.dtype) @ weight.T


def accumulate_head_grads(
    dlogits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> None:
    """Chain rule through ``logits = hidden @ weight.T``: writes ``dlogits @ weight`` into grad_hidden and adds
    ``dlogits.T @ hidden`` to grad_weight (either may be None: not needed).

    Args:
        dlogits: (n, V) d loss / d logits of a chunk, compute dtype.
        hidden: (n, H) the chunk's hidden states (any float dtype; upcast).
        weight: (V, H) compute-dtype weight.
        grad_hidden: (n, H) destination (the chunk's rows).
        grad_weight: (V, H) accumulator, compute dtype.
    """
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden)
    if grad_weight is not None:
        grad_weight.addmm_(dlogits.T, hidden.to(weight.dtype))


def _grads_or_none(needed: bool, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    return torch.zeros(shape, dtype=like.dtype, device=like.device) if needed else None


def _to(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if grad is None else grad.to(dtype)


def _scaled_(backend, grad: torch.Tensor | None, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A gradient computed for a unit upstream gradient, scaled in place by the actual one (the backend's ``scale_``:
    no host sync, and no pass when it is 1, as it is for a loss) and cast to its input's dtype."""
    if grad is not None:
        backend.scale_(grad, scale)
    return _to(grad, dtype)


class _TokenLogprobsFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_rows, backend):  # type: ignore[override]
        w = weight.to(compute_dtype(weight.dtype))
        n, v = hidden.shape[0], weight.shape[0]
        logp = torch.empty(n, dtype=w.dtype, device=w.device)
        lse, entropy = torch.empty_like(logp), torch.empty_like(logp)
        for rows in row_chunks(n, v, chunk_rows):
            stats = backend.logprob_forward(head_logits(hidden[rows], w), targets[rows], temperature, with_entropy)
            logp[rows], lse[rows] = stats.logp, stats.lse
            if with_entropy:
                entropy[rows] = stats.entropy
        ctx.backend, ctx.temperature, ctx.with_entropy, ctx.chunk_rows = backend, temperature, with_entropy, chunk_rows
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):  # type: ignore[override]
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        w = weight.to(lse.dtype)
        grad_h = _grads_or_none(ctx.needs_input_grad[0], tuple(hidden.shape), lse)
        grad_w = _grads_or_none(ctx.needs_input_grad[1], tuple(w.shape), w)
        c_lp = grad_logp.to(lse.dtype).contiguous()
        c_h = grad_entropy.to(lse.dtype).contiguous() if ctx.with_entropy and grad_entropy is not None else None
        for rows in row_chunks(hidden.shape[0], w.shape[0], ctx.chunk_rows):
            logits = head_logits(hidden[rows], w)
            dlogits = torch.empty_like(logits)  # not the logits' storage: a backend may read a row after writing it
            ctx.backend.logprob_backward(
                logits, targets[rows], lse[rows], None if c_h is None else entropy[rows], c_lp[rows],
                None if c_h is None else c_h[rows], ctx.temperature, dlogits,
            )  # fmt: skip
            accumulate_head_grads(dlogits, hidden[rows], w, None if grad_h is None else grad_h[rows], grad_w)
        return _to(grad_h, hidden.dtype), _to(grad_w, weight.dtype), None, None, None, None, None


class _KLFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, temperature, chunk_rows, backend):  # type: ignore[override]
        cdt = compute_dtype(weight.dtype)
        w, ref_w = weight.to(cdt), ref_weight.to(cdt)
        n, v = hidden.shape[0], weight.shape[0]
        kl = torch.empty(n, dtype=cdt, device=w.device)
        lse_p, lse_q = torch.empty_like(kl), torch.empty_like(kl)
        for rows in row_chunks(n, v, chunk_rows):
            logits, ref_logits = head_logits(hidden[rows], w), head_logits(ref_hidden[rows], ref_w)
            kl[rows], lse_p[rows], lse_q[rows] = backend.kl_forward(logits, ref_logits, temperature)
        ctx.backend, ctx.temperature, ctx.chunk_rows = backend, temperature, chunk_rows
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, kl, lse_p, lse_q)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):  # type: ignore[override]
        hidden, weight, ref_hidden, ref_weight, kl, lse_p, lse_q = ctx.saved_tensors
        w, ref_w = weight.to(kl.dtype), ref_weight.to(kl.dtype)
        grad_h = _grads_or_none(ctx.needs_input_grad[0], tuple(hidden.shape), kl)
        grad_w = _grads_or_none(ctx.needs_input_grad[1], tuple(w.shape), w)
        c = grad_kl.to(kl.dtype).contiguous()
        for rows in row_chunks(hidden.shape[0], w.shape[0], ctx.chunk_rows):
            logits, ref_logits = head_logits(hidden[rows], w), head_logits(ref_hidden[rows], ref_w)
            dlogits = _kl_grad(ctx.backend, logits, ref_logits, (kl[rows], lse_p[rows], lse_q[rows]), c[rows],
                               ctx.temperature)  # fmt: skip
            accumulate_head_grads(dlogits, hidden[rows], w, None if grad_h is None else grad_h[rows], grad_w)
        return _to(grad_h, hidden.dtype), _to(grad_w, weight.dtype), None, None, None, None, None


class _PPOLossFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old_logp, advantages, valid, ref_logp, ref_hidden, ref_weight, cfg,
                temperature, chunk_rows, backend):  # type: ignore[override]  # fmt: skip
        cdt = compute_dtype(weight.dtype)
        w = weight.to(cdt)
        # Masked rows add nothing to the loss, the statistics or the gradient: only the valid rows are evaluated
        # (they are also the only ones whose hidden states are read, so NaN padding cannot leak into grad_W).
        idx = valid.nonzero().squeeze(1)
        n = idx.numel()
        h, t, old, adv = hidden[idx], targets[idx], old_logp[idx], advantages[idx]
        ref_lp = None if ref_logp is None else ref_logp[idx]
        full = ref_hidden is not None
        ref_h, ref_w = (ref_hidden[idx], ref_weight.to(cdt)) if full else (None, None)
        # The loss is a mean over the valid tokens of the whole batch: every chunk's gradient carries the global 1/n.
        inv_count = torch.tensor(1.0 / max(n, 1), dtype=cdt, device=w.device)
        all_valid = torch.ones(n, dtype=torch.bool, device=w.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = _grads_or_none(need_h, tuple(h.shape), w)
        grad_w = _grads_or_none(need_w, tuple(w.shape), w)
        totals = torch.zeros(5, dtype=cdt, device=w.device)  # loss, clipped, approx_kl, ratio, entropy: sums
        for chunk in row_chunks(n, w.shape[0], chunk_rows):
            logits = head_logits(h[chunk], w)
            ref_logits = head_logits(ref_h[chunk], ref_w) if full else None
            kl_stats = backend.kl_forward(logits, ref_logits, temperature) if full else None
            ref_lp_chunk = None if ref_lp is None else ref_lp[chunk]
            args = (logits, t[chunk], old[chunk], adv[chunk], all_valid[chunk], ref_lp_chunk,
                    kl_stats[0] if full else None, inv_count, cfg, temperature)  # fmt: skip
            if need_h or need_w:
                # The full KL's gradient is read from the logits before the PPO terms' gradient overwrites them.
                kl_grad = None
                if full:
                    c_kl = torch.full_like(kl_stats[0], cfg["kl_coef"]) * inv_count
                    kl_grad = _kl_grad(backend, logits, ref_logits, kl_stats, c_kl, temperature)
                rows = backend.ppo_forward(*args, grad_out=logits)
                if kl_grad is not None:
                    logits.add_(kl_grad)
                accumulate_head_grads(logits, h[chunk], w, None if grad_h is None else grad_h[chunk], grad_w)
            else:
                rows = backend.ppo_forward(*args)
            totals.add_(rows.terms.sum(dim=1))

        full_grad_h = None
        if grad_h is not None:
            full_grad_h = torch.zeros(hidden.shape, dtype=cdt, device=w.device).index_copy_(0, idx, grad_h)
        # Kept as attributes, not saved tensors, and handed over in backward: with no other reference left, autograd
        # adopts them as the parameters' .grad instead of copying (a (V, H) copy is a third of this op's memory).
        ctx.grads, ctx.dtypes, ctx.backend = [full_grad_h, grad_w], (hidden.dtype, weight.dtype), backend
        loss, clipped, approx_kl, ratio, entropy = totals.unbind()
        return loss, clipped, approx_kl, entropy, ratio

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("ppo_loss_from_hidden's backward ran twice (retain_graph): its gradients were handed "
                               "over the first time; evaluate the loss again")  # fmt: skip
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        grad_h = _scaled_(ctx.backend, grad_h, grad_loss, ctx.dtypes[0])
        return grad_h, _scaled_(ctx.backend, grad_w, grad_loss, ctx.dtypes[1]), *(None,) * 11


def _check_head(
    hidden: object, weight: object, hidden_name: str = "hidden", weight_name: str = "lm_head_weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks hidden (N, H) and weight (V, H): same floating dtype and device, matching H, V > 0."""
    hidden, weight = check_tensor(hidden_name, hidden), check_tensor(weight_name, weight)
    if hidden.ndim != 2:
        raise ValueError(f"{hidden_name} must have shape (N, H), got {tuple(hidden.shape)}; flatten leading dims first")
    if weight.ndim != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{weight_name} must have shape (V, H) with V > 0 and H = {hidden.shape[1]} (from "
                         f"{hidden_name}), got {tuple(weight.shape)}")  # fmt: skip
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{hidden_name} must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    check_same(weight_name, weight, hidden_name, hidden, check_dtype=True)
    return hidden, weight


def _check_head_targets(targets: object, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # check_targets reads N, V and the device from a logits tensor: an (N, V) broadcast view of one hidden column
    # stands in for the logits without allocating them.
    return check_targets(targets, hidden[:, :1].expand(hidden.shape[0], weight.shape[0]))


def _check_chunk_rows(chunk_rows: int | None) -> int | None:
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    return chunk_rows


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`~rlhf_kernels.token_logprobs` of ``hidden @ lm_head_weight.T`` without the (N, V) logits.

    Differentiable w.r.t. hidden and the weight (a tied embedding receives its gradient); backward recomputes each
    chunk's logits.

    Args:
        hidden: (N, H) final hidden states, float16 / bfloat16 / float32 / float64.
        lm_head_weight: (V, H) bias-free LM head, same dtype and device.
        targets: (N,) integer token ids in [0, V).
        temperature: > 0; logits are divided by it.
        return_entropy: also return the entropy of each row.
        chunk_rows: rows per chunk (default from :data:`CHUNK_ELEMENTS`).
        backend: "auto", "triton" or "torch" (the row ops; the matmuls are torch's).

    Returns:
        logp (N,) in fp32 (fp64 for fp64 inputs), clamped to <= 0; with ``return_entropy`` also entropy (N,).
    """
    hidden, lm_head_weight = _check_head(hidden, lm_head_weight)
    targets = _check_head_targets(targets, hidden, lm_head_weight)
    temperature = check_positive("temperature", temperature)
    impl = resolve_backend(backend, hidden.device)
    return _TokenLogprobsFromHidden.apply(hidden, lm_head_weight, targets, temperature, bool(return_entropy),
                                          _check_chunk_rows(chunk_rows), impl)  # fmt: skip


def kl_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`~rlhf_kernels.kl_from_logits` of ``hidden @ lm_head_weight.T`` against ``ref_hidden @ ref_weight.T``,
    without either (N, V) logits. Differentiable w.r.t. hidden and lm_head_weight; the reference is constant.

    Args:
        hidden: (N, H) policy hidden states; lm_head_weight: (V, H) policy LM head.
        ref_hidden: (N, H) reference hidden states; ref_weight: (V, H) reference LM head; same dtype and device.
        chunk_rows, backend: as in :func:`token_logprobs_from_hidden`.

    Returns:
        kl (N,) in fp32 (fp64 for fp64 inputs).
    """
    hidden, lm_head_weight = _check_head(hidden, lm_head_weight)
    ref_hidden, ref_weight = _check_ref_head(ref_hidden, ref_weight, hidden, lm_head_weight)
    temperature = check_positive("temperature", temperature)
    impl = resolve_backend(backend, hidden.device)
    return _KLFromHidden.apply(hidden, lm_head_weight, ref_hidden, ref_weight, temperature,
                               _check_chunk_rows(chunk_rows), impl)  # fmt: skip


def _check_ref_head(
    ref_hidden: object, ref_weight: object, hidden: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's hidden states and head, checked against the policy's (same shapes, dtype, device), detached."""
    ref_hidden, ref_weight = _check_head(ref_hidden, ref_weight, "ref_hidden", "ref_weight")
    if ref_hidden.shape != hidden.shape or ref_weight.shape != weight.shape:
        raise ValueError(f"ref_hidden {tuple(ref_hidden.shape)} / ref_weight {tuple(ref_weight.shape)} must match "
                         f"hidden {tuple(hidden.shape)} / lm_head_weight {tuple(weight.shape)}")  # fmt: skip
    check_same("ref_hidden", ref_hidden, "hidden", hidden, check_dtype=True)
    return ref_hidden.detach(), ref_weight.detach()


def ppo_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
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
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, PPOLossStats]:
    """:func:`~rlhf_kernels.ppo_loss_from_logits` of ``hidden @ lm_head_weight.T`` without the (N, V) logits.

    The gradients w.r.t. hidden and the weight are computed in the forward pass, one chunk of rows at a time, and
    kept ((N, H) and (V, H), compute dtype); backward scales them by the upstream gradient. Masked rows get an
    exactly zero gradient and are not evaluated at all.

    Args:
        hidden: (N, H) final hidden states at the response positions.
        lm_head_weight: (V, H) bias-free LM head, same dtype and device (a tied embedding gets its gradient).
        targets: (N,) sampled token ids in [0, V).
        old_logp: (N,) rollout log-probs; advantages: (N,); mask: (N,) non-zero where the token counts.
        clip_eps_low, clip_eps_high, entropy_coef, kl_coef, kl_estimator, temperature: as in
            :func:`~rlhf_kernels.ppo_loss_from_logits`.
        ref_logp: (N,) reference log-probs, required when ``kl_coef != 0`` with k1, k2 or k3.
        ref_hidden: (N, H) reference hidden states and ref_weight: (V, H) reference LM head, required when
            ``kl_coef != 0`` with "full" (constants; same dtype and device as hidden).
        chunk_rows: rows per chunk (default from :data:`CHUNK_ELEMENTS`).
        backend: "auto", "triton" or "torch" (the row ops; the matmuls are torch's).

    Returns:
        (loss, stats): the scalar loss and :class:`~rlhf_kernels.types.PPOLossStats`, in fp32 (fp64 for fp64).
    """
    hidden, lm_head_weight = _check_head(hidden, lm_head_weight)
    n = hidden.shape[0]
    targets = _check_head_targets(targets, hidden, lm_head_weight)
    old_logp = check_vector("old_logp", old_logp, n, hidden, "hidden").detach()
    advantages = check_vector("advantages", advantages, n, hidden, "hidden").detach()
    valid = check_vector("mask", mask, n, hidden, "hidden") != 0
    cfg = check_ppo_config(clip_eps_low, clip_eps_high, entropy_coef, kl_coef, kl_estimator)
    temperature = check_positive("temperature", temperature)
    full = cfg["kl_coef"] != 0.0 and cfg["kl_estimator"] == "full"
    if full:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("ref_hidden and ref_weight are required when kl_coef != 0 with kl_estimator 'full'")
        ref_hidden, ref_weight = _check_ref_head(ref_hidden, ref_weight, hidden, lm_head_weight)
    else:
        ref_hidden = ref_weight = None  # unused: the KL term is off or sampled
    if ref_logp is not None:
        ref_logp = check_vector("ref_logp", ref_logp, n, hidden, "hidden").detach()
    elif cfg["kl_coef"] != 0.0 and not full:
        raise ValueError("ref_logp is required when kl_coef != 0")
    impl = resolve_backend(backend, hidden.device)
    loss, clip_fraction, approx_kl, entropy, ratio = _PPOLossFromHidden.apply(
        hidden, lm_head_weight, targets, old_logp, advantages, valid, ref_logp, ref_hidden, ref_weight, cfg,
        temperature, _check_chunk_rows(chunk_rows), impl,
    )  # fmt: skip
    return loss, PPOLossStats(clip_fraction.detach(), approx_kl.detach(), entropy.detach(), ratio.detach())
