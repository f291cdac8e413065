"""DiT layers with a tangent: each has `forward(x)` (plain) and `forward_jvp(x, x_dot, ops) -> (y, y_dot)`.

The generic pieces (Linear, MLP, Attention, LayerNormModulate) come from `mfkernels.nn`; this file adds what is
specific to the DiT: timestep embedders, the adaLN-Zero block and the final layer.

`ops` is a backend's op table (meanflow.models.backends.JVPOps). Tangents follow the mfkernels contract: batch kt <= B, the
first kt rows of the primal batch; kt = 0 works. Parameters have zero tangent.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from mfkernels.nn import MLP, Attention, LayerNormModulate, Linear, gated_residual

from .backends import JVPOps


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of raw t in [0, 1]: [cos(w_j t), sin(w_j t)], w_j = max_period^(-j / half).

    Raw t, not DiT's 1000 t: the tangent of the embedding scales with the frequencies, and with 1000 t du/dt (and so
    the MeanFlow target) becomes huge and noisy; on the MNIST demo 1-step samples collapsed (10% vs 80% label match).
    """
    freqs = _frequencies(dim, max_period, t)
    args = t.to(freqs.dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _frequencies(dim: int, max_period: float, t: torch.Tensor) -> torch.Tensor:
    """w_j = max_period^(-j / half), in fp32 (fp64 when t is fp64, so float64 references stay exact)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)


def timestep_embedding_jvp(t: torch.Tensor, t_dot: torch.Tensor, dim: int, max_period: float = 10000.0,
                           tangent_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding and its tangent: d cos(w t) = -w sin(w t) t_dot, d sin(w t) = w cos(w t) t_dot. The tangent is
    computed without a graph unless tangent_grad (then it is differentiable in t and t_dot)."""
    emb = timestep_embedding(t, dim, max_period)
    kt = t_dot.shape[0]
    with torch.set_grad_enabled(tangent_grad and torch.is_grad_enabled()):
        freqs = _frequencies(dim, max_period, t)
        args = t[:kt].to(freqs.dtype)[:, None] * freqs[None]
        w_dt = freqs[None] * t_dot.to(freqs.dtype)[:, None]
        emb_dot = F.pad(torch.cat([-torch.sin(args) * w_dt, torch.cos(args) * w_dt], dim=-1), (0, dim % 2))
    return emb, emb_dot


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
        emb, emb_dot = timestep_embedding_jvp(t, t_dot, self.freq_dim, tangent_grad=ops.tangent_grad_enabled(t_dot))
        dtype = self.fc1.weight.dtype
        a, a_dot = self.fc1.forward_jvp(emb.to(dtype), emb_dot.to(dtype), ops)
        a, a_dot = ops.silu(a, a_dot)
        return self.fc2.forward_jvp(a, a_dot, ops)


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C p p): one token per p x p patch, channels then patch rows, then columns."""
    return rearrange(z, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)


def unpatchify(x: torch.Tensor, p: int, grid_h: int) -> torch.Tensor:
    """Tokens (B, grid_h * grid_w, p p C) back to (B, C, grid_h p, grid_w p) (the final layers emit (p1 p2 c))."""
    return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid_h, p1=p, p2=p)


def _to(dtype, *tensors):
    """Modulation vectors follow the residual stream's dtype (under autocast the stream is fp32, linears give bf16)."""
    return tuple(t.to(dtype) for t in tensors)


class DiTBlock(nn.Module):
    """x += g1 * Attn(mod(LN(x), b1, s1)); x += g2 * MLP(mod(LN(x), b2, s2)); (b, s, g) from Linear(SiLU(c))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = LayerNormModulate(eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaLN = Linear(dim, 6 * dim)

    def forward(self, x, c_act):
        b1, s1, g1, b2, s2, g2 = self.adaLN(c_act).chunk(6, dim=1)
        x = gated_residual(x, g1, self.attn(self.norm(x, b1, s1)))
        return gated_residual(x, g2, self.mlp(self.norm(x, b2, s2)))

    def forward_jvp(self, x, x_dot, c_act, c_act_dot, ops: JVPOps):
        mods, mods_dot = _to(x.dtype, *self.adaLN.forward_jvp(c_act, c_act_dot, ops))
        b1, s1, g1, b2, s2, g2 = mods.chunk(6, dim=1)
        b1d, s1d, g1d, b2d, s2d, g2d = mods_dot.chunk(6, dim=1)
        h, h_dot = self.norm.forward_jvp(x, b1, s1, x_dot, b1d, s1d, ops)
        a, a_dot = self.attn.forward_jvp(h, h_dot, ops)
        x, x_dot = ops.gated_residual(x, g1, a, x_dot, g1d, a_dot)
        h, h_dot = self.norm.forward_jvp(x, b2, s2, x_dot, b2d, s2d, ops)
        m, m_dot = self.mlp.forward_jvp(h, h_dot, ops)
        return ops.gated_residual(x, g2, m, x_dot, g2d, m_dot)


class FinalLayer(nn.Module):
    """mod(LN(x), b, s) then Linear to patch pixels; (b, s) from Linear(SiLU(c))."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm = LayerNormModulate(eps=1e-6)
        self.adaLN = Linear(dim, 2 * dim)
        self.linear = Linear(dim, out_features)

    def forward(self, x, c_act):
        shift, scale = self.adaLN(c_act).chunk(2, dim=1)
        return self.linear(self.norm(x, shift, scale))

    def forward_jvp(self, x, x_dot, c_act, c_act_dot, ops: JVPOps):
        mods, mods_dot = _to(x.dtype, *self.adaLN.forward_jvp(c_act, c_act_dot, ops))
        shift, scale = mods.chunk(2, dim=1)
        shift_dot, scale_dot = mods_dot.chunk(2, dim=1)
        h, h_dot = self.norm.forward_jvp(x, shift, scale, x_dot, shift_dot, scale_dot, ops)
        return self.linear.forward_jvp(h, h_dot, ops)
