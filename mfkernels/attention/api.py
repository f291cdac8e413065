"""Public API: attention_jvp (fused forward + JVP) and the SDPA drop-in scaled_dot_product_attention."""
from __future__ import annotations

import math
import numbers

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import reference
from .._checks import describe
from ._common import MAX_HEAD_DIM
from .custom_ops import _fallback, _kernel_can_run


# ================================================================================================ argument checks
def _resolve_scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be None or a real number; got {scale!r} ({type(scale).__name__})")
    if not (math.isfinite(float(scale)) and scale > 0):
        raise ValueError(f"scale must be finite and > 0 (the kernels track the row max of unscaled scores); "
                         f"got {scale!r}")
    return float(scale)


def _check_head_dim(q: torch.Tensor, k: torch.Tensor) -> None:
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q has head dim D = {d} ({describe(q)}); supported head dims are 1..{MAX_HEAD_DIM} "
                         f"(tuned for 64 and 128; others are zero-padded to the next power of two >= 16)")
    if k.shape[2] == 0:
        raise ValueError(f"k has no keys ({describe(k)}); attention needs Nk >= 1")


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {causal!r} ({type(causal).__name__})")
    return causal


# ===================================================================================================== public API
def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  q_dot: torch.Tensor, k_dot: torch.Tensor, v_dot: torch.Tensor,
                  *, causal: bool = False, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its tangent in one fused pass (per head, c = scale, default D^-1/2):

    S = c Q K^T, P = softmax(S), O = P V;  S_dot = c (Q_dot K^T + Q K_dot^T);
    O_dot = P_dot V + P V_dot, P_dot = P * (S_dot - rowsum(P * S_dot)).
    q: (B, H, Nq, D); k, v: (B, H, Nk, D); tangents: (kt, ...) with kt <= B standing for the first kt batch rows
    (kt = 0: a plain flash forward, o_dot is empty). causal: top-left aligned like SDPA (query i sees keys j <= i).
    Returns (o (B, H, Nq, D), o_dot (kt, H, Nq, D)); o is differentiable in q, k, v, o_dot is not.
    """
    reference._check_attention(q, k, v, q_dot, k_dot, v_dot)
    _check_head_dim(q, k)
    causal = _check_causal(causal)
    c = _resolve_scale(scale, q.shape[-1])
    if not _kernel_can_run(q):
        _fallback("attention_jvp", q)
        return reference.attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot, causal=causal, scale=c)
    o, o_dot, _ = torch.ops.mfkernels.attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, causal, c)
    return o, o_dot


# ===================================================================================== SDPA drop-in: forward mode
class _SDPAJVPFunction(torch.autograd.Function):
    """Attention with a custom forward-mode rule, used only where forward mode is active (torch.func.jvp, forward_ad;
    any functorch transform): o from the custom op, its backward the flash backward, its jvp the fused forward + JVP
    kernel. setup_context style (no ctx in forward) so that torch.func transforms accept it. Without forward mode the
    drop-in calls the custom op directly (register_autograd gives its backward; Dynamo traces it whole)."""

    @staticmethod
    def forward(q, k, v, causal, scale):
        o, _, lse = torch.ops.mfkernels.attention_jvp_fwd(q, k, v, q[:0], k[:0], v[:0], causal, scale)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale = inputs
        o, lse = output
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    @once_differentiable  # no double backward; also keeps the op call out of autograd under torch.func.grad
    def backward(ctx, grad_o, _grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.mfkernels.attention_bwd(grad_o, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot, _causal_dot, _scale_dot):
        q, k, v = ctx.saved_tensors
        # An input without a tangent has a zero tangent. The fused kernel recomputes O alongside O_dot (the primal
        # forward already ran: forward mode only sees the tangents after it).
        q_dot = torch.zeros_like(q) if q_dot is None else q_dot
        k_dot = torch.zeros_like(k) if k_dot is None else k_dot
        v_dot = torch.zeros_like(v) if v_dot is None else v_dot
        # o_dot is never differentiable (and a custom op call under torch.func.grad must not record anything).
        with torch.no_grad():
            _, o_dot, _ = torch.ops.mfkernels.attention_jvp_fwd(q, k, v, q_dot.to(q.dtype), k_dot.to(k.dtype),
                                                                v_dot.to(v.dtype), ctx.causal, ctx.scale)
        return o_dot, None


def _forward_mode_active() -> bool:
    """True inside torch.func.jvp (or any functorch transform) or a torch.autograd.forward_ad dual level."""
    return torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0


@torch.compiler.disable
def _sdpa_outside_dynamo(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """Eager island for forward mode under torch.compile: Dynamo drops an autograd.Function's custom jvp inside
    torch.func.jvp / forward_ad and returns zero (or no) tangents silently (pytorch #192985). Running the Function
    outside Dynamo costs a graph break but keeps the tangent right."""
    return _SDPAJVPFunction.apply(q, k, v, causal, scale)[0]


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for F.scaled_dot_product_attention on 4-D (B, H, N, D) inputs, differentiable in reverse mode (flash
    backward) and forward mode (torch.autograd.forward_ad, torch.func.jvp: the fused forward + JVP kernel).

    attn_mask, dropout_p > 0 and enable_gqa are not supported and raise. Falls back to F.scaled_dot_product_attention
    (with a warning; in forward mode to the math reference) where the kernels cannot run. Under torch.compile, plain
    autograd traces into the graph (two opaque custom ops); forward mode (torch.func.jvp / forward_ad) graph-breaks
    around this call, because Dynamo would otherwise silently drop the custom jvp (pytorch #192985).
    """
    if attn_mask is not None:
        raise NotImplementedError("mfkernels.scaled_dot_product_attention: attn_mask is not supported "
                                  "(use is_causal=True for a causal mask, or F.scaled_dot_product_attention)")
    if dropout_p != 0.0:
        raise NotImplementedError(f"mfkernels.scaled_dot_product_attention: dropout_p must be 0.0; got {dropout_p}")
    if enable_gqa:
        raise NotImplementedError("mfkernels.scaled_dot_product_attention: enable_gqa is not supported; "
                                  "k and v must have as many heads as q")
    q0 = query[:0]  # zero-row tangents: the checks of attention_jvp without any tangent
    reference._check_attention(query, key, value, q0, key[:0], value[:0])
    _check_head_dim(query, key)
    causal = _check_causal(is_causal)
    c = _resolve_scale(scale, query.shape[-1])
    if not _kernel_can_run(query):
        _fallback("scaled_dot_product_attention", query)
        if _forward_mode_active():  # torch's fused CPU/CUDA SDPA kernels have no forward-mode formula
            return reference.attention_ref(query, key, value, causal=causal, scale=c)
        return F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=c)
    if _forward_mode_active():
        if torch.compiler.is_compiling():
            return _sdpa_outside_dynamo(query, key, value, causal, c)
        return _SDPAJVPFunction.apply(query, key, value, causal, c)[0]
    # No forward mode: the custom op itself (its registered autograd is the flash backward; Dynamo traces it whole).
    return torch.ops.mfkernels.attention_jvp_fwd(query, key, value, q0, key[:0], value[:0], causal, c)[0]
