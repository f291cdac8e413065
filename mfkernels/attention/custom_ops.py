"""The attention custom ops (mfkernels::attention_jvp_fwd, mfkernels::attention_bwd): opaque to torch.func transforms
and Dynamo, with fake (meta) implementations for tracing."""
from __future__ import annotations

import warnings

import torch

from .._checks import describe
from .._runtime import triton_can_run, warn_fallback
from ._common import _lse_dtype
from .backward import attention_bwd
from .forward import attention_jvp_fwd


# ============================================================================ custom ops (for torch.func / compile)
@torch.library.custom_op("mfkernels::attention_jvp_fwd", mutates_args=())
def _attention_jvp_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor,
                          k_dot: torch.Tensor, v_dot: torch.Tensor, causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, o_dot, lse) from the fused kernel; an opaque op, so torch.func transforms and Dynamo never look inside."""
    if not _kernel_can_run(q):
        raise RuntimeError(f"mfkernels::attention_jvp_fwd needs a CUDA fp16/bf16/fp32 tensor "
                           f"(or TRITON_INTERPRET=1 on CPU); "
                           f"got q with {describe(q)}")
    return attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, causal, scale)


@_attention_jvp_fwd_op.register_fake
def _(q, k, v, q_dot, k_dot, v_dot, causal, scale):
    batch, heads, n_q, d = q.shape
    return (q.new_empty(q.shape), q.new_empty((q_dot.shape[0], heads, n_q, d)),
            q.new_empty((batch, heads, n_q), dtype=_lse_dtype(q.dtype)))


@torch.library.custom_op("mfkernels::attention_bwd", mutates_args=())
def _attention_bwd_op(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the flash backward kernels and the saved LSE."""
    if not _kernel_can_run(q):
        raise RuntimeError(f"mfkernels::attention_bwd needs a CUDA fp16/bf16/fp32 tensor "
                           f"(or TRITON_INTERPRET=1 on CPU); "
                           f"got q with {describe(q)}")
    return attention_bwd(grad_o, q, k, v, o, lse, causal, scale)


@_attention_bwd_op.register_fake
def _(grad_o, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _kernel_can_run(q: torch.Tensor) -> bool:
    """Triton can run here, and the dtype is one the compiled kernels support on that device. fp64 runs only under the
    interpreter (exact fp64 tests); Triton 3.6 has no reliable fp64 tl.dot on NVIDIA, so CUDA fp64 uses the
    reference."""
    return triton_can_run(q) and not (q.device.type == "cuda" and q.dtype == torch.float64)


def _fallback(op: str, q: torch.Tensor) -> None:
    if triton_can_run(q):  # only the dtype is the reason
        if op not in _FP64_WARNED:
            _FP64_WARNED.add(op)
            warnings.warn(f"mfkernels.{op}: float64 CUDA tensors use the pure-torch reference (the Triton kernels "
                          f"support fp16, bf16 and fp32 on CUDA)", RuntimeWarning, stacklevel=3)
    else:
        warn_fallback(op, q)


_FP64_WARNED: set[str] = set()
