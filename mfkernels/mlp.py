"""Linear layers and the DiT MLP (Linear -> GELU(tanh) -> Linear) with their tangents.

    linear:  y = x W^T + b,  y_dot = x_dot W^T                  (one GEMM over the stacked rows [x; x_dot])
    mlp:     h = [x; x_dot] W1^T                                (GEMM 1, cuBLAS through torch)
             a = h[:B] + b1;  g = gelu(a);  g_dot = gelu'(a) h[B:]   (one fused kernel, writes [g; g_dot] stacked)
             [y; y_dot] = [g; g_dot] W2^T, then y += b2          (GEMM 2: reads the stacked buffer, no concatenation)

Memory: the MLP saves x and the biased pre-activation a only (no tangent activation, and not g: the backward
recomputes g = gelu(a) in the same kernel that forms da = dg gelu'(a)), against x, a and g for an unfused chain.

Autocast: under torch.autocast (CUDA, or CPU in tests) both ops cast x, x_dot, the weights and biases to the autocast
dtype first (differentiably, as autocast does for F.linear), so y and y_dot share that dtype and the parameter
gradients come back in the parameters' dtype. (`reference.linear_jvp_ref` under autocast returns y in fp32 and y_dot
in bf16, and `reference.mlp_jvp_ref` raises there: see the report of issue 5.) Without autocast all must share a dtype.

Chain: `_act_jvp_fwd_kernel` (activations.py, with a fused bias) -> `mlp_jvp_fwd()` -> `MLPJVPFunction` -> `mlp_jvp()`;
`linear_jvp()` -> `reference._LinearJVP` (the same stacked GEMM; reused, not duplicated).
"""
from __future__ import annotations

import math

import torch

from . import _runtime
from ._checks import check_linear_args
from ._tl_math import ACT_GELU_TANH
from .activations import act_bwd, act_jvp_fwd
from .reference import _LinearJVP, mlp_jvp_ref

__all__ = ["linear_jvp", "mlp_jvp", "MLPJVPFunction"]


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    device_type = t.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(dtype: torch.dtype | None, *tensors):
    """Differentiable casts to the autocast dtype (the identity without autocast; floats only, None passes)."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


# ---------------------------------------------------------------------------------------------------------- linear
def linear_jvp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               x_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b (differentiable in x, W, b);  y_dot = x_dot W^T (detached).  One GEMM on [x; x_dot].

    x: (B, ..., in), x_dot: (kt, ..., in), W: (out, in). Same checks as `reference.linear_jvp_ref`; the stacked GEMM is
    `reference._LinearJVP` itself (cuBLAS through torch, so it runs on any device: no fallback needed). Under autocast
    the inputs are cast to the autocast dtype first, so y and y_dot share one dtype.
    """
    check_linear_args(x, weight, x_dot)
    x, weight, bias, x_dot = _cast(_autocast_dtype(x), x, weight, bias, x_dot)
    return _LinearJVP.apply(x, x_dot, weight, bias)


# ------------------------------------------------------------------------------------------------------------- mlp
def mlp_jvp_fwd(x, w1, b1, w2, b2, x_dot, save_for_backward: bool):
    """Forward of the MLP and its tangent. Returns (y, y_dot, a or None); a = x W1^T + b1 (B*N, hidden) when saving."""
    lead, lead_t = x.shape[:-1], x_dot.shape[:-1]
    m, mt = math.prod(lead), math.prod(lead_t)
    c = x.shape[-1]
    stacked = torch.cat([x.reshape(m, c), x_dot.reshape(mt, c)]) if mt else x.reshape(m, c)
    h = torch.mm(stacked, w1.t())  # GEMM 1 over [x; x_dot]: (m + mt, hidden); bias only on primal rows (kernel)
    del stacked
    hidden = h.shape[1]
    # [g; g_dot] in one buffer, so that GEMM 2 reads it as is. Through new_output: poisoned in tests.
    g_stack = _runtime.new_output((m + mt, hidden), dtype=h.dtype, device=h.device)
    _, _, a = act_jvp_fwd(h[:m], h[m:], ACT_GELU_TANH, bias=b1, y=g_stack[:m], y_dot=g_stack[m:],
                          write_a=save_for_backward)
    del h  # the tangent half of the pre-activation is dropped here: nothing of the tangent survives the forward
    out = torch.mm(g_stack, w2.t())  # GEMM 2 over [g; g_dot]
    y = out[:m] if b2 is None else out[:m] + b2
    y_dot = out[m:]
    return y.reshape(*lead, out.shape[1]), y_dot.reshape(*lead_t, out.shape[1]), a


class MLPJVPFunction(torch.autograd.Function):
    """y = Linear2(GELU_tanh(Linear1(x))) differentiable in x, w1, b1, w2, b2; y_dot non-differentiable.

    Saves x and a = x W1^T + b1 only. Backward (dy: (M, out)):
        dW2 = dy^T g, db2 = sum dy, dg = dy W2;  [g = gelu(a), da = dg gelu'(a)] in one kernel (da overwrites dg);
        dW1 = da^T x, db1 = sum da, dx = da W1.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, w1, b1, w2, b2, x_dot):
        needs_grad = any(ctx.needs_input_grad[:5])
        y, y_dot, a = mlp_jvp_fwd(x, w1, b1, w2, b2, x_dot, save_for_backward=needs_grad)
        if needs_grad:
            ctx.save_for_backward(x, a, w1, w2)
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.mark_non_differentiable(y_dot)
        return y, y_dot

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y, _grad_y_dot):
        x, a, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        need_b1 = need_b1 and ctx.has_b1
        need_b2 = need_b2 and ctx.has_b2
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(a.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        need_da = need_x or need_w1 or need_b1
        dx = dw1 = db1 = dw2 = db2 = None
        dg = torch.mm(dy, w2) if need_da else None
        da = g = None
        if need_da or need_w2:
            da, g = act_bwd(a, dg, ACT_GELU_TANH, write_da=need_da, write_g=need_w2, in_place=True)
        if need_w2:
            dw2 = torch.mm(dy.t(), g)
        if need_b2:
            db2 = dy.sum(0)
        if need_w1:
            dw1 = torch.mm(da.t(), x2)
        if need_b1:
            db1 = da.sum(0)
        if need_x:
            dx = torch.mm(da, w1).reshape(x.shape)
        return dx, dw1, db1, dw2, db2, None


def mlp_jvp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
            x_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear(w1, b1) -> GELU(tanh) -> Linear(w2, b2) with its tangent (see the module docstring).

    x: (B, ..., in), x_dot: (kt, ..., in), w1: (hidden, in), w2: (out, hidden). Returns (y differentiable in x and the
    parameters, y_dot detached). Same contract and checks as `reference.mlp_jvp_ref` (whose checks run in its first
    linear and its GELU); falls back to it (one warning) where Triton cannot run.
    """
    check_linear_args(x, w1, x_dot)
    if w2.shape[-1] != w1.shape[0]:
        raise ValueError(f"w2 has shape {tuple(w2.shape)} (out, hidden) but w1 has shape {tuple(w1.shape)} "
                         f"(hidden, in): the hidden sizes must match")
    # cast before the fallback too: the reference's own linear mixes dtypes under autocast
    x, w1, b1, w2, b2, x_dot = _cast(_autocast_dtype(x), x, w1, b1, w2, b2, x_dot)
    if not _runtime.triton_can_run(x):
        _runtime.warn_fallback("mlp_jvp", x)
        return mlp_jvp_ref(x, w1, b1, w2, b2, x_dot)
    dtype = x.dtype
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and (t.dtype != dtype or t.device != x.device):
            raise TypeError(f"{name} has dtype {t.dtype} on {t.device} but x has dtype {dtype} on {x.device}; outside "
                            f"autocast the MLP's parameters must match x")
    return MLPJVPFunction.apply(x, w1, b1, w2, b2, x_dot)
