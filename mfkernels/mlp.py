"""Linear layers and the DiT MLP (Linear -> GELU(tanh) -> Linear) with their tangents.

    linear:  y = x W^T + b  (one addmm: cuBLAS applies the bias in its epilogue),  y_dot = x_dot W^T  (one mm)
    mlp:     h = x W1^T, h_dot = x_dot W1^T                                  (GEMM 1, two cuBLAS calls)
             a = h + b1;  g = gelu(a);  g_dot = gelu'(a) h_dot               (one fused kernel, bias included)
             y = g W2^T + b2,  y_dot = g_dot W2^T                            (GEMM 2, addmm + mm)

Primal and tangent rows go through separate GEMMs (same weight), not one GEMM over the stacked rows [x; x_dot] as
`reference.linear_jvp_ref` does: the stacking costs a concatenation (a copy of x and x_dot) and a separate bias add,
three launches where two do, and a custom op may not return two views of one output buffer.

The linear is plain torch (F.linear for y, with autograd; a no-grad F.linear for y_dot): it launches no Triton kernel,
so it needs no custom op. torch.compile traces it, and eager autograd handles its backward in C++.

The MLP is one custom op, `mfkernels::mlp_fwd`, because its memory is the point: it saves x and the GEMM output h only
(no tangent activation, and not g: the backward recomputes g = gelu(h + b1) in the same kernel that forms
da = dg gelu'(h + b1), `mfkernels::gelu_tanh_bias_bwd`), against x, a and g for an unfused chain.

Autocast: under torch.autocast (CUDA, or CPU in tests) both ops cast x, x_dot, the weights and biases to the autocast
dtype first (differentiably, as autocast does for F.linear: `_runtime.autocast_cast`), so y and y_dot share that dtype
and the parameter gradients come back in the parameters' dtype. The references do not cast: under autocast
`reference.linear_jvp_ref` returns y in fp32 and y_dot in bf16, and `reference.mlp_jvp_ref` raises (its GELU gets
mixed dtypes); so the fused ops cast before they fall back to them. Without autocast all must share a dtype.

Gradients through the tangent (`tangent_grad`, rule in `_runtime.tangent_grad_on`; formulas in docs/design.md,
'Gradients through the tangent'): torch GEMMs and elementwise ops, no kernel of their own.
    linear:  y_dot = F.linear(x_dot, W) recorded by autograd: dx_dot = G' W, dW += G'^T x_dot.
    mlp:     with G, G' the upstream gradients of y, y_dot, a = h + b1 and h_dot = x_dot W1^T (recomputed in the
             backward: one GEMM over the kt tangent rows, rather than keeping a tangent activation of the hidden width):
             dg_dot = G' W2;  dW2 = G^T g + G'^T g_dot,  g_dot = gelu'(a) h_dot
             dh_dot = dg_dot gelu'(a);  da = dg gelu'(a) + dg_dot gelu''(a) h_dot (tangent rows)
             dW1 = da^T x + dh_dot^T x_dot;  db1 = sum da;  dx = da W1;  dx_dot = dh_dot W1
             Saved beyond the stop-gradient path: x_dot only. Without tangent_grad nothing changes.

Chain: `_act_jvp_fwd_kernel` (activations.py, with a fused bias) -> `mlp_jvp_fwd()` -> op `mfkernels::mlp_fwd`
(backward: torch GEMMs around `_act_bwd_kernel` -> op `mfkernels::gelu_tanh_bias_bwd`) -> `mlp_jvp()`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _runtime
from ._checks import check_linear_args, check_mlp_args, check_params_match, check_tangent_grad
from ._library import FusedOp
from ._triton import ACT_GELU_TANH
from .activations import act_bwd, act_jvp_fwd
from .reference import _mlp_jvp_ref, gelu_tanh_grad, gelu_tanh_grad2

__all__ = ["linear_jvp", "mlp_jvp"]


# -------------------------------------------------------------------------------------------------------- launchers
def mlp_jvp_fwd(x, w1, b1, w2, b2, x_dot, save_for_backward: bool):
    """Forward of the MLP and its tangent. Returns (y, y_dot, h); h = x W1^T (B*N, hidden) when saving, else empty."""
    lead, lead_t = x.shape[:-1], x_dot.shape[:-1]
    m, mt = math.prod(lead), math.prod(lead_t)
    c = x.shape[-1]
    h = torch.mm(x.reshape(m, c), w1.t())  # GEMM 1, primal rows; b1 is added in the activation kernel
    h_dot = torch.mm(x_dot.reshape(mt, c), w1.t()) if mt else h[:0]
    g, g_dot = act_jvp_fwd(h, h_dot, ACT_GELU_TANH, bias=b1)
    del h_dot  # nothing of the tangent survives the forward
    y = torch.mm(g, w2.t()) if b2 is None else torch.addmm(b2, g, w2.t())  # GEMM 2
    y_dot = torch.mm(g_dot, w2.t()) if mt else g_dot.new_empty((0, w2.shape[0]))
    saved = h if save_for_backward else h.new_empty((0,))
    return y.reshape(*lead, w2.shape[0]), y_dot.reshape(*lead_t, w2.shape[0]), saved


# ----------------------------------------------------------------------------------------------------- registration
def _gelu_bias_bwd_impl(h: torch.Tensor, b1: torch.Tensor | None, dg: torch.Tensor, write_da: bool,
                        write_g: bool) -> torch.Tensor:
    """With a = h + b1: dg <- dg gelu'(a) in place (if write_da), and returns g = gelu(a) (if write_g, else empty)."""
    _, g = act_bwd(h, dg, ACT_GELU_TANH, bias=b1, write_da=write_da, write_g=write_g, in_place=True)
    return g if write_g else h.new_empty((0,))


def _gelu_bias_bwd_fake(h, b1, dg, write_da, write_g):
    return h.new_empty(h.shape if write_g else (0,))


_gelu_bias_bwd = FusedOp("gelu_tanh_bias_bwd", _gelu_bias_bwd_impl, _gelu_bias_bwd_fake, mutates_args=("dg",))


def _mlp_fwd_impl(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                  b2: torch.Tensor | None, x_dot: torch.Tensor, save_for_backward: bool,
                  tangent_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlp_jvp_fwd(x, w1, b1, w2, b2, x_dot, save_for_backward)


def _mlp_fwd_fake(x, w1, b1, w2, b2, x_dot, save_for_backward, tangent_grad=False):
    out = w2.shape[0]
    h_shape = (math.prod(x.shape[:-1]), w1.shape[0]) if save_for_backward else (0,)
    return (x.new_empty((*x.shape[:-1], out)), x.new_empty((*x_dot.shape[:-1], out)), x.new_empty(h_shape))


def _mlp_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, x_dot, _, tangent_grad = inputs
    ctx.has_b2 = b2 is not None
    ctx.tangent_grad = tangent_grad
    if tangent_grad:  # y_dot differentiable: the backward recomputes h_dot from x_dot
        ctx.save_for_backward(x, output[2], w1, b1, w2, x_dot)
        ctx.mark_non_differentiable(output[2])
    else:
        ctx.save_for_backward(x, output[2], w1, b1, w2)
        ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for y_dot and h (a launch and a write each)


def _mlp_tangent_backward(ctx, grad_y, grad_y_dot):
    """Gradients of a loss of (y, y_dot) (module docstring, 'Gradients through the tangent'): the primal kernel
    forms g and dg gelu'(a) for every row, torch ops add the tangent rows' terms, then one GEMM per gradient."""
    x, h, w1, b1, w2, x_dot = ctx.saved_tensors
    need_x, need_w1, need_b1, need_w2, need_b2, need_x_dot = ctx.needs_input_grad[:6]
    x2, xd2 = x.reshape(-1, x.shape[-1]), x_dot.reshape(-1, x_dot.shape[-1])
    mt = xd2.shape[0]
    acc = _runtime.acc_dtype(h.dtype)
    dyd = grad_y_dot.reshape(mt, -1).to(h.dtype)
    h_dot = torch.mm(xd2.to(h.dtype), w1.t())  # recomputed: the forward kept no tangent activation
    ak = h[:mt].to(acc) + (b1.to(acc) if b1 is not None else 0.0)
    dg_dot = torch.mm(dyd, w2).to(acc)
    g_dot = (gelu_tanh_grad(ak) * h_dot.to(acc)).to(h.dtype)
    dh_dot = (dg_dot * gelu_tanh_grad(ak)).to(h.dtype)
    if grad_y is not None:
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(h.dtype)
        da = torch.mm(dy, w2)  # dg, overwritten by da (and g returned) in one kernel
        g = _gelu_bias_bwd(h, b1, da, True, True)
    else:
        dy, g, da = None, None, torch.zeros_like(h)
    da[:mt] += (dg_dot * gelu_tanh_grad2(ak) * h_dot.to(acc)).to(h.dtype)
    dx = torch.mm(da, w1).reshape(x.shape) if need_x else None
    dx_dot = torch.mm(dh_dot, w1).reshape(x_dot.shape) if need_x_dot else None
    dw1 = (torch.mm(da.t(), x2) + torch.mm(dh_dot.t(), xd2)) if need_w1 else None
    db1 = da.sum(0) if need_b1 and b1 is not None else None
    dw2 = None
    if need_w2:
        dw2 = torch.mm(dyd.t(), g_dot)
        if dy is not None:
            dw2 = dw2 + torch.mm(dy.t(), g)
    db2 = dy.sum(0) if need_b2 and ctx.has_b2 and dy is not None else None
    if need_b2 and ctx.has_b2 and dy is None:
        db2 = torch.zeros_like(dyd[0])
    return dx, dw1, db1, dw2, db2, dx_dot, None, None


def _mlp_backward(ctx, grad_y, grad_y_dot, _grad_h):
    """dW2 = dy^T g, db2 = sum dy, dg = dy W2; [g = gelu(a), da = dg gelu'(a)] in one kernel (da overwrites dg);
    dW1 = da^T x, db1 = sum da, dx = da W1   (a = h + b1, dy = grad_y as (M, out))."""
    if ctx.tangent_grad and grad_y_dot is not None and grad_y_dot.shape[0]:
        return _mlp_tangent_backward(ctx, grad_y, grad_y_dot)
    if grad_y is None:  # y took no part in what is differentiated
        return (None,) * 8
    x, h, w1, b1, w2 = ctx.saved_tensors[:5]
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    need_b1 = need_b1 and b1 is not None
    need_b2 = need_b2 and ctx.has_b2
    dy = grad_y.reshape(-1, grad_y.shape[-1]).to(h.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    need_da = need_x or need_w1 or need_b1
    dx = dw1 = db1 = dw2 = db2 = None
    if need_da or need_w2:
        da = torch.mm(dy, w2) if need_da else h.new_empty((0,))  # dg, overwritten by da
        g = _gelu_bias_bwd(h, b1, da, need_da, need_w2)
        if need_w2:
            dw2 = torch.mm(dy.t(), g)
        if need_w1:
            dw1 = torch.mm(da.t(), x2)
        if need_b1:
            db1 = da.sum(0)
        if need_x:
            dx = torch.mm(da, w1).reshape(x.shape)
    if need_b2:
        db2 = dy.sum(0)
    return dx, dw1, db1, dw2, db2, None, None, None


def _check_mlp_op(x, w1, b1, w2, b2, x_dot, save_for_backward, tangent_grad=False):
    check_mlp_args(x, w1, w2, x_dot)
    check_params_match("MLP", x, None, w1=w1, b1=b1, w2=w2, b2=b2)
    _runtime.require_triton("mlp_fwd", x)


_mlp_fwd = FusedOp("mlp_fwd", _mlp_fwd_impl, _mlp_fwd_fake, setup_context=_mlp_setup_context,
                   backward=_mlp_backward, check=_check_mlp_op)


# ----------------------------------------------------------------------------------------------------------- public
def linear_jvp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               x_dot: torch.Tensor, *, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b (differentiable in x, W, b);  y_dot = x_dot W^T (detached; with tangent_grad differentiable in
    x_dot and W: module docstring).

    x: (B, ..., in), x_dot: (kt, ..., in), W: (out, in). Same checks as `reference.linear_jvp_ref`. Two GEMMs on one
    weight (cuBLAS through torch, so it runs on any device: no fallback needed; no GEMM at all for kt = 0). Under
    autocast the inputs are cast to the autocast dtype first, so y and y_dot share one dtype.
    """
    check_linear_args(x, weight, x_dot)
    check_tangent_grad(tangent_grad)
    return _linear_jvp(x, weight, bias, x_dot, tangent_grad=tangent_grad)


def _linear_jvp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                x_dot: torch.Tensor, *, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_jvp on checked arguments."""
    x, weight, bias, x_dot = _runtime.autocast_cast(_runtime.autocast_dtype(x), x, weight, bias, x_dot)
    y = F.linear(x, weight, bias)
    with torch.set_grad_enabled(_runtime.tangent_grad_on(tangent_grad, x_dot)):
        y_dot = F.linear(x_dot, weight)
    return y, y_dot


def mlp_jvp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
            x_dot: torch.Tensor, *, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear(w1, b1) -> GELU(tanh) -> Linear(w2, b2) with its tangent (see the module docstring).

    x: (B, ..., in), x_dot: (kt, ..., in), w1: (hidden, in), w2: (out, hidden). Returns (y differentiable in x and the
    parameters, y_dot detached, or with tangent_grad differentiable in x, x_dot and the parameters). Same contract and
    checks as `reference.mlp_jvp_ref`; outside autocast the parameters must have x's dtype and device. Falls back to
    the reference (one warning) where Triton cannot run. The op is `torch.ops.mfkernels.mlp_fwd` (what torch.compile
    records).
    """
    check_mlp_args(x, w1, w2, x_dot)
    check_tangent_grad(tangent_grad)
    if _runtime.triton_can_run(x):  # the reference takes mixed dtypes as torch does
        check_params_match("MLP", x, _runtime.autocast_dtype(x), w1=w1, b1=b1, w2=w2, b2=b2)
    return _mlp_jvp(x, w1, b1, w2, b2, x_dot, tangent_grad=tangent_grad)


def _mlp_jvp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
             x_dot: torch.Tensor, *, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mlp_jvp on checked arguments."""
    return two_gemm_jvp("mlp_jvp", _mlp_fwd, _mlp_jvp_ref, x, w1, b1, w2, b2, x_dot, tangent_grad)


def two_gemm_jvp(name: str, fused: FusedOp, reference, x, w_in, b_in, w_out, b_out, x_dot,
                 tangent_grad: bool | None = None):
    """The MLP-shaped ops (mlp_jvp, swiglu_jvp) on checked arguments: the autocast casts first (also before the
    fallback: the references do not cast), the reference where Triton cannot run, else the fused op, which saves for
    its backward only when a gradient is wanted."""
    x, w_in, b_in, w_out, b_out, x_dot = _runtime.autocast_cast(_runtime.autocast_dtype(x), x, w_in, b_in, w_out,
                                                                b_out, x_dot)
    if not _runtime.triton_can_run(x):
        _runtime.warn_fallback(name, x)
        return reference(x, w_in, b_in, w_out, b_out, x_dot, tangent_grad=tangent_grad)
    tangent_grad = _runtime.tangent_grad_on(tangent_grad, x_dot)
    save = _runtime.wants_grad(x, w_in, b_in, w_out, b_out, *((x_dot,) if tangent_grad else ()))
    y, y_dot, _ = fused(x, w_in, b_in, w_out, b_out, x_dot, save, tangent_grad)
    return y, y_dot
