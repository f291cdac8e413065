"""The MeanFlow stop-gradient target and adaptively weighted loss in one native pass (C++ on CPU, CUDA on GPU).

    loss, per_sample, weight = meanflow_loss(u, v_g, du_dt, t, r, p=1.0, eps=0.01)

Exactly the semantics of `mfkernels.reference.meanflow_loss_ref` (docs/design.md, 'The MeanFlow loss'):

    u_tgt_i = v_g_i - clip(t_i - r_i, 0, 1) du_dt_i   for the first kt = du_dt.shape[0] rows, u_tgt_i = v_g_i after
    L_i = sum over non-batch dims (u_i - u_tgt_i)^2;   w_i = (L_i + eps)^-p (detached);   loss = mean_i w_i L_i
    d loss / d u_i = (2 / B) w_i (u_i - u_tgt_i);  v_g, du_dt, t, r get no gradient (stop-gradient)

Inputs: u, v_g (B, ...) and du_dt (kt, ...) share one floating dtype (float16, bfloat16, float32, float64) and any
trailing shape; t, r (B,) share one floating dtype (any; t - r is rounded to it, as the reference does); everything on
one device. Non-contiguous inputs are accepted (copied to contiguous memory first). Outputs loss (), per_sample (B,)
and weight (B,) are float32 (float64 for float64 inputs: the native op then also accumulates in float64; the
reference computes in float32 whatever the input). per_sample and weight are detached.

How it runs (`backend`):
    "native": the op torch.ops.mfkernels.meanflow_loss (see csrc/target.cpp); an error if it is not available.
    "torch":  the reference (plain torch ops).
    "auto":   native when available for the tensors' device, else the reference with ONE warning saying why.
The extension is loaded lazily on the first call (mfkernels._C if setup.py built it, else a JIT build cached in
mfkernels/_build/; see mfkernels/_ext.py), so importing mfkernels stays cheap.

The forward reads u, v_g, du_dt once and saves the residual u - u_tgt (u's dtype) for backward, where the scale
2 w_i / B is applied (grad_u = grad_loss * (2 / B) w_i (u_i - u_tgt_i), one read and one write). Nothing is saved
when u does not require grad (or grad mode is off).

t >= r is checked (a ValueError / RuntimeError naming the first bad row): always by the CPU kernel and for CPU
tensors on the reference path; on CUDA only with check_times=True, because reading the result needs a host sync
(without it a row with t < r behaves as in the reference: clip(t - r, 0, 1) = 0). Not checked while torch.compile
traces.

Layout: the kernels are C++ / CUDA (csrc/: `TORCH_LIBRARY` defines the schema); this file registers their Python
parts (fake kernels, autograd) once the library is loaded, then the public `meanflow_loss`. Not a FusedOp: the op is
defined in C++, and its eager call is one dispatch into C++ with no Python body to skip.
"""
from __future__ import annotations

import threading
import warnings

import torch

from . import _ext
from ._checks import check_meanflow_loss_args, check_time_order
from ._runtime import acc_dtype
from .reference import meanflow_loss_ref

__all__ = ["meanflow_loss", "native_available", "native_status"]

BACKENDS = ("auto", "native", "torch")


# ----------------------------------------------------------------------------------------------------- registration
def _fake_meanflow_loss(u, v_g, du_dt, t, r, p, eps, save_residual=True):
    acc = acc_dtype(u.dtype)
    batch = u.shape[0]
    residual = u.new_empty(u.shape) if save_residual else u.new_empty((0,))
    return (u.new_empty((), dtype=acc), u.new_empty((batch,), dtype=acc), u.new_empty((batch,), dtype=acc),
            residual)


def _fake_meanflow_loss_backward(grad_loss, residual, weight):
    return residual.new_empty(residual.shape)


def _setup_context(ctx, inputs, output):
    _, per_sample, weight, residual = output
    ctx.saved_residual = bool(inputs[7]) if len(inputs) > 7 else True
    ctx.save_for_backward(residual, weight)
    ctx.mark_non_differentiable(per_sample, weight, residual)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_per_sample, _grad_weight, _grad_residual):
    grad_u = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        if not ctx.saved_residual:
            raise RuntimeError("mfkernels.meanflow_loss: backward through a call made with save_residual=False "
                               "(u did not require grad, or grad mode was off, when the loss was computed)")
        residual, weight = ctx.saved_tensors
        grad_u = torch.ops.mfkernels.meanflow_loss_backward(grad_loss, residual, weight)
    return grad_u, None, None, None, None, None, None, None


_registered = False
_register_lock = threading.Lock()


def _register_python_parts() -> None:
    """Fake kernels (torch.compile / FakeTensor shape inference) and autograd, once the C++ ops exist."""
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        torch.library.register_fake("mfkernels::meanflow_loss")(_fake_meanflow_loss)
        torch.library.register_fake("mfkernels::meanflow_loss_backward")(_fake_meanflow_loss_backward)
        torch.library.register_autograd("mfkernels::meanflow_loss", _backward, setup_context=_setup_context)
        _registered = True


if _ext.op_defined():  # someone loaded the library before importing this module (csrc's set_python_module)
    _register_python_parts()


# ----------------------------------------------------------------------------------------------------- availability
_SUPPORTED = ("cpu", "cuda", "meta")


@torch.compiler.assume_constant_result
def _unavailable_reason(device_type: str, warn: bool = False) -> str:
    """'' when the native op runs on `device_type`, else why not (and, with warn, the one fallback warning).
    Loads the extension on first call; under torch.compile it runs at trace time and its result is a constant of
    the graph."""
    why = ""
    if device_type not in _SUPPORTED:
        why = f"no native kernel for device type {device_type!r}"
    else:
        status = native_status()
        if not status.available:
            why = status.reason or "the native extension is not available"
        elif device_type == "cuda" and not status.cuda:
            why = status.reason or "the native extension has no CUDA kernels"
    if why and warn:
        _warn_fallback(device_type, why)
    return why


_warned: set[str] = set()


def _warn_fallback(device_type: str, why: str) -> None:
    """One warning per process and device type: the reference replaces the native op, and why."""
    if device_type in _warned:
        return
    _warned.add(device_type)
    warnings.warn(f"mfkernels.meanflow_loss: native op unavailable for {device_type} tensors, falling back to the "
                  f"pure-torch reference meanflow_loss_ref (slower, same results). Why: {why}",
                  RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------------------------------------- public
def native_status() -> _ext.NativeStatus:
    """Load the extension if not done yet; say where it came from, whether it has CUDA kernels, and why not."""
    status = _ext.status()
    if status.available:
        _register_python_parts()
    return status


def native_available(device: str | torch.device = "cpu") -> bool:
    """True when the native op can run on tensors of `device` (loads the extension on first call)."""
    return _unavailable_reason(torch.device(device).type) == ""


def meanflow_loss(u: torch.Tensor, v_g: torch.Tensor, du_dt: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                  p: float = 1.0, eps: float = 0.01, *, backend: str = "auto",
                  check_times: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per_sample_L, weight) of the MeanFlow objective; see the module doc for the exact contract.

    backend: "auto" | "native" | "torch".  check_times: None = check t >= r where it costs no host sync (CPU);
    True = check on every device (one sync on CUDA); False = no Python-side check (the CPU kernel still refuses).
    """
    check_meanflow_loss_args(u, v_g, du_dt, t, r, p, eps)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    native = False
    if backend != "torch":
        why = _unavailable_reason(u.device.type, backend == "auto")  # warns (once) when "auto" falls back
        if why == "":
            native = True
        elif backend == "native":
            raise RuntimeError(f"mfkernels.meanflow_loss: backend='native' is not available for {u.device.type} "
                               f"tensors: {why}")
    if check_times is None:
        check_times = u.device.type == "cpu"  # free there (the CPU kernel checks too; this gives the same error type)
    if check_times and not torch.compiler.is_compiling():
        check_time_order(t, r)
    if native:
        save_residual = torch.is_grad_enabled() and u.requires_grad
        loss, per_sample, weight, _ = torch.ops.mfkernels.meanflow_loss(u, v_g, du_dt, t, r, float(p), float(eps),
                                                                         save_residual)
        return loss, per_sample, weight
    return meanflow_loss_ref(u, v_g, du_dt, t, r, p, eps)
