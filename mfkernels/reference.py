"""Pure-PyTorch reference ops: each layer's output and its tangent (forward-mode derivative) in one call.

These are the readable statement of the tangent rules (docs/design.md, 'Tangent rules'), the `explicit` backend of
`meanflow`, the CPU fallback of every Triton op, and what the kernels are tested against. Every op here and in the
Triton modules follows one contract:

* ``op(primals..., tangents...) -> (y, y_dot)``.
* A tangent has its primal's shape except in dim 0: kt <= B rows that stand for the FIRST kt rows of the primal batch.
  kt = 0 is allowed (no tangent work at all; y_dot is empty).
* ``y`` is differentiable with respect to every primal input (ordinary autograd); ``y_dot`` is computed without
  building any autograd graph and is returned detached. Tangent inputs are constants: no gradient flows into them.
* ``tangent_grad`` (a keyword of every op) changes the second point: with it True, ``y_dot`` is computed WITH grad from
  the same formulas, so it is differentiable with respect to the primal inputs, the tangents and the weights (a loss
  of the tangent, as TVM's, gets exact gradients: "reverse over forward"). None (the default): True exactly when grad
  mode is on and a tangent input requires grad (`_runtime.tangent_grad_on`); False: detached. The backward formulas of
  every op's tangent are in docs/design.md, 'Gradients through the tangent'.

Rules (a dot is a tangent; parameters and positions carry none):

    linear       y = x W^T + b;  y_dot = x_dot W^T                  (one matmul on the stacked rows [x; x_dot])
    activations  y = g(a);  y_dot = g'(a) a_dot                       (GELU(tanh), SiLU)
    LN-modulate  y = xh (1 + scale) + shift,  xh = (x - mean) / sigma;
                 y_dot = xh_dot (1 + scale) + xh scale_dot + shift_dot
    residual     y = x + gate f;  y_dot = x_dot + gate_dot f + gate f_dot
    attention    O = softmax(c Q K^T + mask) V;  O_dot = P_dot V + P V_dot
    RMSNorm      r = 1 / sqrt(mean(x^2) + eps);  y = x r w;          y_dot = (x_dot - x r^2 mean(x x_dot)) r w
    RoPE         pairs (x1, x2) of the last dim rotated by the angle of their position and frequency:
                 y1 = x1 cos - x2 sin,  y2 = x1 sin + x2 cos;       the tangent rotates with the same angles
    QK-norm+RoPE RoPE(RMSNorm(q, w_q)), RoPE(RMSNorm(k, w_k))
    SwiGLU       [a | b] = x [W1; W3]^T + [b1; b3];  g = silu(a) b;  y = g W2^T + b2
                 g_dot = silu'(a) a_dot b + silu(a) b_dot,  [a_dot | b_dot] = x_dot [W1; W3]^T  (one GEMM on [x; x_dot])

RoPE pairing: ``interleaved=True`` pairs (x[2i], x[2i+1]) (a complex view of the last dim: iMF, Flux, LLaMA's Meta
code); ``interleaved=False`` pairs (x[i], x[i + D/2]) (GPT-NeoX / HF "rotate_half"). cos and sin hold one angle per
pair: shape broadcastable to x.shape[:-1] + (D/2,), e.g. (N, D/2) for x of (B, H, N, D), or (N, 1, D/2) for
(B, N, H, D).

Tangent math runs in fp32 (fp64 for fp64 inputs: `_runtime.acc_dtype`); outputs have x's dtype. Norm weights may have
another float dtype than x (an fp32 parameter with bf16 activations under autocast): they are upcast, as the kernels do.

Checks: each public `<op>_ref` validates its arguments (mfkernels._checks, the same checks as the fused op) and calls
its private `_<op>_ref`, which does not; composite references and the unchecked op table
(`mfkernels.ops.ops_table("reference", checked=False)`) call the private ones.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import (check_attention_args, check_gated_residual_args, check_layernorm_modulate_args,
                      check_linear_args, check_mlp_args, check_qk_args, check_rmsnorm_args, check_rope_args,
                      check_swiglu_args, check_tangent, check_tangent_grad)
from ._runtime import acc_dtype, tangent_grad_on

GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715

__all__ = ["linear_jvp_ref", "silu_jvp_ref", "gelu_tanh_jvp_ref", "mlp_jvp_ref", "layernorm_modulate_jvp_ref",
           "gated_residual_jvp_ref", "attention_ref", "attention_jvp_ref", "rmsnorm_jvp_ref", "rope_jvp_ref",
           "qk_norm_rope_jvp_ref", "swiglu_jvp_ref", "meanflow_loss_ref", "gelu_tanh_grad", "silu_grad",
           "gelu_tanh_grad2", "silu_grad2", "rotate_pairs"]


def _rows(t: torch.Tensor, kt: int) -> torch.Tensor:
    """The first kt rows, detached: tangent rules read primal values but never backpropagate through them."""
    return t[:kt].detach()


def _graph_rows(t: torch.Tensor, kt: int) -> torch.Tensor:
    """The first kt rows, attached (tangent_grad: the tangent's graph reaches the primal)."""
    return t[:kt]


def _tangent_mode(tangent_grad: bool | None, *tangents: torch.Tensor | None):
    """(grad mode of the tangent math, how it reads primal rows) for an op's tangent_grad argument."""
    on = tangent_grad_on(tangent_grad, *tangents)
    return on, (_graph_rows if on else _rows)


# ----------------------------------------------------------------------------------------------------------- linear
class _LinearJVP(torch.autograd.Function):
    """y = x W^T + b and y_dot = x_dot W^T from ONE matmul on [x; x_dot]; backward saves only x (never x_dot)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, x_dot, weight, bias):
        batch, kt = x.shape[0], x_dot.shape[0]
        stacked = torch.cat([x, x_dot.to(x.dtype)]) if kt else x
        out = F.linear(stacked, weight)
        y = out[:batch] + bias.to(out.dtype) if bias is not None else out[:batch]  # autocast: bias stays fp32
        y_dot = out[batch:]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(y_dot)
        return y, y_dot

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y, _grad_y_dot):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.matmul(weight.to(grad_y.dtype))
        if ctx.needs_input_grad[2]:
            grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]).to(grad_y.dtype))
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_w, grad_b


def linear_jvp_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   x_dot: torch.Tensor, *, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b;  y_dot = x_dot W^T  (x: (B, ..., in), x_dot: (kt, ..., in), W: (out, in)).
    tangent_grad: y_dot differentiable in x_dot and W (module docstring)."""
    check_linear_args(x, weight, x_dot)
    check_tangent_grad(tangent_grad)
    return _linear_jvp_ref(x, weight, bias, x_dot, tangent_grad=tangent_grad)


def _linear_jvp_ref(x, weight, bias, x_dot, *, tangent_grad: bool | None = None):
    if not tangent_grad_on(tangent_grad, x_dot):
        return _LinearJVP.apply(x, x_dot, weight, bias)
    # the same one matmul over [x; x_dot], recorded by autograd (the tangent rows' gradient reaches x_dot and W)
    batch, kt = x.shape[0], x_dot.shape[0]
    out = F.linear(torch.cat([x, x_dot.to(x.dtype)]) if kt else x, weight)
    y = out[:batch] + bias.to(out.dtype) if bias is not None else out[:batch]
    return y, out[batch:]


# ------------------------------------------------------------------------------------------------------ activations
def silu_grad(a: torch.Tensor) -> torch.Tensor:
    """silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)."""
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def silu_grad2(a: torch.Tensor) -> torch.Tensor:
    """silu''(a) = s (1 - s) (2 + a (1 - 2 s)), s = sigmoid(a): the fused ops' tangent backward uses it."""
    s = torch.sigmoid(a)
    return s * (1 - s) * (2 + a * (1 - 2 * s))


def silu_jvp_ref(a: torch.Tensor, a_dot: torch.Tensor, *,
                 tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = a sig(a);  y_dot = sig(a) (1 + a (1 - sig(a))) a_dot."""
    check_tangent("a_dot", a_dot, "a", a)
    check_tangent_grad(tangent_grad)
    return _silu_jvp_ref(a, a_dot, tangent_grad=tangent_grad)


def _silu_jvp_ref(a, a_dot, *, tangent_grad: bool | None = None):
    y = F.silu(a)
    on, rows = _tangent_mode(tangent_grad, a_dot)
    with torch.set_grad_enabled(on):
        acc = acc_dtype(a.dtype)
        y_dot = (silu_grad(rows(a, a_dot.shape[0]).to(acc)) * a_dot.to(acc)).to(a.dtype)
    return y, y_dot


def gelu_tanh_grad(a: torch.Tensor) -> torch.Tensor:
    """g'(a) for g(a) = 0.5 a (1 + tanh(k (a + c a^3))):  0.5 (1 + th) + 0.5 a (1 - th^2) k (1 + 3 c a^2)."""
    th = torch.tanh(GELU_K * (a + GELU_C * a * a * a))
    return 0.5 * (1 + th) + 0.5 * a * (1 - th * th) * GELU_K * (1 + 3 * GELU_C * a * a)


def gelu_tanh_grad2(a: torch.Tensor) -> torch.Tensor:
    """g''(a) of GELU(tanh): with u = k (a + c a^3), u' = k (1 + 3 c a^2), th = tanh(u):
    g'' = (1 - th^2) (u' - a th u'^2 + 3 k c a^2)   (the fused ops' tangent backward uses it)."""
    th = torch.tanh(GELU_K * (a + GELU_C * a * a * a))
    du = GELU_K * (1 + 3 * GELU_C * a * a)
    return (1 - th * th) * (du - a * th * du * du + 3 * GELU_K * GELU_C * a * a)


def gelu_tanh_jvp_ref(a: torch.Tensor, a_dot: torch.Tensor, *,
                      tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = GELU_tanh(a);  y_dot = g'(a) a_dot."""
    check_tangent("a_dot", a_dot, "a", a)
    check_tangent_grad(tangent_grad)
    return _gelu_tanh_jvp_ref(a, a_dot, tangent_grad=tangent_grad)


def _gelu_tanh_jvp_ref(a, a_dot, *, tangent_grad: bool | None = None):
    y = F.gelu(a, approximate="tanh")
    on, rows = _tangent_mode(tangent_grad, a_dot)
    with torch.set_grad_enabled(on):
        acc = acc_dtype(a.dtype)
        y_dot = (gelu_tanh_grad(rows(a, a_dot.shape[0]).to(acc)) * a_dot.to(acc)).to(a.dtype)
    return y, y_dot


def mlp_jvp_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, x_dot: torch.Tensor, *,
                tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear -> GELU(tanh) -> Linear with its tangent; each linear is one GEMM over [x; x_dot]."""
    check_mlp_args(x, w1, w2, x_dot)
    check_tangent_grad(tangent_grad)
    return _mlp_jvp_ref(x, w1, b1, w2, b2, x_dot, tangent_grad=tangent_grad)


def _mlp_jvp_ref(x, w1, b1, w2, b2, x_dot, *, tangent_grad: bool | None = None):
    tangent_grad = tangent_grad_on(tangent_grad, x_dot)  # decided once: the inner tangents inherit it
    a, a_dot = _linear_jvp_ref(x, w1, b1, x_dot, tangent_grad=tangent_grad)
    g, g_dot = _gelu_tanh_jvp_ref(a, a_dot, tangent_grad=tangent_grad)
    return _linear_jvp_ref(g, w2, b2, g_dot, tangent_grad=tangent_grad)


def swiglu_jvp_ref(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor | None, w2: torch.Tensor,
                   b2: torch.Tensor | None, x_dot: torch.Tensor, *,
                   tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU MLP with its tangent: [a | b] = x [W1; W3]^T (+ b13); g = silu(a) b; y = g W2^T (+ b2).

    x: (B, ..., C); w13: (2H, C) = [W1; W3] (gate rows first); w2: (out, H); x_dot: (kt, ..., C). Both GEMMs run once
    over the stacked rows [x; x_dot] (resp. [g; g_dot])."""
    check_swiglu_args(x, w13, b13, w2, b2, x_dot)
    check_tangent_grad(tangent_grad)
    return _swiglu_jvp_ref(x, w13, b13, w2, b2, x_dot, tangent_grad=tangent_grad)


def _swiglu_jvp_ref(x, w13, b13, w2, b2, x_dot, *, tangent_grad: bool | None = None):
    on, rows = _tangent_mode(tangent_grad, x_dot)
    ab, ab_dot = _linear_jvp_ref(x, w13, b13, x_dot, tangent_grad=on)
    a, b = ab.chunk(2, dim=-1)
    g = F.silu(a) * b
    with torch.set_grad_enabled(on):
        kt = x_dot.shape[0]
        acc = acc_dtype(ab.dtype)
        ak, bk = (rows(t, kt).to(acc) for t in (a, b))
        a_dot, b_dot = (t.to(acc) for t in ab_dot.chunk(2, dim=-1))
        g_dot = (silu_grad(ak) * a_dot * bk + F.silu(ak) * b_dot).to(g.dtype)
    return _linear_jvp_ref(g, w2, b2, g_dot, tangent_grad=on)


# --------------------------------------------------------------------------------------------- LayerNorm + modulate
def layernorm_modulate_jvp_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                               x_dot: torch.Tensor, shift_dot: torch.Tensor, scale_dot: torch.Tensor,
                               *, eps: float = 1e-6, tangent_grad: bool | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm without affine, then adaLN modulation, with its tangent.

    xh = (x - mean) / sigma, sigma = sqrt(var + eps);  y = xh (1 + scale) + shift   (scale, shift broadcast over tokens)
    xh_dot = (x_dot - mean(x_dot) - xh mean(xh x_dot)) / sigma
    y_dot = xh_dot (1 + scale) + xh scale_dot + shift_dot
    Shapes: x (B, N, C); shift, scale (B, C); tangents (kt, N, C) and (kt, C).
    """
    check_layernorm_modulate_args(x, shift, scale, x_dot, shift_dot, scale_dot)
    check_tangent_grad(tangent_grad)
    return _layernorm_modulate_jvp_ref(x, shift, scale, x_dot, shift_dot, scale_dot, eps=eps,
                                       tangent_grad=tangent_grad)


def _layernorm_modulate_jvp_ref(x, shift, scale, x_dot, shift_dot, scale_dot, *, eps: float = 1e-6,
                                tangent_grad: bool | None = None):
    kt = x_dot.shape[0]
    xh = F.layer_norm(x, (x.shape[-1],), eps=eps)
    y = xh * (1 + scale[:, None, :]) + shift[:, None, :]
    # the statistics are recomputed from their formulas (not F.layer_norm's saved ones): with tangent_grad their
    # dependence on x is part of the tangent's graph
    on, rows = _tangent_mode(tangent_grad, x_dot, shift_dot, scale_dot)
    with torch.set_grad_enabled(on):
        xk = rows(x, kt)
        acc = acc_dtype(x.dtype)
        xf, xdf = xk.to(acc), x_dot.to(acc)
        mean = xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)
        xhk = (xf - mean) * rstd
        xh_dot = (xdf - xdf.mean(-1, keepdim=True) - xhk * (xhk * xdf).mean(-1, keepdim=True)) * rstd
        y_dot = (xh_dot * (1 + rows(scale, kt).to(acc)[:, None, :]) + xhk * scale_dot.to(acc)[:, None, :]
                 + shift_dot.to(acc)[:, None, :]).to(y.dtype)
    return y, y_dot


# --------------------------------------------------------------------------------------------------- gated residual
def gated_residual_jvp_ref(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor,
                           x_dot: torch.Tensor, gate_dot: torch.Tensor, f_dot: torch.Tensor, *,
                           tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x + gate * f;  y_dot = x_dot + gate_dot * f + gate * f_dot   (x, f: (B, N, C); gate: (B, C))."""
    check_gated_residual_args(x, gate, f, x_dot, gate_dot, f_dot)
    check_tangent_grad(tangent_grad)
    return _gated_residual_jvp_ref(x, gate, f, x_dot, gate_dot, f_dot, tangent_grad=tangent_grad)


def _gated_residual_jvp_ref(x, gate, f, x_dot, gate_dot, f_dot, *, tangent_grad: bool | None = None):
    kt = x_dot.shape[0]
    y = x + gate[:, None, :] * f
    on, rows = _tangent_mode(tangent_grad, x_dot, gate_dot, f_dot)
    with torch.set_grad_enabled(on):
        y_dot = x_dot + gate_dot[:, None, :] * rows(f, kt) + rows(gate, kt)[:, None, :] * f_dot
    return y, y_dot


# -------------------------------------------------------------------------------------------------------- attention
def _causal_mask(nq: int, nk: int, device) -> torch.Tensor:
    """True where attention is allowed. Top-left aligned, as torch's SDPA with is_causal=True: query i sees keys
    <= i."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """GQA / MQA for the references: k, v repeated per query head (head h reads key/value head h // (Hq / Hkv))."""
    if k.shape[1] == q.shape[1]:
        return k, v
    rep = q.shape[1] // k.shape[1]
    return k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)


def _masked_logits(s: torch.Tensor, attn_mask, causal: bool) -> torch.Tensor:
    """Scaled scores with causal / bool (-inf where False) / additive masks applied, as torch's SDPA does."""
    if causal:
        s = s.masked_fill(~_causal_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    return s


def _safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim with fully masked rows (all -inf) giving 0, as torch's SDPA math backend does. The
    dead rows are filled before the softmax, so no NaN reaches a derivative either (torch's own math backend does give
    NaN gradients there under reverse-over-forward; the exact ones are 0: those rows are constant)."""
    dead = (s == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                  causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Math attention O = softmax(c Q K^T + mask) V, written out so that torch.func.jvp can differentiate it (test
    reference). GQA (k, v with fewer heads) repeats them per query head; fully masked rows give 0 (torch's result)."""
    c = scale if scale is not None else q.shape[-1] ** -0.5
    k, v = _expand_kv(q, k, v)
    s = _masked_logits(c * q @ k.transpose(-1, -2), attn_mask, causal)
    return _safe_softmax(s) @ v


def attention_jvp_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      q_dot: torch.Tensor, k_dot: torch.Tensor, v_dot: torch.Tensor,
                      *, attn_mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                      enable_gqa: bool = False, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its tangent, closed form (per head, c = scale, default D^-1/2):

    S = c Q K^T + mask, P = softmax(S), O = P V
    S_dot = c (Q_dot K^T + Q K_dot^T) (a mask is a constant);  P_dot = P * (S_dot - rowsum(P * S_dot));
    O_dot = P_dot V + P V_dot
    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) (Hkv < Hq needs enable_gqa); tangents have kt <= B
    rows; attn_mask bool / additive, broadcastable to (B, Hq, Nq, Nk). Masked entries have P = 0 and so P_dot = 0;
    fully masked rows give O = O_dot = 0. The primal uses torch's SDPA (differentiable).
    tangent_grad: False (the op contract): o_dot is computed in fp32 (fp64 for fp64 inputs) without a graph, the
    tangents get no gradient. True: o_dot is differentiable in q, k, v and the tangents. None (default): True exactly
    when grad mode is on and a tangent requires grad.
    """
    check_attention_args(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal=causal, enable_gqa=enable_gqa)
    check_tangent_grad(tangent_grad)
    return _attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot, attn_mask=attn_mask, causal=causal, scale=scale,
                              enable_gqa=enable_gqa, tangent_grad=tangent_grad)


def _attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot, *, attn_mask=None, causal: bool = False,
                       scale: float | None = None, enable_gqa: bool = False, tangent_grad: bool | None = None):
    kt = q_dot.shape[0]
    c = scale if scale is not None else q.shape[-1] ** -0.5
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=c, enable_gqa=enable_gqa)
    on, rows = _tangent_mode(tangent_grad, q_dot, k_dot, v_dot)
    with torch.set_grad_enabled(on):
        acc = acc_dtype(q.dtype)
        qk, kk, vk = (rows(t, kt).to(acc) for t in (q, k, v))
        qd, kd, vd = (t.to(acc) for t in (q_dot, k_dot, v_dot))
        kk, vk = _expand_kv(qk, kk, vk)
        kd, vd = _expand_kv(qk, kd, vd)
        batched = attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[0] > 1
        mask = attn_mask[:kt] if batched else attn_mask  # the mask rows of the first kt batch rows
        s = _masked_logits(c * qk @ kk.transpose(-1, -2), mask, causal)
        s_dot = c * (qd @ kk.transpose(-1, -2) + qk @ kd.transpose(-1, -2))
        p = _safe_softmax(s)
        p_dot = p * (s_dot - (p * s_dot).sum(-1, keepdim=True))
        o_dot = (p_dot @ vk + p @ vd).to(q.dtype)
    return o, o_dot


# ---------------------------------------------------------------------------------------------------------- RMSNorm
def rmsnorm_jvp_ref(x: torch.Tensor, weight: torch.Tensor | None, x_dot: torch.Tensor,
                    *, eps: float = 1e-6, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x r w, r = 1 / sqrt(mean(x^2) + eps) over the last dim;  y_dot = (x_dot - x r^2 mean(x x_dot)) r w.

    x: (B, ..., D) any strides; weight: (D,) or None (no learned scale); x_dot: (kt, ..., D)."""
    check_rmsnorm_args(x, weight, x_dot, eps)
    check_tangent_grad(tangent_grad)
    return _rmsnorm_jvp_ref(x, weight, x_dot, eps=eps, tangent_grad=tangent_grad)


def _rmsnorm_jvp_ref(x, weight, x_dot, *, eps: float = 1e-6, tangent_grad: bool | None = None):
    kt = x_dot.shape[0]
    acc = acc_dtype(x.dtype, weight.dtype if weight is not None else x.dtype)
    xf = x.to(acc)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    y = xf * r * weight.to(acc) if weight is not None else xf * r
    on, rows = _tangent_mode(tangent_grad, x_dot)
    with torch.set_grad_enabled(on):
        xk, xd = rows(x, kt).to(acc), x_dot.to(acc)
        rk = rows(r, kt)
        y_dot = (xd - xk * rk.square() * (xk * xd).mean(-1, keepdim=True)) * rk
        if weight is not None:
            y_dot = y_dot * (weight if on else weight.detach()).to(acc)
    return y.to(x.dtype), y_dot.to(x.dtype)


# ------------------------------------------------------------------------------------------------------------- RoPE
def _pairs(x: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def _unpairs(y1: torch.Tensor, y2: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack([y1, y2], dim=-1).flatten(-2)
    return torch.cat([y1, y2], dim=-1)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The plain RoPE rotation of x's last-dim pairs by the angles of cos / sin (in x's dtype; no checks): what
    `rope_jvp_ref` and `mfkernels.nn.apply_rope` compute."""
    x1, x2 = _pairs(x, interleaved)
    return _unpairs(x1 * cos - x2 * sin, x1 * sin + x2 * cos, interleaved)


def rope_jvp_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dot: torch.Tensor,
                 *, interleaved: bool = True, tangent_grad: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = rotate(x) by the angles whose cos / sin are given (per position and pair);  y_dot = rotate(x_dot).

    x: (B, ..., D), D even; cos, sin: broadcastable to x.shape[:-1] + (D/2,); x_dot: (kt, ..., D). The positions carry
    no tangent, so the tangent rotates with the primal's angles (rows of the first kt samples)."""
    check_rope_args(x, cos, sin, x_dot)
    check_tangent_grad(tangent_grad)
    return _rope_jvp_ref(x, cos, sin, x_dot, interleaved=interleaved, tangent_grad=tangent_grad)


def _rope_jvp_ref(x, cos, sin, x_dot, *, interleaved: bool = True, tangent_grad: bool | None = None):
    kt = x_dot.shape[0]
    target = tuple(x.shape[:-1]) + (x.shape[-1] // 2,)
    acc = acc_dtype(x.dtype, cos.dtype)
    c, s = (t.to(acc).broadcast_to(target) for t in (cos, sin))
    y = rotate_pairs(x.to(acc), c, s, interleaved)
    with torch.set_grad_enabled(tangent_grad_on(tangent_grad, x_dot)):
        y_dot = rotate_pairs(x_dot.to(acc), c[:kt], s[:kt], interleaved)
    return y.to(x.dtype), y_dot.to(x.dtype)


def qk_norm_rope_jvp_ref(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                         k_weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                         q_dot: torch.Tensor, k_dot: torch.Tensor, *, eps: float = 1e-6, interleaved: bool = True,
                         tangent_grad: bool | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """QK-norm then RoPE on q and k: (RoPE(RMSNorm(q, q_weight)), RoPE(RMSNorm(k, k_weight)), and their tangents).

    q, k: (B, ..., D) one shape (e.g. (B, H, N, Dh) views of a fused qkv projection); weights (D,) or both None;
    cos / sin as in `rope_jvp_ref`, or both None (QK-norm only). Returns (q_out, k_out, q_out_dot, k_out_dot)."""
    check_qk_args(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps)
    check_tangent_grad(tangent_grad)
    return _qk_norm_rope_jvp_ref(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps=eps, interleaved=interleaved,
                                 tangent_grad=tangent_grad)


def _qk_norm_rope_jvp_ref(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, *, eps: float = 1e-6,
                          interleaved: bool = True, tangent_grad: bool | None = None):
    on = tangent_grad_on(tangent_grad, q_dot, k_dot)  # one decision for q and k
    outs = []
    for x, w, x_dot in ((q, q_weight, q_dot), (k, k_weight, k_dot)):
        if cos is None:
            outs.append(_rmsnorm_jvp_ref(x, w, x_dot, eps=eps, tangent_grad=on))
            continue
        # norm and rotation in the accumulation dtype, one rounding at the end (as the fused kernel)
        acc = acc_dtype(x.dtype, cos.dtype, w.dtype if w is not None else x.dtype)
        y, y_dot = _rmsnorm_jvp_ref(x.to(acc), None if w is None else w.to(acc), x_dot.to(acc), eps=eps,
                                    tangent_grad=on)
        y, y_dot = _rope_jvp_ref(y, cos, sin, y_dot, interleaved=interleaved, tangent_grad=on)
        outs.append((y.to(x.dtype), y_dot.to(x.dtype)))
    (qo, qo_dot), (ko, ko_dot) = outs
    return qo, ko, qo_dot, ko_dot


# --------------------------------------------------------------------------------------------- MeanFlow target/loss
def meanflow_loss_ref(u: torch.Tensor, v_g: torch.Tensor, du_dt: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                      p: float = 1.0, eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stop-gradient MeanFlow target and the adaptively weighted loss (docs/design.md, 'The MeanFlow loss'),
    accumulated in fp32.

    u_tgt_i = v_g_i - clip(t_i - r_i, 0, 1) du_dt_i   for the first kt rows (du_dt: (kt, ...));  u_tgt_i = v_g_i after
    L_i = sum over non-batch dims (u_i - u_tgt_i)^2;  w_i = 1 / (L_i + eps)^p (detached);  loss = mean_i w_i L_i
    Returns (loss, L, w) in fp32 (fp64 for fp64 u); loss is differentiable in u only:
    d loss / d u_i = (2 / B) w_i (u_i - u_tgt_i).
    """
    batch, kt = u.shape[0], du_dt.shape[0]
    acc = acc_dtype(u.dtype)
    with torch.no_grad():
        target = v_g.to(acc).clone()
        if kt:
            h = (t[:kt] - r[:kt]).to(acc).clamp(0.0, 1.0).reshape((kt,) + (1,) * (u.dim() - 1))
            target[:kt] -= h * du_dt.to(acc)
    per_sample = (u.to(acc) - target).pow(2).reshape(batch, -1).sum(1)
    weight = (per_sample.detach() + eps).pow(-p)
    loss = (weight * per_sample).mean()
    return loss, per_sample.detach(), weight
