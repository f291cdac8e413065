"""Fused elementwise activations with their tangent: GELU(tanh) (the DiT MLP) and SiLU (the conditioning path).

    y = g(a)                 for every element of the primal a (any shape)
    y_dot = g'(a) a_dot      for the tangent elements: a_dot has kt <= B rows standing for the FIRST kt rows of a

One launch reads a once and writes y and y_dot (eager reads a twice and runs about six kernels for the tangent).
The backward of the primal is one more elementwise kernel: da = dy g'(a).

Chain: `_act_jvp_fwd_kernel` -> `gelu_tanh_jvp_fwd()` / `silu_jvp_fwd()` -> `GeluTanhJVPFunction` / `SiLUJVPFunction`
-> `gelu_tanh_jvp()` / `silu_jvp()`. The MLP op (mlp.py) reuses both kernels with a fused bias and a stacked layout.
"""
from __future__ import annotations

import torch

from . import _runtime
from ._checks import check_tangent
from ._tl_math import (
    ACT_GELU_TANH,
    ACT_SILU,
    ELEMENTWISE_BLOCK,
    ELEMENTWISE_WARPS,
    acc_dtype,
    act_and_grad,
    tl,
    triton,
)
from .reference import gelu_tanh_jvp_ref, silu_jvp_ref

__all__ = ["gelu_tanh_jvp", "silu_jvp", "GeluTanhJVPFunction", "SiLUJVPFunction"]


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _act_jvp_fwd_kernel(A, A_DOT, BIAS, Y, Y_DOT, A_OUT, n_primal, n_tangent, n_cols,
                        ACT: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_A: tl.constexpr,
                        BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Elementwise activation g (ACT: 0 GELU(tanh), 1 SiLU) and its tangent, over flat indices i:

        a_i = A[i] (+ BIAS[i % n_cols] if HAS_BIAS)
        Y[i] = g(a_i)                         for i < n_primal
        Y_DOT[i] = g'(a_i) A_DOT[i]           for i < n_tangent      (n_tangent <= n_primal)
        A_OUT[i] = a_i                        if WRITE_A (the MLP saves its biased pre-activation for backward)

    Tangent element i belongs to primal element i: the tangent rows are the first kt rows of the primal batch and both
    are contiguous, so one flat index addresses both and a is loaded once for y and y_dot.
    Grid: (cdiv(n_primal, BLOCK),); math in ACC (fp32, or fp64 for fp64 data).
    """
    pid = tl.program_id(0)
    # int64 offsets: the stacked MLP hidden activation of a large batch has more than 2^31 elements.
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n_primal
    a = tl.load(A + offs, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        a += tl.load(BIAS + offs % n_cols, mask=mask, other=0.0).to(ACC)
    y, dy_da = act_and_grad(a, ACT)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if WRITE_A:
        tl.store(A_OUT + offs, a.to(A_OUT.dtype.element_ty), mask=mask)
    # Scalar branch: blocks past the tangent (most of them when kt << B) skip the tangent loads entirely.
    if start < n_tangent:
        tmask = offs < n_tangent
        a_dot = tl.load(A_DOT + offs, mask=tmask, other=0.0).to(ACC)
        tl.store(Y_DOT + offs, (dy_da * a_dot).to(Y_DOT.dtype.element_ty), mask=tmask)


@triton.jit
def _act_bwd_kernel(A, DY, DA, G, n, ACT: tl.constexpr, WRITE_DA: tl.constexpr, WRITE_G: tl.constexpr,
                    BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Backward of y = g(a):  DA[i] = DY[i] g'(A[i])  (if WRITE_DA);  G[i] = g(A[i])  (if WRITE_G).

    WRITE_G lets the MLP backward recompute its hidden activation g(a) instead of saving it in the forward.
    DA may alias DY (each element is read before it is written by the same program). Grid: (cdiv(n, BLOCK),).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(ACC)
    y, dy_da = act_and_grad(a, ACT)
    if WRITE_DA:
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        tl.store(DA + offs, (dy * dy_da).to(DA.dtype.element_ty), mask=mask)
    if WRITE_G:
        tl.store(G + offs, y.to(G.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------- launchers
def act_jvp_fwd(a: torch.Tensor, a_dot: torch.Tensor, act: int, *, bias: torch.Tensor | None = None,
                y: torch.Tensor | None = None, y_dot: torch.Tensor | None = None,
                write_a: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch `_act_jvp_fwd_kernel`. Returns (y, y_dot, a_biased or None).

    a, a_dot: contiguous, a_dot.numel() = kt * (a.numel() / B). bias (n_cols,) is added over the last dim of a.
    y / y_dot: optional preallocated contiguous outputs (the MLP passes the two halves of one stacked buffer so the next
    GEMM reads [g; g_dot] without a concatenation); otherwise allocated through `_runtime.new_output`.
    """
    n_primal, n_tangent = a.numel(), a_dot.numel()
    if y is None:
        y = _runtime.new_output(a.shape, dtype=a.dtype, device=a.device)
    if y_dot is None:
        y_dot = _runtime.new_output(a_dot.shape, dtype=a.dtype, device=a.device)
    a_out = _runtime.new_output(a.shape, dtype=a.dtype, device=a.device) if write_a else None
    if n_primal:
        grid = (_runtime.cdiv(n_primal, ELEMENTWISE_BLOCK),)
        _act_jvp_fwd_kernel[grid](
            a, a_dot, bias if bias is not None else a, y, y_dot, a_out if write_a else a,
            n_primal, n_tangent, a.shape[-1],
            ACT=act, HAS_BIAS=bias is not None, WRITE_A=write_a,
            BLOCK=ELEMENTWISE_BLOCK, ACC=acc_dtype(a.dtype), num_warps=ELEMENTWISE_WARPS,
        )
    return y, y_dot, a_out


def act_bwd(a: torch.Tensor, dy: torch.Tensor | None, act: int, *, write_da: bool = True, write_g: bool = False,
            in_place: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch `_act_bwd_kernel`: (da = dy g'(a) or None, g(a) or None). in_place writes da over dy (a scratch dy)."""
    a = a.contiguous()
    if write_da:
        dy = dy.contiguous()
        da = dy if in_place else _runtime.new_output(a.shape, dtype=a.dtype, device=a.device)
    else:
        da = None
    g = _runtime.new_output(a.shape, dtype=a.dtype, device=a.device) if write_g else None
    n = a.numel()
    if n:
        grid = (_runtime.cdiv(n, ELEMENTWISE_BLOCK),)
        _act_bwd_kernel[grid](
            a, dy if write_da else a, da if write_da else a, g if write_g else a, n,
            ACT=act, WRITE_DA=write_da, WRITE_G=write_g,
            BLOCK=ELEMENTWISE_BLOCK, ACC=acc_dtype(a.dtype), num_warps=ELEMENTWISE_WARPS,
        )
    return da, g


def gelu_tanh_jvp_fwd(a: torch.Tensor, a_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y, y_dot, _ = act_jvp_fwd(a.contiguous(), a_dot.contiguous(), ACT_GELU_TANH)
    return y, y_dot


def gelu_tanh_bwd(a: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    return act_bwd(a, grad_y, ACT_GELU_TANH)[0]


def silu_jvp_fwd(a: torch.Tensor, a_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y, y_dot, _ = act_jvp_fwd(a.contiguous(), a_dot.contiguous(), ACT_SILU)
    return y, y_dot


def silu_bwd(a: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    return act_bwd(a, grad_y, ACT_SILU)[0]


# ---------------------------------------------------------------------------------------------- autograd Functions
class _ActJVPFunction(torch.autograd.Function):
    """y = g(a) differentiable (saves a only); y_dot = g'(a) a_dot non-differentiable.

    Subclasses name their launchers; `forward` / `backward` are spelled out in each subclass so that the
    torch.amp decorators apply to them."""

    @staticmethod
    def _fwd(a, a_dot):  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def _bwd(a, grad_y):  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def _forward(cls, ctx, a, a_dot):
        a = a.contiguous()
        y, y_dot = cls._fwd(a, a_dot)
        ctx.save_for_backward(a)
        ctx.mark_non_differentiable(y_dot)
        return y, y_dot

    @classmethod
    def _backward(cls, ctx, grad_y, _grad_y_dot):
        (a,) = ctx.saved_tensors
        return (cls._bwd(a, grad_y) if ctx.needs_input_grad[0] else None), None


class GeluTanhJVPFunction(_ActJVPFunction):
    _fwd = staticmethod(gelu_tanh_jvp_fwd)
    _bwd = staticmethod(gelu_tanh_bwd)

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, a, a_dot):
        return GeluTanhJVPFunction._forward(ctx, a, a_dot)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y, grad_y_dot):
        return GeluTanhJVPFunction._backward(ctx, grad_y, grad_y_dot)


class SiLUJVPFunction(_ActJVPFunction):
    _fwd = staticmethod(silu_jvp_fwd)
    _bwd = staticmethod(silu_bwd)

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, a, a_dot):
        return SiLUJVPFunction._forward(ctx, a, a_dot)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y, grad_y_dot):
        return SiLUJVPFunction._backward(ctx, grad_y, grad_y_dot)


# ---------------------------------------------------------------------------------------------------------- public
def gelu_tanh_jvp(a: torch.Tensor, a_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = GELU_tanh(a) (differentiable);  y_dot = g'(a) a_dot (detached), a_dot: (kt, *a.shape[1:]), kt <= B.

    Same contract and checks as `reference.gelu_tanh_jvp_ref`; no autocast casting (elementwise: runs in a's dtype,
    math in fp32). Falls back to the reference (with one warning) where Triton cannot run.
    """
    check_tangent("a_dot", a_dot, "a", a)
    if not _runtime.triton_can_run(a):
        _runtime.warn_fallback("gelu_tanh_jvp", a)
        return gelu_tanh_jvp_ref(a, a_dot)
    return GeluTanhJVPFunction.apply(a, a_dot)


def silu_jvp(a: torch.Tensor, a_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = SiLU(a) (differentiable);  y_dot = sig(a) (1 + a (1 - sig(a))) a_dot (detached). See `gelu_tanh_jvp`."""
    check_tangent("a_dot", a_dot, "a", a)
    if not _runtime.triton_can_run(a):
        _runtime.warn_fallback("silu_jvp", a)
        return silu_jvp_ref(a, a_dot)
    return SiLUJVPFunction.apply(a, a_dot)
