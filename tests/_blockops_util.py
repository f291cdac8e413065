"""Shared helpers of the block-op tests (norm, activations, mlp, residual): shapes, dtype tolerances, comparisons.

Every fused result is compared with a float64 reference computed from the SAME (rounded) inputs. For fp64 and fp32 the
bound is absolute + relative; for fp16 / bf16 it is torch's own error in that dtype (the `_ref` op run in that dtype,
against the same float64 reference) times a small factor, plus a floor: a kernel that is as good as eager torch passes,
one that loses precision (bf16 arithmetic, a missing upcast) does not.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from mfkernels import _runtime

# (dtype, atol, rtol). For fp16 / bf16 the pair is the floor added to FACTOR x torch's own error.
DTYPE_TOLS = [
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 4e-3, 4e-3, id="bf16"),
]
LOW_PRECISION = (torch.float16, torch.bfloat16)
FACTOR = 2.0

# (B, N, C, kt): hidden sizes that are not powers of two, one token and several, kt in {0, 1, B}.
SHAPES = [
    pytest.param(1, 1, 24, 0, id="B1N1C24-kt0"),
    pytest.param(1, 1, 24, 1, id="B1N1C24-kt1"),
    pytest.param(3, 7, 40, 0, id="B3N7C40-kt0"),
    pytest.param(3, 7, 40, 1, id="B3N7C40-kt1"),
    pytest.param(3, 7, 40, 3, id="B3N7C40-kt3"),
]


def rand(*shape, dtype, device, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    """Random normal data made in the test dtype (so the fp64 reference sees exactly the rounded values)."""
    t = (torch.randn(*shape, dtype=torch.float64, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def f64(*tensors, requires_grad: bool = False):
    return [t.detach().double().requires_grad_(requires_grad) for t in tensors]


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


def assert_close(name: str, actual: torch.Tensor, ref64: torch.Tensor, *, atol: float, rtol: float,
                 torch_lowp: torch.Tensor | None = None) -> None:
    """actual (any dtype) against the float64 reference; see the module docstring for the bound."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    if actual.numel() == 0:
        return
    assert not torch.isnan(actual).any(), f"{name}: NaN in the output (an element the kernel never wrote?)"
    if actual.dtype in LOW_PRECISION:
        assert torch_lowp is not None, f"{name}: low-precision comparison needs torch's own result"
        ours, theirs = _max_err(actual, ref64), _max_err(torch_lowp, ref64)
        bound = FACTOR * theirs + atol + rtol * ref64.abs().max().item()
        assert ours <= bound, (f"{name}: max error {ours:.3g} vs float64 exceeds {FACTOR} x torch's own {actual.dtype} "
                               f"error {theirs:.3g} + floor (bound {bound:.3g})")
    else:
        torch.testing.assert_close(actual.double(), ref64.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_same_error(fused_call, ref_call) -> None:
    """Both calls must raise the same exception type with the same message (shared argument checks)."""
    with pytest.raises(Exception) as ref_info:
        ref_call()
    with pytest.raises(type(ref_info.value)) as fused_info:
        fused_call()
    assert str(fused_info.value) == str(ref_info.value)


def check_fallback(monkeypatch, op_name: str, fused_call, ref_call) -> None:
    """Without the interpreter a CPU op warns once, then matches its reference exactly (it IS the reference)."""
    monkeypatch.setattr(_runtime, "interpreter_active", lambda: False)
    monkeypatch.setattr(_runtime, "_warned", set())
    with pytest.warns(RuntimeWarning, match=f"mfkernels.{op_name}: falling back"):
        first = fused_call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = fused_call()
    expected = ref_call()
    for a, b, c in zip(first, second, expected):
        assert torch.equal(a, c) and torch.equal(b, c)


def assert_tangent_detached(y: torch.Tensor, y_dot: torch.Tensor) -> None:
    assert y.requires_grad, "y must be differentiable"
    assert not y_dot.requires_grad and y_dot.grad_fn is None, "y_dot must be detached"
