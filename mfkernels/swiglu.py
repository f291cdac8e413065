"""The SwiGLU MLP (LLaMA, iMF, LightningDiT) with its tangent: two stacked GEMMs and one fused gate kernel between.

    [h; h_dot] = [x; x_dot] [W1; W3]^T                          GEMM 1 (cuBLAS): gate and value weights stacked, primal
                                                                and tangent rows stacked: one GEMM for all four products
    a = h[:, :H] + b1,  b = h[:, H:] + b3                       (primal rows; biases optional)
    g = silu(a) b                                               } one fused kernel, writes [g; g_dot] stacked so that
    g_dot = silu'(a) a_dot b + silu(a) b_dot                    } GEMM 2 reads it with no concatenation
    y = g W2^T + b2,  y_dot = g_dot W2^T                        GEMM 2 (cuBLAS; two calls on the halves of [g; g_dot])

Memory: the backward saves x and the biased pre-activations [a | b] only (no tangent activation, and not g: the backward
kernel recomputes g while it forms da = dg b silu'(a), db = dg silu(a)). Without a gradient to compute (no_grad, or
inputs that need none) nothing is saved, and a backward that finds no saved [a | b] recomputes it (one GEMM).

Weights: w13 = [W1; W3] (2H, C), gate rows first, as one parameter (`mfkernels.nn.SwiGLU` holds it so); w2 (out, H).
Autocast: as `mlp_jvp`, x, x_dot, weights and biases are cast to the autocast dtype first; outside autocast all must
share x's dtype.

Gradients through the tangent (`tangent_grad`, rule in `_runtime.tangent_grad_on`; formulas in docs/design.md,
'Gradients through the tangent'): the primal gate kernel (`_swiglu_bwd_kernel`), then torch GEMMs and elementwise ops.
With G, G' the upstream gradients of y, y_dot and [a_dot | b_dot] = x_dot W13^T recomputed over the kt tangent rows:
    dg_dot = G' W2;  dW2 = G^T g + G'^T g_dot
    da_dot = dg_dot silu'(a) b,  db_dot = dg_dot silu(a)
    da += dg_dot (silu''(a) a_dot b + silu'(a) b_dot),  db += dg_dot silu'(a) a_dot      (tangent rows)
    dW13 = [da | db]^T x + [da_dot | db_dot]^T x_dot;  db13 = sum [da | db];  dx = [da | db] W13;
    dx_dot = [da_dot | db_dot] W13
(`swiglu_tangent_bwd`, op `mfkernels::swiglu_tangent_bwd`). Saved beyond the stop-gradient path: x_dot only.

Chain: `_swiglu_jvp_fwd_kernel` -> `swiglu_jvp_fwd()` -> op `mfkernels::swiglu_fwd` (backward `_swiglu_bwd_kernel` ->
`swiglu_bwd()` -> op `mfkernels::swiglu_bwd`, see `_library.FusedOp`) -> `swiglu_jvp()`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _runtime
from ._checks import check_params_match, check_swiglu_args, check_tangent_grad
from ._library import FusedOp
from ._triton import next_power_of_2, rne_bf16, round_to, silu_and_grad, tl, tl_acc_dtype, triton
from .mlp import two_gemm_jvp
from .reference import _swiglu_jvp_ref, silu_grad, silu_grad2

__all__ = ["swiglu_jvp"]


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _swiglu_jvp_fwd_kernel(
    H_, B13, G, AB,
    m, mt, hidden,
    HAS_BIAS: tl.constexpr, WRITE_AB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    RNE: tl.constexpr,
):
    """SiLU-gate epilogue of GEMM 1 on a tile of BLOCK_R rows x BLOCK_C hidden units; grid (cdiv(m, BLOCK_R),
    cdiv(hidden, BLOCK_C)). H_ is GEMM 1's output (m + mt, 2 hidden): primal rows then tangent rows.

        a = H_[r, c] + b1[c];  b = H_[r, hidden + c] + b3[c]            (r < m; B13 = [b1; b3])
        G[r, c] = silu(a) b;   AB[r, c] = a, AB[r, hidden + c] = b       (AB if WRITE_AB: saved for the backward)
        G[m + r, c] = silu'(a) H_[m + r, c] b + silu(a) H_[m + r, hidden + c]      (r < mt: tangent row r)
    The tangent row r belongs to primal row r (tangent rows are the first kt samples), so a, b are loaded once for both.
    """
    start = tl.program_id(0) * BLOCK_R
    rows = start + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < hidden
    mask = (rows < m)[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    in_a = r64 * (2 * hidden) + cols[None, :]
    a = tl.load(H_ + in_a, mask=mask, other=0.0).to(ACC)
    b = tl.load(H_ + in_a + hidden, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        a += tl.load(B13 + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        b += tl.load(B13 + hidden + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    silu_a, dsilu_a = silu_and_grad(a)
    tl.store(G + r64 * hidden + cols[None, :], round_to(silu_a * b, G.dtype.element_ty, RNE), mask=mask)
    if WRITE_AB:
        tl.store(AB + in_a, round_to(a, AB.dtype.element_ty, RNE), mask=mask)
        tl.store(AB + in_a + hidden, round_to(b, AB.dtype.element_ty, RNE), mask=mask)
    # Scalar branch: tiles past the tangent rows (most of them at kt = B/4) skip the tangent loads.
    if start < mt:
        tmask = mask & (rows < mt)[:, None]
        t_in = (r64 + m) * (2 * hidden) + cols[None, :]
        a_dot = tl.load(H_ + t_in, mask=tmask, other=0.0).to(ACC)
        b_dot = tl.load(H_ + t_in + hidden, mask=tmask, other=0.0).to(ACC)
        g_dot = dsilu_a * a_dot * b + silu_a * b_dot
        tl.store(G + (r64 + m) * hidden + cols[None, :], round_to(g_dot, G.dtype.element_ty, RNE), mask=tmask)


@triton.jit
def _swiglu_bwd_kernel(
    DG, AB, DAB, G,
    m, hidden,
    WRITE_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr,
):
    """Backward of g = silu(a) b on a tile; grid as the forward's. dg = dy W2 (m, hidden); AB = [a | b] (m, 2 hidden):

        DAB[r, c] = dg silu'(a) b,   DAB[r, hidden + c] = dg silu(a)
        G[r, c] = silu(a) b          (if WRITE_G: GEMM dW2 = dy^T g needs it; G may alias DG, each element is read
                                      before the same program overwrites it)
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < m)[:, None] & (cols < hidden)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    in_a = r64 * (2 * hidden) + cols[None, :]
    in_g = r64 * hidden + cols[None, :]
    a = tl.load(AB + in_a, mask=mask, other=0.0).to(ACC)
    b = tl.load(AB + in_a + hidden, mask=mask, other=0.0).to(ACC)
    dg = tl.load(DG + in_g, mask=mask, other=0.0).to(ACC)
    silu_a, dsilu_a = silu_and_grad(a)
    tl.store(DAB + in_a, round_to(dg * dsilu_a * b, DAB.dtype.element_ty, RNE), mask=mask)
    tl.store(DAB + in_a + hidden, round_to(dg * silu_a, DAB.dtype.element_ty, RNE), mask=mask)
    if WRITE_G:
        tl.store(G + in_g, round_to(silu_a * b, G.dtype.element_ty, RNE), mask=mask)


# -------------------------------------------------------------------------------------------------------- launchers
def _tile(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): 1024-element tiles, 128 hidden units wide (divides 2048 and 2730 -> 22 blocks
    with a masked tail), 8 elements per thread at 4 warps: 16-byte vector loads of 16-bit data."""
    block_c = min(next_power_of_2(hidden), 128)
    return max(1, 1024 // block_c), block_c, 4


def swiglu_jvp_fwd(x, w13, b13, w2, b2, x_dot, save_pre: bool):
    """Forward of the SwiGLU MLP and its tangent. Returns (y, y_dot, ab); ab = [a | b] (M, 2H) if save_pre else
    empty (0, 2H)."""
    lead, lead_t = x.shape[:-1], x_dot.shape[:-1]
    m, mt = math.prod(lead), math.prod(lead_t)
    c = x.shape[-1]
    hidden = w13.shape[0] // 2
    stacked = torch.cat([x.reshape(m, c), x_dot.reshape(mt, c)]) if mt else x.reshape(m, c)
    h = torch.mm(stacked, w13.t())  # GEMM 1: (m + mt, 2H); biases only on primal rows (in the kernel)
    del stacked
    g_stack = _runtime.new_output((m + mt, hidden), dtype=h.dtype, device=h.device)
    ab = _runtime.new_output((m if save_pre else 0, 2 * hidden), dtype=h.dtype, device=h.device)
    if m and hidden:
        block_r, block_c, warps = _tile(hidden)
        _swiglu_jvp_fwd_kernel[(_runtime.cdiv(m, block_r), _runtime.cdiv(hidden, block_c))](
            h, b13 if b13 is not None else h, g_stack, ab if save_pre else h, m, mt, hidden,
            HAS_BIAS=b13 is not None, WRITE_AB=save_pre, BLOCK_R=block_r, BLOCK_C=block_c,
            ACC=tl_acc_dtype(h.dtype), RNE=rne_bf16(h.dtype), num_warps=warps,
        )
    del h  # nothing of the tangent survives the forward
    # GEMM 2 as two calls over the two halves of [g; g_dot]: a custom op's outputs must not share storage (two views of
    # one (m + mt, out) product would), and the primal's call adds b2 in its epilogue (addmm) instead of a pass more.
    w2t = w2.t()
    y = torch.mm(g_stack[:m], w2t) if b2 is None else torch.addmm(b2, g_stack[:m], w2t)
    y_dot = torch.mm(g_stack[m:], w2t)
    return y.reshape(*lead, w2.shape[0]), y_dot.reshape(*lead_t, w2.shape[0]), ab


def _gate_bwd(dg, ab, write_g: bool):
    """The gate kernel on the primal rows: [da | db] = [dg silu'(a) b | dg silu(a)], and g over dg if write_g."""
    m, hidden = dg.shape
    dab = _runtime.new_output((m, 2 * hidden), dtype=ab.dtype, device=ab.device)
    if m and hidden:
        block_r, block_c, warps = _tile(hidden)
        _swiglu_bwd_kernel[(_runtime.cdiv(m, block_r), _runtime.cdiv(hidden, block_c))](
            dg, ab, dab, dg, m, hidden,
            WRITE_G=write_g, BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc_dtype(ab.dtype),
            RNE=rne_bf16(ab.dtype), num_warps=warps,
        )
    return dab


def swiglu_bwd(grad_y, x, ab, w13, b13, w2, has_b2: bool, need_dx: bool, need_dw: bool):
    """Backward of the primal. Returns (dx, dw13, db13, dw2, db2); those not needed (or of absent biases) are empty.

        dg = dy W2;  [da | db] (kernel, with g recomputed);  dW2 = dy^T g;  db2 = sum dy;
        dW13 = [da | db]^T x;  db13 = sum [da | db];  dx = [da | db] W13
    """
    c, out_features, hidden = x.shape[-1], w2.shape[0], w13.shape[0] // 2
    x2 = x.reshape(-1, c)
    m = x2.shape[0]
    if ab.shape[0] != m:  # nothing saved (the forward ran without a gradient to compute): recompute [a | b]
        ab = F.linear(x2, w13, b13)
    dy = grad_y.reshape(m, out_features).to(ab.dtype)
    dg = torch.mm(dy, w2)  # scratch: the kernel overwrites it with g when the weight gradients need g
    dab = _gate_bwd(dg, ab, need_dw)

    def empty():  # a fresh one each: a custom op's outputs must not alias each other
        return x.new_empty(0)

    dx = torch.mm(dab, w13).reshape(x.shape) if need_dx else empty()
    if not need_dw:
        return dx, empty(), empty(), empty(), empty()
    g = dg  # overwritten in place by the kernel
    return (dx, torch.mm(dab.t(), x2), dab.sum(0) if b13 is not None else empty(),
            torch.mm(dy.t(), g), dy.sum(0) if has_b2 else empty())


def swiglu_tangent_bwd(grad_y, grad_y_dot, x, x_dot, ab, w13, b13, w2, has_b2: bool, need_dx: bool,
                       need_dx_dot: bool, need_dw: bool):
    """Backward of a loss of (y, y_dot) (module docstring, 'Gradients through the tangent'). grad_y may be None (y
    unused). Returns (dx, dx_dot, dw13, db13, dw2, db2); those not needed (or of absent biases) are empty."""
    c, out_features, hidden = x.shape[-1], w2.shape[0], w13.shape[0] // 2
    x2, xd2 = x.reshape(-1, c), x_dot.reshape(-1, c)
    m, mt = x2.shape[0], xd2.shape[0]
    if ab.shape[0] != m:  # nothing saved: recompute [a | b]
        ab = F.linear(x2, w13, b13)
    dtype, acc = ab.dtype, _runtime.acc_dtype(ab.dtype)
    dyd = grad_y_dot.reshape(mt, out_features).to(dtype)
    hd = torch.mm(xd2.to(dtype), w13.t()).to(acc)  # [a_dot | b_dot], recomputed: the forward kept no tangent
    a_dot, b_dot = hd[:, :hidden], hd[:, hidden:]
    ak, bk = ab[:mt, :hidden].to(acc), ab[:mt, hidden:].to(acc)
    s, ds, d2s = F.silu(ak), silu_grad(ak), silu_grad2(ak)
    dg_dot = torch.mm(dyd, w2).to(acc)
    g_dot = (ds * a_dot * bk + s * b_dot).to(dtype)
    dab_dot = torch.cat([dg_dot * ds * bk, dg_dot * s], dim=1).to(dtype)
    if grad_y is not None:
        dy = grad_y.reshape(m, out_features).to(dtype)
        g = torch.mm(dy, w2)  # dg; the kernel overwrites it with g when the weight gradients need g
        dab = _gate_bwd(g, ab, need_dw)
    else:
        dy, g, dab = None, None, ab.new_zeros((m, 2 * hidden))
    dab[:mt, :hidden] += (dg_dot * (d2s * a_dot * bk + ds * b_dot)).to(dtype)
    dab[:mt, hidden:] += (dg_dot * ds * a_dot).to(dtype)

    def empty():  # a fresh one each: a custom op's outputs must not alias each other
        return x.new_empty(0)

    dx = torch.mm(dab, w13).reshape(x.shape) if need_dx else empty()
    dx_dot = torch.mm(dab_dot, w13).reshape(x_dot.shape) if need_dx_dot else empty()
    if not need_dw:
        return dx, dx_dot, empty(), empty(), empty(), empty()
    dw13 = torch.mm(dab.t(), x2) + torch.mm(dab_dot.t(), xd2.to(dtype))
    dw2 = torch.mm(dyd.t(), g_dot)
    if dy is not None:
        dw2 = dw2 + torch.mm(dy.t(), g)
    db2 = empty()
    if has_b2:
        db2 = dy.sum(0) if dy is not None else dyd.new_zeros((out_features,))
    return dx, dx_dot, dw13, dab.sum(0) if b13 is not None else empty(), dw2, db2


# ----------------------------------------------------------------------------------------------------- registration
def _fwd_impl(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
              x_dot: torch.Tensor, save_pre: bool,
              tangent_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, y_dot, [a | b] or empty) from GEMM 1, the fused gate kernel and GEMM 2."""
    return swiglu_jvp_fwd(x, w13, b13, w2, b2, x_dot, save_pre)


def _fwd_fake(x, w13, b13, w2, b2, x_dot, save_pre, tangent_grad=False):
    m = math.prod(x.shape[:-1]) if save_pre else 0
    out = w2.shape[0]
    return (x.new_empty((*x.shape[:-1], out)), x.new_empty((*x_dot.shape[:-1], out)),
            x.new_empty((m, w13.shape[0])))


def _bwd_impl(grad_y: torch.Tensor, x: torch.Tensor, ab: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor | None,
              w2: torch.Tensor, has_b2: bool, need_dx: bool, need_dw: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw13, db13, dw2, db2), each empty when not needed (or its bias is absent)."""
    return swiglu_bwd(grad_y, x, ab, w13, b13, w2, has_b2, need_dx, need_dw)


def _bwd_fake(grad_y, x, ab, w13, b13, w2, has_b2, need_dx, need_dw):
    def empty():
        return x.new_empty(0)

    dx = x.new_empty(x.shape) if need_dx else empty()
    if not need_dw:
        return dx, empty(), empty(), empty(), empty()
    return (dx, w13.new_empty(w13.shape), w13.new_empty((w13.shape[0],)) if b13 is not None else empty(),
            w2.new_empty(w2.shape), w2.new_empty((w2.shape[0],)) if has_b2 else empty())


_bwd = FusedOp("swiglu_bwd", _bwd_impl, _bwd_fake,
               check=lambda grad_y, x, *_: _runtime.require_triton("swiglu_bwd", x))


def _tangent_bwd_impl(grad_y: torch.Tensor | None, grad_y_dot: torch.Tensor, x: torch.Tensor, x_dot: torch.Tensor,
                      ab: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor | None, w2: torch.Tensor, has_b2: bool,
                      need_dx: bool, need_dx_dot: bool, need_dw: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dx_dot, dw13, db13, dw2, db2), each empty when not needed (or its bias is absent)."""
    return swiglu_tangent_bwd(grad_y, grad_y_dot, x, x_dot, ab, w13, b13, w2, has_b2, need_dx, need_dx_dot, need_dw)


def _tangent_bwd_fake(grad_y, grad_y_dot, x, x_dot, ab, w13, b13, w2, has_b2, need_dx, need_dx_dot, need_dw):
    def empty():
        return x.new_empty(0)

    dx = x.new_empty(x.shape) if need_dx else empty()
    dx_dot = x.new_empty(x_dot.shape) if need_dx_dot else empty()
    if not need_dw:
        return dx, dx_dot, empty(), empty(), empty(), empty()
    return (dx, dx_dot, w13.new_empty(w13.shape), w13.new_empty((w13.shape[0],)) if b13 is not None else empty(),
            w2.new_empty(w2.shape), w2.new_empty((w2.shape[0],)) if has_b2 else empty())


_tangent_bwd = FusedOp("swiglu_tangent_bwd", _tangent_bwd_impl, _tangent_bwd_fake,
                       check=lambda grad_y, grad_y_dot, x, *_: _runtime.require_triton("swiglu_tangent_bwd", x))


def _setup_context(ctx, inputs, output):
    x, w13, b13, w2, b2, x_dot, _save, tangent_grad = inputs
    _y, y_dot, ab = output
    ctx.has_b2 = b2 is not None
    ctx.tangent_grad = tangent_grad
    if tangent_grad:  # y_dot differentiable: the backward recomputes [a_dot | b_dot] from x_dot
        ctx.save_for_backward(x, ab, w13, b13, w2, x_dot)
        ctx.mark_non_differentiable(ab)
    else:
        ctx.save_for_backward(x, ab, w13, b13, w2)
        ctx.mark_non_differentiable(y_dot, ab)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for y_dot and ab


def _backward(ctx, grad_y, grad_y_dot, _grad_ab):
    need = ctx.needs_input_grad
    pick = lambda flag, g: g if flag else None  # noqa: E731
    if ctx.tangent_grad and grad_y_dot is not None and grad_y_dot.shape[0]:
        x, ab, w13, b13, w2, x_dot = ctx.saved_tensors
        dx, dx_dot, dw13, db13, dw2, db2 = _tangent_bwd(grad_y, grad_y_dot, x, x_dot, ab, w13, b13, w2, ctx.has_b2,
                                                        need[0], need[5], any(need[1:5]))
        return (pick(need[0], dx), pick(need[1], dw13), pick(need[2] and b13 is not None, db13), pick(need[3], dw2),
                pick(need[4] and ctx.has_b2, db2), pick(need[5], dx_dot), None, None)
    if grad_y is None:  # y took no part in what is differentiated
        return (None,) * 8
    x, ab, w13, b13, w2 = ctx.saved_tensors[:5]
    need_dx, need_dw = need[0], any(need[1:5])
    dx, dw13, db13, dw2, db2 = _bwd(grad_y, x, ab, w13, b13, w2, ctx.has_b2, need_dx, need_dw)
    return (pick(need[0], dx), pick(need[1], dw13), pick(need[2] and b13 is not None, db13), pick(need[3], dw2),
            pick(need[4] and ctx.has_b2, db2), None, None, None)


def _check_op_args(x, w13, b13, w2, b2, x_dot, save_pre, tangent_grad=False):
    check_swiglu_args(x, w13, b13, w2, b2, x_dot)
    check_params_match("SwiGLU", x, None, w13=w13, b13=b13, w2=w2, b2=b2)
    _runtime.require_triton("swiglu_fwd", x)


_fwd = FusedOp("swiglu_fwd", _fwd_impl, _fwd_fake, setup_context=_setup_context, backward=_backward,
               check=_check_op_args)


# ----------------------------------------------------------------------------------------------------------- public
def swiglu_jvp(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, x_dot: torch.Tensor, *,
               tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU MLP y = (silu(x W1^T + b1) * (x W3^T + b3)) W2^T + b2 with its tangent (module docstring).

    x: (B, ..., C); w13: (2H, C) = [W1; W3]; b13: (2H,) or None; w2: (out, H); b2: (out,) or None; x_dot: (kt, ..., C),
    kt <= B. Returns (y differentiable in x and the parameters, y_dot detached, or with tangent_grad differentiable in
    x, x_dot and the parameters: module docstring). Same contract and checks as
    `reference.swiglu_jvp_ref`; outside autocast the parameters must have x's dtype and device. Falls back to the
    reference (one warning) where Triton cannot run. The op is `torch.ops.mfkernels.swiglu_fwd`.
    """
    check_swiglu_args(x, w13, b13, w2, b2, x_dot)
    check_tangent_grad(tangent_grad)
    if _runtime.triton_can_run(x):  # the reference takes mixed dtypes as torch does
        check_params_match("SwiGLU", x, _runtime.autocast_dtype(x), w13=w13, b13=b13, w2=w2, b2=b2)
    return _swiglu_jvp(x, w13, b13, w2, b2, x_dot, tangent_grad=tangent_grad)


def _swiglu_jvp(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, x_dot: torch.Tensor, *,
                tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """swiglu_jvp on checked arguments."""
    return two_gemm_jvp("swiglu_jvp", _fwd, _swiglu_jvp_ref, x, w13, b13, w2, b2, x_dot, tangent_grad)
