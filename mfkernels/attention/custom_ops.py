"""The attention custom ops and their autograd (the op pattern of DESIGN.md 7 / issue 14).

    mfkernels::attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, attn_mask?, causal, scale) -> (o, o_dot, lse)
    mfkernels::attention_bwd(grad_o, q, k, v, o, lse, attn_mask?, causal, scale) -> (dq, dk, dv)

Each op's body calls its launcher (forward.py / backward.py); `register_fake` gives Dynamo and torch.func the output
metadata, so the ops are opaque: traced whole by torch.compile (fullgraph), never looked inside by torch.func.
`register_autograd` on attention_jvp_fwd: o backpropagates through the flash backward from the saved LSE; o_dot and lse
are non-differentiable; tangent inputs get no gradient; a mask gets none either (a gradient for a float attn_mask
is refused with an error: it would need the (B, H, Nq, Nk) score gradient). No custom jvp anywhere on this path
(pytorch #192985).
"""
from __future__ import annotations

import warnings

import torch

from .._checks import describe
from .._runtime import triton_can_run, warn_fallback
from ._common import _lse_dtype, lse_shape
from .backward import attention_bwd
from .forward import attention_jvp_fwd


def _kernel_can_run(q: torch.Tensor) -> bool:
    """Triton can run here, and the dtype is one the compiled kernels support on that device. fp64 runs only under the
    interpreter (exact fp64 tests); Triton 3.6 has no reliable fp64 tl.dot on NVIDIA, so CUDA fp64 uses the
    reference."""
    return triton_can_run(q) and not (q.device.type == "cuda" and q.dtype == torch.float64)


def _require_kernel(op: str, q: torch.Tensor) -> None:
    if not _kernel_can_run(q):
        raise RuntimeError(f"mfkernels::{op} needs a CUDA fp16/bf16/fp32 tensor (or TRITON_INTERPRET=1 on CPU); "
                           f"got q with {describe(q)}")


def _fallback(op: str, q: torch.Tensor) -> None:
    if triton_can_run(q):  # only the dtype is the reason
        if op not in _FP64_WARNED:
            _FP64_WARNED.add(op)
            warnings.warn(f"mfkernels.{op}: float64 CUDA tensors use the pure-torch reference (the Triton kernels "
                          f"support fp16, bf16 and fp32 on CUDA)", RuntimeWarning, stacklevel=3)
    else:
        warn_fallback(op, q)


_FP64_WARNED: set[str] = set()


# ======================================================================================== forward + JVP (o, o_dot)
@torch.library.custom_op("mfkernels::attention_jvp_fwd", mutates_args=())
def _attention_jvp_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor,
                          k_dot: torch.Tensor, v_dot: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, o_dot, lse) from the fused kernel (lse in raw-score units, see the package docstring)."""
    _require_kernel("attention_jvp_fwd", q)
    return attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale)


@_attention_jvp_fwd_op.register_fake
def _(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale):
    batch, heads, n_q, _ = q.shape
    dv = v.shape[3]
    return (q.new_empty((batch, heads, n_q, dv)), q.new_empty((q_dot.shape[0], heads, n_q, dv)),
            q.new_empty(lse_shape(batch, heads, n_q, attn_mask), dtype=_lse_dtype(q.dtype)))


# ============================================================================================= flash backward of o
@torch.library.custom_op("mfkernels::attention_bwd", mutates_args=())
def _attention_bwd_op(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the flash backward kernels and the saved LSE."""
    _require_kernel("attention_bwd", q)
    return attention_bwd(grad_o, q, k, v, o, lse, attn_mask, causal, scale)


@_attention_bwd_op.register_fake
def _(grad_o, q, k, v, o, lse, attn_mask, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ======================================================================================================= autograd
def mask_grad_error() -> ValueError:
    return ValueError("attn_mask requires grad: the fused attention gives no gradient for a float attn_mask (it would "
                      "need the (B, H, Nq, Nk) score gradient); pass attn_mask.detach(), or use "
                      "F.scaled_dot_product_attention for a learned additive mask")


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, _q_dot, _k_dot, _v_dot, attn_mask, causal, scale = inputs
    o, o_dot, lse = output
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, o, lse, attn_mask)  # O(N) beyond the outputs: never a tangent
    ctx.mark_non_differentiable(o_dot, lse)
    ctx.set_materialize_grads(False)  # grad_o stays None when o is unused: no backward launch at all


def _backward(ctx, grad_o, _grad_o_dot, _grad_lse):
    if ctx.needs_input_grad[6]:
        raise mask_grad_error()
    if grad_o is None or not any(ctx.needs_input_grad[:3]):
        return (None,) * 9
    q, k, v, o, lse, attn_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.mfkernels.attention_bwd(grad_o, q, k, v, o, lse, attn_mask, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("mfkernels::attention_jvp_fwd", _backward, setup_context=_setup_context)
