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

Chain: `rope._rope_jvp_fwd_kernel` (NORM) -> custom op `mfkernels::qk_norm_rope_fwd` (autograd registered:
`rope._rope_bwd_kernel` (NORM) -> `mfkernels::qk_norm_rope_bwd`) -> `qk_norm_rope_jvp()`.
"""
from __future__ import annotations

import torch

from . import _runtime
from ._checks import describe
from .reference_modern import check_qk_args, qk_norm_rope_jvp_ref
from .rmsnorm import rmsnorm_jvp
from .rope import check_angles_constant, rope_bwd_launch, rope_fwd_launch

__all__ = ["qk_norm_rope_jvp"]


@torch.library.custom_op("mfkernels::qk_norm_rope_fwd", mutates_args=())
def _qk_norm_rope_fwd_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                         k_weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                         q_dot: torch.Tensor, k_dot: torch.Tensor, eps: float, interleaved: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q', k', q'_dot, k'_dot, rstd (2, rows)) from one launch of the fused kernel."""
    if not _runtime.triton_can_run(q):
        raise RuntimeError(f"mfkernels::qk_norm_rope_fwd needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                           f"got q with {describe(q)}")
    weights = None if q_weight is None else [q_weight, k_weight]
    (qo, ko), (qo_dot, ko_dot), rstd = rope_fwd_launch([q, k], [q_dot, k_dot], weights, cos, sin, eps=eps, norm=True,
                                                       interleaved=interleaved)
    return qo, ko, qo_dot, ko_dot, rstd


@_qk_norm_rope_fwd_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps, interleaved):
    rows = q.numel() // q.shape[-1]
    dtypes = {q.dtype} | ({q_weight.dtype, k_weight.dtype} if q_weight is not None else set())
    stats = torch.float64 if torch.float64 in dtypes else torch.float32
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q_dot.shape), q.new_empty(k_dot.shape),
            q.new_empty((2, rows), dtype=stats))


@torch.library.custom_op("mfkernels::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd_op(grad_q: torch.Tensor, grad_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, cos: torch.Tensor | None,
                         sin: torch.Tensor | None, rstd: torch.Tensor, interleaved: bool, compute_dx: bool,
                         compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dw_q, dw_k); dq / dk empty unless compute_dx, dw_* empty unless compute_dw and weights are given."""
    if not _runtime.triton_can_run(q):
        raise RuntimeError(f"mfkernels::qk_norm_rope_bwd needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                           f"got q with {describe(q)}")
    weights = None if q_weight is None else [q_weight, k_weight]
    (dq, dk), dws = rope_bwd_launch([grad_q, grad_k], [q, k], weights, cos, sin, rstd, norm=True,
                                    interleaved=interleaved, compute_dx=compute_dx, compute_dw=compute_dw)
    if dws is None:
        dws = [q.new_empty(0), q.new_empty(0)]
    return dq, dk, dws[0], dws[1]


@_qk_norm_rope_bwd_op.register_fake
def _(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, rstd, interleaved, compute_dx, compute_dw):
    dx_shape = q.shape if compute_dx else (0,)
    if compute_dw and q_weight is not None:
        dws = (q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape))
    else:
        dws = (q.new_empty(0), q.new_empty(0))
    return q.new_empty(dx_shape), q.new_empty(dx_shape), *dws


def _setup_context(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, _q_dot, _k_dot, _eps, interleaved = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, output[4])
    ctx.interleaved = interleaved
    ctx.mark_non_differentiable(output[2], output[3], output[4])


def _backward(ctx, grad_q, grad_k, _gqd, _gkd, _grstd):
    q, k, q_weight, k_weight, cos, sin, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    compute_dx = need[0] or need[1]
    compute_dw = q_weight is not None and (need[2] or need[3])
    dq, dk, dwq, dwk = torch.ops.mfkernels.qk_norm_rope_bwd(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, rstd,
                                                            ctx.interleaved, compute_dx, compute_dw)
    pick = lambda flag, g: g if flag else None  # noqa: E731
    return (pick(need[0], dq), pick(need[1], dk), pick(compute_dw and need[2], dwq), pick(compute_dw and need[3], dwk),
            None, None, None, None, None, None)


torch.library.register_autograd("mfkernels::qk_norm_rope_fwd", _backward, setup_context=_setup_context)


def qk_norm_rope_jvp(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                     cos: torch.Tensor | None, sin: torch.Tensor | None, q_dot: torch.Tensor, k_dot: torch.Tensor,
                     *, eps: float = 1e-6, interleaved: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """QK-norm then RoPE on q and k with their tangents, fused, one launch (module docstring).

    q, k: (B, ..., D) one shape, dtype and device, any strides (per-head views of a qkv projection); q_weight, k_weight:
    (D,) learned scales, or both None; cos, sin: broadcastable to q.shape[:-1] + (D/2,) constants, or both None (no
    RoPE); q_dot, k_dot: (kt, ..., D), kt <= B. Returns (q', k', q'_dot, k'_dot): q', k' differentiable in q, k and the
    scales, contiguous in q's shape; tangents detached. Same contract and checks as `reference.qk_norm_rope_jvp_ref`;
    falls back to it (one warning) where Triton cannot run.
    """
    check_qk_args(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps)
    check_angles_constant(cos, sin)
    if not _runtime.triton_can_run(q):
        _runtime.warn_fallback("qk_norm_rope_jvp", q)
        return qk_norm_rope_jvp_ref(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps=eps, interleaved=interleaved)
    if q.shape[-1] % 2:  # an odd head dim without RoPE: the pair kernel cannot split it; two RMSNorm launches
        qo, qo_dot = rmsnorm_jvp(q, q_weight, q_dot, eps=eps)
        ko, ko_dot = rmsnorm_jvp(k, k_weight, k_dot, eps=eps)
        return qo, ko, qo_dot, ko_dot
    qo, ko, qo_dot, ko_dot, _ = torch.ops.mfkernels.qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot,
                                                                     float(eps), bool(interleaved))
    return qo, ko, qo_dot, ko_dot
