"""The host-side runtime every op shares: where a Triton kernel can run (and the fallback when it cannot), output
allocation, the accumulation dtype, autocast casts, launch-grid arithmetic. Pure torch: importable without Triton.

On CUDA tensors the compiled kernels run. On CPU tensors they run only under the Triton interpreter
(TRITON_INTERPRET=1, used by the tests). Anywhere else an op falls back to its pure-torch `<op>_ref` and says so once.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch


_triton_importable: bool | None = None


def triton_importable() -> bool:
    """Tried once per process. A plain global rather than functools.lru_cache: torch.compile traces this function (the
    public ops call it), and Dynamo reads a global as a constant but warns about an lru_cache wrapper."""
    global _triton_importable
    if _triton_importable is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:  # pragma: no cover - depends on the install
            _triton_importable = False
        else:
            _triton_importable = True
    return _triton_importable


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(t: torch.Tensor) -> bool:
    """True when a Triton kernel can process tensor t where it lives."""
    if not triton_importable():
        return False
    if t.device.type == "cuda":
        return not interpreter_active()
    if t.device.type == "cpu":
        return interpreter_active()
    return False


def require_triton(op: str, t: torch.Tensor, can_run=triton_can_run) -> None:
    """The registered ops' own check (their public functions fall back to the reference before ever calling them).
    can_run: a stricter test where an op supports fewer dtypes than Triton does (attention: no fp64 on CUDA)."""
    if not can_run(t):
        raise RuntimeError(f"mfkernels::{op} runs Triton kernels: it needs CUDA tensors, or CPU tensors with "
                           f"TRITON_INTERPRET=1 (and Triton importable); got a tensor of dtype {t.dtype} on "
                           f"{t.device}")


_warned: set[str] = set()


def warn_fallback(op: str, t: torch.Tensor) -> None:
    """One warning per process when a pure-torch reference replaces a Triton kernel: the first op to fall back names
    itself and the reason, which holds for every other op of the process too (a network on the CPU would otherwise
    print one warning per kind of layer)."""
    if _warned:
        return
    _warned.add(op)
    why = "Triton is not importable" if not triton_importable() else (
        f"tensors are on {t.device} (Triton kernels run on CUDA, or on CPU only with TRITON_INTERPRET=1)"
    )
    warnings.warn(f"mfkernels.{op}: falling back to the pure-torch reference {op}_ref because {why}. Every "
                  f"mfkernels op falls back the same way in this process (exact, slower); this is said once.",
                  RuntimeWarning, stacklevel=3)


_poison = os.environ.get("MFKERNELS_POISON", "0") == "1"


def set_poison(enabled: bool) -> None:
    """Debug mode for tests: kernel outputs are allocated filled with NaN, so an element a kernel forgets to write
    shows up as NaN instead of passing silently with whatever the allocator left there."""
    global _poison
    _poison = enabled


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output buffer (uninitialised; NaN-filled in poison mode)."""
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids. Plain Python: triton.cdiv is a ConstexprFunction in Triton 3.6, whose host call
    costs more than the arithmetic, and it is paid on every launch."""
    return -(-a // b)


_PROMOTED: dict = {}


def promote(*dtypes: torch.dtype) -> torch.dtype:
    """torch.promote_types over several dtypes, memoised: torch.promote_types is an aten op (a dispatcher call of a
    microsecond or two on every op call otherwise)."""
    out = _PROMOTED.get(dtypes)
    if out is None:
        out = dtypes[0]
        for d in dtypes[1:]:
            out = torch.promote_types(out, d)
        _PROMOTED[dtypes] = out
    return out


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Grad mode is on and an input requires grad: whether a forward saves what its backward needs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def tangent_grad_on(tangent_grad: bool | None, *tangents: torch.Tensor | None) -> bool:
    """Whether an op's tangent output is differentiable (the rule of every op's `tangent_grad` argument): grad mode is
    on and either tangent_grad is True, or it is None (the default) and a tangent input requires grad, so that a
    tangent that carries a graph is never cut silently. False: the op contract, a detached tangent."""
    if tangent_grad is False or not torch.is_grad_enabled():
        return False
    return tangent_grad is True or any(t is not None and t.requires_grad for t in tangents)


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation / math dtype of every op, kernel and reference alike: float64 if any input is float64 (the
    exact tests), else float32 (16-bit inputs are upcast after the load; loads and stores keep the tensors' dtypes)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# --------------------------------------------------------------------------------------------------------- autocast
def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype active for t's device type, or None outside autocast."""
    device_type = t.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(dtype: torch.dtype | None, *tensors):
    """Differentiable casts to the autocast dtype, as autocast does for F.linear (the identity without autocast;
    floats only, None passes). The GEMM ops (linear, mlp, swiglu) cast their inputs and parameters so first."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
