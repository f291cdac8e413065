"""The adaLN-Zero gated residual with its tangent, fused: `x + gate * f` of the DiT block.

    y = x + gate f                           gate: (B, C), broadcast over the N tokens of each sample
    y_dot = x_dot + gate_dot f + gate f_dot  (first kt samples only)

Forward: one elementwise kernel over (token rows, feature blocks) tiles, writing y and, for tangent rows, y_dot.
Backward (primal only): dx = dy (returned as is, no copy); df = gate dy and dgate = sum over tokens of dy f as torch ops
(see gated_residual_bwd).

Dtypes: as in the reference, x, gate and f may differ (the usual autocast case: an fp32 residual stream x, bf16 gate and
branch output f); y and y_dot have their promoted dtype, math in fp32 (fp64 if any input is fp64). Each tangent must
have its primal's dtype.

Gradients through the tangent (`tangent_grad`, rule in `_runtime.tangent_grad_on`): torch elementwise ops and token
sums, no kernel of their own (`gated_residual_tangent_bwd`). With G, G' the upstream gradients of y, y_dot:
    dx_dot = G';  df_dot = gate G';  dgate_dot = sum over tokens of G' f
    df += gate_dot G',  dgate += sum over tokens of G' f_dot      (tangent rows)
Saved beyond the stop-gradient path: gate_dot and f_dot. A gate broadcast over the batch (a stride-0 view, iMF's
scaled residual) gets its gradient summed by autograd's expand backward.

Chain: `_gated_residual_jvp_fwd_kernel` -> `gated_residual_jvp_fwd()` -> op `mfkernels::gated_residual_fwd`
-> `gated_residual_jvp()`; backward `gated_residual_bwd()` (torch ops, traced by torch.compile as they are).
"""
from __future__ import annotations

import torch

from . import _runtime
from ._checks import check_gated_residual_args, check_tangent_grad
from ._library import FusedOp
from ._triton import next_power_of_2, row_stride, tl, tl_acc_dtype, triton
from .reference import _gated_residual_jvp_ref

__all__ = ["gated_residual_jvp"]


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _gated_residual_jvp_fwd_kernel(
    X, GATE, F, X_DOT, GATE_DOT, F_DOT,  # (B*N, C), (B, C), (B*N, C), (kt*N, C), (kt, C), (kt*N, C)
    Y, Y_DOT,                            # (B*N, C), (kt*N, C)
    n_rows, n_tangent_rows, N, C, stride_gate, stride_gate_dot,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Tile of BLOCK_R token rows x BLOCK_C features; grid (cdiv(B*N, BLOCK_R), cdiv(C, BLOCK_C)); b = row // N.

        y = x + gate[b] f
        y_dot = x_dot + gate_dot[b] f + gate[b] f_dot      for rows < kt*N (tangent rows are the first kt samples)
    f and gate are loaded once for both. Math in ACC.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < C)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    b = rows // N
    goffs = b[:, None] * stride_gate + cols[None, :]

    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    f = tl.load(F + offs, mask=mask, other=0.0).to(ACC)
    gate = tl.load(GATE + goffs, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, (x + gate * f).to(Y.dtype.element_ty), mask=mask)

    # Scalar branch: tiles past the tangent rows skip the tangent loads.
    if tl.program_id(0) * BLOCK_R < n_tangent_rows:
        tmask = mask & (rows < n_tangent_rows)[:, None]
        x_dot = tl.load(X_DOT + offs, mask=tmask, other=0.0).to(ACC)
        f_dot = tl.load(F_DOT + offs, mask=tmask, other=0.0).to(ACC)
        gate_dot = tl.load(GATE_DOT + b[:, None] * stride_gate_dot + cols[None, :], mask=tmask, other=0.0).to(ACC)
        y_dot = x_dot + gate_dot * f + gate * f_dot
        tl.store(Y_DOT + offs, y_dot.to(Y_DOT.dtype.element_ty), mask=tmask)


# -------------------------------------------------------------------------------------------------------- launchers
def _tile(c: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the forward: 128-wide column blocks divide the DiT widths (768, 1024, 1152)
    exactly; 16 rows make 2048-element tiles, 8 per thread at 8 warps (one 16-byte load per 16-bit tensor). Bigger
    tiles (32 x 128) compile to ~160 registers on sm_90, one block per SM: too little memory parallelism."""
    block_c = min(next_power_of_2(c), 128)
    block_r = max(1, 2048 // block_c)
    return block_r, block_c, 8


def gated_residual_jvp_fwd(x, gate, f, x_dot, gate_dot, f_dot) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, c = x.shape
    kt = x_dot.shape[0]
    out_dtype = _runtime.promote(x.dtype, gate.dtype, f.dtype)
    x, f, x_dot, f_dot = x.contiguous(), f.contiguous(), x_dot.contiguous(), f_dot.contiguous()
    gate, s_gate = row_stride(gate)
    gate_dot, s_gate_dot = row_stride(gate_dot)
    y = _runtime.new_output(x.shape, dtype=out_dtype, device=x.device)
    y_dot = _runtime.new_output(x_dot.shape, dtype=out_dtype, device=x.device)
    rows = batch * tokens
    if rows and c:
        block_r, block_c, warps = _tile(c)
        grid = (_runtime.cdiv(rows, block_r), _runtime.cdiv(c, block_c))
        _gated_residual_jvp_fwd_kernel[grid](
            x, gate, f, x_dot, gate_dot, f_dot, y, y_dot,
            rows, kt * tokens, tokens, c, s_gate, s_gate_dot,
            BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc_dtype(x.dtype, gate.dtype, f.dtype), num_warps=warps,
        )
    return y, y_dot


def gated_residual_bwd(grad_y, gate, f, compute_df: bool, compute_dgate: bool):
    """Returns (df or None, dgate or None): df = gate dy, dgate = sum over tokens of dy f; dx = dy needs nothing.

    Plain torch ops on purpose: at DiT-B and DiT-XL widths on an H200 the eager product and token reduction were
    faster than a Triton partial-sum kernel (bench/results/h200-2026-11-26/NOTES.md, the gated-residual rows).
    """
    df = (grad_y * gate[:, None, :]).to(f.dtype) if compute_df else None
    dgate = None
    if compute_dgate:
        acc = _runtime.acc_dtype(grad_y.dtype, f.dtype)
        dgate = (grad_y * f).sum(1, dtype=acc).to(gate.dtype)  # products as eager autograd, fp32 accumulation
    return df, dgate


def gated_residual_tangent_bwd(grad_y, grad_y_dot, gate, f, gate_dot, f_dot, x_dtype: torch.dtype,
                               x_dot_dtype: torch.dtype, need: tuple[bool, ...]):
    """Gradients of a loss of (y, y_dot) (module docstring), in the order of the op's inputs (x, gate, f, x_dot,
    gate_dot, f_dot); None where not needed. grad_y may be None (y unused)."""
    kt = grad_y_dot.shape[0]
    acc = _runtime.acc_dtype(grad_y_dot.dtype, f.dtype, f_dot.dtype)
    gyd = grad_y_dot.to(acc)
    dx = dgate = df = None
    if grad_y is not None:
        if need[0]:
            dx = grad_y if grad_y.dtype == x_dtype else grad_y.to(x_dtype)
        df, dgate = gated_residual_bwd(grad_y, gate, f, need[2], need[1])
    if need[1]:  # the tangent rows' share of dgate: sum over tokens of G' f_dot
        extra = (gyd * f_dot.to(acc)).sum(1)
        if dgate is None:
            dgate = gate.new_zeros(gate.shape)
        dgate[:kt] += extra.to(gate.dtype)  # dgate is a fresh tensor: added in place
    if need[2]:  # df's tangent rows: + gate_dot G'
        extra = (gyd * gate_dot.to(acc)[:, None, :]).to(f.dtype)
        if df is None:
            df = f.new_zeros(f.shape)
        df[:kt] += extra
    dx_dot = grad_y_dot.to(x_dot_dtype) if need[3] else None
    dgate_dot = (gyd * f[:kt].to(acc)).sum(1).to(gate_dot.dtype) if need[4] else None
    df_dot = (gyd * gate[:kt].to(acc)[:, None, :]).to(f_dot.dtype) if need[5] else None
    return dx, dgate, df, dx_dot, dgate_dot, df_dot


# ----------------------------------------------------------------------------------------------------- registration
def _fwd_impl(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor, x_dot: torch.Tensor, gate_dot: torch.Tensor,
              f_dot: torch.Tensor, tangent_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_jvp_fwd(x, gate, f, x_dot, gate_dot, f_dot)


def _fwd_fake(x, gate, f, x_dot, gate_dot, f_dot, tangent_grad=False):
    out_dtype = _runtime.promote(x.dtype, gate.dtype, f.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x_dot.shape, dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    x, gate, f, x_dot, gate_dot, f_dot, tangent_grad = inputs
    ctx.x_dtype, ctx.x_dot_dtype = x.dtype, x_dot.dtype
    ctx.tangent_grad = tangent_grad
    if tangent_grad:  # y_dot differentiable: its backward needs the tangents of the gate and the branch
        ctx.save_for_backward(gate, f, gate_dot, f_dot)
    else:
        ctx.save_for_backward(gate, f)  # df needs gate, dgate needs f; nothing of the tangents is kept
        ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for y_dot (a launch and a write per call)


def _backward(ctx, grad_y, grad_y_dot):
    """dx = dy (in x's dtype), df = gate dy, dgate = sum over tokens of dy f (torch ops, see gated_residual_bwd);
    with a gradient of y_dot too, gated_residual_tangent_bwd."""
    if ctx.tangent_grad and grad_y_dot is not None and grad_y_dot.shape[0]:
        gate, f, gate_dot, f_dot = ctx.saved_tensors
        return gated_residual_tangent_bwd(grad_y, grad_y_dot, gate, f, gate_dot, f_dot, ctx.x_dtype, ctx.x_dot_dtype,
                                          ctx.needs_input_grad[:6]) + (None,)
    gate, f = ctx.saved_tensors[:2]
    need_dx, need_dgate, need_df = ctx.needs_input_grad[:3]
    grad_x = grad_gate = grad_f = None
    if grad_y is None:  # y took no part in what is differentiated
        return (None,) * 7
    if need_dx:  # y = x + ...: dy is dx (in x's dtype if the output dtype was promoted)
        grad_x = grad_y if grad_y.dtype == ctx.x_dtype else grad_y.to(ctx.x_dtype)
    if need_dgate or need_df:
        grad_f, grad_gate = gated_residual_bwd(grad_y, gate, f, need_df, need_dgate)
    return grad_x, grad_gate, grad_f, None, None, None, None


def _check_op_args(x, gate, f, x_dot, gate_dot, f_dot, tangent_grad=False):
    check_gated_residual_args(x, gate, f, x_dot, gate_dot, f_dot)
    _runtime.require_triton("gated_residual_fwd", x)


_fwd = FusedOp("gated_residual_fwd", _fwd_impl, _fwd_fake, setup_context=_setup_context, backward=_backward,
               check=_check_op_args)


# ----------------------------------------------------------------------------------------------------------- public
def gated_residual_jvp(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor,
                       x_dot: torch.Tensor, gate_dot: torch.Tensor, f_dot: torch.Tensor, *,
                       tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x + gate f (differentiable in x, gate, f);  y_dot = x_dot + gate_dot f + gate f_dot (detached, or with
    tangent_grad differentiable in every input: module docstring).

    x, f: (B, N, C); gate: (B, C); x_dot, f_dot: (kt, N, C); gate_dot: (kt, C); kt <= B. Same contract and checks as
    `reference.gated_residual_jvp_ref` (mixed dtypes of x, gate, f allowed; outputs in the promoted dtype); falls back
    to it (one warning) where Triton cannot run. The op is `torch.ops.mfkernels.gated_residual_fwd`.
    """
    check_gated_residual_args(x, gate, f, x_dot, gate_dot, f_dot)
    check_tangent_grad(tangent_grad)
    return _gated_residual_jvp(x, gate, f, x_dot, gate_dot, f_dot, tangent_grad=tangent_grad)


def _gated_residual_jvp(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor, x_dot: torch.Tensor,
                        gate_dot: torch.Tensor, f_dot: torch.Tensor, *,
                        tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gated_residual_jvp on checked arguments."""
    if not _runtime.triton_can_run(x):
        _runtime.warn_fallback("gated_residual_jvp", x)
        return _gated_residual_jvp_ref(x, gate, f, x_dot, gate_dot, f_dot, tangent_grad=tangent_grad)
    return _fwd(x, gate, f, x_dot, gate_dot, f_dot, _runtime.tangent_grad_on(tangent_grad, x_dot, gate_dot, f_dot))
