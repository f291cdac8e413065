"""Layers with a tangent: each has `forward(x)` (plain) and `forward_jvp(x, x_dot, ops) -> (y, y_dot)`.

`ops` is a backend's op table (meanflow.backends.JVPOps). Tangents follow the mfkernels contract: batch kt <= B, the
first kt rows of the primal batch; kt = 0 works. Parameters have zero tangent.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import JVPOps


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of raw t in [0, 1]: [cos(w_j t), sin(w_j t)], w_j = max_period^(-j / half)."""
    freqs = _frequencies(dim, max_period, t)
    args = t.to(freqs.dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _frequencies(dim: int, max_period: float, t: torch.Tensor) -> torch.Tensor:
    """w_j = max_period^(-j / half), in fp32 (fp64 when t is fp64, so float64 references stay exact)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)


def timestep_embedding_jvp(t: torch.Tensor, t_dot: torch.Tensor, dim: int,
                           max_period: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding and its tangent: d cos(w t) = -w sin(w t) t_dot, d sin(w t) = w cos(w t) t_dot."""
    emb = timestep_embedding(t, dim, max_period)
    kt = t_dot.shape[0]
    with torch.no_grad():
        freqs = _frequencies(dim, max_period, t)
        args = t[:kt].to(freqs.dtype)[:, None] * freqs[None]
        w_dt = freqs[None] * t_dot.to(freqs.dtype)[:, None]
        emb_dot = F.pad(torch.cat([-torch.sin(args) * w_dt, torch.cos(args) * w_dt], dim=-1), (0, dim % 2))
    return emb, emb_dot


class Linear(nn.Linear):
    def forward_jvp(self, x, x_dot, ops: JVPOps):
        return ops.linear(x, self.weight, self.bias, x_dot)


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = Linear(freq_dim, hidden)
        self.fc2 = Linear(hidden, hidden)

    def forward(self, t):
        return self.fc2(F.silu(self.fc1(timestep_embedding(t, self.freq_dim).to(self.fc1.weight.dtype))))

    def forward_jvp(self, t, t_dot, ops: JVPOps):
        emb, emb_dot = timestep_embedding_jvp(t, t_dot, self.freq_dim)
        dtype = self.fc1.weight.dtype
        a, a_dot = self.fc1.forward_jvp(emb.to(dtype), emb_dot.to(dtype), ops)
        a, a_dot = ops.silu(a, a_dot)
        return self.fc2.forward_jvp(a, a_dot, ops)


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def forward_jvp(self, x, x_dot, ops: JVPOps):
        return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, x_dot)


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear -> scaled dot-product attention -> output Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by the number of heads {heads}")
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def _split(self, qkv):
        """(B, N, 3 * H * Dh) -> q, k, v each (B, H, N, Dh), as strided views."""
        b, n, width = qkv.shape
        return qkv.reshape(b, n, 3, self.heads, width // (3 * self.heads)).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def _merge(o):
        return o.transpose(1, 2).flatten(2)  # (B, H, N, Dh) -> (B, N, H*Dh)

    def forward(self, x):
        q, k, v = self._split(self.qkv(x))
        return self.proj(self._merge(F.scaled_dot_product_attention(q, k, v)))

    def forward_jvp(self, x, x_dot, ops: JVPOps):
        qkv, qkv_dot = self.qkv.forward_jvp(x, x_dot, ops)
        o, o_dot = ops.attention(*self._split(qkv), *self._split(qkv_dot))
        return self.proj.forward_jvp(self._merge(o), self._merge(o_dot), ops)


def _to(dtype, *tensors):
    """Modulation vectors follow the residual stream's dtype (under autocast the stream is fp32, linears give bf16)."""
    return tuple(t.to(dtype) for t in tensors)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def layernorm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class DiTBlock(nn.Module):
    """x += g1 * Attn(mod(LN(x), b1, s1)); x += g2 * MLP(mod(LN(x), b2, s2)); (b, s, g) from Linear(SiLU(c))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN = Linear(dim, 6 * dim)

    def forward(self, x, c_act):
        b1, s1, g1, b2, s2, g2 = self.adaLN(c_act).chunk(6, dim=1)
        x = x + g1[:, None, :] * self.attn(modulate(layernorm(x), b1, s1))
        return x + g2[:, None, :] * self.mlp(modulate(layernorm(x), b2, s2))

    def forward_jvp(self, x, x_dot, c_act, c_act_dot, ops: JVPOps):
        mods, mods_dot = _to(x.dtype, *self.adaLN.forward_jvp(c_act, c_act_dot, ops))
        b1, s1, g1, b2, s2, g2 = mods.chunk(6, dim=1)
        b1d, s1d, g1d, b2d, s2d, g2d = mods_dot.chunk(6, dim=1)
        h, h_dot = ops.layernorm_modulate(x, b1, s1, x_dot, b1d, s1d)
        a, a_dot = self.attn.forward_jvp(h, h_dot, ops)
        x, x_dot = ops.gated_residual(x, g1, a, x_dot, g1d, a_dot)
        h, h_dot = ops.layernorm_modulate(x, b2, s2, x_dot, b2d, s2d)
        m, m_dot = self.mlp.forward_jvp(h, h_dot, ops)
        return ops.gated_residual(x, g2, m, x_dot, g2d, m_dot)


class FinalLayer(nn.Module):
    """mod(LN(x), b, s) then Linear to patch pixels; (b, s) from Linear(SiLU(c))."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.adaLN = Linear(dim, 2 * dim)
        self.linear = Linear(dim, out_features)

    def forward(self, x, c_act):
        shift, scale = self.adaLN(c_act).chunk(2, dim=1)
        return self.linear(modulate(layernorm(x), shift, scale))

    def forward_jvp(self, x, x_dot, c_act, c_act_dot, ops: JVPOps):
        mods, mods_dot = _to(x.dtype, *self.adaLN.forward_jvp(c_act, c_act_dot, ops))
        shift, scale = mods.chunk(2, dim=1)
        shift_dot, scale_dot = mods_dot.chunk(2, dim=1)
        h, h_dot = ops.layernorm_modulate(x, shift, scale, x_dot, shift_dot, scale_dot)
        return self.linear.forward_jvp(h, h_dot, ops)
