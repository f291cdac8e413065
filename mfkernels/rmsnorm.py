"""RMSNorm with its tangent, fused, over the last dim of a tensor of any leading strides.

    r = 1 / sqrt(mean(x^2) + eps)                     (row statistic over D, fp32 / fp64)
    y = x r w                                         (w: learned (D,) scale, or none)
    y_dot = (x_dot - x r^2 mean(x x_dot)) r w         (first kt samples only)

Layouts: x may be any view whose non-batch leading dims merge into two (see `_rows`): the residual stream (B, N, C),
per-head q / k views (B, N, H, Dh) or (B, H, N, Dh) of a fused qkv projection; x_dot may have strides of its own.
Outputs are contiguous in x's logical shape. Forward: one kernel, tiles of BLOCK_R rows, reads x (and x_dot on tangent
rows) once, writes y (and y_dot), and saves r (one fp32 per row) for the backward.
Backward (primal only): one kernel, dx = r (g - xh mean(g xh)) with g = dy w, xh = x r, and per-program partial sums of
dy xh that the host sums (deterministic) into dw.

Gradients through the tangent (`tangent_grad`, rule in `_runtime.tangent_grad_on`): y_dot is then differentiable in
x, w and x_dot through one more kernel, `_rmsnorm_tangent_bwd_kernel` (formulas in its docstring and in
docs/design.md, 'Gradients through the tangent'; checked against float64 autograd of the reference in
tests/test_tangent_grad.py). Saved beyond the stop-gradient path: x_dot. Without tangent_grad nothing changes.

Dtypes: y and y_dot have x's dtype; w may be another float dtype (an fp32 parameter with bf16 activations); math in
fp32 (fp64 for fp64 inputs).

Chain: `_rmsnorm_jvp_fwd_kernel` -> `rmsnorm_jvp_fwd()` -> op `mfkernels::rmsnorm_fwd` (backward `_rmsnorm_bwd_kernel`
-> `rmsnorm_bwd()` -> op `mfkernels::rmsnorm_bwd`, see `_library.FusedOp`) -> `rmsnorm_jvp()`.
"""
from __future__ import annotations

import torch

from . import _runtime
from ._checks import check_rmsnorm_args, check_tangent_grad
from ._library import FusedOp
from ._rows import rows_for
from ._triton import partial_sum_programs, rne_bf16, round_to, row_block, tl, tl_acc_dtype, triton
from .reference import _rmsnorm_jvp_ref

__all__ = ["rmsnorm_jvp"]


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _rmsnorm_jvp_fwd_kernel(
    X, W, X_DOT, Y, Y_DOT, RSTD,
    n_rows, n_tangent_rows, L1, L2, D,
    sx0, sx1, sx2, sd0, sd1, sd2,
    eps,
    HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr,
):
    """Tile of BLOCK_R rows x the whole row (BLOCK_D >= D); grid (cdiv(B L1 L2, BLOCK_R),).

    Row r = (b, i1, i2), r = (b L1 + i1) L2 + i2, read at b s0 + i1 s1 + i2 s2 (x: sx*, x_dot: sd*); outputs contiguous.
        r_row = 1 / sqrt(sum(x^2) / D + eps);  Y = x r_row w
        Y_DOT = (x_dot - x r_row^2 sum(x x_dot) / D) r_row w          for rows < kt L1 L2 (the first kt samples)
    RSTD[row] = r_row (4 bytes a row, written always: the backward reads it). Math in ACC.
    """
    start = tl.program_id(0) * BLOCK_R
    rows = start + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)
    per_sample = L1 * L2
    b = r64 // per_sample
    i1 = (r64 % per_sample) // L2
    i2 = r64 % L2

    x = tl.load(X + (b * sx0 + i1 * sx1 + i2 * sx2)[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    else:
        w = 1.0
    out = r64[:, None] * D + cols[None, :]
    tl.store(Y + out, round_to(x * rstd[:, None] * w, Y.dtype.element_ty, RNE), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)

    # Scalar branch: tiles past the tangent rows (most at kt = B/4) never touch the tangent buffers.
    if start < n_tangent_rows:
        tmask = mask & (rows < n_tangent_rows)[:, None]
        x_dot = tl.load(X_DOT + (b * sd0 + i1 * sd1 + i2 * sd2)[:, None] + cols[None, :], mask=tmask,
                        other=0.0).to(ACC)
        proj = tl.sum(x * x_dot, axis=1) / D  # mean(x x_dot); zero on the padding
        y_dot = (x_dot - x * (rstd * rstd * proj)[:, None]) * rstd[:, None] * w
        tl.store(Y_DOT + out, round_to(y_dot, Y_DOT.dtype.element_ty, RNE), mask=tmask)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PART,
    n_rows, L1, L2, D, n_programs,
    sx0, sx1, sx2,
    HAS_W: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr,
):
    """Backward of y = x r w for row tiles pid, pid + P, pid + 2P, ... (P = n_programs); grid (P,).

        xh = x r;  g = dy w;  DX = r (g - xh sum(g xh) / D)          (DY, DX contiguous; X strided as in the forward)
        DW_PART[pid] = sum over the program's rows of dy xh          (the host sums the P partials: deterministic)
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    else:
        w = 1.0
    dw = tl.zeros([BLOCK_D], dtype=ACC)
    per_sample = L1 * L2
    n_tiles = tl.cdiv(n_rows, BLOCK_R)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)
        b = r64 // per_sample
        i1 = (r64 % per_sample) // L2
        i2 = r64 % L2
        x = tl.load(X + (b * sx0 + i1 * sx1 + i2 * sx2)[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + r64[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xh = x * rstd[:, None]
        if COMPUTE_DX:
            g = dy * w
            mean_gxh = tl.sum(g * xh, axis=1) / D
            dx = (g - xh * mean_gxh[:, None]) * rstd[:, None]
            tl.store(DX + r64[:, None] * D + cols[None, :], round_to(dx, DX.dtype.element_ty, RNE), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(dy * xh, axis=0)
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * D + cols, dw, mask=col_ok)


@triton.jit
def _rmsnorm_tangent_bwd_kernel(
    DY, DY_DOT, X, X_DOT, W, RSTD, DX, DX_DOT, DW_PART,
    n_rows, n_tangent_rows, L1, L2, D, n_programs,
    sx0, sx1, sx2, sd0, sd1, sd2,
    HAS_W: tl.constexpr, HAS_DY: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DX_DOT: tl.constexpr,
    COMPUTE_DW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr,
):
    """Backward of (y, y_dot) for row tiles pid, pid + P, ... (P = n_programs); grid (P,). Rows as in the forward (X,
    X_DOT strided; DY, DY_DOT, DX, DX_DOT contiguous); tangent rows are rows < n_tangent_rows (= kt L1 L2).

    Per row, with xh = x r, G = DY (0 without HAS_DY), G' = DY_DOT (0 off the tangent rows) and the tangent's own
        m = mean(xh x_dot),  xh_dot = (x_dot - xh m) r                      (y_dot = xh_dot w)
    the gradients of xh and xh_dot are p = G w and q = G' w, and with J u = r (u - xh mean(xh u)) (RMSNorm's
    Jacobian: symmetric, J x_dot = xh_dot):
        DX_DOT = J q
        DX     = J p - r (mean(q xh_dot) xh + mean(q xh) xh_dot + m DX_DOT)
        DW_PART[pid] = sum over the program's rows of G xh + G' xh_dot      (the host sums the P partials)
    The second term of DX is the gradient of q . J(x) x_dot through J's dependence on x (d r / dx = -r^2 xh / D,
    d(xh . u) / dx = J u): -r (mean(q xh_dot) xh + mean(q xh) xh_dot + m J q).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    else:
        w = 1.0
    dw = tl.zeros([BLOCK_D], dtype=ACC)
    per_sample = L1 * L2
    n_tiles = tl.cdiv(n_rows, BLOCK_R)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        tmask = mask & (rows < n_tangent_rows)[:, None]
        r64 = rows.to(tl.int64)
        b = r64 // per_sample
        i1 = (r64 % per_sample) // L2
        i2 = r64 % L2
        out = r64[:, None] * D + cols[None, :]
        x = tl.load(X + (b * sx0 + i1 * sx1 + i2 * sx2)[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        xd = tl.load(X_DOT + (b * sd0 + i1 * sd1 + i2 * sd2)[:, None] + cols[None, :], mask=tmask,
                     other=0.0).to(ACC)
        if HAS_DY:
            dy = tl.load(DY + out, mask=mask, other=0.0).to(ACC)
        else:
            dy = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        dyd = tl.load(DY_DOT + out, mask=tmask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        xh = x * rstd
        proj = (tl.sum(xh * xd, axis=1) / D)[:, None]  # m
        xh_dot = (xd - xh * proj) * rstd
        q = dyd * w
        dx_dot = (q - xh * (tl.sum(xh * q, axis=1) / D)[:, None]) * rstd
        if COMPUTE_DX_DOT:
            tl.store(DX_DOT + out, round_to(dx_dot, DX_DOT.dtype.element_ty, RNE), mask=tmask)
        if COMPUTE_DX:
            p = dy * w
            dx = (p - xh * (tl.sum(xh * p, axis=1) / D)[:, None]) * rstd
            dx -= rstd * ((tl.sum(q * xh_dot, axis=1) / D)[:, None] * xh
                          + (tl.sum(q * xh, axis=1) / D)[:, None] * xh_dot + proj * dx_dot)
            tl.store(DX + out, round_to(dx, DX.dtype.element_ty, RNE), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(dy * xh + dyd * xh_dot, axis=0)
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * D + cols, dw, mask=col_ok)


# -------------------------------------------------------------------------------------------------------- launchers
TILE_ELEMENTS = 4096  # BLOCK_R x BLOCK_D per program: 16 fp32 per thread at 8 warps


def _tile(d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): whole rows, as many as fit in TILE_ELEMENTS (64 rows of a head dim of 64)."""
    block_d = row_block(d, "rmsnorm_jvp")
    block_r = max(1, min(64, TILE_ELEMENTS // block_d))
    return block_r, block_d, min(8, max(1, block_r * block_d // 512))


def rmsnorm_jvp_fwd(x: torch.Tensor, weight: torch.Tensor | None,
                    x_dot: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns (y, y_dot, rstd); rstd (B L1 L2,) in fp32 (fp64 for fp64 inputs)."""
    shape = tuple(x.shape)
    (x, x_dot), layout = rows_for(shape, x, x_dot)
    d = shape[-1]
    n_rows = x.numel() // d if d else 0
    n_tangent_rows = x_dot.shape[0] * layout.rows_per_sample
    y = _runtime.new_output(shape, dtype=x.dtype, device=x.device)
    y_dot = _runtime.new_output(tuple(x_dot.shape), dtype=x.dtype, device=x.device)
    stats_dtype = _runtime.acc_dtype(x.dtype, *(() if weight is None else (weight.dtype,)))
    rstd = _runtime.new_output((n_rows,), dtype=stats_dtype, device=x.device)
    if n_rows:
        block_r, block_d, warps = _tile(d)
        (sx, sd) = layout.strides
        _rmsnorm_jvp_fwd_kernel[(_runtime.cdiv(n_rows, block_r),)](
            x, weight if weight is not None else x, x_dot, y, y_dot, rstd,
            n_rows, n_tangent_rows, *layout.sizes, d, *sx, *sd, eps,
            HAS_W=weight is not None, BLOCK_R=block_r, BLOCK_D=block_d,
            ACC=tl_acc_dtype(x.dtype, *(() if weight is None else (weight.dtype,))), RNE=rne_bf16(x.dtype),
            num_warps=warps,
        )
    return y, y_dot, rstd


def rmsnorm_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                compute_dx: bool, compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns (dx (x's shape, contiguous) or empty, dw (D,) or empty)."""
    shape = tuple(x.shape)
    d = shape[-1]
    grad_y = grad_y.contiguous()
    (x,), layout = rows_for(shape, x)
    n_rows = x.numel() // d if d else 0
    compute_dw = compute_dw and weight is not None
    dx = _runtime.new_output(shape if compute_dx else (0,), dtype=x.dtype, device=x.device)
    block_r, block_d, warps = _tile(d)
    n_tiles = _runtime.cdiv(n_rows, block_r)
    programs = partial_sum_programs(n_tiles, x.device) if compute_dw else max(n_tiles, 1)
    dw_part = _runtime.new_output((programs, d) if compute_dw else (0,), dtype=rstd.dtype, device=x.device)
    if n_rows and (compute_dx or compute_dw):
        _rmsnorm_bwd_kernel[(programs,)](
            grad_y, x, weight if weight is not None else x, rstd, dx, dw_part,
            n_rows, *layout.sizes, d, programs, *layout.strides[0],
            HAS_W=weight is not None, COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw,
            BLOCK_R=block_r, BLOCK_D=block_d, ACC=tl_acc_dtype(rstd.dtype), RNE=rne_bf16(x.dtype),
            num_warps=warps,
        )
    if not compute_dw:
        return dx, x.new_empty(0)
    if not n_rows:  # no rows at all: the weight gradient is zero
        return dx, torch.zeros_like(weight)
    return dx, dw_part.sum(0).to(weight.dtype)


def rmsnorm_tangent_bwd(grad_y: torch.Tensor | None, grad_y_dot: torch.Tensor, x: torch.Tensor, x_dot: torch.Tensor,
                        weight: torch.Tensor | None, rstd: torch.Tensor, compute_dx: bool, compute_dx_dot: bool,
                        compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the tangent backward kernel. Returns (dx, dx_dot (contiguous in their shapes), dw (D,)); those not
    asked for (or dw without a weight) are empty."""
    shape = tuple(x.shape)
    d = shape[-1]
    grad_y_dot = grad_y_dot.contiguous()
    if grad_y is not None:
        grad_y = grad_y.contiguous()
    (x, x_dot), layout = rows_for(shape, x, x_dot)
    n_rows = x.numel() // d if d else 0
    compute_dw = compute_dw and weight is not None
    dx = _runtime.new_output(shape if compute_dx else (0,), dtype=x.dtype, device=x.device)
    dx_dot = _runtime.new_output(tuple(x_dot.shape) if compute_dx_dot else (0,), dtype=x_dot.dtype, device=x.device)
    block_r, block_d, warps = _tile(d)
    n_tiles = _runtime.cdiv(n_rows, block_r)
    programs = partial_sum_programs(n_tiles, x.device) if compute_dw else max(n_tiles, 1)
    dw_part = _runtime.new_output((programs, d) if compute_dw else (0,), dtype=rstd.dtype, device=x.device)
    if n_rows and (compute_dx or compute_dx_dot or compute_dw):
        (sx, sd) = layout.strides
        _rmsnorm_tangent_bwd_kernel[(programs,)](
            grad_y if grad_y is not None else grad_y_dot, grad_y_dot, x, x_dot, weight if weight is not None else x,
            rstd, dx, dx_dot, dw_part,
            n_rows, x_dot.shape[0] * layout.rows_per_sample, *layout.sizes, d, programs, *sx, *sd,
            HAS_W=weight is not None, HAS_DY=grad_y is not None, COMPUTE_DX=compute_dx, COMPUTE_DX_DOT=compute_dx_dot,
            COMPUTE_DW=compute_dw, BLOCK_R=block_r, BLOCK_D=block_d, ACC=tl_acc_dtype(rstd.dtype),
            RNE=rne_bf16(x.dtype), num_warps=warps,
        )
    if not compute_dw:
        return dx, dx_dot, x.new_empty(0)
    if not n_rows:
        return dx, dx_dot, torch.zeros_like(weight)
    return dx, dx_dot, dw_part.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------- registration
def _fwd_impl(x: torch.Tensor, weight: torch.Tensor | None, x_dot: torch.Tensor, eps: float,
              tangent_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, y_dot, rstd) from the fused kernel."""
    return rmsnorm_jvp_fwd(x, weight, x_dot, eps)


def _fwd_fake(x, weight, x_dot, eps, tangent_grad=False):
    n_rows = x.numel() // x.shape[-1]
    stats = _runtime.acc_dtype(x.dtype, *(() if weight is None else (weight.dtype,)))
    return x.new_empty(x.shape), x.new_empty(x_dot.shape), x.new_empty((n_rows,), dtype=stats)


def _bwd_impl(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
              compute_dx: bool, compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx or empty, dw or empty) from the backward kernel and the saved row statistics."""
    return rmsnorm_bwd(grad_y, x, weight, rstd, compute_dx, compute_dw)


def _bwd_fake(grad_y, x, weight, rstd, compute_dx, compute_dw):
    dw = weight.new_empty(weight.shape) if (compute_dw and weight is not None) else x.new_empty(0)
    return x.new_empty(x.shape if compute_dx else (0,)), dw


_bwd = FusedOp("rmsnorm_bwd", _bwd_impl, _bwd_fake,
               check=lambda grad_y, x, *_: _runtime.require_triton("rmsnorm_bwd", x))


def _tangent_bwd_impl(grad_y: torch.Tensor | None, grad_y_dot: torch.Tensor, x: torch.Tensor, x_dot: torch.Tensor,
                      weight: torch.Tensor | None, rstd: torch.Tensor, compute_dx: bool, compute_dx_dot: bool,
                      compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dx_dot, dw) of a loss of (y, y_dot); each empty when not asked for."""
    return rmsnorm_tangent_bwd(grad_y, grad_y_dot, x, x_dot, weight, rstd, compute_dx, compute_dx_dot, compute_dw)


def _tangent_bwd_fake(grad_y, grad_y_dot, x, x_dot, weight, rstd, compute_dx, compute_dx_dot, compute_dw):
    dw = weight.new_empty(weight.shape) if (compute_dw and weight is not None) else x.new_empty(0)
    return x.new_empty(x.shape if compute_dx else (0,)), x.new_empty(x_dot.shape if compute_dx_dot else (0,)), dw


_tangent_bwd = FusedOp("rmsnorm_tangent_bwd", _tangent_bwd_impl, _tangent_bwd_fake,
                       check=lambda grad_y, grad_y_dot, x, *_: _runtime.require_triton("rmsnorm_tangent_bwd", x))


def _setup_context(ctx, inputs, output):
    x, weight, x_dot, _eps, tangent_grad = inputs
    _y, y_dot, rstd = output
    ctx.tangent_grad = tangent_grad
    if tangent_grad:  # y_dot differentiable: its backward reads x_dot too
        ctx.save_for_backward(x, weight, rstd, x_dot)
        ctx.mark_non_differentiable(rstd)
    else:
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(y_dot, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for y_dot and rstd


def _backward(ctx, grad_y, grad_y_dot, _grad_rstd):
    need = ctx.needs_input_grad
    if ctx.tangent_grad and grad_y_dot is not None and grad_y_dot.shape[0]:
        x, weight, rstd, x_dot = ctx.saved_tensors
        need_dw = weight is not None and need[1]
        dx, dx_dot, dw = _tangent_bwd(grad_y, grad_y_dot, x, x_dot, weight, rstd, need[0], need[2], need_dw)
        return (dx if need[0] else None), (dw if need_dw else None), (dx_dot if need[2] else None), None, None
    x, weight, rstd = ctx.saved_tensors[:3]
    need_dx, need_dw = need[0], weight is not None and need[1]
    if grad_y is None or not (need_dx or need_dw):
        return None, None, None, None, None
    dx, dw = _bwd(grad_y, x, weight, rstd, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None


def _check_op_args(x, weight, x_dot, eps, tangent_grad=False):
    check_rmsnorm_args(x, weight, x_dot, eps)
    _runtime.require_triton("rmsnorm_fwd", x)


_fwd = FusedOp("rmsnorm_fwd", _fwd_impl, _fwd_fake, setup_context=_setup_context, backward=_backward,
               check=_check_op_args)


# ----------------------------------------------------------------------------------------------------------- public
def rmsnorm_jvp(x: torch.Tensor, weight: torch.Tensor | None, x_dot: torch.Tensor,
                *, eps: float = 1e-6, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim with its tangent, fused (formulas in the module docstring).

    x: (B, ..., D) any strides (per-head q / k views included); weight: (D,) learned scale or None; x_dot: (kt, ..., D),
    kt <= B, its own strides allowed. Returns (y differentiable in x and weight, y_dot detached, or with tangent_grad
    differentiable in x, weight and x_dot: module docstring), both contiguous in x's shape and dtype. Same contract and
    checks as `reference.rmsnorm_jvp_ref`; falls back to it (one warning) where Triton cannot run. The op is
    `torch.ops.mfkernels.rmsnorm_fwd`.
    """
    check_rmsnorm_args(x, weight, x_dot, eps)
    check_tangent_grad(tangent_grad)
    return _rmsnorm_jvp(x, weight, x_dot, eps=eps, tangent_grad=tangent_grad)


def _rmsnorm_jvp(x: torch.Tensor, weight: torch.Tensor | None, x_dot: torch.Tensor,
                 *, eps: float = 1e-6, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rmsnorm_jvp on checked arguments."""
    if not _runtime.triton_can_run(x):
        _runtime.warn_fallback("rmsnorm_jvp", x)
        return _rmsnorm_jvp_ref(x, weight, x_dot, eps=eps, tangent_grad=tangent_grad)
    y, y_dot, _ = _fwd(x, weight, x_dot, float(eps), _runtime.tangent_grad_on(tangent_grad, x_dot))
    return y, y_dot
