"""Chunked PyTorch implementation of the row ops: the fallback on CPU (and wherever Triton is unavailable).

A (N, V) input is processed CHUNK_ELEMENTS at a time, so the temporaries (the scaled logits and their exponentials)
never exceed two chunks whatever N is, and a chunk is still in cache when its gradient is written. All functions
share the signatures of :mod:`rlhf_kernels.triton_backend`.

Notation per row: z = logits / T, m = max z, s = sum exp(z - m), lse = m + log s, p = exp(z - lse),
H = -sum p log p = log s - sum p (z - m).
"""

from __future__ import annotations

import torch

from rlhf_kernels.reference import compute_dtype
from rlhf_kernels.types import CoefFn, RowStats

#: Elements of one row chunk. 2^18 fp32 elements = 1 MiB per temporary, which stays in a core's L2 cache.
CHUNK_ELEMENTS = 1 << 18


def _row_chunks(n: int, v: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // max(v, 1))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh compute-dtype copy of x / T. Callers shift and clamp it in place, never touching x itself.

    Args:
        x: (n, V) logits.

    Returns:
        (n, V) scaled logits.
    """
    z = torch.empty(x.shape, dtype=compute_dtype(x.dtype), device=x.device)
    z.copy_(x)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _shift(z: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Subtracts ``shift`` from z in place and returns z.

    -inf entries are clamped to the dtype's lowest finite value, so that their exponential is exactly 0 and the
    products 0 * z used for entropy and KL stay 0 instead of NaN. NaN entries stay NaN.

    Args:
        z: (n, V) scaled logits, modified in place.
        shift: (n, 1) row shift (the row max or the log-sum-exp).
    """
    return z.sub_(shift).clamp_(min=torch.finfo(z.dtype).min)


def _shift_and_exp(z: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shifts z in place (see :func:`_shift`) and returns exp of it, a new (n, V) tensor."""
    return torch.exp(_shift(z, shift))


def _row_max(z: torch.Tensor) -> torch.Tensor:
    """(n, 1) row max of z (n, V), with 0 for all -inf rows so the shift never makes -inf - -inf."""
    m = z.amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) row-wise dot products of a, b (n, V) without an (n, V) product buffer."""
    return torch.einsum("nv,nv->n", a, b)


def _target_logit(x: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n,) scaled logit of each row's target, read from the raw logits so a -inf target stays -inf."""
    return x.gather(1, targets.unsqueeze(1)).squeeze(1).to(compute_dtype(x.dtype)) / temperature


def _write_logprob_grad(
    logp_all: torch.Tensor,
    p: torch.Tensor,
    targets: torch.Tensor,
    c_lp: torch.Tensor,
    c_h: torch.Tensor | None,
    entropy: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor,
) -> None:
    """Writes d/d logits of ``sum c_lp * logp(target) + c_h * H`` into out.

    d logp_t / d z_j = [j = t] - p_j and d H / d z_j = -p_j (log p_j + H), and d z / d logits = 1 / T.

    Args:
        logp_all: (n, V) log p (clamped finite), consumed as scratch.
        p: (n, V) probabilities, consumed as scratch.
        targets: (n,) token ids.
        c_lp: (n,) coefficient of logp(target).
        c_h: (n,) coefficient of the entropy, or None for none.
        entropy: (n,) row entropies (needed when c_h is given).
        out: (n, V) destination; may alias the logits.
    """
    c_lp = c_lp / temperature
    if c_h is None:
        g = p.mul_(-c_lp.unsqueeze(1))
    else:
        c_h = c_h / temperature
        g = logp_all.mul_(c_h.unsqueeze(1)).add_((c_lp + c_h * entropy).unsqueeze(1)).mul_(p).neg_()
    g.scatter_add_(1, targets.unsqueeze(1), c_lp.unsqueeze(1).to(g.dtype))
    out.copy_(g)


def logprob_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    coef_fn: CoefFn | None = None,
    grad_out: torch.Tensor | None = None,
) -> RowStats:
    """Per-row log p(target), log-sum-exp and entropy; optionally the gradient in the same pass.

    Args:
        logits: (N, V) logits, last dim contiguous.
        targets: (N,) int64 token ids in [0, V).
        coef_fn: called per row chunk as ``coef_fn(rows, logp, entropy) -> (c_lp, c_h)``; when given, the gradient of
            ``sum c_lp * logp + c_h * entropy`` w.r.t. the logits is written into ``grad_out`` (N, V), which may be the
            logits themselves.

    Returns:
        RowStats of (N,) tensors in the compute dtype.
    """
    n, v = logits.shape
    cdt = compute_dtype(logits.dtype)
    logp = torch.empty(n, dtype=cdt, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    for rows in _row_chunks(n, v):
        x, t = logits[rows], targets[rows]
        z = _scaled(x, temperature)
        m = _row_max(z)
        e = _shift_and_exp(z, m)  # z now holds z - m
        s = e.sum(-1)
        log_s = s.log()
        lse[rows] = m.squeeze(1) + log_s
        logp[rows] = (_target_logit(x, t, temperature) - lse[rows]).clamp(max=0.0)
        if entropy is not None:
            entropy[rows] = log_s - _row_dot(e, z) / s
        if coef_fn is not None:
            c_lp, c_h = coef_fn(rows, logp[rows], entropy[rows] if entropy is not None else None)
            logp_all = z.sub_(log_s.unsqueeze(1))
            p = e.div_(s.unsqueeze(1))
            ent = entropy[rows] if entropy is not None else None
            _write_logprob_grad(logp_all, p, t, c_lp, c_h, ent, temperature, grad_out[rows])
    return RowStats(logp, lse, entropy)


def logprob_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    c_lp: torch.Tensor,
    c_h: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor,
) -> None:
    """Writes d/d logits of ``sum c_lp * logp(target) + c_h * H`` into out, from the saved row statistics.

    Args:
        logits: (N, V) logits.
        targets: (N,) token ids.
        lse: (N,) log-sum-exp of logits / T.
        entropy: (N,) entropies (needed when c_h is given).
        c_lp: (N,) upstream gradient of logp.
        c_h: (N,) upstream gradient of the entropy, or None.
        out: (N, V) destination.
    """
    n, v = logits.shape
    for rows in _row_chunks(n, v):
        logp_all = _scaled(logits[rows], temperature)
        p = _shift_and_exp(logp_all, lse[rows].unsqueeze(1))
        _write_logprob_grad(
            logp_all,
            p,
            targets[rows],
            c_lp[rows],
            None if c_h is None else c_h[rows],
            None if entropy is None else entropy[rows],
            temperature,
            out[rows],
        )


def kl_forward(
    logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact KL(p || q) per row with p = softmax(logits / T), q = softmax(ref_logits / T).

    KL = sum p (z_p - z_q) - lse_p + lse_q.

    Args:
        logits: (N, V) policy logits.
        ref_logits: (N, V) reference logits.

    Returns:
        kl, lse_p, lse_q, each (N,).
    """
    n, v = logits.shape
    cdt = compute_dtype(logits.dtype)
    kl = torch.empty(n, dtype=cdt, device=logits.device)
    lse_p, lse_q = torch.empty_like(kl), torch.empty_like(kl)
    for rows in _row_chunks(n, v):
        zp = _scaled(logits[rows], temperature)
        mp = _row_max(zp)
        ep = _shift_and_exp(zp, mp)
        zq = _scaled(ref_logits[rows], temperature)
        mq = _row_max(zq)
        sq = _shift_and_exp(zq, mq).sum(-1)
        sp = ep.sum(-1)
        lse_p[rows] = mp.squeeze(1) + sp.log()
        lse_q[rows] = mq.squeeze(1) + sq.log()
        diff = zq.neg_().add_(zp).add_(mp - mq)  # z_p - z_q, unshifted
        kl[rows] = _row_dot(ep, diff) / sp - lse_p[rows] + lse_q[rows]
    return kl, lse_p, lse_q


def kl_backward(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    lse_p: torch.Tensor,
    lse_q: torch.Tensor,
    kl: torch.Tensor,
    c: torch.Tensor,
    temperature: float,
    out: torch.Tensor,
) -> None:
    """Writes d/d logits of ``sum c * KL`` into out: c * p_j (log p_j - log q_j - KL) / T.

    Args:
        logits, ref_logits: (N, V).
        lse_p, lse_q, kl, c: (N,).
        out: (N, V) destination.
    """
    n, v = logits.shape
    for rows in _row_chunks(n, v):
        logp = _scaled(logits[rows], temperature)
        p = _shift_and_exp(logp, lse_p[rows].unsqueeze(1))
        logq = _shift(_scaled(ref_logits[rows], temperature), lse_q[rows].unsqueeze(1))
        g = logp.sub_(logq).sub_(kl[rows].unsqueeze(1)).mul_(p).mul_((c[rows] / temperature).unsqueeze(1))
        out[rows].copy_(g)
