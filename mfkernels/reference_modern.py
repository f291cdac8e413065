"""Pure-PyTorch references of the modern-transformer ops: RMSNorm, rotary embeddings (RoPE), fused QK-norm + RoPE and
the SwiGLU MLP, each with its tangent. Same contract as every op of `mfkernels.reference` (re-exported there):

* ``op(primals..., tangents...) -> (outputs..., tangents...)``; a tangent has its primal's shape except in dim 0, where
  it has kt <= B rows standing for the FIRST kt rows of the primal batch (kt = 0 allowed).
* Outputs are differentiable; tangents are computed without a graph and returned detached.

Rules (a dot is a tangent; parameters and positions carry none):

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

Math runs in fp32 (fp64 for fp64 inputs); outputs have x's dtype. Norm weights may have another float dtype than x (an
fp32 parameter with bf16 activations under autocast): they are upcast, as the kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_float, check_like, check_linear_args, check_tangent, describe

__all__ = ["rmsnorm_jvp_ref", "rope_jvp_ref", "qk_norm_rope_jvp_ref", "swiglu_jvp_ref", "silu_grad"]


def _acc(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


# ---------------------------------------------------------------------------------------------------------- checks
def check_rmsnorm_args(x: torch.Tensor, weight: torch.Tensor | None, x_dot: torch.Tensor, eps: float) -> int:
    """x (B, ..., D) float, D >= 1; weight None or (D,) float on x's device; x_dot its ragged tangent. Returns kt."""
    check_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dim and a feature dim (B, ..., D); got {describe(x)}")
    if x.shape[-1] == 0:
        raise ValueError(f"x has no features to normalise (D = 0); got {describe(x)}")
    if weight is not None:
        check_float("weight", weight)
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"weight must have shape (D,) = ({x.shape[-1]},); got {describe(weight)}")
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device} but x is on {x.device}; they must be on the same device")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        raise ValueError(f"eps must be a positive number; got {eps!r}")
    return check_tangent("x_dot", x_dot, "x", x)


def check_rope_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dot: torch.Tensor,
                    name: str = "x") -> int:
    """x (B, ..., D) float, D even; cos, sin float, one shape, broadcastable to x.shape[:-1] + (D/2,). Returns kt."""
    check_float(name, x)
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"{name} must be (B, ..., D) with an even head dim D (RoPE rotates pairs); got {describe(x)}")
    for tname, t in (("cos", cos), ("sin", sin)):
        check_float(tname, t)
        if t.device != x.device:
            raise ValueError(f"{tname} is on {t.device} but {name} is on {x.device}; they must be on the same device")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape; got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    target = tuple(x.shape[:-1]) + (x.shape[-1] // 2,)
    try:
        ok = tuple(torch.broadcast_shapes(cos.shape, target)) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} do not broadcast to {name}.shape[:-1] + (D/2,) = "
                         f"{target} (one angle per position and pair; e.g. (N, D/2) for {name} (B, H, N, D), "
                         f"(N, 1, D/2) for (B, N, H, D))")
    return check_tangent(f"{name}_dot", x_dot, name, x)


def check_swiglu_args(x, w13, b13, w2, b2, x_dot) -> int:
    """x (B, ..., C); w13 (2H, C) = [W1; W3]; b13 (2H,) or None; w2 (out, H); b2 (out,) or None. Returns kt."""
    kt = check_linear_args(x, w13, x_dot)
    if w13.dim() != 2 or w13.shape[0] % 2:
        raise ValueError(f"w13 must be (2 H, C): the gate weight W1 (H, C) stacked over the value weight W3 (H, C); "
                         f"got shape {tuple(w13.shape)}")
    hidden = w13.shape[0] // 2
    if b13 is not None and b13.shape != (2 * hidden,):
        raise ValueError(f"b13 must be (2 H,) = ({2 * hidden},) (b1 then b3); got shape {tuple(b13.shape)}")
    if w2.dim() != 2 or w2.shape[1] != hidden:
        raise ValueError(f"w2 must be (out, H) with H = {hidden} (half of w13's {w13.shape[0]} rows); "
                         f"got shape {tuple(w2.shape)}")
    if b2 is not None and b2.shape != (w2.shape[0],):
        raise ValueError(f"b2 must be (out,) = ({w2.shape[0]},); got shape {tuple(b2.shape)}")
    return kt


def check_qk_args(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps) -> int:
    """q and k one shape (B, ..., D), dtype and device; weights both None or both (D,); cos/sin both None or both
    given (RoPE). Returns kt (q_dot and k_dot must agree)."""
    check_float("q", q)
    check_float("k", k)
    check_like("k", k, "q", q)
    if k.shape != q.shape:
        raise ValueError(f"q and k must have one shape; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("q_weight and k_weight must both be given (learned QK-norm scales) or both be None")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be given (RoPE) or both be None (QK-norm only)")
    kt = check_rmsnorm_args(q, q_weight, q_dot, eps)
    if check_rmsnorm_args(k, k_weight, k_dot, eps) != kt:
        raise ValueError(f"tangent batches differ (q_dot: {q_dot.shape[0]}, k_dot: {k_dot.shape[0]}); every tangent "
                         f"of one call must have the same kt")
    if cos is not None:
        check_rope_args(q, cos, sin, q_dot, "q")
    return kt


# --------------------------------------------------------------------------------------------------------- RMSNorm
def rmsnorm_jvp_ref(x: torch.Tensor, weight: torch.Tensor | None, x_dot: torch.Tensor,
                    *, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x r w, r = 1 / sqrt(mean(x^2) + eps) over the last dim;  y_dot = (x_dot - x r^2 mean(x x_dot)) r w.

    x: (B, ..., D) any strides; weight: (D,) or None (no learned scale); x_dot: (kt, ..., D)."""
    kt = check_rmsnorm_args(x, weight, x_dot, eps)
    acc = _acc(x.dtype, weight.dtype if weight is not None else x.dtype)
    xf = x.to(acc)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    y = xf * r * weight.to(acc) if weight is not None else xf * r
    with torch.no_grad():
        xk, xd = x[:kt].detach().to(acc), x_dot.to(acc)
        rk = r[:kt].detach()
        y_dot = (xd - xk * rk.square() * (xk * xd).mean(-1, keepdim=True)) * rk
        if weight is not None:
            y_dot = y_dot * weight.detach().to(acc)
    return y.to(x.dtype), y_dot.to(x.dtype)


# ------------------------------------------------------------------------------------------------------------ RoPE
def _pairs(x: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def _unpairs(y1: torch.Tensor, y2: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack([y1, y2], dim=-1).flatten(-2)
    return torch.cat([y1, y2], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    x1, x2 = _pairs(x, interleaved)
    return _unpairs(x1 * cos - x2 * sin, x1 * sin + x2 * cos, interleaved)


def rope_jvp_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dot: torch.Tensor,
                 *, interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """y = rotate(x) by the angles whose cos / sin are given (per position and pair);  y_dot = rotate(x_dot).

    x: (B, ..., D), D even; cos, sin: broadcastable to x.shape[:-1] + (D/2,); x_dot: (kt, ..., D). The positions carry
    no tangent, so the tangent rotates with the primal's angles (rows of the first kt samples)."""
    kt = check_rope_args(x, cos, sin, x_dot)
    target = tuple(x.shape[:-1]) + (x.shape[-1] // 2,)
    acc = _acc(x.dtype, cos.dtype)
    c, s = (t.to(acc).broadcast_to(target) for t in (cos, sin))
    y = _rotate(x.to(acc), c, s, interleaved)
    with torch.no_grad():
        y_dot = _rotate(x_dot.to(acc), c[:kt], s[:kt], interleaved)
    return y.to(x.dtype), y_dot.to(x.dtype)


def qk_norm_rope_jvp_ref(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                         k_weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                         q_dot: torch.Tensor, k_dot: torch.Tensor, *, eps: float = 1e-6, interleaved: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """QK-norm then RoPE on q and k: (RoPE(RMSNorm(q, q_weight)), RoPE(RMSNorm(k, k_weight)), and their tangents).

    q, k: (B, ..., D) one shape (e.g. (B, H, N, Dh) views of a fused qkv projection); weights (D,) or both None;
    cos / sin as in `rope_jvp_ref`, or both None (QK-norm only). Returns (q_out, k_out, q_out_dot, k_out_dot)."""
    check_qk_args(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps)
    outs = []
    for x, w, x_dot in ((q, q_weight, q_dot), (k, k_weight, k_dot)):
        if cos is None:
            outs.append(rmsnorm_jvp_ref(x, w, x_dot, eps=eps))
            continue
        # norm and rotation in the accumulation dtype, one rounding at the end (as the fused kernel)
        acc = _acc(x.dtype, cos.dtype, w.dtype if w is not None else x.dtype)
        y, y_dot = rmsnorm_jvp_ref(x.to(acc), None if w is None else w.to(acc), x_dot.to(acc), eps=eps)
        y, y_dot = rope_jvp_ref(y, cos, sin, y_dot, interleaved=interleaved)
        outs.append((y.to(x.dtype), y_dot.to(x.dtype)))
    (qo, qo_dot), (ko, ko_dot) = outs
    return qo, ko, qo_dot, ko_dot


# ---------------------------------------------------------------------------------------------------------- SwiGLU
def silu_grad(a: torch.Tensor) -> torch.Tensor:
    """silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)."""
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def swiglu_jvp_ref(x: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor | None, w2: torch.Tensor,
                   b2: torch.Tensor | None, x_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU MLP with its tangent: [a | b] = x [W1; W3]^T (+ b13); g = silu(a) b; y = g W2^T (+ b2).

    x: (B, ..., C); w13: (2H, C) = [W1; W3] (gate rows first); w2: (out, H); x_dot: (kt, ..., C). Both GEMMs run once
    over the stacked rows [x; x_dot] (resp. [g; g_dot])."""
    from .reference import linear_jvp_ref  # lazy: reference.py re-exports this module

    check_swiglu_args(x, w13, b13, w2, b2, x_dot)
    ab, ab_dot = linear_jvp_ref(x, w13, b13, x_dot)
    a, b = ab.chunk(2, dim=-1)
    g = F.silu(a) * b
    with torch.no_grad():
        kt = x_dot.shape[0]
        acc = _acc(ab.dtype)
        ak, bk = (t[:kt].detach().to(acc) for t in (a, b))
        a_dot, b_dot = (t.to(acc) for t in ab_dot.chunk(2, dim=-1))
        g_dot = (silu_grad(ak) * a_dot * bk + F.silu(ak) * b_dot).to(g.dtype)
    return linear_jvp_ref(g, w2, b2, g_dot)
