"""LayerNorm (no affine) + adaLN modulation with its tangent, fused: the DiT block's `modulate(norm(x), shift, scale)`.

    xh = (x - mean) rstd,  rstd = 1 / sqrt(var + eps)            (row statistics over C, in fp32 / fp64)
    y = xh (1 + scale) + shift                                     (scale, shift: (B, C), broadcast over the N tokens)
    xh_dot = (x_dot - mean(x_dot) - xh mean(xh x_dot)) rstd
    y_dot = xh_dot (1 + scale) + xh scale_dot + shift_dot          (first kt samples only)

Forward: one kernel, one program per token row, reads x (and x_dot for tangent rows) once and writes y (and y_dot);
saves mean and rstd (one fp32 pair per row) for the backward.
Backward (primal only): one kernel per (token chunk, sample): dx = rstd (g - mean(g) - xh mean(g xh)),
g = dy (1 + scale), and per-chunk partial sums of dy and dy xh, summed over chunks on the host (deterministic) into
dshift and dscale.

Gradients through the tangent (`tangent_grad`, rule in `_runtime.tangent_grad_on`): y_dot is then differentiable in
x, shift, scale and the three tangents, through one more kernel, `_layernorm_modulate_tangent_bwd_kernel` (formulas in
its docstring and in docs/design.md, 'Gradients through the tangent'; checked against float64 autograd of the
reference in tests/test_tangent_grad.py). Saved beyond the stop-gradient path: x_dot and scale_dot. Without
tangent_grad nothing changes: the same forward, the same saved tensors, the same primal backward kernel.

Dtypes: x, shift, scale and all tangents must share one dtype (as in the reference, which raises otherwise: cast the
adaLN outputs to x's dtype before calling). No autocast casting: y and y_dot have x's dtype; statistics and all math are
fp32 (fp64 for fp64 inputs).

Chain: `_layernorm_modulate_jvp_fwd_kernel` -> `layernorm_modulate_jvp_fwd()` -> op `mfkernels::layernorm_modulate_fwd`
-> `layernorm_modulate_jvp()`; backward `_layernorm_modulate_bwd_kernel` -> `layernorm_modulate_bwd()` -> op
`mfkernels::layernorm_modulate_bwd`, registered as the forward op's autograd formula (see `_library.FusedOp`).
"""
from __future__ import annotations

import torch

from . import _runtime
from ._checks import check_layernorm_modulate_args, check_tangent_grad
from ._library import FusedOp
from ._triton import reduction_rows_per_program, row_block, row_stride, row_warps, tl, tl_acc_dtype, triton
from .reference import _layernorm_modulate_jvp_ref

__all__ = ["layernorm_modulate_jvp"]


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _layernorm_modulate_jvp_fwd_kernel(
    X, SHIFT, SCALE, X_DOT, SHIFT_DOT, SCALE_DOT,  # inputs: (B*N, C) rows, (B, C) modulation, tangents
    Y, Y_DOT, MEAN, RSTD,                           # outputs: (B*N, C), (kt*N, C), (B*N,), (B*N,)
    N, C, n_tangent_rows,
    stride_shift, stride_scale, stride_shift_dot, stride_scale_dot,
    eps,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr, SAVE_STATS: tl.constexpr,
):
    """One token row per program (grid (B*N,)), sample b = row // N; the whole row of C features in registers.

        mean = sum(x) / C;  var = sum((x - mean)^2) / C;  rstd = 1 / sqrt(var + eps);  xh = (x - mean) rstd
        y = xh (1 + scale[b]) + shift[b]
    and for rows < kt*N (the tangent rows are the first kt samples, so token rows < kt*N):
        xh_dot = (x_dot - mean(x_dot) - xh mean(xh x_dot)) rstd
        y_dot = xh_dot (1 + scale[b]) + xh scale_dot[b] + shift_dot[b]
    MEAN/RSTD[row] are saved for the backward when SAVE_STATS. Math in ACC (fp32; fp64 for fp64 data).
    """
    row = tl.program_id(0)
    b = row // N
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    offs = row.to(tl.int64) * C + cols

    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=0) / C
    # zero the padding (C need not be a power of two) so it adds nothing to the variance and the tangent's means
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    xh = xc * rstd
    gain = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=mask, other=0.0).to(ACC)
    shift = tl.load(SHIFT + b * stride_shift + cols, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, (xh * gain + shift).to(Y.dtype.element_ty), mask=mask)
    if SAVE_STATS:
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    # Scalar branch: primal-only rows (most rows at the usual kt = B/4) never touch the tangent buffers.
    if row < n_tangent_rows:
        x_dot = tl.load(X_DOT + offs, mask=mask, other=0.0).to(ACC)
        mean_dot = tl.sum(x_dot, axis=0) / C
        proj = tl.sum(xh * x_dot, axis=0) / C  # mean(xh x_dot); xh is 0 on the padding
        xh_dot = (x_dot - mean_dot - xh * proj) * rstd
        scale_dot = tl.load(SCALE_DOT + b * stride_scale_dot + cols, mask=mask, other=0.0).to(ACC)
        shift_dot = tl.load(SHIFT_DOT + b * stride_shift_dot + cols, mask=mask, other=0.0).to(ACC)
        y_dot = xh_dot * gain + xh * scale_dot + shift_dot
        tl.store(Y_DOT + offs, y_dot.to(Y_DOT.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_modulate_bwd_kernel(
    DY, X, SCALE, MEAN, RSTD,   # (B*N, C), (B*N, C), (B, C), (B*N,), (B*N,)
    DX, DSHIFT_PART, DSCALE_PART,  # (B*N, C), (B, n_chunks, C) fp32 partial sums
    N, C, n_chunks, rows_per_program, stride_scale,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DMOD: tl.constexpr,
):
    """Backward of y = xh (1 + scale) + shift for the tokens [chunk * R, chunk * R + R) of sample b.

    Grid (n_chunks, B); R = rows_per_program. With g = dy (1 + scale[b]) (the modulated gain of a plain LayerNorm):
        dx = rstd (g - mean(g) - xh mean(g xh))
        DSHIFT_PART[b, chunk] = sum over the chunk's tokens of dy
        DSCALE_PART[b, chunk] = sum over the chunk's tokens of dy xh
    The host sums the partials over chunks (fixed order: deterministic, no atomics).
    """
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    gain = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=mask, other=0.0).to(ACC)
    acc_dshift = tl.zeros([BLOCK_C], dtype=ACC)
    acc_dscale = tl.zeros([BLOCK_C], dtype=ACC)
    n0 = chunk * rows_per_program
    for i in range(0, rows_per_program):
        n = n0 + i
        valid = n < N  # the last chunk may be short
        row = (b * N + n).to(tl.int64)
        m = mask & valid
        dy = tl.load(DY + row * C + cols, mask=m, other=0.0).to(ACC)
        x = tl.load(X + row * C + cols, mask=m, other=0.0).to(ACC)
        mean = tl.load(MEAN + row, mask=valid, other=0.0)
        rstd = tl.load(RSTD + row, mask=valid, other=0.0)
        xh = tl.where(m, (x - mean) * rstd, 0.0)
        if COMPUTE_DX:
            g = dy * gain
            mean_g = tl.sum(g, axis=0) / C
            mean_gxh = tl.sum(g * xh, axis=0) / C
            dx = (g - mean_g - xh * mean_gxh) * rstd
            tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=m)
        if COMPUTE_DMOD:
            acc_dshift += dy
            acc_dscale += dy * xh
    if COMPUTE_DMOD:
        part = (b * n_chunks + chunk).to(tl.int64) * C + cols
        tl.store(DSHIFT_PART + part, acc_dshift, mask=mask)
        tl.store(DSCALE_PART + part, acc_dscale, mask=mask)


@triton.jit
def _layernorm_modulate_tangent_bwd_kernel(
    DY, DY_DOT, X, X_DOT, SCALE, SCALE_DOT, MEAN, RSTD,  # (B*N, C), (kt*N, C), (B*N, C), (kt*N, C), (B, C), (kt, C)
    DX, DX_DOT, DMOD_PART,                              # (B*N, C), (kt*N, C), (4, B, n_chunks, C) fp32 partial sums
    N, C, n_chunks, rows_per_program, kt, stride_scale, stride_scale_dot,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr, HAS_DY: tl.constexpr, COMPUTE_DX: tl.constexpr,
    COMPUTE_DX_DOT: tl.constexpr, COMPUTE_DMOD: tl.constexpr,
):
    """Backward of (y, y_dot) for the tokens [chunk * R, chunk * R + R) of sample b; grid (n_chunks, B).

    Per row, with xh = (x - mean) rstd, G = DY (0 without HAS_DY), G' = DY_DOT (0 for samples b >= kt: no tangent),
    s = scale[b], s' = scale_dot[b], and the tangent's own quantities
        m = mean(xh x_dot),  xh_dot = (x_dot - mean(x_dot) - xh m) rstd
    the gradients of xh and xh_dot are
        p = G (1 + s) + G' s'      q = G' (1 + s)
    and, with J u = rstd (u - mean(u) - xh mean(xh u)) (the LayerNorm's Jacobian: symmetric, J x_dot = xh_dot),
        DX_DOT = J q
        DX     = J p - rstd (mean(q xh_dot) xh + mean(q xh) xh_dot + m DX_DOT)
    The second term of DX is the gradient of q . xh_dot = q . J(x) x_dot through J's dependence on x: from
    d rstd / dx = -rstd^2 xh / C and d(xh . u) / dx = J u, with q . xh_dot = rstd (q . x~ - (q . xh) C m),
    x~ = x_dot - mean(x_dot), its gradient is -rstd (mean(q xh_dot) xh + mean(q xh) xh_dot + m J q).
    Modulation partials (summed over the chunk's tokens; the host sums the chunks, fixed order):
        DMOD_PART[0] += G,  [1] += G xh + G' xh_dot,  [2] += G' (dshift_dot),  [3] += G' xh (dscale_dot)
    Samples b >= kt run the same code with their tangent loads masked off (all tangent terms 0): the primal backward.
    """
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    tmask = mask & (b < kt)
    acc_shift = tl.zeros([BLOCK_C], dtype=ACC)
    acc_scale = tl.zeros([BLOCK_C], dtype=ACC)
    acc_shift_dot = tl.zeros([BLOCK_C], dtype=ACC)
    acc_scale_dot = tl.zeros([BLOCK_C], dtype=ACC)
    n0 = chunk * rows_per_program
    for i in range(0, rows_per_program):
        n = n0 + i
        valid = n < N  # the last chunk may be short
        row = (b * N + n).to(tl.int64)  # also the tangent row of a sample b < kt: (kt*N, C) holds the first kt samples
        m_ = mask & valid
        tm = tmask & valid
        x = tl.load(X + row * C + cols, mask=m_, other=0.0).to(ACC)
        mean = tl.load(MEAN + row, mask=valid, other=0.0)
        rstd = tl.load(RSTD + row, mask=valid, other=0.0)
        xh = tl.where(m_, (x - mean) * rstd, 0.0)
        xd = tl.load(X_DOT + row * C + cols, mask=tm, other=0.0).to(ACC)
        proj = tl.sum(xh * xd, axis=0) / C  # m = mean(xh x_dot)
        xh_dot = tl.where(tm, (xd - tl.sum(xd, axis=0) / C - xh * proj) * rstd, 0.0)
        if HAS_DY:
            dy = tl.load(DY + row * C + cols, mask=m_, other=0.0).to(ACC)
        else:
            dy = tl.zeros([BLOCK_C], dtype=ACC)
        dyd = tl.load(DY_DOT + row * C + cols, mask=tm, other=0.0).to(ACC)
        if COMPUTE_DMOD:
            acc_shift += dy
            acc_scale += dy * xh + dyd * xh_dot
            acc_shift_dot += dyd
            acc_scale_dot += dyd * xh
        # the modulation rows are read again for every token (from cache) rather than held: two row vectors fewer
        # live across the loop (an fp64 build at C = 1152 spilled with them held)
        gain = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=mask, other=0.0).to(ACC)
        q = dyd * gain
        dx_dot = (q - tl.sum(q, axis=0) / C - xh * (tl.sum(xh * q, axis=0) / C)) * rstd
        if COMPUTE_DX_DOT:
            tl.store(DX_DOT + row * C + cols, dx_dot.to(DX_DOT.dtype.element_ty), mask=tm)
        if COMPUTE_DX:
            s_dot = tl.load(SCALE_DOT + b * stride_scale_dot + cols, mask=tm, other=0.0).to(ACC)
            p = dy * gain + dyd * s_dot
            c_xh = tl.sum(xh * p, axis=0) / C + tl.sum(q * xh_dot, axis=0) / C
            c_xh_dot = tl.sum(q * xh, axis=0) / C
            dx = (p - tl.sum(p, axis=0) / C - xh * c_xh - xh_dot * c_xh_dot - dx_dot * proj) * rstd
            tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=m_)
    if COMPUTE_DMOD:
        plane = tl.num_programs(1).to(tl.int64) * n_chunks * C  # one of the 4 (B, n_chunks, C) planes
        part = (b * n_chunks + chunk).to(tl.int64) * C + cols
        tl.store(DMOD_PART + part, acc_shift, mask=mask)
        tl.store(DMOD_PART + plane + part, acc_scale, mask=mask)
        tl.store(DMOD_PART + 2 * plane + part, acc_shift_dot, mask=mask)
        tl.store(DMOD_PART + 3 * plane + part, acc_scale_dot, mask=mask)


# -------------------------------------------------------------------------------------------------------- launchers
def layernorm_modulate_jvp_fwd(x, shift, scale, x_dot, shift_dot, scale_dot, eps: float, save_stats: bool):
    """Launch the forward kernel. Returns (y, y_dot, mean, rstd); mean/rstd are empty (0,) unless save_stats."""
    batch, tokens, c = x.shape
    kt = x_dot.shape[0]
    x, x_dot = x.contiguous(), x_dot.contiguous()
    shift, s_shift = row_stride(shift)
    scale, s_scale = row_stride(scale)
    shift_dot, s_shift_dot = row_stride(shift_dot)
    scale_dot, s_scale_dot = row_stride(scale_dot)
    y = _runtime.new_output(x.shape, dtype=x.dtype, device=x.device)
    y_dot = _runtime.new_output(x_dot.shape, dtype=x.dtype, device=x.device)
    stats_dtype = _runtime.acc_dtype(x.dtype)
    n_stats = batch * tokens if save_stats else 0
    mean = _runtime.new_output((n_stats,), dtype=stats_dtype, device=x.device)
    rstd = _runtime.new_output((n_stats,), dtype=stats_dtype, device=x.device)
    rows = batch * tokens
    if rows and c:
        block_c = row_block(c, "layernorm_modulate_jvp")
        _layernorm_modulate_jvp_fwd_kernel[(rows,)](
            x, shift, scale, x_dot, shift_dot, scale_dot,
            y, y_dot, mean, rstd,
            tokens, c, kt * tokens, s_shift, s_scale, s_shift_dot, s_scale_dot, eps,
            BLOCK_C=block_c, ACC=tl_acc_dtype(x.dtype), SAVE_STATS=save_stats, num_warps=row_warps(block_c),
        )
    return y, y_dot, mean, rstd


def layernorm_modulate_bwd(grad_y, x, scale, mean, rstd, compute_dx: bool, compute_dmod: bool):
    """Launch the backward kernel. Returns (dx or None, dmod = stack([dshift, dscale]) (2, B, C) or None)."""
    batch, tokens, c = x.shape
    grad_y, x = grad_y.contiguous(), x.contiguous()
    scale, s_scale = row_stride(scale)
    dx = _runtime.new_output(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    block_c = row_block(c, "layernorm_modulate_jvp")
    rows_per_program = reduction_rows_per_program(batch, tokens, 1, x.device)
    n_chunks = _runtime.cdiv(tokens, rows_per_program)
    # dshift and dscale partials in one buffer (2, B, n_chunks, C): one reduction over the chunks for both
    parts = _runtime.new_output((2, batch, n_chunks, c), dtype=_runtime.acc_dtype(x.dtype), device=x.device) \
        if compute_dmod else None
    _layernorm_modulate_bwd_kernel[(n_chunks, batch)](
        grad_y, x, scale, mean, rstd,
        dx if compute_dx else grad_y, parts[0] if compute_dmod else grad_y, parts[1] if compute_dmod else grad_y,
        tokens, c, n_chunks, rows_per_program, s_scale,
        BLOCK_C=block_c, ACC=tl_acc_dtype(x.dtype), COMPUTE_DX=compute_dx, COMPUTE_DMOD=compute_dmod,
        num_warps=row_warps(block_c),
    )
    dmod = parts.sum(2).to(scale.dtype) if compute_dmod else None  # fixed order over chunks: deterministic
    return dx, dmod


def tangent_warps(block_c: int) -> int:
    """Twice the row kernels' warps (at most 16): the tangent backward keeps about twice as many row vectors live (x,
    xh, the two upstream gradients, x_dot, xh_dot, p, q, both outputs, four partial sums), and at row_warps it spilled
    in fp32 on sm_90 (bench/results/sm90-aot-2026-12-07-tangent/)."""
    return min(2 * row_warps(block_c), 16)


def layernorm_modulate_tangent_bwd(grad_y, grad_y_dot, x, x_dot, scale, scale_dot, mean, rstd, compute_dx: bool,
                                   compute_dx_dot: bool, compute_dmod: bool):
    """Launch the tangent backward kernel. grad_y may be None (y unused). Returns (dx or None, dx_dot or None,
    dmod = stack([dshift, dscale]) (2, B, C) or None, dmod_dot = stack([dshift_dot, dscale_dot]) (2, kt, C) or None)."""
    batch, tokens, c = x.shape
    kt = x_dot.shape[0]
    x, x_dot, grad_y_dot = x.contiguous(), x_dot.contiguous(), grad_y_dot.contiguous()
    if grad_y is not None:
        grad_y = grad_y.contiguous()
    scale, s_scale = row_stride(scale)
    scale_dot, s_scale_dot = row_stride(scale_dot)
    dx = _runtime.new_output(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    dx_dot = _runtime.new_output(x_dot.shape, dtype=x_dot.dtype, device=x.device) if compute_dx_dot else None
    block_c = row_block(c, "layernorm_modulate_jvp")
    rows_per_program = reduction_rows_per_program(batch, tokens, 1, x.device)
    n_chunks = _runtime.cdiv(tokens, rows_per_program)
    # the four modulation partials in one buffer: one reduction over the chunks for all
    parts = _runtime.new_output((4, batch, n_chunks, c), dtype=_runtime.acc_dtype(x.dtype), device=x.device) \
        if compute_dmod else None
    if x.numel():
        _layernorm_modulate_tangent_bwd_kernel[(n_chunks, batch)](
            grad_y if grad_y is not None else grad_y_dot, grad_y_dot, x, x_dot, scale, scale_dot, mean, rstd,
            dx if compute_dx else x, dx_dot if compute_dx_dot else x, parts if compute_dmod else x,
            tokens, c, n_chunks, rows_per_program, kt, s_scale, s_scale_dot,
            BLOCK_C=block_c, ACC=tl_acc_dtype(x.dtype), HAS_DY=grad_y is not None, COMPUTE_DX=compute_dx,
            COMPUTE_DX_DOT=compute_dx_dot, COMPUTE_DMOD=compute_dmod, num_warps=tangent_warps(block_c),
        )
    else:  # no tokens or no features: zero gradients
        dx = torch.zeros_like(x) if compute_dx else None
        dx_dot = torch.zeros_like(x_dot) if compute_dx_dot else None
        parts = x.new_zeros((4, batch, 1, c), dtype=_runtime.acc_dtype(x.dtype)) if compute_dmod else None
    if not compute_dmod:
        return dx, dx_dot, None, None
    # fixed order over chunks: deterministic; two sums, so that the op's two outputs do not share memory
    return dx, dx_dot, parts[:2].sum(2).to(scale.dtype), parts[2:, :kt].sum(2).to(scale_dot.dtype)


# ----------------------------------------------------------------------------------------------------- registration
def _fwd_impl(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, x_dot: torch.Tensor, shift_dot: torch.Tensor,
              scale_dot: torch.Tensor, eps: float, save_stats: bool, tangent_grad: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, y_dot, mean, rstd); mean / rstd (B*N,) only with save_stats (what the backward needs), else empty."""
    return layernorm_modulate_jvp_fwd(x, shift, scale, x_dot, shift_dot, scale_dot, eps, save_stats)


def _fwd_fake(x, shift, scale, x_dot, shift_dot, scale_dot, eps, save_stats, tangent_grad=False):
    rows = x.shape[0] * x.shape[1] if save_stats else 0
    stats_dtype = _runtime.acc_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty(x_dot.shape), x.new_empty((rows,), dtype=stats_dtype),
            x.new_empty((rows,), dtype=stats_dtype))


def _bwd_impl(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
              compute_dx: bool, compute_dmod: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dmod = stack([dshift, dscale]) (2, B, C)); the ones not asked for are empty (0,). One output for both
    modulation gradients: they come from one reduction, and a custom op may not return two views of one tensor.
    No tokens or no features: zeros."""
    if x.numel():
        dx, dmod = layernorm_modulate_bwd(grad_y, x, scale, mean, rstd, compute_dx, compute_dmod)
    else:
        dx = torch.zeros_like(x) if compute_dx else None
        dmod = scale.new_zeros((2, *scale.shape)) if compute_dmod else None
    return (dx if compute_dx else x.new_empty((0,)), dmod if compute_dmod else scale.new_empty((0,)))


def _bwd_fake(grad_y, x, scale, mean, rstd, compute_dx, compute_dmod):
    dmod_shape = (2, x.shape[0], x.shape[2]) if compute_dmod else (0,)
    return x.new_empty(x.shape if compute_dx else (0,)), scale.new_empty(dmod_shape)


_bwd = FusedOp("layernorm_modulate_bwd", _bwd_impl, _bwd_fake)


def _tangent_bwd_impl(grad_y: torch.Tensor | None, grad_y_dot: torch.Tensor, x: torch.Tensor, x_dot: torch.Tensor,
                      scale: torch.Tensor, scale_dot: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                      compute_dx: bool, compute_dx_dot: bool, compute_dmod: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dx_dot, dmod (2, B, C), dmod_dot (2, kt, C)) of a loss of (y, y_dot); those not asked for are empty."""
    dx, dx_dot, dmod, dmod_dot = layernorm_modulate_tangent_bwd(grad_y, grad_y_dot, x, x_dot, scale, scale_dot, mean,
                                                                rstd, compute_dx, compute_dx_dot, compute_dmod)
    return (dx if compute_dx else x.new_empty((0,)), dx_dot if compute_dx_dot else x.new_empty((0,)),
            dmod if compute_dmod else scale.new_empty((0,)), dmod_dot if compute_dmod else scale.new_empty((0,)))


def _tangent_bwd_fake(grad_y, grad_y_dot, x, x_dot, scale, scale_dot, mean, rstd, compute_dx, compute_dx_dot,
                      compute_dmod):
    return (x.new_empty(x.shape if compute_dx else (0,)), x.new_empty(x_dot.shape if compute_dx_dot else (0,)),
            scale.new_empty((2, *scale.shape) if compute_dmod else (0,)),
            scale.new_empty((2, *scale_dot.shape) if compute_dmod else (0,)))


_tangent_bwd = FusedOp("layernorm_modulate_tangent_bwd", _tangent_bwd_impl, _tangent_bwd_fake)


def _setup_context(ctx, inputs, output):
    x, _, scale, x_dot, _, scale_dot, _, _, tangent_grad = inputs
    _, y_dot, mean, rstd = output
    ctx.tangent_grad = tangent_grad
    if tangent_grad:  # y_dot differentiable: its backward reads the tangents of x and scale too
        ctx.save_for_backward(x, scale, mean, rstd, x_dot, scale_dot)
        ctx.mark_non_differentiable(mean, rstd)
    else:
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.mark_non_differentiable(y_dot, mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for y_dot, mean, rstd (a launch and a write each)


def _tangent_backward(ctx, grad_y, grad_y_dot):
    """A loss of (y, y_dot): every gradient from `_layernorm_modulate_tangent_bwd_kernel`."""
    x, scale, mean, rstd, x_dot, scale_dot = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dmod = any(need[1:3]) or any(need[4:6])
    dx, dx_dot, dmod, dmod_dot = _tangent_bwd(grad_y, grad_y_dot, x, x_dot, scale, scale_dot, mean, rstd, need[0],
                                              need[3], need_dmod)
    pick = lambda flag, g: g if flag else None  # noqa: E731
    return (pick(need[0], dx), pick(need[1], dmod[0] if need_dmod else None),
            pick(need[2], dmod[1] if need_dmod else None), pick(need[3], dx_dot),
            pick(need[4], dmod_dot[0] if need_dmod else None), pick(need[5], dmod_dot[1] if need_dmod else None),
            None, None, None)


def _backward(ctx, grad_y, grad_y_dot, _grad_mean, _grad_rstd):
    """y = xh (1 + scale) + shift: dx, dshift, dscale from one kernel (see `_layernorm_modulate_bwd_kernel`); with a
    gradient of y_dot too, `_tangent_backward`."""
    if ctx.tangent_grad and grad_y_dot is not None and grad_y_dot.shape[0]:
        return _tangent_backward(ctx, grad_y, grad_y_dot)
    x, scale, mean, rstd = ctx.saved_tensors[:4]
    need_dx, need_dshift, need_dscale = ctx.needs_input_grad[:3]
    need_dmod = need_dshift or need_dscale
    if grad_y is None or not (need_dx or need_dmod):
        return (None,) * 9
    dx, dmod = _bwd(grad_y, x, scale, mean, rstd, need_dx, need_dmod)
    dshift, dscale = dmod.unbind(0) if need_dmod else (None, None)
    return (dx if need_dx else None, dshift if need_dshift else None, dscale if need_dscale else None,
            None, None, None, None, None, None)


def _check_op_args(x, shift, scale, x_dot, shift_dot, scale_dot, eps, save_stats, tangent_grad=False):
    check_layernorm_modulate_args(x, shift, scale, x_dot, shift_dot, scale_dot)
    _runtime.require_triton("layernorm_modulate_fwd", x)


_fwd = FusedOp("layernorm_modulate_fwd", _fwd_impl, _fwd_fake, setup_context=_setup_context, backward=_backward,
               check=_check_op_args)


# ----------------------------------------------------------------------------------------------------------- public
def layernorm_modulate_jvp(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                           x_dot: torch.Tensor, shift_dot: torch.Tensor, scale_dot: torch.Tensor,
                           *, eps: float = 1e-6, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm (no affine) + adaLN modulate with its tangent, fused (see the module docstring for the formulas).

    x: (B, N, C); shift, scale: (B, C); x_dot: (kt, N, C); shift_dot, scale_dot: (kt, C); kt <= B, all one dtype and
    device. Returns (y (B, N, C) differentiable in x, shift, scale; y_dot (kt, N, C) detached, or with tangent_grad
    differentiable in all six inputs: module docstring). Same contract and checks as
    `reference.layernorm_modulate_jvp_ref`; falls back to it (one warning) where Triton cannot run.
    The op is `torch.ops.mfkernels.layernorm_modulate_fwd` (what torch.compile records).
    """
    check_layernorm_modulate_args(x, shift, scale, x_dot, shift_dot, scale_dot)
    check_tangent_grad(tangent_grad)
    return _layernorm_modulate_jvp(x, shift, scale, x_dot, shift_dot, scale_dot, eps=eps, tangent_grad=tangent_grad)


def _layernorm_modulate_jvp(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, x_dot: torch.Tensor,
                            shift_dot: torch.Tensor, scale_dot: torch.Tensor,
                            *, eps: float = 1e-6, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """layernorm_modulate_jvp on checked arguments."""
    if not _runtime.triton_can_run(x):
        _runtime.warn_fallback("layernorm_modulate_jvp", x)
        return _layernorm_modulate_jvp_ref(x, shift, scale, x_dot, shift_dot, scale_dot, eps=eps,
                                           tangent_grad=tangent_grad)
    if _runtime.tangent_grad_on(tangent_grad, x_dot, shift_dot, scale_dot):
        save_stats = _runtime.wants_grad(x, shift, scale, x_dot, shift_dot, scale_dot)
        y, y_dot, _, _ = _fwd(x, shift, scale, x_dot, shift_dot, scale_dot, float(eps), save_stats, True)
        return y, y_dot
    save_stats = torch.is_grad_enabled() and (x.requires_grad or shift.requires_grad or scale.requires_grad)
    y, y_dot, _, _ = _fwd(x, shift, scale, x_dot, shift_dot, scale_dot, float(eps), save_stats, False)
    return y, y_dot
