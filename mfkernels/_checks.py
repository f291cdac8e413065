"""Argument checks shared by every mfkernels op.

Every error names the argument, what it got (shape / dtype / device) and what was expected, so a user never has
to read a kernel to find out why a call was refused.
"""
from __future__ import annotations

from typing import Callable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


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
