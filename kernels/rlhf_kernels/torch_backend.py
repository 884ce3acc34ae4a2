"""Chunked PyTorch implementation of the row ops: the fallback on CPU (and wherever Triton is unavailable).

A (N, V) input is processed CHUNK_ELEMENTS at a time, so the temporaries (log-probs and probabilities of a chunk)
never exceed a few chunks whatever N is, a chunk is still in cache when its gradient is written, and the heap reuses
the same chunk-sized blocks instead of faulting in fresh (N, V) pages as the naive formulation does. Each chunk goes
through torch's fused log_softmax, the fastest CPU primitive for it. All functions share the signatures of
:mod:`rlhf_kernels.triton_backend`.

Notation per row: z = logits / T, lse = log sum exp z, log p = z - lse, H = -sum p log p.
"""

from __future__ import annotations

import torch

from rlhf_kernels.ppo_terms import ppo_token_terms
from rlhf_kernels.reference import compute_dtype
from rlhf_kernels.types import CoefFn, PPORows, RowStats

#: Elements of one row chunk: 2^20 fp32 elements = 4 MiB per temporary, measured fastest on the benchmark machine
#: (smaller chunks pay per-op overhead, larger ones fall out of cache).
CHUNK_ELEMENTS = 1 << 20


def _row_chunks(n: int, v: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // v)
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _shifted(x: torch.Tensor, shift: torch.Tensor, temperature: float) -> torch.Tensor:
    """A new compute-dtype tensor ``x / T - shift``; x itself is never modified.

    -inf entries become the dtype's lowest finite value, so that their exponential is exactly 0 and the products
    0 * z used for entropy, KL and gradients stay 0 instead of NaN. NaN entries stay NaN.

    Args:
        x: (n, V) logits.
        shift: (n, 1) compute-dtype shift in units of x / T (the row max or the log-sum-exp).

    Returns:
        (n, V) shifted scaled logits.
    """
    # torch.sub promotes half/bf16 x to the shift's (compute) dtype.
    z = torch.sub(x, shift) if temperature == 1.0 else torch.sub(x, shift * temperature).div_(temperature)
    return _finite_(z)


def _log_softmax(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(x / T) per row and its log-sum-exp, through torch's fused (fast, vectorised) log_softmax.

    The log-sum-exp is read back from the row maxima: at the argmax, log p = max z - lse.

    Args:
        x: (n, V) logits.

    Returns:
        logp_all (n, V) in the compute dtype (-inf where x is -inf; NaN rows where x is all -inf or has NaN),
        lse (n,).
    """
    cdt = compute_dtype(x.dtype)
    z = x if temperature == 1.0 else torch.div(x.to(cdt), temperature)
    logp_all = torch.log_softmax(z, dim=-1, dtype=cdt)
    lse = z.amax(dim=-1).to(cdt) - logp_all.amax(dim=-1)  # two amax passes: far cheaper than max with indices
    return logp_all, lse


def _finite_(t: torch.Tensor) -> torch.Tensor:
    """Clamps -inf to the lowest finite value in place, so that exp gives exactly 0 and 0 * t stays 0 (not NaN)."""
    return t.clamp_(min=torch.finfo(t.dtype).min)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) row-wise dot products of a, b (n, V). A product and a sum: much faster than bmm/einsum for thin rows."""
    return (a * b).sum(-1)


def _row_max(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, 1) max of x / T per row, in the compute dtype, 0 for all -inf rows (so no -inf - -inf later).

    Args:
        x: (n, V) logits.
    """
    m = x.amax(dim=-1, keepdim=True).to(compute_dtype(x.dtype)) / temperature
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _write_logprob_grad(
    zs: torch.Tensor,
    e: torch.Tensor,
    log_s: torch.Tensor,
    targets: torch.Tensor,
    c_lp: torch.Tensor,
    c_h: torch.Tensor | None,
    entropy: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor,
    valid: torch.Tensor | None,
) -> None:
    """Writes d/d logits of ``sum c_lp * logp(target) + c_h * H`` into out.

    With p_j = e_j / s and log p_j = zs_j - log s: d logp_t / d z_j = [j = t] - p_j, d H / d z_j = -p_j (log p_j + H)
    and d z / d logits = 1 / T. So a gradient row is e_j (a + b zs_j) + [j = t] c_lp / T with
    a = -(c_lp + c_h (H - log s)) / (s T) and b = -c_h / (s T): two passes over the chunk, no normalisation pass.

    Args:
        zs: (n, V) z minus a per-row shift, finite (see :func:`_finite_`); consumed as scratch.
        e: (n, V) exp(zs).
        log_s: (n,) log of the row sums of e (0 when zs is already shifted by the log-sum-exp).
        targets: (n,) token ids.
        c_lp: (n,) coefficient of logp(target).
        c_h: (n,) coefficient of the entropy, or None for none.
        entropy: (n,) row entropies (needed when c_h is given).
        out: (n, V) destination, any floating dtype; may alias the logits.
        valid: (n,) bool or None; rows not valid get exact zeros (their logits may be NaN or inf: padding).
    """
    inv_s = torch.exp(-log_s) / temperature
    a = -c_lp * inv_s
    direct = out if out.dtype == e.dtype else None  # write straight into out unless a cast is needed
    if c_h is None:
        g = torch.mul(e, a.unsqueeze(1), out=direct)
    else:
        a = a - c_h * (entropy - log_s) * inv_s
        # zs * e first: zs is the lowest finite float where e == 0, and scaling it before the product could overflow
        # to inf and turn 0 * inf into NaN.
        g = torch.addcmul(zs.mul_(e).mul_((-c_h * inv_s).unsqueeze(1)), e, a.unsqueeze(1), out=direct)
    g.scatter_add_(1, targets.unsqueeze(1), (c_lp / temperature).unsqueeze(1).to(g.dtype))
    if g is not out:
        out.copy_(g)
    if valid is not None:
        # The chunk is still in cache: clearing it here costs no extra pass over memory. A product would not do:
        # 0 * NaN is NaN.
        out.masked_fill_(~valid.unsqueeze(1), 0.0)


def logprob_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    coef_fn: CoefFn | None = None,
    grad_out: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> RowStats:
    """Per-row log p(target), log-sum-exp and entropy; optionally the gradient in the same pass.

    Args:
        logits: (N, V) logits, last dim contiguous.
        targets: (N,) int64 token ids in [0, V).
        coef_fn: called per row chunk as ``coef_fn(rows, logp, entropy) -> (c_lp, c_h)``; when given, the gradient of
            ``sum c_lp * logp + c_h * entropy`` w.r.t. the logits is written into ``grad_out`` (N, V), which may be the
            logits themselves.
        valid: (N,) bool or None: rows whose gradient is zeroed (see :func:`_write_logprob_grad`).

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
        if entropy is None and coef_fn is None:
            # Only log p(target) is needed: torch's fused log_softmax is the fastest way there.
            logp_all, lse[rows] = _log_softmax(x, temperature)
            logp[rows] = logp_all.gather(1, t.unsqueeze(1)).squeeze(1).clamp(max=0.0)
            continue
        # Entropy and gradient need the probabilities anyway: shift by the row max, exponentiate once.
        m = _row_max(x, temperature)
        zs = _shifted(x, m, temperature)
        e = torch.exp(zs)
        log_s = e.sum(-1).log()
        lse[rows] = m.squeeze(1) + log_s
        # The target logit is read from x, not the clamped zs, so that a -inf target gives logp = -inf.
        logp[rows] = (x.gather(1, t.unsqueeze(1)).squeeze(1).to(cdt) / temperature - lse[rows]).clamp(max=0.0)
        if entropy is not None:
            entropy[rows] = log_s - _row_dot(e, zs) * torch.exp(-log_s)
        if coef_fn is not None:
            ent = None if entropy is None else entropy[rows]
            c_lp, c_h = coef_fn(rows, logp[rows], ent)
            ok = None if valid is None else valid[rows]
            _write_logprob_grad(zs, e, log_s, t, c_lp, c_h, ent, temperature, grad_out[rows], ok)
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
    valid: torch.Tensor | None = None,
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
        valid: (N,) bool or None: rows not valid get exact zeros.
    """
    n, v = logits.shape
    for rows in _row_chunks(n, v):
        logp_all = _shifted(logits[rows], lse[rows].unsqueeze(1), temperature)  # shifted by lse: log s = 0
        _write_logprob_grad(
            logp_all,
            torch.exp(logp_all),
            torch.zeros_like(lse[rows]),
            targets[rows],
            c_lp[rows],
            None if c_h is None else c_h[rows],
            None if entropy is None else entropy[rows],
            temperature,
            out[rows],
            None if valid is None else valid[rows],
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
        logp_all, lse_p[rows] = _log_softmax(logits[rows], temperature)
        logq_all, lse_q[rows] = _log_softmax(ref_logits[rows], temperature)
        p = torch.exp(_finite_(logp_all))
        kl[rows] = _row_dot(p, logp_all.sub_(_finite_(logq_all)))
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
    valid: torch.Tensor | None = None,
) -> None:
    """Writes d/d logits of ``sum c * KL`` into out: c * p_j (log p_j - log q_j - KL) / T.

    Args:
        logits, ref_logits: (N, V).
        lse_p, lse_q, kl, c: (N,).
        out: (N, V) destination.
        valid: (N,) bool or None: rows not valid get exact zeros.
    """
    n, v = logits.shape
    for rows in _row_chunks(n, v):
        logp = _shifted(logits[rows], lse_p[rows].unsqueeze(1), temperature)
        logq = _shifted(ref_logits[rows], lse_q[rows].unsqueeze(1), temperature)
        p = torch.exp(logp)
        g = logp.sub_(logq).sub_(kl[rows].unsqueeze(1)).mul_(p).mul_((c[rows] / temperature).unsqueeze(1))
        out[rows].copy_(g)
        if valid is not None:
            out[rows].masked_fill_(~valid[rows].unsqueeze(1), 0.0)


def ppo_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    ref_logp: torch.Tensor | None,
    full_kl: torch.Tensor | None,
    inv_count: torch.Tensor,
    cfg: dict,
    temperature: float,
    grad_out: torch.Tensor | None = None,
) -> PPORows:
    """Row statistics and the per-token PPO terms; with ``grad_out`` also d loss / d logits, chunk by chunk.

    Args:
        logits: (N, V); targets, old_logp, advantages, valid (bool), ref_logp (or None): (N,).
        full_kl: (N,) exact KL of each row when cfg's estimator is "full" with kl_coef != 0, else None.
        inv_count: 0-dim, 1 / number of valid tokens.
        cfg: the keyword arguments of :func:`rlhf_kernels.ppo_terms.ppo_token_terms` that configure the loss.
        grad_out: (N, V) destination of the gradient (for a unit upstream gradient; zero at masked rows), which may
            be the logits themselves; None to skip it.
    """
    n = logits.shape[0]
    cdt = compute_dtype(logits.dtype)
    terms = torch.zeros(5, n, dtype=cdt, device=logits.device)
    c_lp = torch.zeros(n, dtype=cdt, device=logits.device)

    def coef_fn(rows: slice, logp: torch.Tensor, entropy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = ppo_token_terms(
            logp, entropy, old_logp[rows], advantages[rows], valid[rows], inv_count,
            ref_logp=None if ref_logp is None else ref_logp[rows], full_kl=None if full_kl is None else full_kl[rows],
            **cfg,
        )  # fmt: skip
        for i, x in enumerate((t.loss, t.clipped, t.approx_kl, t.ratio)):
            terms[i, rows] = x
        terms[4, rows] = torch.where(valid[rows], entropy * inv_count, torch.zeros_like(entropy))
        c_lp[rows] = t.c_lp
        return t.c_lp, t.c_h

    if grad_out is None:
        stats = logprob_forward(logits, targets, temperature, True)
        coef_fn(slice(0, n), stats.logp, stats.entropy)
    else:
        stats = logprob_forward(logits, targets, temperature, True, coef_fn, grad_out, valid)
    return PPORows(terms, stats.lse, stats.entropy, c_lp)


def scale_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad *= factor in place (factor 0-dim). On the CPU, where reading the factor costs no device sync, the usual
    unit factor skips the pass over (N, V); on another device (this backend forced there) the multiply is queued."""
    if grad.device.type != "cpu" or bool(factor != 1):
        grad.mul_(factor.to(grad.dtype))
