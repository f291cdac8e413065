"""The attention ops, registered as every Triton op is (`_library.FusedOp`: a custom op for tracing, a direct path for
eager calls), and their autograd.

    mfkernels::attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, attn_mask?, causal, scale, tangent_grad)
        -> (o, o_dot, lse, mu)
    mfkernels::attention_bwd(grad_o, q, k, v, o, lse, attn_mask?, causal, scale) -> (dq, dk, dv)
    mfkernels::attention_jvp_bwd(grad_o?, grad_o_dot, q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, attn_mask?,
        causal, scale) -> (dq, dk, dv, dq_dot, dk_dot, dv_dot)

Each op's body calls its launcher (forward.py / backward.py / tangent_backward.py); its fake gives Dynamo and
torch.func the output metadata, so the ops are opaque: traced whole by torch.compile (fullgraph), never looked inside
by torch.func. The autograd of attention_jvp_fwd: o backpropagates through the flash backward from the saved LSE; with
tangent_grad=False (the op contract) o_dot is non-differentiable and the tangent inputs get no gradient; with
tangent_grad=True a loss of o_dot backpropagates exactly into all six inputs (the tangent backward): the op variant
with a differentiable tangent output that `_library.FusedOp` allows for. A mask gets no gradient (one for a float
attn_mask is refused with an error: it would need the (B, H, Nq, Nk) score gradient). No custom jvp anywhere on this
path (docs/design.md, 'Triton interpreter and CPU testing': Dynamo can drop a custom jvp silently).
"""
from __future__ import annotations

import warnings

import torch

from .._checks import check_attention_args, check_attention_kernel_args, mask_grad_error
from .._library import FusedOp
from .._runtime import acc_dtype, require_triton, triton_can_run, warn_fallback
from ._common import lse_shape
from .backward import attention_bwd
from .forward import attention_jvp_fwd
from .tangent_backward import attention_jvp_bwd


def kernel_can_run(q: torch.Tensor) -> bool:
    """Triton can run here, and the dtype is one the compiled kernels support on that device. fp64 runs only under the
    interpreter (exact fp64 tests); Triton 3.6 has no reliable fp64 tl.dot on NVIDIA, so CUDA fp64 uses the
    reference."""
    return triton_can_run(q) and not (q.device.type == "cuda" and q.dtype == torch.float64)


_FP64_WARNED: set[str] = set()


def warn_reference(op: str, q: torch.Tensor) -> None:
    """One warning per op and process when the reference replaces the kernels, and why."""
    if triton_can_run(q):  # only the dtype is the reason
        if op not in _FP64_WARNED:
            _FP64_WARNED.add(op)
            warnings.warn(f"mfkernels.{op}: float64 CUDA tensors use the pure-torch reference (the Triton kernels "
                          f"support fp16, bf16 and fp32 on CUDA)", RuntimeWarning, stacklevel=3)
    else:
        warn_fallback(op, q)


# ========================================================================================== flash backward of o
def _bwd_impl(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the flash backward kernels and the saved LSE."""
    return attention_bwd(grad_o, q, k, v, o, lse, attn_mask, causal, scale)


def _bwd_fake(grad_o, q, k, v, o, lse, attn_mask, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


attention_bwd_op = FusedOp("attention_bwd", _bwd_impl, _bwd_fake,
                           check=lambda grad_o, q, *_: require_triton("attention_bwd", q, kernel_can_run))


# ============================================================================ backward of (o, o_dot) together
def _jvp_bwd_impl(grad_o: torch.Tensor | None, grad_o_dot: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, q_dot: torch.Tensor, k_dot: torch.Tensor, v_dot: torch.Tensor, o: torch.Tensor,
                  o_dot: torch.Tensor, lse: torch.Tensor, mu: torch.Tensor, attn_mask: torch.Tensor | None,
                  causal: bool, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dq_dot, dk_dot, dv_dot) of a loss of (o, o_dot): the tangent backward (tangent_backward.py)."""
    return attention_jvp_bwd(grad_o, grad_o_dot, q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, attn_mask, causal,
                             scale)


def _jvp_bwd_fake(grad_o, grad_o_dot, q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, attn_mask, causal, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, q_dot, k_dot, v_dot))


attention_jvp_bwd_op = FusedOp("attention_jvp_bwd", _jvp_bwd_impl, _jvp_bwd_fake,
                               check=lambda grad_o, grad_o_dot, q, *_: require_triton("attention_jvp_bwd", q,
                                                                                      kernel_can_run))


# ====================================================================================== forward + JVP (o, o_dot)
def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor, k_dot: torch.Tensor,
              v_dot: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool, scale: float, tangent_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, o_dot, lse, mu) from the fused kernel (lse: row statistics, see forward.attention_jvp_fwd; mu: the tangent
    row statistic, saved only when tangent_grad, else empty)."""
    return attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, tangent_grad)


def _fwd_fake(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, tangent_grad):
    batch, heads, n_q, _ = q.shape
    kt, dv, stats = q_dot.shape[0], v.shape[3], acc_dtype(q.dtype)
    return (q.new_empty((batch, heads, n_q, dv)), q.new_empty((kt, heads, n_q, dv)),
            q.new_empty(lse_shape(batch, heads, n_q, attn_mask), dtype=stats),
            q.new_empty((kt if tangent_grad else 0, heads, n_q), dtype=stats))


def _setup_context(ctx, inputs, output) -> None:
    """Save for the backward. Without tangent_grad (the op contract, MeanFlow's stop-gradient path): q, k, v, o and the
    row statistics, never a tangent; o_dot is non-differentiable. With tangent_grad: also the tangents, o_dot and mu,
    so that a loss of o_dot gets exact gradients (mfkernels::attention_jvp_bwd)."""
    q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, tangent_grad = inputs
    o, o_dot, lse, mu = output
    ctx.causal, ctx.scale, ctx.tangent_grad = causal, scale, tangent_grad
    if tangent_grad:
        ctx.save_for_backward(q, k, v, o, lse, attn_mask, q_dot, k_dot, v_dot, o_dot, mu)
        ctx.mark_non_differentiable(lse, mu)
    else:
        ctx.save_for_backward(q, k, v, o, lse, attn_mask)  # O(N) beyond the outputs: never a tangent
        ctx.mark_non_differentiable(o_dot, lse, mu)
    ctx.set_materialize_grads(False)  # unused outputs keep a None gradient: nothing launched for them


def _backward(ctx, grad_o, grad_o_dot, _grad_lse, _grad_mu):
    """Flash backward when only o carries a gradient (grad_o_dot None: o_dot unused, or not differentiable); the
    tangent backward when o_dot does."""
    if ctx.needs_input_grad[6]:
        raise mask_grad_error()
    q, k, v, o, lse, attn_mask = ctx.saved_tensors[:6]
    if ctx.tangent_grad and grad_o_dot is not None and grad_o_dot.shape[0] > 0:
        q_dot, k_dot, v_dot, o_dot, mu = ctx.saved_tensors[6:]
        grads = attention_jvp_bwd_op(grad_o, grad_o_dot, q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, attn_mask,
                                     ctx.causal, ctx.scale)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:6])) + (None,) * 4
    if grad_o is None or not any(ctx.needs_input_grad[:3]):
        return (None,) * 10
    dq, dk, dv = attention_bwd_op(grad_o, q, k, v, o, lse, attn_mask, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None, None


def _check_fwd_args(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, tangent_grad):
    """The registered op's own check (a direct torch.ops call: GQA is whatever the head counts say)."""
    check_attention_args(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal=causal, enable_gqa=True)
    check_attention_kernel_args(q, k, v, scale)
    require_triton("attention_jvp_fwd", q, kernel_can_run)


attention_fwd_op = FusedOp("attention_jvp_fwd", _fwd_impl, _fwd_fake, setup_context=_setup_context,
                           backward=_backward, check=_check_fwd_args)
