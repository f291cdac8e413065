"""Pure-PyTorch reference ops: each layer's output and its tangent (forward-mode derivative) in one call.

These are the readable statement of the tangent rules in DESIGN.md 2, the `explicit` backend of `meanflow`, the CPU
fallback of every Triton op, and what the kernels are tested against. Every op here and in the Triton modules follows
one contract:

* ``op(primals..., tangents...) -> (y, y_dot)``.
* A tangent has its primal's shape except in dim 0: kt <= B rows that stand for the FIRST kt rows of the primal batch.
  kt = 0 is allowed (no tangent work at all; y_dot is empty).
* ``y`` is differentiable with respect to every primal input (ordinary autograd); ``y_dot`` is computed without
  building any autograd graph and is returned detached. Tangent inputs are constants: no gradient flows into them.

Linear layers run one matmul on the stacked rows [x; x_dot] (the tangent of x W^T + b is x_dot W^T: same weight).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import (check_float, check_gated_residual_args, check_layernorm_modulate_args, check_like,
                      check_linear_args, check_ndim, check_tangent, check_tangent_batches)

GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


def _rows(t: torch.Tensor, kt: int) -> torch.Tensor:
    """The first kt rows, detached: tangent rules read primal values but never backpropagate through them."""
    return t[:kt].detach()


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
                   x_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b;  y_dot = x_dot W^T  (x: (B, ..., in), x_dot: (kt, ..., in), W: (out, in))."""
    check_linear_args(x, weight, x_dot)
    return _LinearJVP.apply(x, x_dot, weight, bias)


# ------------------------------------------------------------------------------------------------------ activations
def silu_jvp_ref(a: torch.Tensor, a_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = a sig(a);  y_dot = sig(a) (1 + a (1 - sig(a))) a_dot."""
    kt = check_tangent("a_dot", a_dot, "a", a)
    y = F.silu(a)
    with torch.no_grad():
        acc = torch.promote_types(a.dtype, torch.float32)
        ak = _rows(a, kt).to(acc)
        s = torch.sigmoid(ak)
        y_dot = (s * (1 + ak * (1 - s)) * a_dot.to(acc)).to(a.dtype)
    return y, y_dot


def gelu_tanh_grad(a: torch.Tensor) -> torch.Tensor:
    """g'(a) for g(a) = 0.5 a (1 + tanh(k (a + c a^3))):  0.5 (1 + th) + 0.5 a (1 - th^2) k (1 + 3 c a^2)."""
    th = torch.tanh(GELU_K * (a + GELU_C * a * a * a))
    return 0.5 * (1 + th) + 0.5 * a * (1 - th * th) * GELU_K * (1 + 3 * GELU_C * a * a)


def gelu_tanh_jvp_ref(a: torch.Tensor, a_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = GELU_tanh(a);  y_dot = g'(a) a_dot."""
    kt = check_tangent("a_dot", a_dot, "a", a)
    y = F.gelu(a, approximate="tanh")
    with torch.no_grad():
        acc = torch.promote_types(a.dtype, torch.float32)
        y_dot = (gelu_tanh_grad(_rows(a, kt).to(acc)) * a_dot.to(acc)).to(a.dtype)
    return y, y_dot


def mlp_jvp_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, x_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear -> GELU(tanh) -> Linear with its tangent; each linear is one GEMM over [x; x_dot]."""
    a, a_dot = linear_jvp_ref(x, w1, b1, x_dot)
    g, g_dot = gelu_tanh_jvp_ref(a, a_dot)
    return linear_jvp_ref(g, w2, b2, g_dot)


# -------------------------------------------------------------------------------------------- LayerNorm + modulate
def layernorm_modulate_jvp_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                               x_dot: torch.Tensor, shift_dot: torch.Tensor, scale_dot: torch.Tensor,
                               *, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm without affine, then adaLN modulation, with its tangent.

    xh = (x - mean) / sigma, sigma = sqrt(var + eps);  y = xh (1 + scale) + shift   (scale, shift broadcast over tokens)
    xh_dot = (x_dot - mean(x_dot) - xh mean(xh x_dot)) / sigma
    y_dot = xh_dot (1 + scale) + xh scale_dot + shift_dot
    Shapes: x (B, N, C); shift, scale (B, C); tangents (kt, N, C) and (kt, C).
    """
    kt = check_layernorm_modulate_args(x, shift, scale, x_dot, shift_dot, scale_dot)
    xh = F.layer_norm(x, (x.shape[-1],), eps=eps)
    y = xh * (1 + scale[:, None, :]) + shift[:, None, :]
    with torch.no_grad():
        xk = _rows(x, kt)
        acc = torch.promote_types(x.dtype, torch.float32)
        xf, xdf = xk.to(acc), x_dot.to(acc)
        mean = xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)
        xhk = (xf - mean) * rstd
        xh_dot = (xdf - xdf.mean(-1, keepdim=True) - xhk * (xhk * xdf).mean(-1, keepdim=True)) * rstd
        y_dot = (xh_dot * (1 + _rows(scale, kt).to(acc)[:, None, :]) + xhk * scale_dot.to(acc)[:, None, :]
                 + shift_dot.to(acc)[:, None, :]).to(y.dtype)
    return y, y_dot


# ------------------------------------------------------------------------------------------------- gated residual
def gated_residual_jvp_ref(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor,
                           x_dot: torch.Tensor, gate_dot: torch.Tensor, f_dot: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x + gate * f;  y_dot = x_dot + gate_dot * f + gate * f_dot   (x, f: (B, N, C); gate: (B, C))."""
    kt = check_gated_residual_args(x, gate, f, x_dot, gate_dot, f_dot)
    y = x + gate[:, None, :] * f
    with torch.no_grad():
        y_dot = x_dot + gate_dot[:, None, :] * _rows(f, kt) + _rows(gate, kt)[:, None, :] * f_dot
    return y, y_dot


# ------------------------------------------------------------------------------------------------------ attention
def _check_attn_mask(attn_mask, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    """attn_mask as torch's SDPA takes it: bool (True = attend) or additive float (q's dtype, or float32 as torch also
    accepts), broadcastable to (B, Hq, Nq, Nk); not together with causal (torch refuses that combination too)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be None or a torch.Tensor; got {type(attn_mask).__name__}")
    if causal:
        raise ValueError("attn_mask and causal (is_causal) are both set; torch's SDPA refuses this combination too "
                         "(its math backend raises): fold the causal mask into attn_mask instead")
    if attn_mask.dtype not in (torch.bool, q.dtype, torch.float32):
        raise TypeError(f"attn_mask has dtype {attn_mask.dtype}; expected torch.bool (True = attend) or an additive "
                        f"float mask of q's dtype {q.dtype} (or torch.float32, as torch accepts)")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}; they must be on the same device")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        ok = attn_mask.dim() <= 4 and tuple(torch.broadcast_shapes(attn_mask.shape, target)) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}, which does not broadcast to the attention "
                         f"weights' shape (B, Hq, Nq, Nk) = {target}")


def _check_attention(q, k, v, q_dot, k_dot, v_dot, attn_mask=None, *, causal: bool = False,
                     enable_gqa: bool = False) -> int:
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); Hkv = Hq, or (enable_gqa) any divisor of Hq; ragged
    tangents of the same shapes; attn_mask (see _check_attn_mask). Returns kt."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        check_ndim(name, t, 4, "(B, H, N, D)")
    for name, t in (("k", k), ("v", v)):
        check_like(name, t, "q", q)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q (B, Hq, Nq, D) and k (B, Hkv, Nk, D) must agree in B and D; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k (B, Hkv, Nk, D) and v (B, Hkv, Nk, Dv) must agree in B, Hkv and Nk; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv != hq:
        if not enable_gqa:
            raise ValueError(f"k and v have {hkv} heads but q has {hq}; pass enable_gqa=True for grouped-query / "
                             f"multi-query attention (got q {tuple(q.shape)}, k {tuple(k.shape)})")
        if hkv == 0 or hq % hkv:
            raise ValueError(f"enable_gqa=True needs q's head count Hq = {hq} to be a multiple of k's and v's "
                             f"Hkv = {hkv}")
    kt = check_tangent_batches(q_dot=q_dot, k_dot=k_dot, v_dot=v_dot)
    check_tangent("q_dot", q_dot, "q", q)
    check_tangent("k_dot", k_dot, "k", k)
    check_tangent("v_dot", v_dot, "v", v)
    _check_attn_mask(attn_mask, q, k, causal)
    return kt


def _causal_mask(nq: int, nk: int, device) -> torch.Tensor:
    """True where attention is allowed. Top-left aligned, as torch's SDPA with is_causal=True: query i sees keys <= i."""
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
    kt = _check_attention(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal=causal, enable_gqa=enable_gqa)
    c = scale if scale is not None else q.shape[-1] ** -0.5
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=c, enable_gqa=enable_gqa)
    if tangent_grad is None:
        tangent_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_dot, k_dot, v_dot))
    with torch.set_grad_enabled(bool(tangent_grad) and torch.is_grad_enabled()):
        acc = torch.promote_types(q.dtype, torch.float32)
        rows = (lambda t: t[:kt]) if tangent_grad else (lambda t: _rows(t, kt))  # noqa: E731
        qk, kk, vk = (rows(t).to(acc) for t in (q, k, v))
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


# ---------------------------------------------------------------------------------------------- MeanFlow target/loss
def meanflow_loss_ref(u: torch.Tensor, v_g: torch.Tensor, du_dt: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                      p: float = 1.0, eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stop-gradient MeanFlow target and the adaptively weighted loss (DESIGN.md 1), accumulated in fp32.

    u_tgt_i = v_g_i - clip(t_i - r_i, 0, 1) du_dt_i   for the first kt rows (du_dt: (kt, ...));  u_tgt_i = v_g_i after
    L_i = sum over non-batch dims (u_i - u_tgt_i)^2;  w_i = 1 / (L_i + eps)^p (detached);  loss = mean_i w_i L_i
    Returns (loss, L, w) in fp32 (fp64 for fp64 u); loss is differentiable in u only: d loss / d u_i = (2 / B) w_i (u_i - u_tgt_i).
    """
    batch, kt = u.shape[0], du_dt.shape[0]
    acc = torch.promote_types(u.dtype, torch.float32)  # fp32 accumulation (fp64 for fp64 inputs)
    with torch.no_grad():
        target = v_g.to(acc).clone()
        if kt:
            h = (t[:kt] - r[:kt]).to(acc).clamp(0.0, 1.0).reshape((kt,) + (1,) * (u.dim() - 1))
            target[:kt] -= h * du_dt.to(acc)
    per_sample = (u.to(acc) - target).pow(2).reshape(batch, -1).sum(1)
    weight = (per_sample.detach() + eps).pow(-p)
    loss = (weight * per_sample).mean()
    return loss, per_sample.detach(), weight


# ------------------------------------------------------------------------------- modern transformer ops (issue 16)
# RMSNorm, RoPE, fused QK-norm + RoPE and the SwiGLU MLP live in their own module; re-exported here so that every
# `<op>_ref` is reachable as mfkernels.reference.<op>_ref.
from .reference_modern import (  # noqa: E402
    qk_norm_rope_jvp_ref,
    rmsnorm_jvp_ref,
    rope_jvp_ref,
    swiglu_jvp_ref,
)
