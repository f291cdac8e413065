"""QK-norm + RoPE for attention, fused: RMSNorm each head of q and k (a learned per-head-dim scale each), then rotate,
with the tangents, for q AND k in one launch (forward and backward).

    q' = RoPE(RMSNorm(q) w_q),  k' = RoPE(RMSNorm(k) w_k)          (iMF's RoPEAttention, SD3.5 / Flux QK-norm)
    q'_dot = RoPE((q_dot - q r^2 mean(q q_dot)) r w_q), likewise k  (first kt samples; the angles carry no tangent)

q and k are usually strided views of one fused qkv projection: pass them in the layout the attention kernels should
receive, e.g. (B, H, N, Dh) = qkv.view(B, N, 3, H, Dh)[:, :, 0].transpose(1, 2); they are read in place and the outputs
are written contiguous in that logical shape (so (B, H, N, Dh) contiguous, what attention reads fastest). Without cos /
sin the op is QK-norm alone (same single launch).

The norm and the rotation run in fp32 registers with one rounding at the store (the reference composes
`rmsnorm_jvp_ref` and `rope_jvp_ref` in fp32 the same way). Kernels and pairing conventions: `rope.py`.

Gradients through the tangent (`tangent_grad`, rule in `_runtime.tangent_grad_on`): q'_dot and k'_dot are then
differentiable in q, k, the scales and the tangents, through `rope._norm_rope_tangent_bwd_kernel` (q and k in one
launch; formulas in its docstring). Saved beyond the stop-gradient path: q_dot and k_dot. Without tangent_grad nothing
changes.

Chain: `rope._rope_jvp_fwd_kernel` (NORM) -> `rope.rope_fwd_launch()` -> op `mfkernels::qk_norm_rope_fwd` (backward
`rope._rope_bwd_kernel` (NORM) -> `rope.rope_bwd_launch()` -> op `mfkernels::qk_norm_rope_bwd`, see `_library.FusedOp`)
-> `qk_norm_rope_jvp()`. The kernels and launchers are rope.py's: this file has the registration and the public part.
"""
from __future__ import annotations

import torch

from . import _runtime
from ._checks import check_angles_constant, check_qk_args, check_tangent_grad
from ._library import FusedOp
from .reference import _qk_norm_rope_jvp_ref
from .rmsnorm import _rmsnorm_jvp
from .rope import norm_rope_tangent_bwd_launch, rope_bwd_launch, rope_fwd_launch

__all__ = ["qk_norm_rope_jvp"]


# ----------------------------------------------------------------------------------------------------- registration
def _fwd_impl(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
              cos: torch.Tensor | None, sin: torch.Tensor | None, q_dot: torch.Tensor, k_dot: torch.Tensor, eps: float,
              interleaved: bool, tangent_grad: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q', k', q'_dot, k'_dot, rstd (2, rows)) from one launch of the fused kernel."""
    weights = None if q_weight is None else [q_weight, k_weight]
    (qo, ko), (qo_dot, ko_dot), rstd = rope_fwd_launch([q, k], [q_dot, k_dot], weights, cos, sin, eps=eps, norm=True,
                                                       interleaved=interleaved)
    return qo, ko, qo_dot, ko_dot, rstd


def _fwd_fake(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps, interleaved, tangent_grad=False):
    rows = q.numel() // q.shape[-1]
    stats = _runtime.acc_dtype(q.dtype, *(() if q_weight is None else (q_weight.dtype, k_weight.dtype)))
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q_dot.shape), q.new_empty(k_dot.shape),
            q.new_empty((2, rows), dtype=stats))


def _bwd_impl(grad_q: torch.Tensor, grad_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
              q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, cos: torch.Tensor | None,
              sin: torch.Tensor | None, rstd: torch.Tensor, interleaved: bool, compute_dx: bool,
              compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dw_q, dw_k); dq / dk empty unless compute_dx, dw_* empty unless compute_dw and weights are given."""
    weights = None if q_weight is None else [q_weight, k_weight]
    (dq, dk), dws = rope_bwd_launch([grad_q, grad_k], [q, k], weights, cos, sin, rstd, norm=True,
                                    interleaved=interleaved, compute_dx=compute_dx, compute_dw=compute_dw)
    if dws is None:
        dws = [q.new_empty(0), q.new_empty(0)]
    return dq, dk, dws[0], dws[1]


def _bwd_fake(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, rstd, interleaved, compute_dx, compute_dw):
    dx_shape = q.shape if compute_dx else (0,)
    if compute_dw and q_weight is not None:
        dws = (q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape))
    else:
        dws = (q.new_empty(0), q.new_empty(0))
    return q.new_empty(dx_shape), q.new_empty(dx_shape), *dws


_bwd = FusedOp("qk_norm_rope_bwd", _bwd_impl, _bwd_fake,
               check=lambda grad_q, grad_k, q, *_: _runtime.require_triton("qk_norm_rope_bwd", q))


def _tangent_bwd_impl(grad_q: torch.Tensor | None, grad_k: torch.Tensor | None, grad_q_dot: torch.Tensor,
                      grad_k_dot: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_dot: torch.Tensor,
                      k_dot: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                      cos: torch.Tensor | None, sin: torch.Tensor | None, rstd: torch.Tensor, interleaved: bool,
                      compute_dx: bool, compute_dx_dot: bool, compute_dw: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dq_dot, dk_dot, dw_q, dw_k) of a loss of the four outputs; empty where not asked for. grad_q and grad_k
    are both given or both None (the backward zero-fills one that got no gradient)."""
    weights = None if q_weight is None else [q_weight, k_weight]
    grads = None if grad_q is None else [grad_q, grad_k]
    (dq, dk), (dq_dot, dk_dot), dws = norm_rope_tangent_bwd_launch(
        grads, [grad_q_dot, grad_k_dot], [q, k], [q_dot, k_dot], weights, cos, sin, rstd, interleaved=interleaved,
        compute_dx=compute_dx, compute_dx_dot=compute_dx_dot, compute_dw=compute_dw)
    if dws is None:
        dws = [q.new_empty(0), q.new_empty(0)]
    return dq, dk, dq_dot, dk_dot, dws[0], dws[1]


def _tangent_bwd_fake(grad_q, grad_k, grad_q_dot, grad_k_dot, q, k, q_dot, k_dot, q_weight, k_weight, cos, sin, rstd,
                      interleaved, compute_dx, compute_dx_dot, compute_dw):
    dx_shape, dxd_shape = (q.shape if compute_dx else (0,)), (q_dot.shape if compute_dx_dot else (0,))
    if compute_dw and q_weight is not None:
        dws = (q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape))
    else:
        dws = (q.new_empty(0), q.new_empty(0))
    return q.new_empty(dx_shape), q.new_empty(dx_shape), q.new_empty(dxd_shape), q.new_empty(dxd_shape), *dws


_tangent_bwd = FusedOp("qk_norm_rope_tangent_bwd", _tangent_bwd_impl, _tangent_bwd_fake,
                       check=lambda *args: _runtime.require_triton("qk_norm_rope_tangent_bwd", args[4]))


def _setup_context(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, _eps, interleaved, tangent_grad = inputs
    ctx.interleaved, ctx.tangent_grad = interleaved, tangent_grad
    if tangent_grad:  # the tangent outputs differentiable: their backward reads the tangent inputs too
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, output[4], q_dot, k_dot)
        ctx.mark_non_differentiable(output[4])
    else:
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, output[4])
        ctx.mark_non_differentiable(output[2], output[3], output[4])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the tangents and rstd (a launch and a write each)


def _tangent_backward(ctx, grad_q, grad_k, grad_q_dot, grad_k_dot):
    """A loss of q', k' and their tangents: every gradient from one launch of `_norm_rope_tangent_bwd_kernel`."""
    q, k, q_weight, k_weight, cos, sin, rstd, q_dot, k_dot = ctx.saved_tensors
    # the kernel takes both gradients of a pair: a zero one for an output that got none
    if (grad_q is None) != (grad_k is None):
        grad_q = torch.zeros_like(grad_k) if grad_q is None else grad_q
        grad_k = torch.zeros_like(grad_q) if grad_k is None else grad_k
    grad_q_dot = torch.zeros_like(grad_k_dot) if grad_q_dot is None else grad_q_dot
    grad_k_dot = torch.zeros_like(grad_q_dot) if grad_k_dot is None else grad_k_dot
    need = ctx.needs_input_grad
    compute_dx, compute_dx_dot = need[0] or need[1], need[6] or need[7]
    compute_dw = q_weight is not None and (need[2] or need[3])
    dq, dk, dq_dot, dk_dot, dwq, dwk = _tangent_bwd(grad_q, grad_k, grad_q_dot, grad_k_dot, q, k, q_dot, k_dot,
                                                    q_weight, k_weight, cos, sin, rstd, ctx.interleaved, compute_dx,
                                                    compute_dx_dot, compute_dw)
    pick = lambda flag, g: g if flag else None  # noqa: E731
    return (pick(need[0], dq), pick(need[1], dk), pick(compute_dw and need[2], dwq), pick(compute_dw and need[3], dwk),
            None, None, pick(need[6], dq_dot), pick(need[7], dk_dot), None, None, None)


def _backward(ctx, grad_q, grad_k, grad_q_dot, grad_k_dot, _grstd):
    if ctx.tangent_grad and not (grad_q_dot is None and grad_k_dot is None) and ctx.saved_tensors[7].shape[0]:
        return _tangent_backward(ctx, grad_q, grad_k, grad_q_dot, grad_k_dot)
    if grad_q is None and grad_k is None:  # neither output took part in what is differentiated
        return (None,) * 11
    q, k, q_weight, k_weight, cos, sin, rstd = ctx.saved_tensors[:7]
    # the kernel takes both gradients: a zero one for an output that got none (rare: q' or k' unused)
    grad_q = torch.zeros_like(grad_k) if grad_q is None else grad_q
    grad_k = torch.zeros_like(grad_q) if grad_k is None else grad_k
    need = ctx.needs_input_grad
    compute_dx = need[0] or need[1]
    compute_dw = q_weight is not None and (need[2] or need[3])
    dq, dk, dwq, dwk = _bwd(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, rstd, ctx.interleaved, compute_dx,
                            compute_dw)
    pick = lambda flag, g: g if flag else None  # noqa: E731
    return (pick(need[0], dq), pick(need[1], dk), pick(compute_dw and need[2], dwq), pick(compute_dw and need[3], dwk),
            None, None, None, None, None, None, None)


def _check_op_args(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps, interleaved, tangent_grad=False):
    check_qk_args(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps)
    _runtime.require_triton("qk_norm_rope_fwd", q)


_fwd = FusedOp("qk_norm_rope_fwd", _fwd_impl, _fwd_fake, setup_context=_setup_context, backward=_backward,
               check=_check_op_args)


# ----------------------------------------------------------------------------------------------------------- public
def qk_norm_rope_jvp(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                     cos: torch.Tensor | None, sin: torch.Tensor | None, q_dot: torch.Tensor, k_dot: torch.Tensor,
                     *, eps: float = 1e-6, interleaved: bool = True, tangent_grad: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """QK-norm then RoPE on q and k with their tangents, fused, one launch (module docstring).

    q, k: (B, ..., D) one shape, dtype and device, any strides (per-head views of a qkv projection); q_weight, k_weight:
    (D,) learned scales, or both None; cos, sin: broadcastable to q.shape[:-1] + (D/2,) constants, or both None (no
    RoPE); q_dot, k_dot: (kt, ..., D), kt <= B. Returns (q', k', q'_dot, k'_dot): q', k' differentiable in q, k and the
    scales, contiguous in q's shape; tangents detached, or with tangent_grad differentiable in q, k, the scales and
    q_dot, k_dot (module docstring). Same contract and checks as `reference.qk_norm_rope_jvp_ref`; falls back to it
    (one warning) where Triton cannot run. The op is `torch.ops.mfkernels.qk_norm_rope_fwd`.
    """
    check_qk_args(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps)
    check_angles_constant(cos, sin)
    check_tangent_grad(tangent_grad)
    return _qk_norm_rope_jvp(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps=eps, interleaved=interleaved,
                             tangent_grad=tangent_grad)


def _qk_norm_rope_jvp(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                      cos: torch.Tensor | None, sin: torch.Tensor | None, q_dot: torch.Tensor, k_dot: torch.Tensor,
                      *, eps: float = 1e-6, interleaved: bool = True, tangent_grad: bool | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qk_norm_rope_jvp on checked arguments."""
    if not _runtime.triton_can_run(q):
        _runtime.warn_fallback("qk_norm_rope_jvp", q)
        return _qk_norm_rope_jvp_ref(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps=eps,
                                     interleaved=interleaved, tangent_grad=tangent_grad)
    tangent_grad = _runtime.tangent_grad_on(tangent_grad, q_dot, k_dot)
    if q.shape[-1] % 2:  # an odd head dim without RoPE: the pair kernel cannot split it; two RMSNorm launches
        qo, qo_dot = _rmsnorm_jvp(q, q_weight, q_dot, eps=eps, tangent_grad=tangent_grad)
        ko, ko_dot = _rmsnorm_jvp(k, k_weight, k_dot, eps=eps, tangent_grad=tangent_grad)
        return qo, ko, qo_dot, ko_dot
    qo, ko, qo_dot, ko_dot, _ = _fwd(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, float(eps), bool(interleaved),
                                     tangent_grad)
    return qo, ko, qo_dot, ko_dot
