"""Triton implementation of the row ops (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

A program handles one row (or, for a small vocabulary, a tile of ROWS rows) and streams over the vocabulary in
blocks. Statistics are online per lane: every lane of the block keeps its own running max, sum and weighted sum
across the loop, and the lanes are combined by one cross-lane reduction at the end, so the loop body is elementwise
(no block-wide max or sum, no barrier per block). Each element costs one ``exp2``: the lane's max only moves when the
new element is the larger, so exactly one of the rescale factor and the new term differs from 1.

The row is read as an aligned, unmasked main loop (it starts at the first column whose address is a multiple of 16
bytes, so loads can vectorise even at an odd V such as 50257) and one masked "edge" pass over the columns before
that start and after the last full block. Loads are cast to the compute dtype (fp32, or fp64 for fp64 inputs) before
any arithmetic; row offsets are int64 so N * V may exceed 2^31.

Scaled logits are formed once, by :func:`_log2_scaled`: ``(x - shift) * log2(e) / T`` with the shift in the logits'
own units. The subtraction comes first so the largest logit gives exactly 0 (no rounding of a scaled logit, which
with |logits| ~ 1e4 is worth 1e-3), and a subtract-then-multiply cannot be contracted into an FMA, so the statistics
and gradient kernels compute bit-identical log-probabilities with fp fusion left on. Hence this backend's ``lse`` is
``T * logsumexp(logits / T)``, in the logits' units (see :class:`~rlhf_kernels.types.RowStats`).

Signatures match :mod:`rlhf_kernels.torch_backend`; notation is documented there. Targets outside [0, V) (only
checked on the host when :mod:`~rlhf_kernels.validate` is asked to, since the check needs a device sync) never read
out of bounds: their log-prob is NaN.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rlhf_kernels.reference import compute_dtype
from rlhf_kernels.types import PPORows, RowStats

#: Largest vocabulary block a program loads at once, and the most elements of a tile of rows. Tests lower it to
#: exercise many blocks per row.
MAX_BLOCK = 4096

#: Most rows one program handles when the vocabulary is small (a tiny V would leave a one-row program idle).
MAX_ROWS = 16

#: Elementwise ops: block of elements per program.
ELEMENTWISE_BLOCK = 1024

#: Modes of the elementwise difference kernel, f(x) of x = a - b (- c).
DIFF_MODES = {"k1": 0, "k2": 1, "k3": 2, "bradley_terry": 3}

#: Per-token KL term of the PPO kernel: none, a sampled estimator, or the exact KL passed in per row.
PPO_KL_MODES = {"none": 0, "k1": 1, "k2": 2, "k3": 3, "full": 4}

LN2 = math.log(2.0)

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _launch_config(n: int, v: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps). ROWS > 1 only when BLOCK >= V, so a tile of rows never needs a main loop."""
    block = min(triton.next_power_of_2(max(v, 1)), MAX_BLOCK)
    rows = max(1, min(MAX_BLOCK // block, MAX_ROWS, triton.next_power_of_2(max(n, 1)))) if block < MAX_BLOCK else 1
    num_warps = 8 if block * rows >= 2048 else 4
    return block, rows, num_warps


def _meta(logits: torch.Tensor) -> dict:
    """Compile-time constants that depend on the logits' dtype: compute dtype, lowest finite value (the lanes'
    starting max: finite, so that x - max is never -inf - -inf) and elements per 16 bytes (the alignment unit)."""
    cdt = compute_dtype(logits.dtype)
    return {"CDT": _TL_DTYPES[cdt], "LOWEST": torch.finfo(cdt).min, "VEC": 16 // logits.element_size()}


def _scales(temperature: float, logits: torch.Tensor) -> torch.Tensor:
    """(3,) tensor of [log2(e) / T, T ln 2, 1 / T] in the compute dtype of ``logits``, on their device.

    Computed in fp64 on the host and rounded once; a tensor, because a Python float would reach the kernel as fp32.
    """
    values = [1.0 / (temperature * LN2), temperature * LN2, 1.0 / temperature]
    return torch.tensor(values, dtype=compute_dtype(logits.dtype), device=logits.device)


@triton.jit
def _exp2(x):
    # fp64 has no hardware exp2; fp32 maps to the fast ex2 instruction.
    if x.dtype == tl.float64:
        return tl.exp(x * 0.6931471805599453)
    else:
        return tl.exp2(x)


@triton.jit
def _log2(x):
    if x.dtype == tl.float64:
        return tl.log(x) * 1.4426950408889634
    else:
        return tl.log2(x)


@triton.jit
def _log2_scaled(x, shift, k):
    """(x - shift) * log2(e) / T: the one definition of a scaled logit in base-2 units (see the module docstring)."""
    return (x - shift) * k


@triton.jit
def _lane_softmax(m, s, x, k):
    """One online-softmax step per lane: (new max, new sum, rescale of the old terms, weight of the new element)."""
    d = _log2_scaled(x, m, k)
    up = d > 0
    t = _exp2(-tl.abs(d))  # NaN for a NaN x, which then poisons s as it should
    alpha = tl.where(up, t, 1.0)
    e = tl.where(up, 1.0, t)
    return tl.where(up, x, m), s * alpha + e, alpha, e


@triton.jit
def _lane_entropy_step(m, s, w, x, k):
    """Lane step keeping w = sum 2^u u with u the scaled logit minus the lane's max, for the entropy."""
    m_new, s_new, alpha, e = _lane_softmax(m, s, x, k)
    # Guards: a lane without terms (s == 0) may hold the lowest float as its max; a -inf element has e == 0.
    w = tl.where(s > 0, alpha * (w + s * _log2_scaled(m, m_new, k)), 0.0)
    w += tl.where(e > 0, e * _log2_scaled(x, m_new, k), 0.0)
    return m_new, s_new, w


@triton.jit
def _lanes_to_rows(m, s, k):
    """Cross-lane combine: per row the max M, each lane's rescale to M, and the row sum of 2^(scaled - M)."""
    big = tl.max(m, axis=1)
    alpha = _exp2(_log2_scaled(m, big[:, None], k))
    return big, alpha, tl.sum(s * alpha, axis=1)


@triton.jit
def _tile(V, stride, ROWS: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """This program's rows, their element offsets, the head before each row's first aligned column, and the length
    of the aligned main loop (0 for a tile of several rows, whose BLOCK covers V)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    base = rows * stride
    head = tl.minimum((VEC - base % VEC) % VEC, V)
    main_len = tl.zeros([], tl.int64)
    if ROWS == 1:
        main_len = tl.maximum(V - tl.max(head, axis=0), 0) // BLOCK * BLOCK
    return rows, base, head, main_len


@triton.jit
def _edge_cols(head, main_len, V, start, BLOCK: tl.constexpr):
    """Columns of the masked pass: first those after the main loop, then the head; and which of them exist."""
    idx = (start + tl.arange(0, BLOCK))[None, :]
    after = (V - head - main_len)[:, None]
    cols = tl.where(idx < after, head[:, None] + main_len + idx, idx - after)
    return cols, idx < V - main_len


@triton.jit
def _row_logsumexp_entropy(
    x_ptr, base, head, main_len, live, V, k, inv_k,
    MASK_MAIN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr, CDT: tl.constexpr,
    LOWEST: tl.constexpr,
):  # fmt: skip
    """(lse, entropy) of each row: lse = T * logsumexp(x / T) in the logits' units, entropy in nats."""
    m = tl.full([ROWS, BLOCK], LOWEST, CDT)
    s = tl.zeros([ROWS, BLOCK], CDT)
    w = tl.zeros([ROWS, BLOCK], CDT)
    aligned = tl.multiple_of(base + head, VEC)
    for start in range(0, main_len, BLOCK):
        ptrs = x_ptr + aligned[:, None] + (start + tl.arange(0, BLOCK))[None, :]
        if MASK_MAIN:  # a row-uniform mask: the loads still vectorise
            x = tl.load(ptrs, mask=live[:, None], other=float("-inf"))
        else:
            x = tl.load(ptrs)
        m, s, w = _lane_entropy_step(m, s, w, x.to(CDT), k)
    for start in range(0, V - main_len, BLOCK):
        cols, in_row = _edge_cols(head, main_len, V, start, BLOCK)
        x = tl.load(x_ptr + base[:, None] + cols, mask=in_row & live[:, None], other=float("-inf"))
        m, s, w = _lane_entropy_step(m, s, w, x.to(CDT), k)
    big, alpha, total = _lanes_to_rows(m, s, k)
    w_total = tl.sum(tl.where(s > 0, alpha * (w + s * _log2_scaled(m, big[:, None], k)), 0.0), axis=1)
    log2_total = _log2(total)
    return big + log2_total * inv_k, (log2_total - w_total / total) * 0.6931471805599453


@triton.jit
def _target_logit(x_ptr, t_ptr, rows, base, live, V):
    """(target ids, their logits); NaN for an id outside [0, V), which is then never read."""
    t = tl.load(t_ptr + rows, mask=live, other=0)
    ok = live & (t >= 0) & (t < V)
    return t, tl.load(x_ptr + base + t, mask=ok, other=float("nan"))


@triton.jit
def _logprob_grad_block(x, cols, t, lse, ent, c_lp, c_h, k, inv_t, HAS_CH: tl.constexpr):
    """d/dx of c_lp * logp(t) + c_h * H for a block of columns: (c_lp ([j = t] - p_j) - c_h p_j (log p_j + H)) / T."""
    logp2 = _log2_scaled(x, lse[:, None], k)
    p = _exp2(logp2)
    if HAS_CH:
        g = tl.where(p > 0, -p * (c_lp[:, None] + c_h[:, None] * (logp2 * 0.6931471805599453 + ent[:, None])), 0.0)
    else:
        g = -p * c_lp[:, None]
    return tl.where(cols == t[:, None], g + c_lp[:, None], g) * inv_t


@triton.jit
def _write_logprob_grad(
    x_ptr, out_ptr, base, obase, head, main_len, in_range, live, t, lse, ent, c_lp, c_h, k, inv_t, V,
    HAS_CH: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    """Writes the gradient rows into out (which may be x itself: each element is read before it is written, by the
    same program). Rows ``in_range`` but not ``live`` get zeros without a read of their logits."""
    aligned = tl.multiple_of(base + head, VEC)
    for start in range(0, main_len, BLOCK):
        cols = head[:, None] + start + tl.arange(0, BLOCK)[None, :]
        ptrs = x_ptr + aligned[:, None] + (start + tl.arange(0, BLOCK))[None, :]
        if HAS_VALID:
            x = tl.load(ptrs, mask=live[:, None], other=float("-inf")).to(CDT)
            g = tl.where(live[:, None], _logprob_grad_block(x, cols, t, lse, ent, c_lp, c_h, k, inv_t, HAS_CH), 0.0)
        else:
            g = _logprob_grad_block(tl.load(ptrs).to(CDT), cols, t, lse, ent, c_lp, c_h, k, inv_t, HAS_CH)
        tl.store(out_ptr + obase[:, None] + cols, g.to(out_ptr.dtype.element_ty))
    for start in range(0, V - main_len, BLOCK):
        cols, in_row = _edge_cols(head, main_len, V, start, BLOCK)
        x = tl.load(x_ptr + base[:, None] + cols, mask=in_row & live[:, None], other=float("-inf")).to(CDT)
        g = tl.where(live[:, None], _logprob_grad_block(x, cols, t, lse, ent, c_lp, c_h, k, inv_t, HAS_CH), 0.0)
        tl.store(out_ptr + obase[:, None] + cols, g.to(out_ptr.dtype.element_ty), mask=in_row & in_range[:, None])


@triton.jit
def _logprob_stats_kernel(
    x_ptr, t_ptr, logp_ptr, lse_ptr, ent_ptr, stride_x, N, V, scale_ptr,
    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr, CDT: tl.constexpr,
    LOWEST: tl.constexpr,
):  # fmt: skip
    rows, base, head, main_len = _tile(V, stride_x, ROWS, VEC, BLOCK)
    live = rows < N
    k = tl.load(scale_ptr)
    _, x_t = _target_logit(x_ptr, t_ptr, rows, base, live, V)  # issued before the loop, its latency hidden by it
    lse, ent = _row_logsumexp_entropy(
        x_ptr, base, head, main_len, live, V, k, tl.load(scale_ptr + 1), False, BLOCK, ROWS, VEC, CDT, LOWEST
    )
    logp = _log2_scaled(x_t.to(CDT), lse, k) * 0.6931471805599453
    tl.store(logp_ptr + rows, tl.where(logp > 0, 0.0, logp), mask=live)  # clamp to <= 0, NaN passes through
    tl.store(lse_ptr + rows, lse, mask=live)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, ent, mask=live)


@triton.jit
def _logprob_grad_kernel(
    x_ptr, t_ptr, lse_ptr, ent_ptr, clp_ptr, ch_ptr, valid_ptr, out_ptr, stride_x, stride_o, N, V, scale_ptr,
    HAS_CH: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr,
    CDT: tl.constexpr,
):  # fmt: skip
    rows, base, head, main_len = _tile(V, stride_x, ROWS, VEC, BLOCK)
    in_range = rows < N
    live = in_range
    if HAS_VALID:
        live &= tl.load(valid_ptr + rows, mask=in_range, other=0) != 0
    lse = tl.load(lse_ptr + rows, mask=live, other=0.0).to(CDT)
    c_lp = tl.load(clp_ptr + rows, mask=live, other=0.0).to(CDT)
    t = tl.load(t_ptr + rows, mask=live, other=0)
    c_h = c_lp
    ent = c_lp
    if HAS_CH:
        c_h = tl.load(ch_ptr + rows, mask=live, other=0.0).to(CDT)
        ent = tl.load(ent_ptr + rows, mask=live, other=0.0).to(CDT)
    _write_logprob_grad(
        x_ptr, out_ptr, base, rows * stride_o, head, main_len, in_range, live, t, lse, ent, c_lp, c_h,
        tl.load(scale_ptr), tl.load(scale_ptr + 2), V, HAS_CH, HAS_VALID, BLOCK, VEC, CDT,
    )  # fmt: skip


@triton.jit
def _expm1_and_minus_x(x):
    """(expm1(x), expm1(x) - x); a Taylor series near 0 avoids the cancellation of exp(x) - 1 - x."""
    small = tl.abs(x) < 0.1
    # sum_{k=2..10} x^k / k!, Horner form: exact to fp64 rounding for |x| < 0.1 (next term < 3e-17 relative)
    c = 1.0 / 3628800.0
    c = 1.0 / 362880.0 + x * c
    c = 1.0 / 40320.0 + x * c
    c = 1.0 / 5040.0 + x * c
    c = 1.0 / 720.0 + x * c
    c = 1.0 / 120.0 + x * c
    c = 1.0 / 24.0 + x * c
    c = 1.0 / 6.0 + x * c
    series = x * x * (0.5 + x * c)
    expm1 = tl.where(small, x + series, tl.exp(x) - 1.0)
    return expm1, tl.where(small, series, expm1 - x)


@triton.jit
def _ppo_kernel(
    x_ptr, t_ptr, old_ptr, adv_ptr, valid_ptr, ref_ptr, fkl_ptr, inv_count_ptr, par_ptr, scale_ptr,
    terms_ptr, lse_ptr, ent_ptr, clp_ptr, out_ptr, stride_x, stride_o, N, V,
    KL_MODE: tl.constexpr, HAS_CH: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    VEC: tl.constexpr, CDT: tl.constexpr, LOWEST: tl.constexpr,
):  # fmt: skip
    """Statistics loop, the per-row PPO terms (the math of :func:`rlhf_kernels.ppo_terms.ppo_token_terms`, against
    which it is tested), and with WRITE_GRAD the gradient in a second loop, into out (the logits themselves when
    inplace). Masked rows read nothing and get zero terms and a zero gradient."""
    rows, base, head, main_len = _tile(V, stride_x, ROWS, VEC, BLOCK)
    in_range = rows < N
    live = in_range & (tl.load(valid_ptr + rows, mask=in_range, other=0) != 0)
    k = tl.load(scale_ptr)
    t, x_t = _target_logit(x_ptr, t_ptr, rows, base, live, V)
    old = tl.load(old_ptr + rows, mask=live, other=0.0).to(CDT)
    adv = tl.load(adv_ptr + rows, mask=live, other=0.0).to(CDT)
    lse, ent = _row_logsumexp_entropy(
        x_ptr, base, head, main_len, live, V, k, tl.load(scale_ptr + 1), True, BLOCK, ROWS, VEC, CDT, LOWEST
    )
    lse = tl.where(live, lse, 0.0)  # a row that read nothing has lse -inf; the gradient loop must see no NaN
    ent = tl.where(live, ent, 0.0)
    logp = _log2_scaled(x_t.to(CDT), lse, k) * 0.6931471805599453
    logp = tl.where(logp > 0, 0.0, logp)
    clip_lo = tl.load(par_ptr)
    clip_hi = tl.load(par_ptr + 1)
    ent_coef = tl.load(par_ptr + 2)
    kl_coef = tl.load(par_ptr + 3)
    inv_count = tl.load(inv_count_ptr)
    log_ratio = logp - old
    ratio = tl.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_value = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
    clipped = clipped_value > unclipped
    loss = tl.maximum(unclipped, clipped_value)
    c_lp = tl.where(clipped, 0.0, unclipped)
    if KL_MODE == 4:
        loss += kl_coef * tl.load(fkl_ptr + rows, mask=live, other=0.0).to(CDT)
    elif KL_MODE > 0:
        r = tl.load(ref_ptr + rows, mask=live, other=0.0).to(CDT) - logp
        if KL_MODE == 1:
            loss += kl_coef * -r
            c_lp += kl_coef
        elif KL_MODE == 2:
            loss += kl_coef * 0.5 * r * r
            c_lp += kl_coef * -r
        else:
            expm1_r, k3 = _expm1_and_minus_x(r)
            loss += kl_coef * k3
            c_lp += kl_coef * -expm1_r
    if HAS_CH:
        loss -= ent_coef * ent
    _, approx_kl = _expm1_and_minus_x(log_ratio)
    # tl.where, not a product: masked rows may hold inf or NaN inputs (padding) and must contribute 0.
    per_row = terms_ptr + rows
    tl.store(per_row, tl.where(live, loss * inv_count, 0.0), mask=in_range)
    tl.store(per_row + N, tl.where(live & clipped, inv_count, 0.0), mask=in_range)
    tl.store(per_row + 2 * N, tl.where(live, approx_kl * inv_count, 0.0), mask=in_range)
    tl.store(per_row + 3 * N, tl.where(live, ratio * inv_count, 0.0), mask=in_range)
    tl.store(per_row + 4 * N, tl.where(live, ent * inv_count, 0.0), mask=in_range)
    c_lp = tl.where(live, c_lp * inv_count, 0.0)
    c_h = tl.where(live, -ent_coef * inv_count, 0.0)
    tl.store(lse_ptr + rows, lse, mask=in_range)
    tl.store(ent_ptr + rows, ent, mask=in_range)
    tl.store(clp_ptr + rows, c_lp, mask=in_range)
    if WRITE_GRAD:
        _write_logprob_grad(
            x_ptr, out_ptr, base, rows * stride_o, head, main_len, in_range, live, t, lse, ent, c_lp, c_h, k,
            tl.load(scale_ptr + 2), V, HAS_CH, True, BLOCK, VEC, CDT,
        )  # fmt: skip


@triton.jit
def _lane_kl_step(mp, sp, mq, sq, w, xp, xq, k):
    """Lane step of both softmaxes, keeping w = sum 2^(up - max) (xp - xq) log2(e) / T for the KL."""
    mp, sp, alpha, e = _lane_softmax(mp, sp, xp, k)
    w = alpha * w + tl.where(e > 0, e * _log2_scaled(xp, xq, k), 0.0)
    mq, sq, _, _ = _lane_softmax(mq, sq, xq, k)
    return mp, sp, mq, sq, w


@triton.jit
def _kl_stats_kernel(
    x_ptr, r_ptr, kl_ptr, lsep_ptr, lseq_ptr, stride_x, stride_r, N, V, scale_ptr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr, CDT: tl.constexpr, LOWEST: tl.constexpr,
):  # fmt: skip
    rows, base, head, main_len = _tile(V, stride_x, ROWS, VEC, BLOCK)
    live = rows < N
    rbase = rows * stride_r
    k = tl.load(scale_ptr)
    inv_k = tl.load(scale_ptr + 1)
    mp = tl.full([ROWS, BLOCK], LOWEST, CDT)
    mq = tl.full([ROWS, BLOCK], LOWEST, CDT)
    sp = tl.zeros([ROWS, BLOCK], CDT)
    sq = tl.zeros([ROWS, BLOCK], CDT)
    w = tl.zeros([ROWS, BLOCK], CDT)
    for start in range(0, main_len, BLOCK):
        cols = head[:, None] + start + tl.arange(0, BLOCK)[None, :]
        xp = tl.load(x_ptr + tl.multiple_of(base + head, VEC)[:, None] + (start + tl.arange(0, BLOCK))[None, :])
        xq = tl.load(r_ptr + rbase[:, None] + cols)
        mp, sp, mq, sq, w = _lane_kl_step(mp, sp, mq, sq, w, xp.to(CDT), xq.to(CDT), k)
    for start in range(0, V - main_len, BLOCK):
        cols, in_row = _edge_cols(head, main_len, V, start, BLOCK)
        mask = in_row & live[:, None]
        xp = tl.load(x_ptr + base[:, None] + cols, mask=mask, other=float("-inf"))
        xq = tl.load(r_ptr + rbase[:, None] + cols, mask=mask, other=float("-inf"))
        mp, sp, mq, sq, w = _lane_kl_step(mp, sp, mq, sq, w, xp.to(CDT), xq.to(CDT), k)
    big_p, alpha_p, total_p = _lanes_to_rows(mp, sp, k)
    big_q, _, total_q = _lanes_to_rows(mq, sq, k)
    lse_p = big_p + _log2(total_p) * inv_k
    lse_q = big_q + _log2(total_q) * inv_k
    w_total = tl.sum(alpha_p * w, axis=1)
    # KL = sum p (zp - zq) - logsumexp zp + logsumexp zq, here in base 2 and brought back to nats.
    tl.store(kl_ptr + rows, (w_total / total_p - _log2_scaled(lse_p, lse_q, k)) * 0.6931471805599453, mask=live)
    tl.store(lsep_ptr + rows, lse_p, mask=live)
    tl.store(lseq_ptr + rows, lse_q, mask=live)


@triton.jit
def _kl_grad_block(xp, xq, lse_p, lse_q, kl, c, k):
    """c p (log p - log q - KL) / T for a block (c already divided by T)."""
    logp2 = _log2_scaled(xp, lse_p[:, None], k)
    p = _exp2(logp2)
    log_ratio = (logp2 - _log2_scaled(xq, lse_q[:, None], k)) * 0.6931471805599453
    return tl.where(p > 0, c[:, None] * p * (log_ratio - kl[:, None]), 0.0)


@triton.jit
def _kl_grad_kernel(
    x_ptr, r_ptr, lsep_ptr, lseq_ptr, kl_ptr, c_ptr, valid_ptr, out_ptr, stride_x, stride_r, stride_o, N, V,
    scale_ptr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr,
    CDT: tl.constexpr,
):  # fmt: skip
    rows, base, head, main_len = _tile(V, stride_x, ROWS, VEC, BLOCK)
    in_range = rows < N
    live = in_range
    if HAS_VALID:
        live &= tl.load(valid_ptr + rows, mask=in_range, other=0) != 0
    rbase = rows * stride_r
    obase = rows * stride_o
    k = tl.load(scale_ptr)
    lse_p = tl.load(lsep_ptr + rows, mask=live, other=0.0).to(CDT)
    lse_q = tl.load(lseq_ptr + rows, mask=live, other=0.0).to(CDT)
    kl = tl.load(kl_ptr + rows, mask=live, other=0.0).to(CDT)
    c = tl.load(c_ptr + rows, mask=live, other=0.0).to(CDT) * tl.load(scale_ptr + 2)
    for start in range(0, main_len, BLOCK):
        cols = head[:, None] + start + tl.arange(0, BLOCK)[None, :]
        xp = tl.load(x_ptr + tl.multiple_of(base + head, VEC)[:, None] + (start + tl.arange(0, BLOCK))[None, :],
                     mask=live[:, None], other=float("-inf"))  # fmt: skip
        xq = tl.load(r_ptr + rbase[:, None] + cols, mask=live[:, None], other=float("-inf"))
        g = tl.where(live[:, None], _kl_grad_block(xp.to(CDT), xq.to(CDT), lse_p, lse_q, kl, c, k), 0.0)
        tl.store(out_ptr + obase[:, None] + cols, g.to(out_ptr.dtype.element_ty))
    for start in range(0, V - main_len, BLOCK):
        cols, in_row = _edge_cols(head, main_len, V, start, BLOCK)
        mask = in_row & live[:, None]
        xp = tl.load(x_ptr + base[:, None] + cols, mask=mask, other=float("-inf"))
        xq = tl.load(r_ptr + rbase[:, None] + cols, mask=mask, other=float("-inf"))
        g = tl.where(live[:, None], _kl_grad_block(xp.to(CDT), xq.to(CDT), lse_p, lse_q, kl, c, k), 0.0)
        tl.store(out_ptr + obase[:, None] + cols, g.to(out_ptr.dtype.element_ty), mask=in_row & in_range[:, None])


@triton.jit
def _scale_rows_kernel(g_ptr, f_ptr, stride, V, BLOCK: tl.constexpr):
    """g *= f in place, f read on the device; f == 1 (the usual upstream gradient) masks every access off."""
    row = g_ptr + tl.program_id(0).to(tl.int64) * stride
    f = tl.full([BLOCK], 1.0, f_ptr.dtype.element_ty) * tl.load(f_ptr)  # a vector: the mask below is elementwise
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = (cols < V) & (f != 1.0)
        g = tl.load(row + cols, mask=mask)
        tl.store(row + cols, (g.to(f.dtype) * f).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _diff_kernel(
    a_ptr, b_ptr, c_ptr, val_ptr, der_ptr, n,
    HAS_C: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(a_ptr + offs, mask=valid, other=0.0).to(CDT) - tl.load(b_ptr + offs, mask=valid, other=0.0).to(CDT)
    if HAS_C:
        x -= tl.load(c_ptr + offs, mask=valid, other=0.0).to(CDT)
    if MODE == 0:  # k1 = -x
        val = -x
        der = tl.full(x.shape, -1.0, CDT)
    elif MODE == 1:  # k2 = x^2 / 2
        val = 0.5 * x * x
        der = x
    elif MODE == 2:  # k3 = expm1(x) - x
        expm1, val = _expm1_and_minus_x(x)
        der = expm1
    else:  # Bradley-Terry: softplus(-x) = -log sigmoid(x), derivative sigmoid(x) - 1 = -sigmoid(-x)
        en = tl.exp(-tl.abs(x))
        val = tl.maximum(-x, 0.0) + tl.log(1.0 + en)
        der = tl.where(x >= 0, -en / (1.0 + en), -1.0 / (1.0 + en))
    tl.store(val_ptr + offs, val, mask=valid)
    tl.store(der_ptr + offs, der, mask=valid)


def _grid(n: int, rows: int) -> tuple[int]:
    return (triton.cdiv(n, rows),)


def _valid_u8(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # A bool tensor reinterpreted (same bytes, no copy): the kernels compare it with 0.
    return like if valid is None else valid.view(torch.uint8)


def logprob_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool) -> RowStats:
    """See :func:`rlhf_kernels.torch_backend.logprob_forward` (without the fused gradient, which here is
    :func:`ppo_forward`); one kernel over all rows."""
    n, v = logits.shape
    cdt = compute_dtype(logits.dtype)
    logp = torch.empty(n, dtype=cdt, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    block, rows, num_warps = _launch_config(n, v)
    if n > 0:
        _logprob_stats_kernel[_grid(n, rows)](
            logits, targets, logp, lse, entropy if with_entropy else lse, logits.stride(0), n, v,
            _scales(temperature, logits),
            WITH_ENTROPY=with_entropy, BLOCK=block, ROWS=rows, num_warps=num_warps, **_meta(logits),
        )  # fmt: skip
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
    """See :func:`rlhf_kernels.torch_backend.logprob_backward`."""
    n, v = logits.shape
    if n == 0:
        return
    block, rows, num_warps = _launch_config(n, v)
    has_ch = c_h is not None
    meta = _meta(logits)
    del meta["LOWEST"]
    _logprob_grad_kernel[_grid(n, rows)](
        logits, targets, lse, entropy if has_ch else lse, c_lp.contiguous(), c_h.contiguous() if has_ch else c_lp,
        _valid_u8(valid, lse), out, logits.stride(0), out.stride(0), n, v, _scales(temperature, logits),
        HAS_CH=has_ch, HAS_VALID=valid is not None, BLOCK=block, ROWS=rows, num_warps=num_warps, **meta,
    )  # fmt: skip


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
    """See :func:`rlhf_kernels.torch_backend.ppo_forward`: here one kernel, statistics, PPO terms and (into
    ``grad_out``) the gradient, with no host synchronisation."""
    n, v = logits.shape
    cdt = compute_dtype(logits.dtype)
    terms = torch.zeros(5, n, dtype=cdt, device=logits.device)
    lse, entropy, c_lp = (torch.empty(n, dtype=cdt, device=logits.device) for _ in range(3))
    kl_mode = "none" if cfg["kl_coef"] == 0.0 else cfg["kl_estimator"]
    params = torch.tensor(
        [1.0 - cfg["clip_eps_low"], 1.0 + cfg["clip_eps_high"], cfg["entropy_coef"], cfg["kl_coef"]],
        dtype=cdt, device=logits.device,
    )  # fmt: skip
    block, rows, num_warps = _launch_config(n, v)
    if n > 0:
        _ppo_kernel[_grid(n, rows)](
            logits, targets, old_logp, advantages, valid.view(torch.uint8), lse if ref_logp is None else ref_logp,
            lse if full_kl is None else full_kl, inv_count.to(cdt).reshape(1), params, _scales(temperature, logits),
            terms, lse, entropy, c_lp, logits if grad_out is None else grad_out, logits.stride(0),
            logits.stride(0) if grad_out is None else grad_out.stride(0), n, v,
            KL_MODE=PPO_KL_MODES[kl_mode], HAS_CH=cfg["entropy_coef"] != 0.0, WRITE_GRAD=grad_out is not None,
            BLOCK=block, ROWS=rows, num_warps=num_warps, **_meta(logits),
        )  # fmt: skip
    return PPORows(terms, lse, entropy, c_lp)


def scale_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad *= factor in place (grad (N, V) with unit column stride, factor 0-dim), without reading factor on the
    host; a unit factor touches no element."""
    n, v = grad.shape
    if n > 0:
        block = min(triton.next_power_of_2(v), MAX_BLOCK)
        f = factor.to(compute_dtype(grad.dtype)).reshape(1)
        _scale_rows_kernel[(n,)](grad, f, grad.stride(0), v, BLOCK=block)


def kl_forward(
    logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`rlhf_kernels.torch_backend.kl_forward`."""
    n, v = logits.shape
    kl = torch.empty(n, dtype=compute_dtype(logits.dtype), device=logits.device)
    lse_p, lse_q = torch.empty_like(kl), torch.empty_like(kl)
    block, rows, num_warps = _launch_config(n, v)
    if n > 0:
        _kl_stats_kernel[_grid(n, rows)](
            logits, ref_logits, kl, lse_p, lse_q, logits.stride(0), ref_logits.stride(0), n, v,
            _scales(temperature, logits), BLOCK=block, ROWS=rows, num_warps=num_warps, **_meta(logits),
        )  # fmt: skip
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
    """See :func:`rlhf_kernels.torch_backend.kl_backward`."""
    n, v = logits.shape
    if n == 0:
        return
    block, rows, num_warps = _launch_config(n, v)
    meta = _meta(logits)
    del meta["LOWEST"]
    _kl_grad_kernel[_grid(n, rows)](
        logits, ref_logits, lse_p, lse_q, kl, c.contiguous(), _valid_u8(valid, kl), out,
        logits.stride(0), ref_logits.stride(0), out.stride(0), n, v, _scales(temperature, logits),
        HAS_VALID=valid is not None, BLOCK=block, ROWS=rows, num_warps=num_warps, **meta,
    )  # fmt: skip


def diff_forward(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and f'(x) for x = a - b (- c), elementwise, with f one of :data:`DIFF_MODES`.

    Args:
        a, b: (N,) contiguous inputs.
        c: (N,) contiguous offset, or None.

    Returns:
        value (N,), derivative (N,) in the compute dtype of ``a``.
    """
    n = a.numel()
    cdt = compute_dtype(a.dtype)
    val = torch.empty(n, dtype=cdt, device=a.device)
    der = torch.empty_like(val)
    if n > 0:
        grid = (triton.cdiv(n, ELEMENTWISE_BLOCK),)
        _diff_kernel[grid](
            a, b, a if c is None else c, val, der, n,
            HAS_C=c is not None, MODE=DIFF_MODES[mode], BLOCK=ELEMENTWISE_BLOCK, CDT=_TL_DTYPES[cdt],
        )  # fmt: skip
    return val, der
