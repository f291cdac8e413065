"""Rotary position embeddings (RoPE) with their tangent, fused; the kernels also serve the fused QK-norm + RoPE op.

    pairs (x1, x2) of the last dim, one angle theta per (position, pair):
    y1 = x1 cos - x2 sin,  y2 = x1 sin + x2 cos                     (a complex product (x1 + i x2) e^{i theta})
    y_dot: the same rotation of x_dot                              (positions carry no tangent; first kt samples)

Pairing: ``interleaved=True`` (default) pairs (x[2i], x[2i+1]), the complex view of the last dim that iMF
(Lyy-iiis/imeanflow models/imfDiT.py, `apply_rotary_pos_emb`), Flux and Meta's LLaMA code use; ``interleaved=False``
pairs (x[i], x[i + D/2]) (GPT-NeoX, HF "rotate_half"). The angles are whatever cos / sin say: 1-D positions (iMF: token
index 0..L-1 over [condition tokens, patches], theta 10000), 2-D axial tables, or per-sample positions; they need only
broadcast to x.shape[:-1] + (D/2,) and are read in place (stride 0 over broadcast dims).

Kernels work on pairs: each program loads a tile of rows as two (BLOCK_R, D/2) halves x1, x2 (strided views read in
place, see `_rows`), optionally RMS-normalises them first (NORM: the fused QK-norm of `qk_norm_rope.py`), rotates, and
writes contiguous outputs. Grid axis 1 picks the tensor (q or k): both are done in ONE launch. Backward: the inverse
rotation of dy (the transpose: sin -> -sin), then, with NORM, the RMSNorm backward, in one kernel.

Gradients through the tangent (`tangent_grad`, rule in `_runtime.tangent_grad_on`): RoPE is linear in x, so
dx_dot = R^T G' (the inverse rotation of the tangent's upstream gradient: the primal backward kernel once more, on the
kt tangent rows) and nothing else changes. The fused QK-norm + RoPE has a kernel of its own for it,
`_norm_rope_tangent_bwd_kernel` (formulas in its docstring and in docs/design.md, 'Gradients through the tangent').

Chain: `_rope_jvp_fwd_kernel` -> `rope_fwd_launch()` -> op `mfkernels::rope_fwd` (backward `_rope_bwd_kernel` ->
`rope_bwd_launch()` -> op `mfkernels::rope_bwd`, see `_library.FusedOp`) -> `rope_jvp()`.
"""
from __future__ import annotations

import torch

from . import _runtime
from ._checks import check_angles_constant, check_rope_args, check_tangent_grad
from ._library import FusedOp
from ._rows import rows_for
from ._triton import next_power_of_2, partial_sum_programs, rne_bf16, round_to, tl, tl_acc_dtype, triton
from .reference import _rope_jvp_ref

__all__ = ["rope_jvp"]


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _pair_cols(HALF, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Pair index i in [0, BLOCK_H) and the columns of its two members: (2i, 2i+1) or (i, i + D/2)."""
    i = tl.arange(0, BLOCK_H)
    if INTERLEAVED:
        c1 = 2 * i
        c2 = 2 * i + 1
    else:
        c1 = i
        c2 = i + HALF
    return i, c1, c2


@triton.jit
def _row_coords(rows, L1, L2):
    """Row r -> (b, i1, i2) with r = (b L1 + i1) L2 + i2, in int64."""
    r64 = rows.to(tl.int64)
    per_sample = L1 * L2
    return r64, r64 // per_sample, (r64 % per_sample) // L2, r64 % L2


@triton.jit
def _rope_jvp_fwd_kernel(
    X0, X1, XD0, XD1, W0, W1, Y0, Y1, YD0, YD1, RSTD, COS, SIN,
    n_rows, n_tangent_rows, L1, L2, HALF,
    sa0, sa1, sa2, sb0, sb1, sb2,  # strides of x (slot 0, slot 1)
    ta0, ta1, ta2, tb0, tb1, tb2,  # strides of x_dot (slot 0, slot 1)
    sc0, sc1, sc2, ss0, ss1, ss2,  # strides of cos, sin
    eps,
    NORM: tl.constexpr, HAS_W: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr,
):
    """Tile of BLOCK_R rows of tensor `slot` = program_id(1) (0: X0/q, 1: X1/k); grid (cdiv(B L1 L2, BLOCK_R), slots).

    Row r = (b, i1, i2) read at b s0 + i1 s1 + i2 s2 (x, x_dot, cos, sin: strides of their own); D = 2 HALF.
        NORM:  rstd = 1 / sqrt((sum x1^2 + sum x2^2) / D + eps);  z = x rstd w  (RSTD[slot, r] saved);  else z = x
        ROPE:  y1 = z1 cos - z2 sin,  y2 = z1 sin + z2 cos;                                           else y = z
        tangent rows (r < kt L1 L2): z_dot = (x_dot - x rstd^2 sum(x x_dot) / D) rstd w (NORM; else x_dot), rotated
    Outputs Y, Y_DOT contiguous (row r at r D). Math in ACC.
    """
    slot = tl.program_id(1)
    if slot == 0:
        X, XD, W, Y, YD = X0, XD0, W0, Y0, YD0
        s0, s1, s2, t0, t1, t2 = sa0, sa1, sa2, ta0, ta1, ta2
    else:
        X, XD, W, Y, YD = X1, XD1, W1, Y1, YD1
        s0, s1, s2, t0, t1, t2 = sb0, sb1, sb2, tb0, tb1, tb2
    start = tl.program_id(0) * BLOCK_R
    rows = start + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    i, c1, c2 = _pair_cols(HALF, BLOCK_H, INTERLEAVED)
    mask = row_ok[:, None] & (i < HALF)[None, :]
    r64, b, i1, i2 = _row_coords(rows, L1, L2)
    D = 2 * HALF

    x_row = (b * s0 + i1 * s1 + i2 * s2)[:, None]
    x1 = tl.load(X + x_row + c1[None, :], mask=mask, other=0.0).to(ACC)
    x2 = tl.load(X + x_row + c2[None, :], mask=mask, other=0.0).to(ACC)
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
        tl.store(RSTD + slot.to(tl.int64) * n_rows + rows, rstd, mask=row_ok)
        if HAS_W:
            w1 = tl.load(W + c1, mask=i < HALF, other=0.0).to(ACC)[None, :]
            w2 = tl.load(W + c2, mask=i < HALF, other=0.0).to(ACC)[None, :]
        else:
            w1 = 1.0
            w2 = 1.0
        z1 = x1 * rstd[:, None] * w1
        z2 = x2 * rstd[:, None] * w2
    else:
        z1 = x1
        z2 = x2
    if ROPE:
        cos = tl.load(COS + (b * sc0 + i1 * sc1 + i2 * sc2)[:, None] + i[None, :], mask=mask, other=0.0).to(ACC)
        sin = tl.load(SIN + (b * ss0 + i1 * ss1 + i2 * ss2)[:, None] + i[None, :], mask=mask, other=0.0).to(ACC)
        y1 = z1 * cos - z2 * sin
        y2 = z1 * sin + z2 * cos
    else:
        y1 = z1
        y2 = z2
    out = r64[:, None] * D
    tl.store(Y + out + c1[None, :], round_to(y1, Y.dtype.element_ty, RNE), mask=mask)
    tl.store(Y + out + c2[None, :], round_to(y2, Y.dtype.element_ty, RNE), mask=mask)

    # Scalar branch: tiles past the tangent rows never touch the tangent buffers.
    if start < n_tangent_rows:
        tmask = mask & (rows < n_tangent_rows)[:, None]
        t_row = (b * t0 + i1 * t1 + i2 * t2)[:, None]
        zd1 = tl.load(XD + t_row + c1[None, :], mask=tmask, other=0.0).to(ACC)
        zd2 = tl.load(XD + t_row + c2[None, :], mask=tmask, other=0.0).to(ACC)
        if NORM:
            proj = (tl.sum(x1 * zd1, axis=1) + tl.sum(x2 * zd2, axis=1)) / D  # mean(x x_dot)
            corr = (rstd * rstd * proj)[:, None]
            zd1 = (zd1 - x1 * corr) * rstd[:, None] * w1
            zd2 = (zd2 - x2 * corr) * rstd[:, None] * w2
        if ROPE:
            yd1 = zd1 * cos - zd2 * sin
            yd2 = zd1 * sin + zd2 * cos
        else:
            yd1 = zd1
            yd2 = zd2
        tl.store(YD + out + c1[None, :], round_to(yd1, YD.dtype.element_ty, RNE), mask=tmask)
        tl.store(YD + out + c2[None, :], round_to(yd2, YD.dtype.element_ty, RNE), mask=tmask)


@triton.jit
def _rope_bwd_kernel(
    DY0, DY1, X0, X1, W0, W1, RSTD, COS, SIN, DX0, DX1, DW_PART,
    n_rows, L1, L2, HALF, n_programs,
    sa0, sa1, sa2, sb0, sb1, sb2,  # strides of x (slot 0, slot 1); used with NORM only
    sc0, sc1, sc2, ss0, ss1, ss2,
    NORM: tl.constexpr, HAS_W: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr,
):
    """Backward of the forward above for row tiles pid, pid + P, ... of tensor `slot`; grid (P, slots).

        ROPE:  dz1 = dy1 cos + dy2 sin,  dz2 = -dy1 sin + dy2 cos      (the inverse rotation; else dz = dy)
        NORM:  xh = x rstd;  g = dz w;  DX = rstd (g - xh sum(g xh) / D);  DW_PART[slot, pid] = sum over rows dz xh
               else DX = dz
    DY, DX contiguous; X strided as in the forward. The host sums DW_PART over programs (deterministic).
    """
    slot = tl.program_id(1)
    pid = tl.program_id(0)
    if slot == 0:
        DY, X, W, DX = DY0, X0, W0, DX0
        s0, s1, s2 = sa0, sa1, sa2
    else:
        DY, X, W, DX = DY1, X1, W1, DX1
        s0, s1, s2 = sb0, sb1, sb2
    i, c1, c2 = _pair_cols(HALF, BLOCK_H, INTERLEAVED)
    pair_ok = i < HALF
    D = 2 * HALF
    if NORM and HAS_W:
        w1 = tl.load(W + c1, mask=pair_ok, other=0.0).to(ACC)[None, :]
        w2 = tl.load(W + c2, mask=pair_ok, other=0.0).to(ACC)[None, :]
    else:
        w1 = 1.0
        w2 = 1.0
    dw1 = tl.zeros([BLOCK_H], dtype=ACC)
    dw2 = tl.zeros([BLOCK_H], dtype=ACC)
    n_tiles = tl.cdiv(n_rows, BLOCK_R)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & pair_ok[None, :]
        r64, b, i1, i2 = _row_coords(rows, L1, L2)
        out = r64[:, None] * D
        dz1 = tl.load(DY + out + c1[None, :], mask=mask, other=0.0).to(ACC)
        dz2 = tl.load(DY + out + c2[None, :], mask=mask, other=0.0).to(ACC)
        if ROPE:
            cos = tl.load(COS + (b * sc0 + i1 * sc1 + i2 * sc2)[:, None] + i[None, :], mask=mask, other=0.0).to(ACC)
            sin = tl.load(SIN + (b * ss0 + i1 * ss1 + i2 * ss2)[:, None] + i[None, :], mask=mask, other=0.0).to(ACC)
            dz1, dz2 = dz1 * cos + dz2 * sin, dz2 * cos - dz1 * sin
        if NORM:
            x_row = (b * s0 + i1 * s1 + i2 * s2)[:, None]
            rstd = tl.load(RSTD + slot.to(tl.int64) * n_rows + rows, mask=row_ok, other=0.0)[:, None]
            xh1 = tl.load(X + x_row + c1[None, :], mask=mask, other=0.0).to(ACC) * rstd
            xh2 = tl.load(X + x_row + c2[None, :], mask=mask, other=0.0).to(ACC) * rstd
            if COMPUTE_DW:
                dw1 += tl.sum(dz1 * xh1, axis=0)
                dw2 += tl.sum(dz2 * xh2, axis=0)
            if COMPUTE_DX:
                g1 = dz1 * w1
                g2 = dz2 * w2
                m = ((tl.sum(g1 * xh1, axis=1) + tl.sum(g2 * xh2, axis=1)) / D)[:, None]
                dx1 = (g1 - xh1 * m) * rstd
                dx2 = (g2 - xh2 * m) * rstd
        else:
            dx1 = dz1
            dx2 = dz2
        if COMPUTE_DX:
            tl.store(DX + out + c1[None, :], round_to(dx1, DX.dtype.element_ty, RNE), mask=mask)
            tl.store(DX + out + c2[None, :], round_to(dx2, DX.dtype.element_ty, RNE), mask=mask)
    if COMPUTE_DW:
        part = (slot * n_programs + pid).to(tl.int64) * D
        tl.store(DW_PART + part + c1, dw1, mask=pair_ok)
        tl.store(DW_PART + part + c2, dw2, mask=pair_ok)


@triton.jit
def _norm_rope_tangent_bwd_kernel(
    DY0, DY1, DYD0, DYD1, X0, X1, XD0, XD1, W0, W1, RSTD, COS, SIN, DX0, DX1, DXD0, DXD1, DW_PART,
    n_rows, n_tangent_rows, L1, L2, HALF, n_programs,
    sa0, sa1, sa2, sb0, sb1, sb2,  # strides of x (slot 0, slot 1)
    ta0, ta1, ta2, tb0, tb1, tb2,  # strides of x_dot (slot 0, slot 1)
    sc0, sc1, sc2, ss0, ss1, ss2,  # strides of cos, sin
    HAS_W: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_DY: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DX_DOT: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr,
):
    """Backward of (y, y_dot) of the fused QK-norm (+ RoPE), y = R(xh w), y_dot = R(xh_dot w), for row tiles pid,
    pid + P, ... of tensor `slot` (0: q, 1: k); grid (P, slots). Tangent rows are rows < n_tangent_rows (kt L1 L2).

    First the inverse rotation of both upstream gradients (ROPE; R^T: sin -> -sin):
        dz = R^T G (0 without HAS_DY),   dz' = R^T G' (0 off the tangent rows)
    then RMSNorm's tangent backward over the whole row (both halves of every pair), with xh = x rstd,
        m = mean(xh x_dot),  xh_dot = (x_dot - xh m) rstd,  p = dz w,  q = dz' w,  J u = rstd (u - xh mean(xh u)):
        DX_DOT = J q
        DX     = J p - rstd (mean(q xh_dot) xh + mean(q xh) xh_dot + m DX_DOT)
        DW_PART[slot, pid] = sum over the program's rows of dz xh + dz' xh_dot     (the host sums the partials)
    (the derivation is `rmsnorm._rmsnorm_tangent_bwd_kernel`'s). X, X_DOT, COS, SIN strided as in the forward; DY,
    DY_DOT, DX, DX_DOT contiguous. Math in ACC.
    """
    slot = tl.program_id(1)
    pid = tl.program_id(0)
    if slot == 0:
        DY, DYD, X, XD, W, DX, DXD = DY0, DYD0, X0, XD0, W0, DX0, DXD0
        s0, s1, s2, t0, t1, t2 = sa0, sa1, sa2, ta0, ta1, ta2
    else:
        DY, DYD, X, XD, W, DX, DXD = DY1, DYD1, X1, XD1, W1, DX1, DXD1
        s0, s1, s2, t0, t1, t2 = sb0, sb1, sb2, tb0, tb1, tb2
    i, c1, c2 = _pair_cols(HALF, BLOCK_H, INTERLEAVED)
    pair_ok = i < HALF
    D = 2 * HALF
    if HAS_W:
        w1 = tl.load(W + c1, mask=pair_ok, other=0.0).to(ACC)[None, :]
        w2 = tl.load(W + c2, mask=pair_ok, other=0.0).to(ACC)[None, :]
    else:
        w1 = 1.0
        w2 = 1.0
    dw1 = tl.zeros([BLOCK_H], dtype=ACC)
    dw2 = tl.zeros([BLOCK_H], dtype=ACC)
    n_tiles = tl.cdiv(n_rows, BLOCK_R)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & pair_ok[None, :]
        tmask = mask & (rows < n_tangent_rows)[:, None]
        r64, b, i1, i2 = _row_coords(rows, L1, L2)
        out = r64[:, None] * D
        if HAS_DY:
            dz1 = tl.load(DY + out + c1[None, :], mask=mask, other=0.0).to(ACC)
            dz2 = tl.load(DY + out + c2[None, :], mask=mask, other=0.0).to(ACC)
        else:
            dz1 = tl.zeros([BLOCK_R, BLOCK_H], dtype=ACC)
            dz2 = tl.zeros([BLOCK_R, BLOCK_H], dtype=ACC)
        dzd1 = tl.load(DYD + out + c1[None, :], mask=tmask, other=0.0).to(ACC)
        dzd2 = tl.load(DYD + out + c2[None, :], mask=tmask, other=0.0).to(ACC)
        if ROPE:
            cos = tl.load(COS + (b * sc0 + i1 * sc1 + i2 * sc2)[:, None] + i[None, :], mask=mask, other=0.0).to(ACC)
            sin = tl.load(SIN + (b * ss0 + i1 * ss1 + i2 * ss2)[:, None] + i[None, :], mask=mask, other=0.0).to(ACC)
            dz1, dz2 = dz1 * cos + dz2 * sin, dz2 * cos - dz1 * sin
            dzd1, dzd2 = dzd1 * cos + dzd2 * sin, dzd2 * cos - dzd1 * sin
        x_row = (b * s0 + i1 * s1 + i2 * s2)[:, None]
        t_row = (b * t0 + i1 * t1 + i2 * t2)[:, None]
        rstd = tl.load(RSTD + slot.to(tl.int64) * n_rows + rows, mask=row_ok, other=0.0)[:, None]
        xh1 = tl.load(X + x_row + c1[None, :], mask=mask, other=0.0).to(ACC) * rstd
        xh2 = tl.load(X + x_row + c2[None, :], mask=mask, other=0.0).to(ACC) * rstd
        xd1 = tl.load(XD + t_row + c1[None, :], mask=tmask, other=0.0).to(ACC)
        xd2 = tl.load(XD + t_row + c2[None, :], mask=tmask, other=0.0).to(ACC)
        proj = ((tl.sum(xh1 * xd1, axis=1) + tl.sum(xh2 * xd2, axis=1)) / D)[:, None]  # m
        xhd1 = (xd1 - xh1 * proj) * rstd
        xhd2 = (xd2 - xh2 * proj) * rstd
        q1 = dzd1 * w1
        q2 = dzd2 * w2
        mean_qxh = ((tl.sum(q1 * xh1, axis=1) + tl.sum(q2 * xh2, axis=1)) / D)[:, None]
        dxd1 = (q1 - xh1 * mean_qxh) * rstd
        dxd2 = (q2 - xh2 * mean_qxh) * rstd
        if COMPUTE_DX_DOT:
            tl.store(DXD + out + c1[None, :], round_to(dxd1, DXD.dtype.element_ty, RNE), mask=tmask)
            tl.store(DXD + out + c2[None, :], round_to(dxd2, DXD.dtype.element_ty, RNE), mask=tmask)
        if COMPUTE_DX:
            p1 = dz1 * w1
            p2 = dz2 * w2
            mean_pxh = ((tl.sum(p1 * xh1, axis=1) + tl.sum(p2 * xh2, axis=1)) / D)[:, None]
            mean_qxhd = ((tl.sum(q1 * xhd1, axis=1) + tl.sum(q2 * xhd2, axis=1)) / D)[:, None]
            dx1 = (p1 - xh1 * mean_pxh) * rstd - rstd * (mean_qxhd * xh1 + mean_qxh * xhd1 + proj * dxd1)
            dx2 = (p2 - xh2 * mean_pxh) * rstd - rstd * (mean_qxhd * xh2 + mean_qxh * xhd2 + proj * dxd2)
            tl.store(DX + out + c1[None, :], round_to(dx1, DX.dtype.element_ty, RNE), mask=mask)
            tl.store(DX + out + c2[None, :], round_to(dx2, DX.dtype.element_ty, RNE), mask=mask)
        if COMPUTE_DW:
            dw1 += tl.sum(dz1 * xh1 + dzd1 * xhd1, axis=0)
            dw2 += tl.sum(dz2 * xh2 + dzd2 * xhd2, axis=0)
    if COMPUTE_DW:
        part = (slot * n_programs + pid).to(tl.int64) * D
        tl.store(DW_PART + part + c1, dw1, mask=pair_ok)
        tl.store(DW_PART + part + c2, dw2, mask=pair_ok)


# -------------------------------------------------------------------------------------------------------- launchers
TILE_PAIRS = 2048  # BLOCK_R x BLOCK_H pairs per program: two (64, 32) halves for a head dim of 64


def _tile(half: int) -> tuple[int, int, int]:
    block_h = next_power_of_2(max(half, 1))
    block_r = max(1, min(64, TILE_PAIRS // block_h))
    return block_r, block_h, min(8, max(1, block_r * block_h // 256))


def _angles(cos, sin, shape):
    """cos / sin broadcast (as views) to shape[:-1] + (D/2,)."""
    target = tuple(shape[:-1]) + (shape[-1] // 2,)
    return cos.broadcast_to(target), sin.broadcast_to(target)


def pick(seq):
    """The two slots' values of a 1- or 2-tensor launch: slot 1 repeats slot 0 in a single-tensor launch (grid axis 1
    of size 1 never reads it)."""
    return seq[0], seq[-1]


def rope_fwd_launch(xs, x_dots, weights, cos, sin, *, eps: float, norm: bool, interleaved: bool):
    """One launch over 1 or 2 tensors of one shape (B, ..., D). Returns (ys, y_dots, rstd (slots, rows) or empty)."""
    shape = tuple(xs[0].shape)
    slots = len(xs)
    rope = cos is not None
    if rope:
        cos, sin = _angles(cos, sin, shape)
    tensors, layout = rows_for(shape, *xs, *x_dots, *((cos, sin) if rope else ()))
    xs, x_dots = list(tensors[:slots]), list(tensors[slots:2 * slots])
    if rope:
        cos, sin = tensors[2 * slots:]
    half = shape[-1] // 2
    n_rows = xs[0].numel() // shape[-1] if shape[-1] else 0
    x0 = xs[0]
    ys = [_runtime.new_output(shape, dtype=x0.dtype, device=x0.device) for _ in xs]
    y_dots = [_runtime.new_output(tuple(xd.shape), dtype=x0.dtype, device=x0.device) for xd in x_dots]
    has_w = norm and weights is not None
    rstd = _runtime.new_output((slots, n_rows) if norm else (0,),
                               dtype=_runtime.acc_dtype(*(t.dtype for t in (x0, *(weights or ())))),
                               device=x0.device)
    if n_rows:
        strides_x = [s for st in pick(layout.strides[:slots]) for s in st]
        strides_d = [s for st in pick(layout.strides[slots:2 * slots]) for s in st]
        angle_strides = [s for st in layout.strides[2 * slots:] for s in st] if rope else [0] * 6
        block_r, block_h, warps = _tile(half)
        w = pick(weights) if has_w else (x0, x0)
        _rope_jvp_fwd_kernel[(_runtime.cdiv(n_rows, block_r), slots)](
            *pick(xs), *pick(x_dots), *w, *pick(ys), *pick(y_dots), rstd if norm else x0,
            cos if rope else x0, sin if rope else x0,
            n_rows, x_dots[0].shape[0] * layout.rows_per_sample, *layout.sizes, half,
            *strides_x, *strides_d, *angle_strides, eps,
            NORM=norm, HAS_W=has_w, ROPE=rope, INTERLEAVED=interleaved, BLOCK_R=block_r, BLOCK_H=block_h,
            ACC=tl_acc_dtype(x0.dtype, *(t.dtype for t in (*(weights if has_w else ()), *((cos,) if rope else ())))),
            RNE=rne_bf16(x0.dtype), num_warps=warps,
        )
    return ys, y_dots, rstd


def rope_bwd_launch(grads, xs, weights, cos, sin, rstd, *, norm: bool, interleaved: bool, compute_dx: bool,
                    compute_dw: bool):
    """Backward over 1 or 2 tensors. grads: dL/dy (y's shape, any strides); xs: the forward's inputs (NORM only).
    Returns (dxs (contiguous, or empty if not compute_dx), dws (D,) per slot or None)."""
    shape = tuple(grads[0].shape)
    slots = len(grads)
    rope = cos is not None
    grads = [g.contiguous() for g in grads]
    if rope:
        cos, sin = _angles(cos, sin, shape)
    extra = (tuple(xs) if norm else ()) + ((cos, sin) if rope else ())
    assert extra, "a backward with neither NORM nor ROPE has nothing to do"
    tensors, layout = rows_for(shape, *extra)  # dy and dx are contiguous: only the strided inputs need a layout
    if norm:
        xs = list(tensors[:slots])
    if rope:
        cos, sin = tensors[-2:]
    half = shape[-1] // 2
    d = shape[-1]
    g0 = grads[0]
    n_rows = g0.numel() // d if d else 0
    has_w = norm and weights is not None
    compute_dw = compute_dw and has_w
    dxs = [_runtime.new_output(shape if compute_dx else (0,), dtype=g0.dtype, device=g0.device) for _ in grads]
    block_r, block_h, warps = _tile(half)
    n_tiles = _runtime.cdiv(n_rows, block_r)
    programs = partial_sum_programs(n_tiles, g0.device) if compute_dw else max(n_tiles, 1)
    dw_part = _runtime.new_output((slots, programs, d) if compute_dw else (0,),
                                  dtype=rstd.dtype if norm else torch.float32, device=g0.device)
    if n_rows and (compute_dx or compute_dw):
        strides_x = [s for st in pick(layout.strides[:slots]) for s in st] if norm else [0] * 6
        angle_strides = [s for st in layout.strides[-2:] for s in st] if rope else [0] * 6
        w = pick(weights) if has_w else (g0, g0)
        xs_arg = pick(xs) if norm else (g0, g0)
        _rope_bwd_kernel[(programs, slots)](
            *pick(grads), *xs_arg, *w, rstd if norm else g0, cos if rope else g0, sin if rope else g0,
            *pick(dxs), dw_part if compute_dw else g0,
            n_rows, *layout.sizes, half, programs, *strides_x, *angle_strides,
            NORM=norm, HAS_W=has_w, ROPE=rope, INTERLEAVED=interleaved, COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw,
            BLOCK_R=block_r, BLOCK_H=block_h,
            ACC=tl_acc_dtype(g0.dtype, *((rstd.dtype,) if norm else ()), *((cos.dtype,) if rope else ())),
            RNE=rne_bf16(g0.dtype), num_warps=warps,
        )
    if not compute_dw:
        return dxs, None
    if not n_rows:
        return dxs, [torch.zeros_like(w) for w in weights]
    return dxs, [dw_part[s].sum(0).to(weights[s].dtype) for s in range(slots)]


def norm_rope_tangent_bwd_launch(grads, grad_dots, xs, x_dots, weights, cos, sin, rstd, *, interleaved: bool,
                                 compute_dx: bool, compute_dx_dot: bool, compute_dw: bool):
    """The QK-norm (+ RoPE) tangent backward over 1 or 2 tensors of one shape. grads: dL/dy per slot, or None (no y took
    part); grad_dots: dL/dy_dot per slot (kt rows); xs, x_dots: the forward's inputs (any strides). Returns (dxs, dx_dots
    (contiguous, or empty if not asked for), dws (D,) per slot or None)."""
    shape = tuple(xs[0].shape)
    slots = len(xs)
    rope = cos is not None
    if rope:
        cos, sin = _angles(cos, sin, shape)
    grad_dots = [g.contiguous() for g in grad_dots]
    if grads is not None:
        grads = [g.contiguous() for g in grads]
    tensors, layout = rows_for(shape, *xs, *x_dots, *((cos, sin) if rope else ()))
    xs, x_dots = list(tensors[:slots]), list(tensors[slots:2 * slots])
    if rope:
        cos, sin = tensors[2 * slots:]
    half, d = shape[-1] // 2, shape[-1]
    x0 = xs[0]
    n_rows = x0.numel() // d if d else 0
    has_w = weights is not None
    compute_dw = compute_dw and has_w
    dxs = [_runtime.new_output(shape if compute_dx else (0,), dtype=x0.dtype, device=x0.device) for _ in xs]
    dx_dots = [_runtime.new_output(tuple(xd.shape) if compute_dx_dot else (0,), dtype=x0.dtype, device=x0.device)
               for xd in x_dots]
    block_r, block_h, warps = _tile(half)
    n_tiles = _runtime.cdiv(n_rows, block_r)
    programs = partial_sum_programs(n_tiles, x0.device) if compute_dw else max(n_tiles, 1)
    dw_part = _runtime.new_output((slots, programs, d) if compute_dw else (0,), dtype=rstd.dtype, device=x0.device)
    if n_rows and (compute_dx or compute_dx_dot or compute_dw):
        strides_x = [s for st in pick(layout.strides[:slots]) for s in st]
        strides_d = [s for st in pick(layout.strides[slots:2 * slots]) for s in st]
        angle_strides = [s for st in layout.strides[2 * slots:] for s in st] if rope else [0] * 6
        w = pick(weights) if has_w else (x0, x0)
        _norm_rope_tangent_bwd_kernel[(programs, slots)](
            *(pick(grads) if grads is not None else pick(grad_dots)), *pick(grad_dots), *pick(xs), *pick(x_dots), *w,
            rstd, cos if rope else x0, sin if rope else x0, *pick(dxs), *pick(dx_dots), dw_part if compute_dw else x0,
            n_rows, x_dots[0].shape[0] * layout.rows_per_sample, *layout.sizes, half, programs,
            *strides_x, *strides_d, *angle_strides,
            HAS_W=has_w, ROPE=rope, INTERLEAVED=interleaved, HAS_DY=grads is not None, COMPUTE_DX=compute_dx,
            COMPUTE_DX_DOT=compute_dx_dot, COMPUTE_DW=compute_dw, BLOCK_R=block_r, BLOCK_H=block_h,
            ACC=tl_acc_dtype(x0.dtype, rstd.dtype, *((cos.dtype,) if rope else ())), RNE=rne_bf16(x0.dtype),
            num_warps=warps,
        )
    if not compute_dw:
        return dxs, dx_dots, None
    if not n_rows:
        return dxs, dx_dots, [torch.zeros_like(w) for w in weights]
    return dxs, dx_dots, [dw_part[s].sum(0).to(weights[s].dtype) for s in range(slots)]


def tangent_angles(cos: torch.Tensor, sin: torch.Tensor, ndim: int, kt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The angles of the kt tangent rows: per-sample tables (as many dims as x, a batch dim of their own) are sliced
    to their first kt rows; shared ones broadcast as they are."""
    if cos.dim() == ndim and cos.shape[0] != 1:
        cos = cos[:kt]
    if sin.dim() == ndim and sin.shape[0] != 1:
        sin = sin[:kt]
    return cos, sin


# ----------------------------------------------------------------------------------------------------- registration
def _fwd_impl(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dot: torch.Tensor,
              interleaved: bool, tangent_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, y_dot) from the fused kernel."""
    (y,), (y_dot,), _ = rope_fwd_launch([x], [x_dot], None, cos, sin, eps=0.0, norm=False, interleaved=interleaved)
    return y, y_dot


def _fwd_fake(x, cos, sin, x_dot, interleaved, tangent_grad=False):
    return x.new_empty(x.shape), x.new_empty(x_dot.shape)


def _bwd_impl(grad_y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """dx = the inverse rotation of grad_y (contiguous, in grad_y's shape)."""
    empty = torch.empty(0, device=grad_y.device)
    (dx,), _ = rope_bwd_launch([grad_y], None, None, cos, sin, empty, norm=False, interleaved=interleaved,
                               compute_dx=True, compute_dw=False)
    return dx


def _bwd_fake(grad_y, cos, sin, interleaved):
    return grad_y.new_empty(grad_y.shape)


_bwd = FusedOp("rope_bwd", _bwd_impl, _bwd_fake,
               check=lambda grad_y, *_: _runtime.require_triton("rope_bwd", grad_y))


def _setup_context(ctx, inputs, output):
    x, cos, sin, _x_dot, interleaved, tangent_grad = inputs
    ctx.save_for_backward(cos, sin)  # a linear map: nothing else, with or without tangent_grad
    ctx.interleaved, ctx.tangent_grad, ctx.ndim = interleaved, tangent_grad, x.dim()
    if not tangent_grad:
        ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for y_dot


def _backward(ctx, grad_y, grad_y_dot):
    cos, sin = ctx.saved_tensors
    dx = dx_dot = None
    if grad_y is not None and ctx.needs_input_grad[0]:
        dx = _bwd(grad_y, cos, sin, ctx.interleaved)
    if ctx.tangent_grad and grad_y_dot is not None and grad_y_dot.shape[0] and ctx.needs_input_grad[3]:
        dx_dot = _bwd(grad_y_dot, *tangent_angles(cos, sin, ctx.ndim, grad_y_dot.shape[0]), ctx.interleaved)
    return dx, None, None, dx_dot, None, None


def _check_op_args(x, cos, sin, x_dot, interleaved, tangent_grad=False):
    check_rope_args(x, cos, sin, x_dot)
    _runtime.require_triton("rope_fwd", x)


_fwd = FusedOp("rope_fwd", _fwd_impl, _fwd_fake, setup_context=_setup_context, backward=_backward,
               check=_check_op_args)


# ----------------------------------------------------------------------------------------------------------- public
def rope_jvp(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dot: torch.Tensor,
             *, interleaved: bool = True, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of x with its tangent, fused (formulas and pairing in the module docstring).

    x: (B, ..., D), D even, any strides; cos, sin: broadcastable to x.shape[:-1] + (D/2,) (e.g. (N, D/2) for x of
    (B, H, N, D), (N, 1, D/2) for (B, N, H, D)), constants; x_dot: (kt, ..., D), kt <= B, strides of its own. Returns
    (y differentiable in x, y_dot detached, or with tangent_grad differentiable in x_dot: module docstring),
    contiguous in x's shape and dtype. Same contract and checks as `reference.rope_jvp_ref`, and cos / sin must not
    require grad; falls back to the reference (one warning) where Triton cannot run. The op is
    `torch.ops.mfkernels.rope_fwd`.
    """
    check_rope_args(x, cos, sin, x_dot)
    check_angles_constant(cos, sin)
    check_tangent_grad(tangent_grad)
    return _rope_jvp(x, cos, sin, x_dot, interleaved=interleaved, tangent_grad=tangent_grad)


def _rope_jvp(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dot: torch.Tensor,
              *, interleaved: bool = True, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_jvp on checked arguments."""
    if not _runtime.triton_can_run(x):
        _runtime.warn_fallback("rope_jvp", x)
        return _rope_jvp_ref(x, cos, sin, x_dot, interleaved=interleaved, tangent_grad=tangent_grad)
    return _fwd(x, cos, sin, x_dot, bool(interleaved), _runtime.tangent_grad_on(tangent_grad, x_dot))
