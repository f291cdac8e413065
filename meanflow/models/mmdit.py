"""An MMDiT joint-attention block (SD3-style; Flux's double-stream block): two token streams, one attention.

    x (B, Nx, C): image tokens;  c (B, Nc, C): text / context tokens, with a key-padding mask (B, Nc) (True = a token)
    vec_act (B, C): SiLU of the conditioning vector (timestep embeddings, pooled text), as DiT's c_act

    per stream s in {x, c}:  (b1, s1, g1, b2, s2, g2)_s = adaLN_s(vec_act);  h_s = LN(s) (1 + s1) + b1
                             q_s, k_s, v_s = qkv_s(h_s);  optional per-stream QK-norm (RMSNorm) and RoPE
    joint attention over the concatenated tokens [c; x] (keys of padded text tokens masked out)
    per stream:              s += g1 * proj_s(o_s);  s += g2 * MLP_s(LN(s) (1 + s2) + b2)

Every stream has its own projections, norms, MLP and modulation; only the attention is shared. Built from the same op
table as DiT and iMF (layernorm_modulate, linear, qk_norm_rope / rope, attention, gated_residual, mlp), so `explicit`
and `fused` share this code. It lives here, next to DiT's block, because its adaLN conditioning on a vector is a
diffusion-model choice; the generic layers are in mfkernels.nn.

Masks: the joint attention takes the key-padding mask as a bool attn_mask (B, 1, 1, Nc + Nx). Op tables whose
`attention` accepts `attn_mask` (mfkernels' fused and reference tables do) get it directly, read per tile by the fused
kernel; an op table of your own whose attention lacks it gets a masked attention with its tangent computed here with
plain torch ops (a warning once for a table named "fused").
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from mfkernels.nn import _MATH_ATTENTION, MLP, LayerNormModulate, Linear, RotaryAttention, gated_residual

from .backends import JVPOps


def joint_mask(c_mask: torch.Tensor | None, n_x: int) -> torch.Tensor | None:
    """Key-padding mask of the joint sequence [c; x]: (B, 1, 1, Nc + Nx) bool, True where a key may be attended."""
    if c_mask is None:
        return None
    if c_mask.dtype != torch.bool or c_mask.dim() != 2:
        raise ValueError(f"c_mask must be a bool (B, Nc) key-padding mask (True = a real token); got dtype "
                         f"{c_mask.dtype}, shape {tuple(c_mask.shape)}")
    keep = torch.cat([c_mask, c_mask.new_ones(c_mask.shape[0], n_x)], dim=1)
    return keep[:, None, None, :]


def masked_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D) with masked keys at -inf) v, with plain ops (torch.func.jvp can differentiate it)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def masked_attention_jvp(q, k, v, q_dot, k_dot, v_dot, mask, tangent_grad: bool = False):
    """Attention with a bool key mask and its tangent (closed form, as reference.attention_jvp_ref; masked scores have
    P = 0, so P_dot = 0). The primal through torch's SDPA (differentiable); the tangent without a graph, unless
    tangent_grad (then differentiable in q, k, v and the tangents)."""
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    kt = q_dot.shape[0]
    with torch.set_grad_enabled(tangent_grad and torch.is_grad_enabled()):
        acc = torch.promote_types(q.dtype, torch.float32)
        qk, kk, vk = (t[:kt].to(acc) if tangent_grad else t[:kt].detach().to(acc) for t in (q, k, v))
        qd, kd, vd = (t.to(acc) for t in (q_dot, k_dot, v_dot))
        c = q.shape[-1] ** -0.5
        s = c * qk @ kk.transpose(-1, -2)
        s = s.masked_fill(~mask[:kt] if mask.shape[0] > 1 else ~mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        s_dot = c * (qd @ kk.transpose(-1, -2) + qk @ kd.transpose(-1, -2))
        p_dot = p * (s_dot - (p * s_dot).sum(-1, keepdim=True))
        o_dot = (p_dot @ vk + p @ vd).to(q.dtype)
    return o, o_dot


_WARNED: set[str] = set()


@functools.lru_cache(maxsize=None)
def _takes_mask(attention) -> bool:
    return "attn_mask" in inspect.signature(attention).parameters


def _attention_jvp(ops: JVPOps, q, k, v, q_dot, k_dot, v_dot, mask):
    if mask is None:
        return ops.attention(q, k, v, q_dot, k_dot, v_dot)
    if _takes_mask(ops.attention):
        return ops.attention(q, k, v, q_dot, k_dot, v_dot, attn_mask=mask)
    if ops.name == "fused" and "fused" not in _WARNED:
        _WARNED.add("fused")
        warnings.warn("MMDiTBlock: this mfkernels attention takes no attn_mask; the masked joint attention runs as "
                      "plain torch ops (the rest of the block stays fused)", RuntimeWarning, stacklevel=3)
    return masked_attention_jvp(q, k, v, q_dot, k_dot, v_dot, mask, ops.tangent_grad_enabled(q_dot, k_dot, v_dot))


class MMDiTBlock(nn.Module):
    """One joint-attention block over an image stream x and a context stream c (module docstring)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, *, qk_norm: bool = True, interleaved: bool = True):
        super().__init__()
        self.x_attn = RotaryAttention(dim, heads, qk_norm=qk_norm, qkv_bias=True, out_bias=True,
                                      interleaved=interleaved)
        self.c_attn = RotaryAttention(dim, heads, qk_norm=qk_norm, qkv_bias=True, out_bias=True,
                                      interleaved=interleaved)
        self.norm = LayerNormModulate(eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.x_mlp, self.c_mlp = MLP(dim, hidden), MLP(dim, hidden)
        self.x_adaLN, self.c_adaLN = Linear(dim, 6 * dim), Linear(dim, 6 * dim)

    @staticmethod
    def _angles(cos, sin, n_c):
        """RoPE tables over the joint sequence [c; x] -> (c's rows, x's rows), or Nones."""
        if cos is None:
            return (None, None), (None, None)
        return (cos[:n_c], sin[:n_c]), (cos[n_c:], sin[n_c:])

    def forward(self, x, c, vec_act, c_mask=None, cos=None, sin=None):
        n_c = c.shape[1]
        mx = self.x_adaLN(vec_act).to(x.dtype).chunk(6, dim=1)
        mc = self.c_adaLN(vec_act).to(c.dtype).chunk(6, dim=1)
        (cos_c, sin_c), (cos_x, sin_x) = self._angles(cos, sin, n_c)
        qx, kx, vx = self.x_attn.split_heads(self.x_attn.qkv(self.norm(x, mx[0], mx[1])))
        qc, kc, vc = self.c_attn.split_heads(self.c_attn.qkv(self.norm(c, mc[0], mc[1])))
        qx, kx = self.x_attn.norm_rope(qx, kx, cos_x, sin_x)
        qc, kc = self.c_attn.norm_rope(qc, kc, cos_c, sin_c)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qc, qx), (kc, kx), (vc, vx)))
        mask = joint_mask(c_mask, x.shape[1])
        if _MATH_ATTENTION.get():
            o = masked_attention(q, k, v, mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        oc, ox = o[:, :, :n_c], o[:, :, n_c:]
        x = gated_residual(x, mx[2], self.x_attn.proj(self.x_attn.merge_heads(ox)))
        c = gated_residual(c, mc[2], self.c_attn.proj(self.c_attn.merge_heads(oc)))
        x = gated_residual(x, mx[5], self.x_mlp(self.norm(x, mx[3], mx[4])))
        c = gated_residual(c, mc[5], self.c_mlp(self.norm(c, mc[3], mc[4])))
        return x, c

    def _modulation(self, ada, vec_act, vec_act_dot, dtype, ops):
        m, m_dot = ada.forward_jvp(vec_act, vec_act_dot, ops)
        return m.to(dtype).chunk(6, dim=1), m_dot.to(dtype).chunk(6, dim=1)

    def _qkv_jvp(self, attn, s, s_dot, mod, mod_dot, cos, sin, ops):
        h, h_dot = self.norm.forward_jvp(s, mod[0], mod[1], s_dot, mod_dot[0], mod_dot[1], ops)
        qkv, qkv_dot = attn.qkv.forward_jvp(h, h_dot, ops)
        (q, k, v), (q_dot, k_dot, v_dot) = attn.split_heads(qkv), attn.split_heads(qkv_dot)
        q, k, q_dot, k_dot = attn.norm_rope_jvp(q, k, q_dot, k_dot, cos, sin, ops)
        return (q, k, v), (q_dot, k_dot, v_dot)

    def forward_jvp(self, x, c, x_dot, c_dot, vec_act, vec_act_dot, c_mask=None, cos=None, sin=None,
                    ops: JVPOps | None = None):
        """(x, c, x_dot, c_dot): both streams and their tangents (kt <= B rows: the first kt samples). The context
        stream may enter with a zero tangent (text does not depend on z, t, h); it leaves with one."""
        from mfkernels.ops import ops_table

        ops = ops if ops is not None else ops_table("fused")
        n_c = c.shape[1]
        mx, mx_dot = self._modulation(self.x_adaLN, vec_act, vec_act_dot, x.dtype, ops)
        mc, mc_dot = self._modulation(self.c_adaLN, vec_act, vec_act_dot, c.dtype, ops)
        (cos_c, sin_c), (cos_x, sin_x) = self._angles(cos, sin, n_c)
        px, px_dot = self._qkv_jvp(self.x_attn, x, x_dot, mx, mx_dot, cos_x, sin_x, ops)
        pc, pc_dot = self._qkv_jvp(self.c_attn, c, c_dot, mc, mc_dot, cos_c, sin_c, ops)
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(pc, px))
        q_dot, k_dot, v_dot = (torch.cat([a, b], dim=2) for a, b in zip(pc_dot, px_dot))
        o, o_dot = _attention_jvp(ops, q, k, v, q_dot, k_dot, v_dot, joint_mask(c_mask, x.shape[1]))
        ax, ax_dot = self.x_attn.proj.forward_jvp(self.x_attn.merge_heads(o[:, :, n_c:]),
                                                  self.x_attn.merge_heads(o_dot[:, :, n_c:]), ops)
        ac, ac_dot = self.c_attn.proj.forward_jvp(self.c_attn.merge_heads(o[:, :, :n_c]),
                                                  self.c_attn.merge_heads(o_dot[:, :, :n_c]), ops)
        x, x_dot = ops.gated_residual(x, mx[2], ax, x_dot, mx_dot[2], ax_dot)
        c, c_dot = ops.gated_residual(c, mc[2], ac, c_dot, mc_dot[2], ac_dot)
        streams = []
        for s, s_dot, mod, mod_dot, mlp in ((x, x_dot, mx, mx_dot, self.x_mlp), (c, c_dot, mc, mc_dot, self.c_mlp)):
            h, h_dot = self.norm.forward_jvp(s, mod[3], mod[4], s_dot, mod_dot[3], mod_dot[4], ops)
            f, f_dot = mlp.forward_jvp(h, h_dot, ops)
            streams.append(ops.gated_residual(s, mod[5], f, s_dot, mod_dot[5], f_dot))
        (x, x_dot), (c, c_dot) = streams
        return x, c, x_dot, c_dot


__all__ = ["MMDiTBlock", "joint_mask", "masked_attention", "masked_attention_jvp"]
