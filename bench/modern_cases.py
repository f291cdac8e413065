"""Benchmark cases of the modern-transformer ops and the iMF block, for bench_block_ops.py and bench_block.py.

Op cases (bench_block_ops' CASES table): `CASES[op](B, N, C, kt, r, e) -> dict` of the fields of bench_block_ops'
Case (primals, tangents, fused, eager, autograd and the useful work: fwd/bwd bytes or FLOPs); r(*shape, scale=...)
draws an input in the benchmark dtype, e is its element size. Providers return (y, y_dot); y may be a tuple (q' and k'
of the QK op), then the backward pass seeds every element.

    rmsnorm        RMSNorm with a learned scale over the residual stream (B, N, C)
    qk_norm_rope   QK-norm + RoPE of q and k, per-head views (B, H, N, 64) of a fused qkv projection (one launch)
    rope           RoPE alone on q (the same views)
    swiglu         the SwiGLU MLP, hidden int(8 C / 3), no biases (iMF)

Block cases (bench_block's BLOCKS table): `BLOCKS[name] = (width, heads, factory)`; the factory builds a module with
forward(x, c)
and forward_jvp(x, x_dot, c, c_dot, ops) like DiTBlock. iMF's block takes no conditioning vector (its conditions are
tokens): c is ignored, and RoPE angles come from the token count. Its useful FLOPs per token equal DiT's (qkv 3 C^2 +
out C^2 + SwiGLU 3 C (8 C / 3) = 12 C^2), so bench_block's block_flops applies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from meanflow.models.imf_dit import IMFBlock
from mfkernels import reference as ref
from mfkernels.nn import apply_rope, rms_norm, rope_angles
from mfkernels.qk_norm_rope import qk_norm_rope_jvp
from mfkernels.rmsnorm import rmsnorm_jvp
from mfkernels.rope import rope_jvp
from mfkernels.swiglu import swiglu_jvp

EPS = 1e-6
HEAD_DIM = 64


def _padded(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A ragged tangent zero-padded to the full batch (torch.func.jvp needs the primal's shape)."""
    if t.shape[0] == batch:
        return t
    return torch.cat([t, t.new_zeros((batch - t.shape[0],) + tuple(t.shape[1:]))])


def _heads(C: int) -> int:
    return max(1, C // HEAD_DIM)


def _qk_views(B, N, C, r, rows):
    """q, k as (B, H, N, Dh) views of one (rows, N, 3C) qkv buffer (rows = B for primals, kt for tangents)."""
    H = _heads(C)
    qkv = r(rows, N, 3 * C).view(rows, N, 3, H, C // H)
    return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)


def rmsnorm_case(B, N, C, kt, r, e) -> dict:
    M, Mt = B * N, kt * N
    w = r(C, scale=0.5) + 1

    def plain(x):
        return rms_norm(x, w, EPS)

    return dict(
        primals=[r(B, N, C)], tangents=[r(kt, N, C)],
        fused=lambda p, t: rmsnorm_jvp(p[0], w, t[0], eps=EPS),
        eager=lambda p, t: ref.rmsnorm_jvp_ref(p[0], w, t[0], eps=EPS),
        autograd=lambda p, t: torch.func.jvp(plain, tuple(p), (_padded(t[0], B),)),
        fwd_bytes=e * (2 * M * C + 2 * Mt * C) + 4 * M,  # x, y; x_dot, y_dot; rstd
        bwd_bytes=e * 3 * M * C + 4 * M)  # dy, x read, dx written; rstd


def _angles(N, C, device):
    cos, sin = rope_angles(C // _heads(C), N)
    return cos.to(device), sin.to(device)


def qk_norm_rope_case(B, N, C, kt, r, e) -> dict:
    M, Mt = B * N, kt * N
    q, k = _qk_views(B, N, C, r, B)
    q_dot, k_dot = _qk_views(B, N, C, r, kt)
    dh = C // _heads(C)
    wq, wk = r(dh, scale=0.5) + 1, r(dh, scale=0.5) + 1
    cos, sin = _angles(N, C, q.device)

    def plain(a, b):
        return apply_rope(rms_norm(a, wq, EPS), cos, sin), apply_rope(rms_norm(b, wk, EPS), cos, sin)

    def pair(out):  # (q', k', q'_dot, k'_dot) -> ((q', k'), (q'_dot, k'_dot))
        return out[:2], out[2:]

    return dict(
        primals=[q, k], tangents=[q_dot, k_dot],
        fused=lambda p, t: pair(qk_norm_rope_jvp(*p, wq, wk, cos, sin, *t, eps=EPS)),
        eager=lambda p, t: pair(ref.qk_norm_rope_jvp_ref(*p, wq, wk, cos, sin, *t, eps=EPS)),
        autograd=lambda p, t: torch.func.jvp(plain, tuple(p), tuple(_padded(x, B) for x in t)),
        fwd_bytes=e * 2 * (2 * M * C + 2 * Mt * C) + 4 * (N * dh + 2 * M * _heads(C)),  # q, k in/out; angles; rstd
        bwd_bytes=e * 2 * 3 * M * C + 4 * 2 * M * _heads(C))


def rope_case(B, N, C, kt, r, e) -> dict:
    M, Mt = B * N, kt * N
    q, _ = _qk_views(B, N, C, r, B)
    q_dot, _ = _qk_views(B, N, C, r, kt)
    cos, sin = _angles(N, C, q.device)
    return dict(
        primals=[q], tangents=[q_dot],
        fused=lambda p, t: rope_jvp(p[0], cos, sin, t[0]),
        eager=lambda p, t: ref.rope_jvp_ref(p[0], cos, sin, t[0]),
        autograd=lambda p, t: torch.func.jvp(lambda a: apply_rope(a, cos, sin), tuple(p), (_padded(t[0], B),)),
        fwd_bytes=e * (2 * M * C + 2 * Mt * C) + 4 * N * C // 2 * 2,
        bwd_bytes=e * 2 * M * C)


def swiglu_case(B, N, C, kt, r, e) -> dict:
    M, Mt, H = B * N, kt * N, int(C * 8 / 3)

    def plain(x, w13, w2):
        a, b = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(a) * b, w2)

    def autograd(p, t):
        x, w13, w2 = p
        return torch.func.jvp(lambda z: plain(z, w13, w2), (x,), (_padded(t[0], B),))

    return dict(
        primals=[r(B, N, C), r(2 * H, C, scale=C ** -0.5), r(C, H, scale=H ** -0.5)], tangents=[r(kt, N, C)],
        fused=lambda p, t: swiglu_jvp(p[0], p[1], None, p[2], None, t[0]),
        eager=lambda p, t: ref.swiglu_jvp_ref(p[0], p[1], None, p[2], None, t[0]),
        autograd=autograd,
        fwd_flops=2 * (M + Mt) * C * 3 * H,  # [x; x_dot] [W1; W3]^T and [g; g_dot] W2^T
        bwd_flops=2 * M * C * H * 6)  # dg = dy W2, dW2; dW13, dx over [da | db] (2H wide)


CASES = {"rmsnorm": rmsnorm_case, "qk_norm_rope": qk_norm_rope_case, "rope": rope_case, "swiglu": swiglu_case}


# ---------------------------------------------------------------------------------------------------------- blocks
class IMFBenchBlock(torch.nn.Module):
    """iMF's block behind DiTBlock's benchmark interface: forward(x, c), forward_jvp(x, x_dot, c, c_dot, ops); c is
    ignored (iMF conditions through tokens), RoPE angles for the x's token count (cached)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.block = IMFBlock(dim, heads)
        self.head_dim = dim // heads
        self._angles: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def angles(self, x):
        key = (x.shape[1], x.device, x.dtype)
        if key not in self._angles:
            cos, sin = rope_angles(self.head_dim, x.shape[1])
            self._angles[key] = (cos.to(x.device), sin.to(x.device))
        return self._angles[key]

    def forward(self, x, c=None):
        return self.block(x, *self.angles(x))

    def forward_jvp(self, x, x_dot, c, c_dot, ops):
        return self.block.forward_jvp(x, x_dot, *self.angles(x), ops)


BLOCKS = {"iMF-B": (768, 12, IMFBenchBlock), "iMF-XL": (1024, 16, IMFBenchBlock)}
TINY_BLOCKS = {"iMF-tiny": (48, 2, IMFBenchBlock)}
