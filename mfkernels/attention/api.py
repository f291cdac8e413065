"""Public API: attention_jvp (fused forward + JVP) and the SDPA drop-in scaled_dot_product_attention (with its
forward-mode autograd.Functions)."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._checks import (check_attention_args, check_attention_kernel_args, check_bool, check_dropout, check_mask_grad,
                       check_mask_is_constant, check_tangent_grad, mask_grad_error)
from ..reference import _attention_jvp_ref, attention_ref
from .registration import attention_bwd_op, attention_fwd_op, attention_jvp_bwd_op, kernel_can_run, warn_reference

__all__ = ["attention_jvp", "scaled_dot_product_attention"]


# ===================================================================================================== public API
def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  q_dot: torch.Tensor, k_dot: torch.Tensor, v_dot: torch.Tensor,
                  *, attn_mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its tangent in one fused pass (per head, c = scale, default D^-1/2):

    S = c Q K^T + mask, P = softmax(S), O = P V;  S_dot = c (Q_dot K^T + Q K_dot^T);
    O_dot = P_dot V + P V_dot, P_dot = P * (S_dot - rowsum(P * S_dot)).
    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) (Dv may differ from D); Hkv = Hq, or with
    enable_gqa=True any divisor of Hq (query head h reads key/value head h // (Hq / Hkv); nothing is copied).
    Tangents: (kt, ...) with kt <= B standing for the first kt batch rows (kt = 0: a plain flash forward, o_dot is
    empty). attn_mask: None, bool (True = attend) or additive float (q's dtype or float32), broadcastable to
    (B, Hq, Nq, Nk) as in torch's SDPA and read per tile (never expanded in memory); it is a constant (no tangent, no
    gradient). Fully masked rows give o = o_dot = 0 (torch's result). causal: top-left aligned like SDPA (query i sees
    keys j <= i); not together with attn_mask (torch refuses that too).
    Returns (o (B, Hq, Nq, Dv), o_dot (kt, Hq, Nq, Dv)); o is differentiable in q, k, v (flash backward).
    tangent_grad: whether o_dot is differentiable too. False: the op contract (mfkernels.reference) and MeanFlow's
    stop-gradient path: o_dot is detached, the tangents get no gradient, nothing beyond the LSE is saved. True: a loss
    of o_dot backpropagates exactly into q, k, v, q_dot, k_dot, v_dot (reverse-over-forward; the tangent backward,
    tangent_backward.py; the tangents, o_dot and one float a tangent row are saved). None (default): True exactly when
    grad mode is on and a tangent requires grad (a tangent with a graph is never cut silently).
    """
    check_bool("causal", causal)
    check_bool("enable_gqa", enable_gqa)
    check_attention_args(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal=causal, enable_gqa=enable_gqa)
    c = check_attention_kernel_args(q, k, v, scale)
    check_tangent_grad(tangent_grad)
    if kernel_can_run(q):  # the reference differentiates a float mask (torch's SDPA does)
        check_mask_grad(attn_mask)
    return _attention_jvp(q, k, v, q_dot, k_dot, v_dot, attn_mask=attn_mask, causal=causal, scale=c,
                          enable_gqa=enable_gqa, tangent_grad=tangent_grad)


def _attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   q_dot: torch.Tensor, k_dot: torch.Tensor, v_dot: torch.Tensor,
                   *, attn_mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_jvp on checked arguments (what the unchecked op tables hold)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not kernel_can_run(q):
        warn_reference("attention_jvp", q)
        return _attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot, attn_mask=attn_mask, causal=causal, scale=scale,
                                  enable_gqa=enable_gqa, tangent_grad=tangent_grad)
    if tangent_grad is None:
        tangent_grad = torch.is_grad_enabled() and (q_dot.requires_grad or k_dot.requires_grad or v_dot.requires_grad)
    o, o_dot, _, _ = attention_fwd_op(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, float(scale), tangent_grad)
    return o, o_dot


# ===================================================================================== SDPA drop-in: forward mode
class _SDPAJVPFunction(torch.autograd.Function):
    """Attention with a custom forward-mode rule, used only where forward mode is active (torch.func.jvp, forward_ad;
    any functorch transform): o from the forward op, its backward the flash backward, its jvp the fused forward + JVP
    kernel. setup_context style (no ctx in forward) so that torch.func transforms accept it. Without forward mode the
    drop-in calls the forward op directly (its registered autograd is the flash backward; Dynamo traces it whole)."""

    @staticmethod
    def forward(q, k, v, attn_mask, causal, scale):
        o, _, lse, _ = attention_fwd_op(q, k, v, q[:0], k[:0], v[:0], attn_mask, causal, scale, False)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, causal, scale = inputs
        o, lse = output
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, v, o, lse, attn_mask)
        ctx.save_for_forward(q, k, v, attn_mask)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    @once_differentiable  # no double backward; also keeps the op call out of autograd under torch.func.grad
    def backward(ctx, grad_o, _grad_lse):
        if ctx.needs_input_grad[3]:
            raise mask_grad_error()
        q, k, v, o, lse, attn_mask = ctx.saved_tensors
        dq, dk, dv = attention_bwd_op(grad_o, q, k, v, o, lse, attn_mask, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot, mask_dot, _causal_dot, _scale_dot):
        q, k, v, attn_mask = ctx.saved_tensors
        # mask_dot is ignored: the mask is a constant. torch.func.jvp hands a zero tangent here even for a closed-over
        # mask; a mask that really carries a tangent was refused before apply (check_mask_is_constant).
        # An input without a tangent has a zero tangent. The fused kernel recomputes O alongside O_dot (the primal
        # forward already ran: forward mode only sees the tangents after it).
        q_dot = torch.zeros_like(q) if q_dot is None else q_dot
        k_dot = torch.zeros_like(k) if k_dot is None else k_dot
        v_dot = torch.zeros_like(v) if v_dot is None else v_dot
        # o_dot is differentiable as torch's is (reverse-over-forward: a loss of (o, o_dot) gets exact gradients from
        # the tangent backward).
        tangents = (q_dot.to(q.dtype), k_dot.to(k.dtype), v_dot.to(v.dtype))
        return _SDPATangentFunction.apply(q, k, v, *tangents, attn_mask, ctx.causal, ctx.scale)[0], None


class _SDPATangentFunction(torch.autograd.Function):
    """o_dot of the drop-in's forward mode, differentiable in q, k, v and the tangents through the tangent backward.
    An autograd.Function in setup_context style rather than the op's registered autograd because functorch transforms
    (torch.func.grad over torch.func.jvp) accept only the former."""

    @staticmethod
    def forward(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale):
        o, o_dot, lse, mu = attention_fwd_op(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, True)
        return o_dot, o, lse, mu

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale = inputs
        o_dot, o, lse, mu = output
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, attn_mask)
        ctx.mark_non_differentiable(o, lse, mu)
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_o_dot, _grad_o, _grad_lse, _grad_mu):
        if ctx.needs_input_grad[6]:
            raise mask_grad_error()
        if grad_o_dot is None:
            return (None,) * 9
        q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, attn_mask = ctx.saved_tensors
        grads = attention_jvp_bwd_op(None, grad_o_dot, q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, mu, attn_mask,
                                     ctx.causal, ctx.scale)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:6])) + (None,) * 3


def _forward_mode_active() -> bool:
    """True inside torch.func.jvp (or any functorch transform) or a torch.autograd.forward_ad dual level."""
    return torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0


@torch.compiler.disable
def _sdpa_outside_dynamo(q, k, v, attn_mask, causal: bool, scale: float) -> torch.Tensor:
    """Eager island for forward mode under torch.compile: Dynamo drops an autograd.Function's custom jvp inside
    torch.func.jvp / forward_ad and returns zero (or no) tangents silently (a PyTorch bug, still open in torch 2.13;
    tests/test_attention.py pins it with a strict xfail). Running the Function
    outside Dynamo costs a graph break but keeps the tangent right."""
    check_mask_is_constant(attn_mask)
    return _SDPAJVPFunction.apply(q, k, v, attn_mask, causal, scale)[0]


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for F.scaled_dot_product_attention on 4-D (B, H, N, D) inputs, differentiable in reverse mode (flash
    backward) and forward mode (torch.autograd.forward_ad, torch.func.jvp: the fused forward + JVP kernel).

    Supported as in torch: attn_mask (bool, True = attend, or additive float of the query's dtype or float32;
    broadcastable to (B, Hq, Nq, Nk); read per tile, never expanded in memory; a constant: a mask that requires grad
    or carries a tangent is refused), is_causal (top-left aligned; not together with attn_mask, as torch), scale,
    enable_gqa (Hkv dividing Hq, no copies), a value head dim Dv != D. Fully masked rows give 0, like torch. In forward
    mode the tangent output is differentiable like torch's (a loss of (o, o_dot) after torch.func.jvp / forward_ad
    gets exact gradients for the primals and the tangents: the tangent backward); no double backward.
    Not supported: dropout_p > 0 (there is no fused dropout: NotImplementedError). Falls back to
    F.scaled_dot_product_attention (with a warning; in forward mode to the math reference) where the kernels cannot
    run. Under torch.compile, plain autograd traces into the graph (two opaque custom ops); forward mode
    (torch.func.jvp / forward_ad) graph-breaks around this call, because Dynamo would otherwise silently drop the custom
    jvp (see _sdpa_outside_dynamo).
    """
    check_dropout(dropout_p)
    causal = check_bool("is_causal", is_causal)
    check_bool("enable_gqa", enable_gqa)
    q0 = query[:0]  # zero-row tangents: the checks of attention_jvp without any tangent
    check_attention_args(query, key, value, q0, key[:0], value[:0], attn_mask, causal=causal, enable_gqa=enable_gqa)
    c = check_attention_kernel_args(query, key, value, scale)
    if not kernel_can_run(query):
        warn_reference("scaled_dot_product_attention", query)
        if _forward_mode_active():  # torch's fused CPU/CUDA SDPA kernels have no forward-mode formula
            return attention_ref(query, key, value, attn_mask=attn_mask, causal=causal, scale=c, enable_gqa=enable_gqa)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=causal, scale=c,
                                              enable_gqa=enable_gqa)
    check_mask_grad(attn_mask)
    if _forward_mode_active():
        if torch.compiler.is_compiling():
            return _sdpa_outside_dynamo(query, key, value, attn_mask, causal, c)
        check_mask_is_constant(attn_mask)
        return _SDPAJVPFunction.apply(query, key, value, attn_mask, causal, c)[0]
    # No forward mode: the op itself (its autograd is the flash backward; Dynamo traces it whole).
    return attention_fwd_op(query, key, value, q0, key[:0], value[:0], attn_mask, causal, c, False)[0]
