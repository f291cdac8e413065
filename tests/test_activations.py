"""gelu_tanh_jvp and silu_jvp: fused elementwise activation + tangent, and the backward of the primal."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mfkernels.activations import gelu_tanh_jvp, silu_jvp
from mfkernels.reference import gelu_tanh_jvp_ref, silu_jvp_ref

from tests._blockops_util import (
    DTYPE_TOLS,
    LOW_PRECISION,
    SHAPES,
    assert_close,
    assert_same_error,
    assert_tangent_detached,
    check_fallback,
    f64,
    rand,
)

OPS = {
    "gelu_tanh": (gelu_tanh_jvp, gelu_tanh_jvp_ref, lambda a: F.gelu(a, approximate="tanh")),
    "silu": (silu_jvp, silu_jvp_ref, F.silu),
}


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("B,N,C,kt", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_forward_tangent_and_gradient(device, op, B, N, C, kt, dtype, atol, rtol):
    fused, ref, plain = OPS[op]
    # 3-D (B, N, hidden) as in the MLP; spread wide enough to reach both saturated tails of the activation
    a = rand(B, N, C, dtype=dtype, device=device, scale=3.0, requires_grad=True)
    a_dot = rand(kt, N, C, dtype=dtype, device=device)
    y, y_dot = fused(a, a_dot)
    assert y.dtype == dtype and y_dot.dtype == dtype and y_dot.shape == a_dot.shape
    assert_tangent_detached(y, y_dot)
    w = rand(B, N, C, dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad((y * w.to(dtype)).sum(), a)

    (a64,) = f64(a, requires_grad=True)
    y64 = plain(a64)
    (grad64,) = torch.autograd.grad((y64 * w).sum(), a64)
    _, y_dot64 = torch.func.jvp(plain, (a64[:kt].detach(),), (a_dot.double(),))
    _, y_dot_ref64 = ref(a64, a_dot.double())
    torch.testing.assert_close(y_dot_ref64, y_dot64, atol=1e-12, rtol=1e-12)  # the two references agree

    torch_y = torch_y_dot = torch_grad = None
    if dtype in LOW_PRECISION:
        torch_y, torch_y_dot = ref(a, a_dot)
        (torch_grad,) = torch.autograd.grad((torch_y * w.to(dtype)).sum(), a)
    tol = dict(atol=atol, rtol=rtol)
    assert_close("y", y, y64, torch_lowp=torch_y, **tol)
    assert_close("y_dot", y_dot, y_dot64, torch_lowp=torch_y_dot, **tol)
    assert_close("da", grad, grad64, torch_lowp=torch_grad, **tol)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, interpreter: exp -> inf is right
@pytest.mark.parametrize("op", list(OPS))
def test_two_dim_conditioning_shape_and_extreme_inputs(device, op):
    """(B, C) as on the conditioning path; inputs far into both tails (|a| up to 1e4) stay finite and exact."""
    fused, ref, plain = OPS[op]
    a = torch.tensor([[-1e4, -80.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 80.0, 1e4]] * 3,
                     dtype=torch.float32, device=device).requires_grad_()
    a_dot = torch.randn(2, a.shape[1], device=device)
    y, y_dot = fused(a, a_dot)
    (grad,) = torch.autograd.grad(y.sum(), a)
    (a64,) = f64(a, requires_grad=True)
    y64 = plain(a64)
    (grad64,) = torch.autograd.grad(y64.sum(), a64)
    _, y_dot64 = torch.func.jvp(plain, (a64[:2].detach(),), (a_dot.double(),))
    for name, got, want in (("y", y, y64), ("y_dot", y_dot, y_dot64), ("da", grad, grad64)):
        assert torch.isfinite(got).all(), name
        assert_close(name, got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_multi_block_and_non_contiguous(device):
    """More elements than one program block (1024), tangent ending mid-block, non-contiguous inputs."""
    a = rand(5, 300, dtype=torch.float32, device=device, scale=2.0).t()  # (300, 5), strided
    a_dot = rand(5, 211, dtype=torch.float32, device=device).t()[:123]  # kt = 123 of 300 rows
    a = a.requires_grad_()
    y, y_dot = gelu_tanh_jvp(a, a_dot)
    y_ref, y_dot_ref = gelu_tanh_jvp_ref(a.double(), a_dot.double())
    assert_close("y", y, y_ref, atol=1e-5, rtol=1e-5)
    assert_close("y_dot", y_dot, y_dot_ref, atol=1e-5, rtol=1e-5)


def _bad_cases():
    a = torch.randn(3, 4, 24)
    return {
        "a_dot shape": (a, torch.randn(2, 4, 23)),
        "a_dot ndim": (a, torch.randn(2, 96)),
        "a_dot dtype": (a, torch.randn(2, 4, 24, dtype=torch.float64)),
        "a_dot device": (a, torch.randn(2, 4, 24, device="meta")),
        "a_dot not float": (a, torch.ones(2, 4, 24, dtype=torch.int32)),
        "kt > B": (a, torch.randn(4, 4, 24)),
    }


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_like_the_reference(op, case):
    fused, ref, _ = OPS[op]
    args = _bad_cases()[case]
    assert_same_error(lambda: fused(*args), lambda: ref(*args))


@pytest.mark.parametrize("op", list(OPS))
def test_falls_back_to_the_reference_without_triton(monkeypatch, op):
    fused, ref, _ = OPS[op]
    a = torch.randn(3, 4, 24, requires_grad=True)
    a_dot = torch.randn(2, 4, 24)
    check_fallback(monkeypatch, f"{op}_jvp", lambda: fused(a, a_dot), lambda: ref(a, a_dot))


def test_modules_import_and_fall_back_without_triton():
    """With Triton not importable at all, every op module but attention's still imports and an op falls back with a
    warning."""
    script = (
        "import sys, warnings; sys.modules['triton'] = None\n"
        "import torch\n"
        "from mfkernels import activations, mlp, norm, qk_norm_rope, residual, rmsnorm, rope, swiglu, target\n"
        "from mfkernels.reference import gelu_tanh_jvp_ref\n"
        "a = torch.randn(2, 3); a_dot = torch.randn(1, 3)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y, y_dot = activations.gelu_tanh_jvp(a, a_dot)\n"
        "assert any('Triton is not importable' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "y_ref, y_dot_ref = gelu_tanh_jvp_ref(a, a_dot)\n"
        "assert torch.equal(y, y_ref) and torch.equal(y_dot, y_dot_ref)\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_gelu_constants_match_the_reference():
    from mfkernels import _triton, reference

    def value(c):
        return getattr(c, "value", c)  # tl.constexpr wraps the number

    assert math.isclose(value(_triton.GELU_2K), 2 * reference.GELU_K, rel_tol=1e-15)
    assert value(_triton.GELU_C) == reference.GELU_C
