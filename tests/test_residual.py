"""gated_residual_jvp: fused y = x + gate f with its tangent, and the backward of the primal."""
import pytest
import torch

from mfkernels.reference import gated_residual_jvp_ref
from mfkernels.residual import gated_residual_jvp

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


def plain(x, gate, f):
    return x + gate[:, None, :] * f


def make_inputs(B, N, C, kt, dtype, device, gate_dtype=None):
    gate_dtype = gate_dtype or dtype
    x = rand(B, N, C, dtype=dtype, device=device, requires_grad=True)
    gate = rand(B, C, dtype=gate_dtype, device=device, requires_grad=True)
    f = rand(B, N, C, dtype=gate_dtype, device=device, scale=2.0, requires_grad=True)
    tangents = (rand(kt, N, C, dtype=dtype, device=device), rand(kt, C, dtype=gate_dtype, device=device),
                rand(kt, N, C, dtype=gate_dtype, device=device))
    return (x, gate, f), tangents


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,C,kt", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_forward_tangent_and_gradients(device, B, N, C, kt, dtype, atol, rtol):
    primals, tangents = make_inputs(B, N, C, kt, dtype, device)
    y, y_dot = gated_residual_jvp(*primals, *tangents)
    assert y.dtype == dtype and y_dot.dtype == dtype and y_dot.shape == (kt, N, C)
    assert_tangent_detached(y, y_dot)
    w = rand(B, N, C, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((y * w.to(dtype)).sum(), primals)

    p64, t64 = f64(*primals, requires_grad=True), f64(*tangents)
    y64 = plain(*p64)
    grads64 = torch.autograd.grad((y64 * w).sum(), p64)
    _, y_dot64 = torch.func.jvp(plain, tuple(p[:kt].detach() for p in p64), tuple(t64))
    _, y_dot_ref64 = gated_residual_jvp_ref(*p64, *t64)
    torch.testing.assert_close(y_dot_ref64, y_dot64, atol=1e-12, rtol=1e-12)

    torch_y = torch_y_dot = None
    torch_grads = (None,) * 3
    if dtype in LOW_PRECISION:
        torch_y, torch_y_dot = gated_residual_jvp_ref(*primals, *tangents)
        torch_grads = torch.autograd.grad((torch_y * w.to(dtype)).sum(), primals)
    tol = dict(atol=atol, rtol=rtol)
    assert_close("y", y, y64, torch_lowp=torch_y, **tol)
    assert_close("y_dot", y_dot, y_dot64, torch_lowp=torch_y_dot, **tol)
    for name, g, g64, gt in zip(("dx", "dgate", "df"), grads, grads64, torch_grads):
        assert g.dtype == dtype
        assert_close(name, g, g64, torch_lowp=gt, **tol)


@pytest.mark.gpu
def test_autocast_mix_fp32_stream_bf16_branch(device):
    """The autocast case: fp32 residual stream x, bf16 gate and f. Outputs are fp32 (promoted, as the reference)."""
    primals, tangents = make_inputs(2, 5, 40, 1, torch.float32, device, gate_dtype=torch.bfloat16)
    y, y_dot = gated_residual_jvp(*primals, *tangents)
    y_ref, y_dot_ref = gated_residual_jvp_ref(*primals, *tangents)
    assert y.dtype == y_ref.dtype == torch.float32 and y_dot.dtype == y_dot_ref.dtype == torch.float32
    grads = torch.autograd.grad(y.square().sum(), primals)
    p64, t64 = f64(*primals, requires_grad=True), f64(*tangents)
    y64, y_dot64 = gated_residual_jvp_ref(*p64, *t64)
    grads64 = torch.autograd.grad(y64.square().sum(), p64)
    assert_close("y", y, y64, atol=1e-5, rtol=1e-5)  # gate f is formed in fp32: no bf16 rounding of the product
    assert_close("y_dot", y_dot, y_dot64, atol=1e-5, rtol=1e-5)
    for name, g, g64, p in zip(("dx", "dgate", "df"), grads, grads64, primals):
        assert g.dtype == p.dtype
        assert_close(name, g.float(), g64, atol=2e-2, rtol=1e-2)  # dgate / df are rounded to bf16


@pytest.mark.gpu
def test_dit_width_strided_gate_and_partial_grads(device):
    """C = 1152 (9 column blocks), gate as a chunk of a (B, 6C) adaLN output, only dgate requested."""
    B, N, C, kt = 2, 9, 1152, 2
    ada = rand(B, 6 * C, dtype=torch.float32, device=device, requires_grad=True)
    ada_dot = rand(kt, 6 * C, dtype=torch.float32, device=device)
    x, f = rand(B, N, C, dtype=torch.float32, device=device), rand(B, N, C, dtype=torch.float32, device=device)
    x_dot, f_dot = rand(kt, N, C, dtype=torch.float32, device=device), rand(kt, N, C, dtype=torch.float32, device=device)
    y, y_dot = gated_residual_jvp(x, ada[:, 2 * C:3 * C], f, x_dot, ada_dot[:, 2 * C:3 * C], f_dot)
    (g_ada,) = torch.autograd.grad(y.square().sum(), ada)
    (ada64,) = f64(ada, requires_grad=True)
    y64, y_dot64 = gated_residual_jvp_ref(x.double(), ada64[:, 2 * C:3 * C], f.double(), x_dot.double(),
                                          ada_dot.double()[:, 2 * C:3 * C], f_dot.double())
    (g_ada64,) = torch.autograd.grad(y64.square().sum(), ada64)
    assert_close("y", y, y64, atol=1e-5, rtol=1e-5)
    assert_close("y_dot", y_dot, y_dot64, atol=1e-5, rtol=1e-5)
    assert_close("d adaLN", g_ada, g_ada64, atol=1e-4, rtol=1e-5)


def _bad_cases():
    B, N, C = 3, 4, 24
    x, gate, f = torch.randn(B, N, C), torch.randn(B, C), torch.randn(B, N, C)
    xd, gd, fd = torch.randn(2, N, C), torch.randn(2, C), torch.randn(2, N, C)
    return {
        "x not 3-D": (x[0], gate, f[0], xd[0], gd, fd[0]),
        "f shape": (x, gate, f[:, :-1], xd, gd, fd),
        "gate shape": (x, gate[:, :-1], f, xd, gd, fd),
        "x_dot shape": (x, gate, f, xd[:, :-1], gd, fd),
        "f_dot dtype": (x, gate, f, xd, gd, fd.double()),
        "gate_dot device": (x, gate, f, xd, gd.to("meta"), fd),
        "tangent batches differ": (x, gate, f, xd, gd[:1], fd),
        "kt > B": (x, gate, f, torch.randn(B + 1, N, C), torch.randn(B + 1, C), torch.randn(B + 1, N, C)),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_like_the_reference(case):
    args = _bad_cases()[case]
    assert_same_error(lambda: gated_residual_jvp(*args), lambda: gated_residual_jvp_ref(*args))


def test_gate_on_another_device_is_refused():
    x, f = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    gate = torch.randn(2, 8, device="meta")
    with pytest.raises(ValueError, match="gate is on meta but x is on cpu"):
        gated_residual_jvp(x, gate, f, x[:1], gate[:1], f[:1])


def test_falls_back_to_the_reference_without_triton(monkeypatch):
    primals, tangents = make_inputs(2, 3, 24, 1, torch.float32, "cpu")
    check_fallback(monkeypatch, "gated_residual_jvp", lambda: gated_residual_jvp(*primals, *tangents),
                   lambda: gated_residual_jvp_ref(*primals, *tangents))
