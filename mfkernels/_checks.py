"""Argument checks of every mfkernels op: the one place where an input is validated.

Every error names the argument, what it got (shape / dtype / device) and what was expected, so a user never has
to read a kernel to find out why a call was refused.

Who calls them: each public entry point, once (`<op>_jvp`, `<op>_jvp_ref`, `meanflow_loss`, the SDPA drop-in), and the
registered ops' bodies (`torch.ops.mfkernels.*` can be called from anywhere). The private entries `_<op>_jvp` /
`_<op>_jvp_ref` that the public ones forward to, and the unchecked op tables (`mfkernels.ops.ops_table(...,
checked=False)`: what a network whose inputs are already validated calls), skip them. The checks of the common case
are a few comparisons (a fast path), the searching for the wrong argument only runs on a refused call.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """torch.broadcast_shapes(shape, target) == target, without building tensors (a few comparisons): every dim of
    shape, aligned from the right, is 1 or target's, and shape has no more dims than target."""
    if len(shape) > len(target):
        return False
    for s, t in zip(reversed(shape), reversed(target)):
        if s != t and s != 1:
            return False
    return True


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64); got {describe(t)}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}; got {describe(t)}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """t must share dtype and device with ref (shapes are checked by the caller)."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on the same device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def check_tangent(name: str, tangent: torch.Tensor, primal_name: str, primal: torch.Tensor) -> int:
    """Check a ragged tangent against its primal and return its batch kt.

    The contract of every op: a tangent has the primal's shape except in dim 0, where it has kt <= B rows that stand
    for the FIRST kt rows of the primal batch (kt = 0 is allowed: no tangent work at all).
    """
    if (isinstance(tangent, torch.Tensor) and isinstance(primal, torch.Tensor) and tangent.dtype == primal.dtype
            and tangent.dtype in FLOAT_DTYPES and tangent.device == primal.device and tangent.dim() == primal.dim()
            and tangent.shape[1:] == primal.shape[1:] and tangent.shape[0] <= primal.shape[0]):
        return tangent.shape[0]  # the common case, decided in a few comparisons
    check_float(name, tangent)
    check_like(name, tangent, primal_name, primal)
    if tangent.dim() != primal.dim() or tangent.shape[1:] != primal.shape[1:]:
        expected = ("kt",) + tuple(primal.shape[1:])
        raise ValueError(
            f"{name} has shape {tuple(tangent.shape)}; expected {expected} (the shape of {primal_name} "
            f"{tuple(primal.shape)} in every dim but the first)"
        )
    kt, batch = tangent.shape[0], primal.shape[0]
    if kt > batch:
        raise ValueError(
            f"{name} has tangent batch {kt} > primal batch {batch} of {primal_name}; the tangent rows stand for the "
            f"first kt rows of the primal batch, so kt must be in [0, {batch}]"
        )
    return kt


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, x_dot: torch.Tensor) -> int:
    """Linear arguments: x (B, ..., in) float, x_dot its ragged tangent, weight (out, in). Returns kt."""
    check_float("x", x)
    kt = check_tangent("x_dot", x_dot, "x", x)
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight has shape {tuple(weight.shape)} (out, in)")
    return kt


def check_tangent_batches(**tangents: torch.Tensor) -> int:
    """All tangents of one op call must have the same batch kt."""
    sizes = {name: t.shape[0] for name, t in tangents.items()}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{n}: {s}" for n, s in sizes.items())
        raise ValueError(f"tangent batches differ ({listing}); every tangent of one call must have the same kt")
    return next(iter(sizes.values()))


def _same_kind(dtype, device, *tensors) -> bool:
    for t in tensors:
        if t.dtype != dtype or t.device != device:
            return False
    return True


def check_layernorm_modulate_args(x, shift, scale, x_dot, shift_dot, scale_dot) -> int:
    """LayerNorm-modulate arguments: x (B, N, C); shift, scale (B, C) like x; tangents (kt, ...). Returns kt.

    Runs on every call: a few comparisons decide that everything is right (the common case); only then is a wrong
    argument searched for, by the checks that name it."""
    if (isinstance(x, torch.Tensor) and x.dim() == 3 and x.dtype in FLOAT_DTYPES
            and isinstance(x_dot, torch.Tensor) and x_dot.dim() == 3):
        kt, mod = x_dot.shape[0], (x.shape[0], x.shape[2])
        if (x_dot.shape[1:] == x.shape[1:] and kt <= x.shape[0] and shift.shape == mod and scale.shape == mod
                and shift_dot.shape == (kt, mod[1]) and scale_dot.shape == (kt, mod[1])
                and _same_kind(x.dtype, x.device, shift, scale, x_dot, shift_dot, scale_dot)):
            return kt
    check_float("x", x)
    check_ndim("x", x, 3, "(B, N, C)")
    for name, m in (("shift", shift), ("scale", scale)):
        check_like(name, m, "x", x)
        if m.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"{name} must have shape (B, C) = {(x.shape[0], x.shape[2])}; got {tuple(m.shape)}")
    kt = check_tangent_batches(x_dot=x_dot, shift_dot=shift_dot, scale_dot=scale_dot)
    check_tangent("x_dot", x_dot, "x", x)
    check_tangent("shift_dot", shift_dot, "shift", shift)
    check_tangent("scale_dot", scale_dot, "scale", scale)
    return kt


def check_gated_residual_args(x, gate, f, x_dot, gate_dot, f_dot) -> int:
    """Gated-residual arguments: x, f (B, N, C); gate (B, C); tangents (kt, ...); one device. Returns kt.

    Dtypes may differ (an fp32 residual stream with a bf16 branch under autocast): the output is the promoted dtype.
    A fast path decides that everything is right first (see check_layernorm_modulate_args).
    """
    if (isinstance(x, torch.Tensor) and x.dim() == 3 and x.dtype in FLOAT_DTYPES and isinstance(x_dot, torch.Tensor)
            and isinstance(f_dot, torch.Tensor) and isinstance(gate_dot, torch.Tensor)):
        kt, device = x_dot.shape[0], x.device
        if (f.shape == x.shape and gate.shape == (x.shape[0], x.shape[2]) and kt <= x.shape[0]
                and x_dot.shape[1:] == x.shape[1:] and f_dot.shape[1:] == x.shape[1:] and f_dot.shape[0] == kt
                and gate_dot.shape == (kt, x.shape[2]) and _same_kind(x.dtype, device, x_dot)
                and _same_kind(gate.dtype, device, gate, gate_dot) and _same_kind(f.dtype, device, f, f_dot)
                and gate.dtype in FLOAT_DTYPES and f.dtype in FLOAT_DTYPES):
            return kt
    check_float("x", x)
    check_ndim("x", x, 3, "(B, N, C)")
    if f.shape != x.shape:
        raise ValueError(f"f must have the shape of x {tuple(x.shape)}; got {tuple(f.shape)}")
    if gate.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"gate must have shape (B, C) = {(x.shape[0], x.shape[2])}; got {tuple(gate.shape)}")
    kt = check_tangent_batches(x_dot=x_dot, gate_dot=gate_dot, f_dot=f_dot)
    check_tangent("x_dot", x_dot, "x", x)
    check_tangent("gate_dot", gate_dot, "gate", gate)
    check_tangent("f_dot", f_dot, "f", f)
    for name, t in (("gate", gate), ("f", f)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must be on the same device")
    return kt


def require_values(ok: torch.Tensor, message: str, details: Callable[[], str] | None = None) -> None:
    """A check on tensor VALUES (ok: a bool tensor, all of it must be True); a ValueError naming what is wrong.

    Eagerly it reads ok on the host (one sync) and the error adds details() (e.g. the offending range). While
    torch.compile traces, reading a value would break the graph (or sync the host), so the check becomes a device-side
    assert, torch._assert_async (no sync, no graph break; a RuntimeError with the message on CPU, a device assert on
    CUDA).
    """
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), message)
        return
    if not bool(ok.all()):
        raise ValueError(message + (details() if details is not None else ""))


# ----------------------------------------------------------------------------------------------------- linear, MLPs
def check_mlp_args(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x_dot: torch.Tensor) -> int:
    """Linear -> GELU -> Linear arguments: x (B, ..., in), w1 (hidden, in), w2 (out, hidden). Returns kt."""
    kt = check_linear_args(x, w1, x_dot)
    if w2.shape[-1] != w1.shape[0]:
        raise ValueError(f"w2 has shape {tuple(w2.shape)} (out, hidden) but w1 has shape {tuple(w1.shape)} "
                         f"(hidden, in): the hidden sizes must match")
    return kt


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


def check_params_match(what: str, x: torch.Tensor, autocast: torch.dtype | None, **params: torch.Tensor | None) -> None:
    """The fused GEMM ops run in one dtype: every parameter on x's device and, outside autocast (autocast: None), of
    x's dtype (under autocast the op casts x and the parameters to the autocast dtype first)."""
    for name, t in params.items():
        if t is not None and (t.device != x.device or (autocast is None and t.dtype != x.dtype)):
            raise TypeError(f"{name} has dtype {t.dtype} on {t.device} but x has dtype {x.dtype} on {x.device}; "
                            f"outside autocast the {what}'s parameters must match x")


# ------------------------------------------------------------------------------------------------ RMSNorm, RoPE, QK
def check_rmsnorm_args(x: torch.Tensor, weight: torch.Tensor | None, x_dot: torch.Tensor, eps: float) -> int:
    """x (B, ..., D) float, D >= 1; weight None or (D,) float on x's device; x_dot its ragged tangent. Returns kt."""
    if (isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and x.dim() >= 2 and x.shape[-1] > 0
            and (weight is None or (isinstance(weight, torch.Tensor) and weight.dtype in FLOAT_DTYPES
                                    and weight.shape == (x.shape[-1],) and weight.device == x.device))
            and type(eps) in (float, int) and eps > 0):
        return check_tangent("x_dot", x_dot, "x", x)  # the common case, decided in a few comparisons
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
    if not broadcasts_to(tuple(cos.shape), target):
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} do not broadcast to {name}.shape[:-1] + (D/2,) = "
                         f"{target} (one angle per position and pair; e.g. (N, D/2) for {name} (B, H, N, D), "
                         f"(N, 1, D/2) for (B, N, H, D))")
    return check_tangent(f"{name}_dot", x_dot, name, x)


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


def check_angles_constant(cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    """The fused ops treat the angles as constants (positions: no gradient, no tangent). Refuse angles that would need
    a gradient instead of dropping it silently."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (cos, sin)):
        raise ValueError("cos / sin require grad, but the fused RoPE treats the angles as constants (no gradient flows "
                         "into them); detach them, or use the `_ref` op to differentiate through the angles")


# -------------------------------------------------------------------------------------------------------- attention
MAX_HEAD_DIM = 256  # the largest head dim the attention kernels have tiles for (attention/_configs.py)


def check_attn_mask(attn_mask, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
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
    if not broadcasts_to(tuple(attn_mask.shape), target):
        raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}, which does not broadcast to the attention "
                         f"weights' shape (B, Hq, Nq, Nk) = {target}")


def check_attention_args(q, k, v, q_dot, k_dot, v_dot, attn_mask=None, *, causal: bool = False,
                         enable_gqa: bool = False) -> int:
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); Hkv = Hq, or (enable_gqa) any divisor of Hq; ragged
    tangents of the same shapes; attn_mask (see check_attn_mask). Returns kt.

    A fast path decides the common case (no mask, everything right) in a few comparisons; only then is a wrong argument
    searched for, by the checks that name it."""
    if attn_mask is None and _attention_args_ok(q, k, v, q_dot, k_dot, v_dot, enable_gqa):
        return q_dot.shape[0]
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
    check_attn_mask(attn_mask, q, k, causal)
    return kt


def _attention_args_ok(q, k, v, q_dot, k_dot, v_dot, enable_gqa) -> bool:
    """Everything right, decided on plain ints (torch.Size slices cost more than the comparisons)."""
    for t in (q, k, v, q_dot, k_dot, v_dot):
        if not isinstance(t, torch.Tensor):
            return False
    dtype, device = q.dtype, q.device
    if dtype not in FLOAT_DTYPES or not _same_kind(dtype, device, k, v, q_dot, k_dot, v_dot):
        return False
    qs, ks, vs, qds, kds, vds = (tuple(t.shape) for t in (q, k, v, q_dot, k_dot, v_dot))
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4 or len(qds) != 4 or len(kds) != 4 or len(vds) != 4:
        return False
    b, hq, nq, d = qs
    _, hkv, nk, _ = ks
    kt = qds[0]
    return (ks[0] == b and ks[3] == d and vs[0] == b and vs[1] == hkv and vs[2] == nk and kt <= b
            and (hkv == hq or (enable_gqa and hkv > 0 and hq % hkv == 0))
            and qds[1:] == qs[1:] and kds == (kt,) + ks[1:] and vds == (kt,) + vs[1:])


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r} ({type(value).__name__})")
    return value


def check_attention_kernel_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> float:
    """What the fused attention kernels add to the reference's checks: head dims they have tiles for, at least one
    key, a positive finite scale (they track the row max of unscaled scores). Returns the scale (default D^-1/2)."""
    for name, t, dim in (("q", q, "D"), ("v", v, "Dv")):
        if not 1 <= t.shape[-1] <= MAX_HEAD_DIM:
            raise ValueError(f"{name} has head dim {dim} = {t.shape[-1]} ({describe(t)}); supported head dims are "
                             f"1..{MAX_HEAD_DIM} (tuned for 64 and 128; others run as power-of-two pieces or "
                             f"zero-padded)")
    if k.shape[2] == 0:
        raise ValueError(f"k has no keys ({describe(k)}); attention needs Nk >= 1")
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be None or a real number; got {scale!r} ({type(scale).__name__})")
    if not (math.isfinite(float(scale)) and scale > 0):
        raise ValueError(f"scale must be finite and > 0 (the kernels track the row max of unscaled scores); "
                         f"got {scale!r}")
    return float(scale)


def check_tangent_grad(tangent_grad) -> None:
    if tangent_grad is not None and not isinstance(tangent_grad, bool):
        raise TypeError(f"tangent_grad must be None or a bool; got {tangent_grad!r} ({type(tangent_grad).__name__})")


def mask_grad_error() -> ValueError:
    return ValueError("attn_mask requires grad: the fused attention gives no gradient for a float attn_mask (it would "
                      "need the (B, H, Nq, Nk) score gradient); pass attn_mask.detach(), or use "
                      "F.scaled_dot_product_attention for a learned additive mask")


def check_mask_grad(attn_mask: torch.Tensor | None) -> None:
    """The kernels give no gradient for a float mask: refuse one that asks for it rather than return none silently."""
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        raise mask_grad_error()


def check_mask_is_constant(attn_mask: torch.Tensor | None) -> None:
    """Forward mode: refuse a float mask with a tangent of its own rather than drop it. forward_ad: the mask is a dual.
    functorch (torch.func.jvp and friends): the mask is wrapped by a transform level, i.e. computed from the inputs of
    the transform (a closed-over mask is a plain tensor). Eager only: called outside Dynamo."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return
    if (fwAD._current_level >= 0 and fwAD.unpack_dual(attn_mask).tangent is not None) or \
            torch._C._functorch.is_functorch_wrapped_tensor(attn_mask):
        raise ValueError("attn_mask carries a tangent (it is a dual tensor of forward_ad, or depends on the inputs of "
                         "torch.func.jvp / another functorch transform); the fused attention treats a mask as a "
                         "constant (zero tangent): pass one that does not depend on them (e.g. attn_mask.detach() "
                         "outside the transform), or use F.scaled_dot_product_attention")


def check_dropout(dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or dropout_p != 0.0:
        raise NotImplementedError(f"mfkernels.scaled_dot_product_attention: dropout_p must be 0.0 (there is no fused "
                                  f"dropout; apply dropout outside, or use F.scaled_dot_product_attention); "
                                  f"got {dropout_p!r}")


# ------------------------------------------------------------------------------------------- MeanFlow target / loss
def check_meanflow_loss_args(u, v_g, du_dt, t, r, p, eps) -> None:
    """u, v_g (B, ...) and du_dt (kt, ...) one float dtype and device; t, r (B,) one float dtype; p finite; eps >= 0."""
    check_float("u", u)
    if u.dim() < 1:
        raise ValueError(f"u must have a batch dim (B, ...); got {describe(u)}")
    check_float("v_g", v_g)
    check_like("v_g", v_g, "u", u)
    if v_g.shape != u.shape:
        raise ValueError(f"v_g has shape {tuple(v_g.shape)} but u has shape {tuple(u.shape)}; they must be equal")
    check_tangent("du_dt", du_dt, "u", u)
    batch = u.shape[0]
    for name, x in (("t", t), ("r", r)):
        check_float(name, x)
        if x.device != u.device:
            raise ValueError(f"{name} is on {x.device} but u is on {u.device}; they must be on the same device")
        if x.dim() != 1 or x.shape[0] != batch:
            raise ValueError(f"{name} must have shape (B,) = ({batch},), one value per row of u; got {describe(x)}")
    if r.dtype != t.dtype:
        raise TypeError(f"r has dtype {r.dtype} but t has dtype {t.dtype}; they must match")
    if not (isinstance(p, numbers.Real) and math.isfinite(p)):
        raise ValueError(f"p must be a finite number; got {p!r}")
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")


def check_time_order(t: torch.Tensor, r: torch.Tensor) -> None:
    """Every row needs r <= t (a host sync: reads the rows where it fails)."""
    bad = torch.nonzero(t < r).flatten()
    if bad.numel():
        i = int(bad[0])
        more = f" ({bad.numel()} rows in all)" if bad.numel() > 1 else ""
        raise ValueError(f"meanflow_loss: t < r in row {i} (t[{i}] = {float(t[i]):.6g}, r[{i}] = {float(r[i]):.6g})"
                         f"{more}; every row needs r <= t")
