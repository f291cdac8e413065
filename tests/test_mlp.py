"""linear_jvp and mlp_jvp: primal and tangent GEMMs with the fused bias + GELU(tanh) + tangent kernel in between."""
import pytest
import torch
import torch.nn.functional as F

from mfkernels.mlp import linear_jvp, mlp_jvp
from mfkernels.reference import linear_jvp_ref, mlp_jvp_ref

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


def make_params(c, hidden, out, dtype, device, bias=True):
    w1 = rand(hidden, c, dtype=dtype, device=device, scale=c ** -0.5, requires_grad=True)
    w2 = rand(out, hidden, dtype=dtype, device=device, scale=hidden ** -0.5, requires_grad=True)
    b1 = rand(hidden, dtype=dtype, device=device, scale=0.5, requires_grad=True) if bias else None
    b2 = rand(out, dtype=dtype, device=device, scale=0.5, requires_grad=True) if bias else None
    return w1, b1, w2, b2


def plain_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,C,kt", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_mlp_forward_tangent_and_gradients(device, B, N, C, kt, dtype, atol, rtol):
    hidden, out = 4 * C - 8, C  # a hidden size that is not a multiple of the kernel block either
    x = rand(B, N, C, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    x_dot = rand(kt, N, C, dtype=dtype, device=device)
    params = make_params(C, hidden, out, dtype, device)
    primals = (x, *params)
    y, y_dot = mlp_jvp(x, *params, x_dot)
    assert y.shape == (B, N, out) and y_dot.shape == (kt, N, out) and y.dtype == y_dot.dtype == dtype
    assert_tangent_detached(y, y_dot)
    w = rand(B, N, out, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((y * w.to(dtype)).sum(), primals)

    p64 = f64(*primals, requires_grad=True)
    y64 = plain_mlp(*p64)
    grads64 = torch.autograd.grad((y64 * w).sum(), p64)
    fixed = [p.detach() for p in p64[1:]]
    _, y_dot64 = torch.func.jvp(lambda t: plain_mlp(t, *fixed), (p64[0][:kt].detach(),), (x_dot.double(),))
    _, y_dot_ref64 = mlp_jvp_ref(*p64, x_dot.double())
    torch.testing.assert_close(y_dot_ref64, y_dot64, atol=1e-12, rtol=1e-12)

    torch_y = torch_y_dot = None
    torch_grads = (None,) * 5
    if dtype in LOW_PRECISION:
        torch_y, torch_y_dot = mlp_jvp_ref(x, *params, x_dot)
        torch_grads = torch.autograd.grad((torch_y * w.to(dtype)).sum(), primals)
    tol = dict(atol=atol, rtol=rtol)
    assert_close("y", y, y64, torch_lowp=torch_y, **tol)
    assert_close("y_dot", y_dot, y_dot64, torch_lowp=torch_y_dot, **tol)
    for name, g, g64, gt in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, grads64, torch_grads):
        assert g.dtype == dtype
        assert_close(name, g, g64, torch_lowp=gt, **tol)


@pytest.mark.gpu
def test_mlp_without_bias_and_partial_grads(device):
    B, N, C, kt = 3, 5, 24, 2
    x = rand(B, N, C, dtype=torch.float32, device=device)  # x needs no gradient
    x_dot = rand(kt, N, C, dtype=torch.float32, device=device)
    w1, _, w2, _ = make_params(C, 40, 16, torch.float32, device, bias=False)
    y, y_dot = mlp_jvp(x, w1, None, w2, None, x_dot)
    gw1, gw2 = torch.autograd.grad(y.square().sum(), (w1, w2))
    w1_64, w2_64 = f64(w1, w2, requires_grad=True)
    y64, y_dot64 = mlp_jvp_ref(x.double(), w1_64, None, w2_64, None, x_dot.double())
    g64 = torch.autograd.grad(y64.square().sum(), (w1_64, w2_64))
    assert_close("y", y, y64, atol=1e-5, rtol=1e-5)
    assert_close("y_dot", y_dot, y_dot64, atol=1e-5, rtol=1e-5)
    assert_close("dw1", gw1, g64[0], atol=1e-5, rtol=1e-5)
    assert_close("dw2", gw2, g64[1], atol=1e-5, rtol=1e-5)
    (gw2_only,) = torch.autograd.grad(mlp_jvp(x, w1, None, w2, None, x_dot)[0].square().sum(), (w2,))
    assert_close("dw2 alone", gw2_only, g64[1], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_mlp_saves_no_tangent_and_no_hidden_activation(device):
    """Saved for backward: x, the GEMM output h (B*N rows, not B*N + kt*N), w1, b1, w2 (parameters cost no memory).
    Not g, not g_dot, nothing of the tangent."""
    B, N, C, kt, hidden = 3, 4, 24, 3, 40
    x = rand(B, N, C, dtype=torch.float32, device=device, requires_grad=True)
    params = make_params(C, hidden, C, torch.float32, device)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp_jvp(x, *params, rand(kt, N, C, dtype=torch.float32, device=device))
    assert sorted(saved) == sorted([(B, N, C), (B * N, hidden), (hidden, C), (hidden,), (C, hidden)])


def test_mlp_under_autocast_cpu():
    """Under autocast both outputs come in the autocast dtype and parameter gradients in the parameters' dtype."""
    B, N, C, kt = 2, 3, 24, 1
    x = rand(B, N, C, dtype=torch.float32, device="cpu", requires_grad=True)
    x_dot = rand(kt, N, C, dtype=torch.float32, device="cpu")
    params = make_params(C, 4 * C, C, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_dot = mlp_jvp(x, *params, x_dot)
        ly, ly_dot = linear_jvp(x, params[0], params[1], x_dot)
    assert y.dtype == y_dot.dtype == ly.dtype == ly_dot.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().square().sum(), (x, *params))
    assert [g.dtype for g in grads] == [torch.float32] * 5
    p64 = f64(x, *params, requires_grad=True)
    y64, y_dot64 = mlp_jvp_ref(*p64, x_dot.double())
    assert_close("y", y.float(), y64, atol=3e-2, rtol=2e-2)
    assert_close("y_dot", y_dot.float(), y_dot64, atol=3e-2, rtol=2e-2)


def test_reference_mlp_under_autocast_cpu():
    """Under autocast the stacked GEMM's y and y_dot share the autocast dtype (the fp32 bias is cast, not promoted)."""
    x = torch.randn(2, 3, 8)
    w1, b1, w2, b2 = make_params(8, 16, 8, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_dot = mlp_jvp_ref(x, w1, b1, w2, b2, x[:1])
    assert y.dtype == y_dot.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_jvp(device, dtype, atol, rtol, bias):
    B, N, C, out, kt = 3, 5, 24, 40, 2
    x = rand(B, N, C, dtype=dtype, device=device, requires_grad=True)
    w = rand(out, C, dtype=dtype, device=device, scale=C ** -0.5, requires_grad=True)
    b = rand(out, dtype=dtype, device=device, requires_grad=True) if bias else None
    x_dot = rand(kt, N, C, dtype=dtype, device=device)
    primals = (x, w) + ((b,) if bias else ())
    y, y_dot = linear_jvp(x, w, b, x_dot)
    assert_tangent_detached(y, y_dot)
    grads = torch.autograd.grad(y.square().sum(), primals)
    p64 = f64(*primals, requires_grad=True)
    y64 = F.linear(p64[0], p64[1], p64[2] if bias else None)
    grads64 = torch.autograd.grad(y64.square().sum(), p64)
    y_dot64 = F.linear(x_dot.double(), p64[1].detach())
    torch_y = torch_y_dot = None
    torch_grads = (None,) * 3
    if dtype in LOW_PRECISION:
        torch_y, torch_y_dot = linear_jvp_ref(x, w, b, x_dot)
        torch_grads = torch.autograd.grad(torch_y.square().sum(), primals)
    tol = dict(atol=atol, rtol=rtol)
    assert_close("y", y, y64, torch_lowp=torch_y, **tol)
    assert_close("y_dot", y_dot, y_dot64, torch_lowp=torch_y_dot, **tol)
    for g, g64, gt in zip(grads, grads64, torch_grads):
        assert_close("grad", g, g64, torch_lowp=gt, **tol)


def _bad_mlp_cases():
    B, N, C, H = 3, 4, 24, 40
    x = torch.randn(B, N, C)
    w1, b1, w2, b2 = (p.detach() for p in make_params(C, H, C, torch.float32, "cpu"))
    return {
        "x_dot shape": (x, w1, b1, w2, b2, torch.randn(2, N, C + 1)),
        "x_dot dtype": (x, w1, b1, w2, b2, torch.randn(2, N, C, dtype=torch.float64)),
        "x_dot device": (x, w1, b1, w2, b2, torch.randn(2, N, C, device="meta")),
        "kt > B": (x, w1, b1, w2, b2, torch.randn(B + 1, N, C)),
        "w1 features": (x, w1[:, :-1], b1, w2, b2, torch.randn(2, N, C)),
    }


@pytest.mark.parametrize("case", list(_bad_mlp_cases()))
def test_bad_input_raises_like_the_reference(case):
    args = _bad_mlp_cases()[case]
    assert_same_error(lambda: mlp_jvp(*args), lambda: mlp_jvp_ref(*args))
    x, w1, b1, _, _, x_dot = args
    assert_same_error(lambda: linear_jvp(x, w1, b1, x_dot), lambda: linear_jvp_ref(x, w1, b1, x_dot))


def test_mismatched_hidden_sizes_and_parameter_dtypes_are_refused():
    x = torch.randn(2, 3, 8)
    w1, b1, w2, b2 = (p.detach() for p in make_params(8, 16, 8, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="hidden sizes must match"):
        mlp_jvp(x, w1, b1, w2[:, :-1], b2, x[:1])
    with pytest.raises(TypeError, match="w2 has dtype torch.float64"):
        mlp_jvp(x, w1, b1, w2.double(), b2, x[:1])


def test_falls_back_to_the_reference_without_triton(monkeypatch):
    x = torch.randn(2, 3, 24, requires_grad=True)
    params = make_params(24, 40, 24, torch.float32, "cpu")
    check_fallback(monkeypatch, "mlp_jvp", lambda: mlp_jvp(x, *params, x[:1].detach()),
                   lambda: mlp_jvp_ref(x, *params, x[:1].detach()))
