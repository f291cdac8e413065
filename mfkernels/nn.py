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

from .ops import JVPOps, ops_table
from .reference import attention_ref

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
