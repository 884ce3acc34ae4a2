"""Triton implementation of the row ops (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

One program handles one row and streams over the vocabulary in blocks with an online (running-max) softmax, so the
statistics cost one read of the logits and a gradient one more read and one write. Loads are cast to the compute
dtype (fp32, or fp64 for fp64 inputs) before any arithmetic; row offsets are int64 so N * V may exceed 2^31.

Signatures match :mod:`rlhf_kernels.torch_backend`; notation is documented there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_kernels.reference import compute_dtype
from rlhf_kernels.types import CoefFn, RowStats

#: Largest vocabulary block a program loads at once. Tests lower it to exercise many blocks per row.
MAX_BLOCK = 4096

#: Elementwise ops: block of elements per program.
ELEMENTWISE_BLOCK = 1024

#: Modes of the elementwise difference kernel, f(x) of x = a - b (- c).
DIFF_MODES = {"k1": 0, "k2": 1, "k3": 2, "bradley_terry": 3}

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _launch_config(v: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(v, 1)), MAX_BLOCK)
    num_warps = 8 if block >= 2048 else 4
    return block, num_warps


def _cdt(t: torch.Tensor) -> tl.dtype:
    return _TL_DTYPES[compute_dtype(t.dtype)]


def _inv_temperature(temperature: float, logits: torch.Tensor) -> torch.Tensor:
    """(1,) tensor holding 1 / temperature in the compute dtype of ``logits``, on their device.

    The row kernels multiply by it: one correctly rounded product per logit, the same in the statistics and the
    gradient kernels. (A division compiles to an approximate reciprocal that may differ between kernels, and with
    huge logits one ulp of the scaled logit moves a probability of 1 by 1e-3.) The row kernels are also launched with
    ``enable_fp_fusion=False`` so that no multiply-add contraction rounds the same expression differently in two of
    them.
    """
    return torch.full((1,), 1.0 / temperature, dtype=compute_dtype(logits.dtype), device=logits.device)


@triton.jit
def _online_max(m, z):
    """Running max after block z, the shift to use (0 while everything is -inf) and the rescale of older sums."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    return m_new, shift, alpha


@triton.jit
def _logprob_stats_kernel(
    x_ptr, t_ptr, logp_ptr, lse_ptr, ent_ptr, stride_x, V, inv_t_ptr,
    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(inv_t_ptr)  # 1 / temperature in the compute dtype (a Python float would arrive as fp32)
    x_row = x_ptr + row * stride_x
    m = tl.full([], float("-inf"), CDT)
    s = tl.zeros([], CDT)  # sum exp(z - shift)
    w = tl.zeros([], CDT)  # sum exp(z - shift) * (z - shift), for the entropy
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(CDT) * inv_t
        m_new, shift, alpha = _online_max(m, z)
        e = tl.exp(z - shift)
        if WITH_ENTROPY:
            # Re-base the old sum on the new shift; where s == 0 the old max may be -inf and the product NaN.
            w = tl.where(s > 0, alpha * (w + s * (m - shift)), 0.0)
            w += tl.sum(tl.where(e > 0, e * (z - shift), 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    lse = shift + log_s
    target = tl.load(t_ptr + row)
    diff = tl.load(x_row + target).to(CDT) * inv_t - lse
    tl.store(logp_ptr + row, tl.where(diff > 0, 0.0, diff))  # clamp to <= 0, NaN passes through
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, log_s - w / s)


@triton.jit
def _logprob_grad_kernel(
    x_ptr, t_ptr, lse_ptr, ent_ptr, clp_ptr, ch_ptr, out_ptr, stride_x, stride_o, V, inv_t_ptr,
    HAS_CH: tl.constexpr, BLOCK: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(inv_t_ptr)  # 1 / temperature in the compute dtype (a Python float would arrive as fp32)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_o
    lse = tl.load(lse_ptr + row).to(CDT)
    c_lp = tl.load(clp_ptr + row).to(CDT)
    target = tl.load(t_ptr + row)
    if HAS_CH:
        c_h = tl.load(ch_ptr + row).to(CDT)
        entropy = tl.load(ent_ptr + row).to(CDT)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        logp = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(CDT) * inv_t - lse
        p = tl.exp(logp)
        if HAS_CH:
            g = tl.where(p > 0, -p * (c_lp + c_h * (logp + entropy)), 0.0)
        else:
            g = -p * c_lp
        g = tl.where(cols == target, g + c_lp, g) * inv_t
        tl.store(out_row + cols, g.to(out_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _kl_stats_kernel(
    x_ptr, r_ptr, kl_ptr, lsep_ptr, lseq_ptr, stride_x, stride_r, V, inv_t_ptr,
    BLOCK: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(inv_t_ptr)  # 1 / temperature in the compute dtype (a Python float would arrive as fp32)
    x_row = x_ptr + row * stride_x
    r_row = r_ptr + row * stride_r
    mp = tl.full([], float("-inf"), CDT)
    mq = tl.full([], float("-inf"), CDT)
    sp = tl.zeros([], CDT)
    sq = tl.zeros([], CDT)
    w = tl.zeros([], CDT)  # sum exp(zp - shift_p) * (zp - zq)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        zp = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(CDT) * inv_t
        zq = tl.load(r_row + cols, mask=cols < V, other=float("-inf")).to(CDT) * inv_t
        mp_new, shift_p, alpha_p = _online_max(mp, zp)
        mq_new, shift_q, alpha_q = _online_max(mq, zq)
        ep = tl.exp(zp - shift_p)
        w = w * alpha_p + tl.sum(tl.where(ep > 0, ep * (zp - zq), 0.0), axis=0)
        sp = sp * alpha_p + tl.sum(ep, axis=0)
        sq = sq * alpha_q + tl.sum(tl.exp(zq - shift_q), axis=0)
        mp = mp_new
        mq = mq_new
    lse_p = tl.where(mp == float("-inf"), 0.0, mp) + tl.log(sp)
    lse_q = tl.where(mq == float("-inf"), 0.0, mq) + tl.log(sq)
    tl.store(kl_ptr + row, w / sp - lse_p + lse_q)
    tl.store(lsep_ptr + row, lse_p)
    tl.store(lseq_ptr + row, lse_q)


@triton.jit
def _kl_grad_kernel(
    x_ptr, r_ptr, lsep_ptr, lseq_ptr, kl_ptr, c_ptr, out_ptr, stride_x, stride_r, stride_o, V, inv_t_ptr,
    BLOCK: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(inv_t_ptr)  # 1 / temperature in the compute dtype (a Python float would arrive as fp32)
    x_row = x_ptr + row * stride_x
    r_row = r_ptr + row * stride_r
    out_row = out_ptr + row * stride_o
    lse_p = tl.load(lsep_ptr + row).to(CDT)
    lse_q = tl.load(lseq_ptr + row).to(CDT)
    kl = tl.load(kl_ptr + row).to(CDT)
    c = tl.load(c_ptr + row).to(CDT) * inv_t
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        logp = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(CDT) * inv_t - lse_p
        logq = tl.load(r_row + cols, mask=cols < V, other=float("-inf")).to(CDT) * inv_t - lse_q
        p = tl.exp(logp)
        g = tl.where(p > 0, c * p * (logp - logq - kl), 0.0)
        tl.store(out_row + cols, g.to(out_ptr.dtype.element_ty), mask=cols < V)


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
    elif MODE == 2:  # k3 = expm1(x) - x; a Taylor series near 0 avoids the cancellation of exp(x) - 1 - x
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
        val = tl.where(small, series, expm1 - x)
        der = expm1
    else:  # Bradley-Terry: softplus(-x) = -log sigmoid(x), derivative sigmoid(x) - 1 = -sigmoid(-x)
        en = tl.exp(-tl.abs(x))
        val = tl.maximum(-x, 0.0) + tl.log(1.0 + en)
        der = tl.where(x >= 0, -en / (1.0 + en), -1.0 / (1.0 + en))
    tl.store(val_ptr + offs, val, mask=valid)
    tl.store(der_ptr + offs, der, mask=valid)


def logprob_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    coef_fn: CoefFn | None = None,
    grad_out: torch.Tensor | None = None,
) -> RowStats:
    """See :func:`rlhf_kernels.torch_backend.logprob_forward`; here the statistics are one kernel over all rows."""
    n, v = logits.shape
    cdt = compute_dtype(logits.dtype)
    logp = torch.empty(n, dtype=cdt, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    block, num_warps = _launch_config(v)
    if n > 0:
        _logprob_stats_kernel[(n,)](
            logits, targets, logp, lse, entropy if with_entropy else lse, logits.stride(0), v,
            _inv_temperature(temperature, logits),
            WITH_ENTROPY=with_entropy, BLOCK=block, CDT=_cdt(logits), num_warps=num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    if coef_fn is not None:
        c_lp, c_h = coef_fn(slice(0, n), logp, entropy)
        logprob_backward(logits, targets, lse, entropy, c_lp, c_h, temperature, grad_out)
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
    """See :func:`rlhf_kernels.torch_backend.logprob_backward`."""
    n, v = logits.shape
    if n == 0:
        return
    block, num_warps = _launch_config(v)
    has_ch = c_h is not None
    _logprob_grad_kernel[(n,)](
        logits, targets, lse, entropy if has_ch else lse, c_lp.contiguous(), c_h.contiguous() if has_ch else c_lp,
        out, logits.stride(0), out.stride(0), v, _inv_temperature(temperature, logits),
        HAS_CH=has_ch, BLOCK=block, CDT=_cdt(logits), num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip


def kl_forward(
    logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`rlhf_kernels.torch_backend.kl_forward`."""
    n, v = logits.shape
    kl = torch.empty(n, dtype=compute_dtype(logits.dtype), device=logits.device)
    lse_p, lse_q = torch.empty_like(kl), torch.empty_like(kl)
    block, num_warps = _launch_config(v)
    if n > 0:
        _kl_stats_kernel[(n,)](
            logits, ref_logits, kl, lse_p, lse_q, logits.stride(0), ref_logits.stride(0), v,
            _inv_temperature(temperature, logits),
            BLOCK=block, CDT=_cdt(logits), num_warps=num_warps, enable_fp_fusion=False,
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
) -> None:
    """See :func:`rlhf_kernels.torch_backend.kl_backward`."""
    n, v = logits.shape
    if n == 0:
        return
    block, num_warps = _launch_config(v)
    _kl_grad_kernel[(n,)](
        logits, ref_logits, lse_p, lse_q, kl, c.contiguous(), out,
        logits.stride(0), ref_logits.stride(0), out.stride(0), v, _inv_temperature(temperature, logits),
        BLOCK=block, CDT=_cdt(logits), num_warps=num_warps, enable_fp_fusion=False,
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
            HAS_C=c is not None, MODE=DIFF_MODES[mode], BLOCK=ELEMENTWISE_BLOCK, CDT=_cdt(a),
        )  # fmt: skip
    return val, der
