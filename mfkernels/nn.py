"""Modules with a tangent, for any JVP-based model (MeanFlow, sCM / continuous consistency models, iMF).

Each module has the ordinary `forward(...)` and `forward_jvp(..., ops=None) -> (y, y_dot)`; `ops` is an op table from
`mfkernels.ops.ops_table` and defaults to the fused kernels. Tangents follow the mfkernels contract: batch kt <= B
standing for the first kt rows; y is differentiable, y_dot detached.

    attn = mfkernels.nn.Attention(dim=768, heads=12).cuda()
    y, y_dot = attn.forward_jvp(x, x_dot)            # one fused pass: output and tangent
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._runtime import acc_dtype
from .ops import JVPOps, ops_table
from .reference import attention_ref, rotate_pairs


class _Switch:
    """A process-wide on/off switch with ContextVar's get / set / reset API, readable by torch.compile.

    Not a ContextVar: Dynamo cannot trace ContextVar.get (a graph break in every compiled plain forward). Not a
    threading.local either: Dynamo does not guard on its attributes, so a compiled graph silently keeps the value it
    was traced with (measured, torch 2.13). A plain attribute is guarded: flipping the switch recompiles."""

    def __init__(self) -> None:
        self._on = False

    def get(self) -> bool:
        return self._on

    def set(self, value: bool) -> bool:
        token, self._on = self._on, value
        return token

    def reset(self, token: bool) -> None:
        self._on = token


_MATH_ATTENTION = _Switch()


@contextlib.contextmanager
def math_attention():
    """Within this context `Attention.forward` computes softmax(c Q K^T) V with plain ops instead of torch's SDPA:
    every op then has a forward-mode rule (torch.func.jvp, forward_ad), which SDPA's fused kernels lack. The switch is
    process-wide (see `_Switch`): do not mix math and SDPA attention in concurrent threads."""
    token = _MATH_ATTENTION.set(True)
    try:
        yield
    finally:
        _MATH_ATTENTION.reset(token)


def _ops(ops: JVPOps | None) -> JVPOps:
    """The table a module's forward_jvp calls: the caller's, or the checked fused table (a direct call on user data)."""
    return ops if ops is not None else ops_table("fused")


class Linear(nn.Linear):
    """y = x W^T + b; the tangent x_dot W^T comes from the same GEMM over the stacked rows [x; x_dot]."""

    def forward_jvp(self, x, x_dot, ops: JVPOps | None = None):
        return _ops(ops).linear(x, self.weight, self.bias, x_dot)


class MLP(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def forward_jvp(self, x, x_dot, ops: JVPOps | None = None):
        return _ops(ops).mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, x_dot)


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
        return o.transpose(1, 2).flatten(2)  # (B, H, N, Dh) -> (B, N, H * Dh)

    def forward(self, x):
        q, k, v = self._split(self.qkv(x))
        o = attention_ref(q, k, v) if _MATH_ATTENTION.get() else F.scaled_dot_product_attention(q, k, v)
        return self.proj(self._merge(o))

    def forward_jvp(self, x, x_dot, ops: JVPOps | None = None):
        ops = _ops(ops)
        qkv, qkv_dot = self.qkv.forward_jvp(x, x_dot, ops)
        o, o_dot = ops.attention(*self._split(qkv), *self._split(qkv_dot))
        return self.proj.forward_jvp(self._merge(o), self._merge(o_dot), ops)


class LayerNormModulate(nn.Module):
    """LayerNorm without affine (eps 1e-6) then adaLN modulation: y = LN(x) (1 + scale) + shift."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x, shift, scale):
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps) * (1 + scale[:, None, :]) + shift[:, None, :]

    def forward_jvp(self, x, shift, scale, x_dot, shift_dot, scale_dot, ops: JVPOps | None = None):
        return _ops(ops).layernorm_modulate(x, shift, scale, x_dot, shift_dot, scale_dot, eps=self.eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x + gate * f with gate (B, C) broadcast over tokens (the plain counterpart of ops.gated_residual)."""
    return x + gate[:, None, :] * f


# ---------------------------------------------------------------------------------------- modern transformer layers
# RMSNorm, the SwiGLU MLP and attention with QK-norm and rotary embeddings (iMF, LightningDiT, SD3 / Flux, LLaMA).
# Their plain forwards compute what the ops compute (norm and rotation in fp32, one rounding to x's dtype), so that
# torch.func.jvp of `forward` (the `autograd` backend) and `forward_jvp` agree.
def _acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return acc_dtype(*(t.dtype for t in tensors if t is not None))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * w over the last dim, in fp32 (fp64 for fp64), returned in x's dtype."""
    acc = _acc_dtype(x, weight)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc) if weight is not None else y).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate pairs of x's last dim by the angles of cos / sin (broadcastable to x.shape[:-1] + (D/2,)), in fp32."""
    acc = _acc_dtype(x, cos)
    return rotate_pairs(x.to(acc), cos.to(acc), sin.to(acc), interleaved).to(x.dtype)


def rope_angles(head_dim: int, positions: torch.Tensor | int, theta: float = 10000.0,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotary angles p theta^(-2i / D) for positions p and pairs i < D/2: each (N, D/2).

    1-D positions over the token sequence, as iMF (positions 0..L-1 over [condition tokens; patches]) and LLaMA.
    Computed in float64, returned in `dtype`. Any other table (2-D axial, per sample) works with the ops too: they take
    whatever broadcasts to (..., N, D/2)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim; got {head_dim}")
    if isinstance(positions, int):
        positions = torch.arange(positions)
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * freqs.to(positions.device)[None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, with a learned scale (init 1) or none."""

    def __init__(self, dim: int, eps: float = 1e-6, learned_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if learned_scale else None

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def forward_jvp(self, x, x_dot, ops: JVPOps | None = None):
        return _ops(ops).rmsnorm(x, self.weight, x_dot, eps=self.eps)


class SwiGLU(nn.Module):
    """y = W2 (silu(W1 x + b1) * (W3 x + b3)) + b2. W1 and W3 are one Linear `fc13` (rows [W1; W3]): the forward and
    the fused op run one GEMM for both (and for the tangent rows). iMF: no biases, hidden = int(dim * 8 / 3)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, bias: bool = False):
        super().__init__()
        self.hidden = hidden
        self.fc13 = Linear(dim, 2 * hidden, bias=bias)
        self.fc2 = Linear(hidden, out or dim, bias=bias)

    def forward(self, x):
        a, b = self.fc13(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)

    def forward_jvp(self, x, x_dot, ops: JVPOps | None = None):
        return _ops(ops).swiglu(x, self.fc13.weight, self.fc13.bias, self.fc2.weight, self.fc2.bias, x_dot)


class RotaryAttention(nn.Module):
    """Multi-head self-attention with optional QK-norm (per-head RMSNorm, learned scale) and rotary embeddings.

    qkv Linear -> q, k per-head RMSNorm -> RoPE on q, k -> attention -> output Linear. `forward(x, cos, sin)` with
    cos / sin of shape (N, Dh/2) (`rope_angles`), or None for no RoPE. iMF's RoPEAttention is qk_norm=True, no biases,
    interleaved pairs. In `forward_jvp` the QK-norm and the rotation of q and k are one fused op call.
    """

    def __init__(self, dim: int, heads: int, *, qk_norm: bool = True, qkv_bias: bool = False, out_bias: bool = False,
                 eps: float = 1e-6, interleaved: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by the number of heads {heads}")
        self.heads, self.head_dim, self.eps, self.interleaved = heads, dim // heads, eps, interleaved
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim, bias=out_bias)
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None

    def split_heads(self, qkv):
        """(B, N, 3 H Dh) -> q, k, v each (B, H, N, Dh), strided views (no copy)."""
        b, n, _ = qkv.shape
        return qkv.reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def merge_heads(o):
        return o.transpose(1, 2).flatten(2)

    def norm_rope(self, q, k, cos=None, sin=None):
        """The plain QK-norm + RoPE of (B, H, N, Dh) q and k."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin, self.interleaved), apply_rope(k, cos, sin, self.interleaved)
        return q, k

    def norm_rope_jvp(self, q, k, q_dot, k_dot, cos, sin, ops: JVPOps):
        """QK-norm + RoPE with tangents: one fused call with QK-norm, two RoPE calls without, nothing if neither."""
        if self.q_norm is not None:
            return ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, q_dot, k_dot,
                                    eps=self.eps, interleaved=self.interleaved)
        if cos is not None:
            q, q_dot = ops.rope(q, cos, sin, q_dot, interleaved=self.interleaved)
            k, k_dot = ops.rope(k, cos, sin, k_dot, interleaved=self.interleaved)
        return q, k, q_dot, k_dot

    def forward(self, x, cos=None, sin=None):
        q, k, v = self.split_heads(self.qkv(x))
        q, k = self.norm_rope(q, k, cos, sin)
        o = attention_ref(q, k, v) if _MATH_ATTENTION.get() else F.scaled_dot_product_attention(q, k, v)
        return self.proj(self.merge_heads(o))

    def forward_jvp(self, x, x_dot, cos=None, sin=None, ops: JVPOps | None = None):
        ops = _ops(ops)
        qkv, qkv_dot = self.qkv.forward_jvp(x, x_dot, ops)
        (q, k, v), (q_dot, k_dot, v_dot) = self.split_heads(qkv), self.split_heads(qkv_dot)
        q, k, q_dot, k_dot = self.norm_rope_jvp(q, k, q_dot, k_dot, cos, sin, ops)
        o, o_dot = ops.attention(q, k, v, q_dot, k_dot, v_dot)
        return self.proj.forward_jvp(self.merge_heads(o), self.merge_heads(o_dot), ops)


def scaled_residual(x: torch.Tensor, f: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x + f * scale with a learned per-channel scale (C,) (iMF's zero-initialised vector gates)."""
    return x + f * scale


def scaled_residual_jvp(x, f, scale, x_dot, f_dot, ops: JVPOps | None = None):
    """x + f * scale and its tangent x_dot + f_dot * scale (the scale is a parameter: no tangent), through the fused
    gated residual with the gate broadcast over the batch (stride-0 views, no copies of size B)."""
    batch, kt, c = x.shape[0], x_dot.shape[0], x.shape[-1]
    gate = scale.expand(batch, c)
    return _ops(ops).gated_residual(x, gate, f, x_dot, scale.new_zeros(()).expand(kt, c), f_dot)
