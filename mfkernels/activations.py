"""Fused elementwise activations with their tangent: GELU(tanh) (the DiT MLP) and SiLU (the conditioning path).

    y = g(a)                 for every element of the primal a (any shape)
    y_dot = g'(a) a_dot      for the tangent elements: a_dot has kt <= B rows standing for the FIRST kt rows of a

One launch reads a once and writes y and y_dot (eager reads a twice and runs about six kernels for the tangent).
The backward of the primal is one more elementwise kernel: da = dy g'(a).

Gradients through the tangent (`tangent_grad`, rule in `_runtime.tangent_grad_on`): y_dot is differentiable, and a
loss of (y, y_dot) with upstream gradients (G, G') backpropagates as
    da = G g'(a) + G' g''(a) a_dot  (tangent rows; G g'(a) on the others),   da_dot = G' g'(a)
(`act_tangent_bwd`: the primal kernel for G g'(a), then torch elementwise ops on the kt tangent rows with the
closed forms `reference.gelu_tanh_grad2` / `silu_grad2`). Only then is a_dot saved; without tangent_grad the op saves
a alone, as before.

Chain: `_act_jvp_fwd_kernel` -> `gelu_tanh_jvp_fwd()` / `silu_jvp_fwd()` -> ops `mfkernels::gelu_tanh_fwd` /
`mfkernels::silu_fwd` (backward ops `mfkernels::gelu_tanh_bwd` / `silu_bwd`, see `_library.FusedOp`) ->
`gelu_tanh_jvp()` / `silu_jvp()`. The MLP op (mlp.py) reuses both kernels with a fused bias.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import _runtime
from ._checks import check_tangent, check_tangent_grad
from ._library import FusedOp
from ._triton import (ACT_GELU_TANH, ACT_SILU, ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, act_and_grad, tl, tl_acc_dtype,
                      triton)
from .reference import _gelu_tanh_jvp_ref, _silu_jvp_ref, gelu_tanh_grad, gelu_tanh_grad2, silu_grad, silu_grad2

__all__ = ["gelu_tanh_jvp", "silu_jvp"]


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _act_jvp_fwd_kernel(A, A_DOT, BIAS, Y, Y_DOT, n_primal, n_tangent, n_cols,
                        ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Elementwise activation g (ACT: 0 GELU(tanh), 1 SiLU) and its tangent, over flat indices i:

        a_i = A[i] (+ BIAS[i % n_cols] if HAS_BIAS)
        Y[i] = g(a_i)                         for i < n_primal
        Y_DOT[i] = g'(a_i) A_DOT[i]           for i < n_tangent      (n_tangent <= n_primal)

    Tangent element i belongs to primal element i: the tangent rows are the first kt rows of the primal batch and both
    are contiguous, so one flat index addresses both and a is loaded once for y and y_dot.
    Grid: (cdiv(n_primal, BLOCK),); math in ACC (fp32, or fp64 for fp64 data).
    """
    pid = tl.program_id(0)
    # int64 offsets: the MLP hidden activation of a large batch has more than 2^31 elements.
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n_primal
    a = tl.load(A + offs, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        a += tl.load(BIAS + offs % n_cols, mask=mask, other=0.0).to(ACC)
    y, dy_da = act_and_grad(a, ACT)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    # Scalar branch: blocks past the tangent (most of them when kt << B) skip the tangent loads entirely.
    if start < n_tangent:
        tmask = offs < n_tangent
        a_dot = tl.load(A_DOT + offs, mask=tmask, other=0.0).to(ACC)
        tl.store(Y_DOT + offs, (dy_da * a_dot).to(Y_DOT.dtype.element_ty), mask=tmask)


@triton.jit
def _act_bwd_kernel(A, BIAS, DY, DA, G, n, n_cols, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    WRITE_DA: tl.constexpr, WRITE_G: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Backward of y = g(a), a = A (+ BIAS[i % n_cols] if HAS_BIAS):
        DA[i] = DY[i] g'(a_i)  (if WRITE_DA);  G[i] = g(a_i)  (if WRITE_G).

    WRITE_G lets the MLP backward recompute its hidden activation g(a) instead of saving it in the forward; HAS_BIAS
    lets it save the GEMM output h (a = h + b1 is formed here, in ACC, exactly as the forward formed it).
    DA may alias DY (each element is read before it is written by the same program). Grid: (cdiv(n, BLOCK),).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        a += tl.load(BIAS + offs % n_cols, mask=mask, other=0.0).to(ACC)
    y, dy_da = act_and_grad(a, ACT)
    if WRITE_DA:
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        tl.store(DA + offs, (dy * dy_da).to(DA.dtype.element_ty), mask=mask)
    if WRITE_G:
        tl.store(G + offs, y.to(G.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------------------- launchers
def act_jvp_fwd(a: torch.Tensor, a_dot: torch.Tensor, act: int, *,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch `_act_jvp_fwd_kernel`: (y, y_dot) = (g(a + bias), g'(a + bias) a_dot), fresh contiguous outputs.

    a, a_dot: contiguous, a_dot.numel() = kt * (a.numel() / B). bias (n_cols,) is added over the last dim of a.
    """
    n_primal, n_tangent = a.numel(), a_dot.numel()
    y = _runtime.new_output(a.shape, dtype=a.dtype, device=a.device)
    y_dot = _runtime.new_output(a_dot.shape, dtype=a.dtype, device=a.device)
    if n_primal:
        grid = (_runtime.cdiv(n_primal, ELEMENTWISE_BLOCK),)
        _act_jvp_fwd_kernel[grid](
            a, a_dot, bias if bias is not None else a, y, y_dot, n_primal, n_tangent, a.shape[-1],
            ACT=act, HAS_BIAS=bias is not None, BLOCK=ELEMENTWISE_BLOCK, ACC=tl_acc_dtype(a.dtype),
            num_warps=ELEMENTWISE_WARPS,
        )
    return y, y_dot


def act_bwd(a: torch.Tensor, dy: torch.Tensor | None, act: int, *, bias: torch.Tensor | None = None,
            write_da: bool = True, write_g: bool = False,
            in_place: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch `_act_bwd_kernel`: (da = dy g'(a + bias) or None, g(a + bias) or None). in_place writes da over dy
    (which must then be contiguous: a scratch buffer of the caller)."""
    a = a.contiguous()
    if write_da:
        if in_place and not dy.is_contiguous():
            raise ValueError("act_bwd(in_place=True) needs a contiguous dy")
        dy = dy.contiguous()
        da = dy if in_place else _runtime.new_output(a.shape, dtype=a.dtype, device=a.device)
    else:
        da = None
    g = _runtime.new_output(a.shape, dtype=a.dtype, device=a.device) if write_g else None
    n = a.numel()
    if n:
        grid = (_runtime.cdiv(n, ELEMENTWISE_BLOCK),)
        _act_bwd_kernel[grid](
            a, bias if bias is not None else a, dy if write_da else a, da if write_da else a, g if write_g else a,
            n, a.shape[-1], ACT=act, HAS_BIAS=bias is not None, WRITE_DA=write_da, WRITE_G=write_g,
            BLOCK=ELEMENTWISE_BLOCK, ACC=tl_acc_dtype(a.dtype), num_warps=ELEMENTWISE_WARPS,
        )
    return da, g


def gelu_tanh_jvp_fwd(a: torch.Tensor, a_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return act_jvp_fwd(a.contiguous(), a_dot.contiguous(), ACT_GELU_TANH)


def act_tangent_bwd(a: torch.Tensor, a_dot: torch.Tensor, grad_y: torch.Tensor | None, grad_y_dot: torch.Tensor,
                    grad: Callable, grad2: Callable, primal_bwd: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, da_dot) of y = g(a), y_dot = g'(a) a_dot (module docstring): the primal backward kernel for G g'(a) on
    every row, torch elementwise ops (in fp32 / fp64) for the tangent rows' terms."""
    kt = a_dot.shape[0]
    acc = _runtime.acc_dtype(a.dtype)
    ak, gyd = a[:kt].to(acc), grad_y_dot.to(acc)
    da = primal_bwd(a, grad_y) if grad_y is not None else torch.zeros_like(a)
    da[:kt] += (gyd * grad2(ak) * a_dot.to(acc)).to(a.dtype)
    return da, (gyd * grad(ak)).to(a_dot.dtype)


def gelu_tanh_bwd(a: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    return act_bwd(a, grad_y, ACT_GELU_TANH)[0]


def silu_jvp_fwd(a: torch.Tensor, a_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return act_jvp_fwd(a.contiguous(), a_dot.contiguous(), ACT_SILU)


def silu_bwd(a: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    return act_bwd(a, grad_y, ACT_SILU)[0]


# ----------------------------------------------------------------------------------------------------- registration
def _fwd_fake(a, a_dot):
    return a.new_empty(a.shape), a.new_empty(a_dot.shape)


def _bwd_fake(a, grad_y):
    return a.new_empty(a.shape)


def _setup_context(ctx, inputs, output):
    a, a_dot, tangent_grad = inputs
    ctx.tangent_grad = tangent_grad
    if tangent_grad:  # y_dot differentiable: its backward needs the tangent too
        ctx.save_for_backward(a, a_dot)
    else:
        ctx.save_for_backward(a)
        ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for y_dot (a launch and a write per call)


def _act_ops(name: str, fwd_launcher, bwd_launcher, grad: Callable, grad2: Callable) -> FusedOp:
    """mfkernels::<name>_fwd (a, a_dot, tangent_grad) -> (y, y_dot) with mfkernels::<name>_bwd (a, grad_y) -> da as
    its backward (and `act_tangent_bwd` around it when y_dot carries a gradient)."""

    def fwd_impl(a: torch.Tensor, a_dot: torch.Tensor, tangent_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return fwd_launcher(a, a_dot)

    def bwd_impl(a: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
        return bwd_launcher(a, grad_y)

    bwd = FusedOp(f"{name}_bwd", bwd_impl, _bwd_fake)

    def backward(ctx, grad_y, grad_y_dot):
        if ctx.tangent_grad and grad_y_dot is not None and grad_y_dot.shape[0]:
            a, a_dot = ctx.saved_tensors
            da, da_dot = act_tangent_bwd(a, a_dot, grad_y, grad_y_dot, grad, grad2, bwd)
            return (da if ctx.needs_input_grad[0] else None), (da_dot if ctx.needs_input_grad[1] else None), None
        a = ctx.saved_tensors[0]
        return (bwd(a, grad_y) if ctx.needs_input_grad[0] and grad_y is not None else None), None, None

    def check(a, a_dot, tangent_grad=False):
        check_tangent("a_dot", a_dot, "a", a)
        _runtime.require_triton(f"{name}_fwd", a)

    def fake(a, a_dot, tangent_grad=False):
        return _fwd_fake(a, a_dot)

    return FusedOp(f"{name}_fwd", fwd_impl, fake, setup_context=_setup_context, backward=backward, check=check)


_gelu_tanh = _act_ops("gelu_tanh", gelu_tanh_jvp_fwd, gelu_tanh_bwd, gelu_tanh_grad, gelu_tanh_grad2)
_silu = _act_ops("silu", silu_jvp_fwd, silu_bwd, silu_grad, silu_grad2)


# ----------------------------------------------------------------------------------------------------------- public
def gelu_tanh_jvp(a: torch.Tensor, a_dot: torch.Tensor, *,
                  tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = GELU_tanh(a) (differentiable);  y_dot = g'(a) a_dot (detached, unless tangent_grad: module docstring),
    a_dot: (kt, *a.shape[1:]), kt <= B.

    Same contract and checks as `reference.gelu_tanh_jvp_ref`; no autocast casting (elementwise: runs in a's dtype,
    math in fp32). Falls back to the reference (with one warning) where Triton cannot run.
    The op is `torch.ops.mfkernels.gelu_tanh_fwd` (its backward `mfkernels::gelu_tanh_bwd`).
    """
    check_tangent("a_dot", a_dot, "a", a)
    check_tangent_grad(tangent_grad)
    return _gelu_tanh_jvp(a, a_dot, tangent_grad=tangent_grad)


def _gelu_tanh_jvp(a: torch.Tensor, a_dot: torch.Tensor, *,
                   tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu_tanh_jvp on checked arguments."""
    return _fused_or_reference("gelu_tanh_jvp", _gelu_tanh, _gelu_tanh_jvp_ref, a, a_dot, tangent_grad)


def silu_jvp(a: torch.Tensor, a_dot: torch.Tensor, *,
             tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = SiLU(a) (differentiable);  y_dot = sig(a) (1 + a (1 - sig(a))) a_dot (detached unless tangent_grad). See
    `gelu_tanh_jvp`.

    The op is `torch.ops.mfkernels.silu_fwd` (its backward `mfkernels::silu_bwd`)."""
    check_tangent("a_dot", a_dot, "a", a)
    check_tangent_grad(tangent_grad)
    return _silu_jvp(a, a_dot, tangent_grad=tangent_grad)


def _silu_jvp(a: torch.Tensor, a_dot: torch.Tensor, *,
              tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_jvp on checked arguments."""
    return _fused_or_reference("silu_jvp", _silu, _silu_jvp_ref, a, a_dot, tangent_grad)


def _fused_or_reference(name: str, fused: FusedOp, reference, a: torch.Tensor, a_dot: torch.Tensor,
                        tangent_grad: bool | None):
    if not _runtime.triton_can_run(a):
        _runtime.warn_fallback(name, a)
        return reference(a, a_dot, tangent_grad=tangent_grad)
    return fused(a, a_dot, _runtime.tangent_grad_on(tangent_grad, a_dot))
