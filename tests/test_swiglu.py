"""swiglu_jvp: SwiGLU MLP with stacked [W1; W3] and [x; x_dot] GEMMs and the fused SiLU-gate + tangent kernel."""
import pytest
import torch
import torch.nn.functional as F

from mfkernels.reference import swiglu_jvp_ref
from mfkernels.swiglu import swiglu_jvp

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
    w13 = rand(2 * hidden, c, dtype=dtype, device=device, scale=c ** -0.5, requires_grad=True)
    w2 = rand(out, hidden, dtype=dtype, device=device, scale=hidden ** -0.5, requires_grad=True)
    b13 = rand(2 * hidden, dtype=dtype, device=device, scale=0.5, requires_grad=True) if bias else None
    b2 = rand(out, dtype=dtype, device=device, scale=0.5, requires_grad=True) if bias else None
    return w13, b13, w2, b2


def plain_swiglu(x, w13, b13, w2, b2):
    """The primal with separate gate and value projections, as the SwiGLU papers write it."""
    w1, w3 = w13.chunk(2)
    b1, b3 = b13.chunk(2) if b13 is not None else (None, None)
    return F.linear(F.silu(F.linear(x, w1, b1)) * F.linear(x, w3, b3), w2, b2)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,C,kt", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_swiglu_forward_tangent_and_gradients(device, B, N, C, kt, dtype, atol, rtol):
    hidden, out = 2 * C + 13, C  # a hidden size that is not a multiple of the kernel's column block
    x = rand(B, N, C, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    x_dot = rand(kt, N, C, dtype=dtype, device=device)
    params = make_params(C, hidden, out, dtype, device)
    primals = (x, *params)
    y, y_dot = swiglu_jvp(x, *params, x_dot)
    assert y.shape == (B, N, out) and y_dot.shape == (kt, N, out) and y.dtype == y_dot.dtype == dtype
    assert_tangent_detached(y, y_dot)
    gw = rand(B, N, out, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((y * gw.to(dtype)).sum(), primals)

    p64 = f64(*primals, requires_grad=True)
    y64 = plain_swiglu(*p64)
    grads64 = torch.autograd.grad((y64 * gw).sum(), p64)
    fixed = [p.detach() for p in p64[1:]]
    _, y_dot64 = torch.func.jvp(lambda t: plain_swiglu(t, *fixed), (p64[0][:kt].detach(),), (x_dot.double(),))
    _, y_dot_ref64 = swiglu_jvp_ref(*p64, x_dot.double())
    torch.testing.assert_close(y_dot_ref64, y_dot64, atol=1e-12, rtol=1e-12)  # the two references agree

    torch_y = torch_y_dot = None
    torch_grads = (None,) * 5
    if dtype in LOW_PRECISION:
        torch_y, torch_y_dot = swiglu_jvp_ref(x, *params, x_dot)
        torch_grads = torch.autograd.grad((torch_y * gw.to(dtype)).sum(), primals)
    tol = dict(atol=atol, rtol=rtol)
    assert_close("y", y, y64, torch_lowp=torch_y, **tol)
    assert_close("y_dot", y_dot, y_dot64, torch_lowp=torch_y_dot, **tol)
    for name, g, g64, gt in zip(("dx", "dw13", "db13", "dw2", "db2"), grads, grads64, torch_grads):
        assert g.dtype == dtype
        assert_close(name, g, g64, torch_lowp=gt, **tol)


@pytest.mark.gpu
def test_swiglu_without_bias_partial_grads_and_strided_tangent(device):
    """iMF's SwiGLU has no biases; weights-only gradients; a primal that is contiguous with a strided tangent (kt = 2)
    and the reverse."""
    B, N, C, kt, hidden = 3, 5, 24, 2, 64
    w13, _, w2, _ = make_params(C, hidden, C, torch.float32, device, bias=False)
    w13_64, w2_64 = f64(w13, w2, requires_grad=True)
    for x, x_dot in ((rand(B, N, C, dtype=torch.float32, device=device),
                      rand(kt, 2 * N, C, dtype=torch.float32, device=device)[:, ::2]),
                     (rand(B, N, 2 * C, dtype=torch.float32, device=device)[..., :C],
                      rand(kt, N, C, dtype=torch.float32, device=device))):
        y, y_dot = swiglu_jvp(x, w13, None, w2, None, x_dot)
        g13, g2 = torch.autograd.grad(y.square().sum(), (w13, w2))
        y64, y_dot64 = swiglu_jvp_ref(x.double(), w13_64, None, w2_64, None, x_dot.double())
        g64 = torch.autograd.grad(y64.square().sum(), (w13_64, w2_64))
        assert_close("y", y, y64, atol=1e-5, rtol=1e-5)
        assert_close("y_dot", y_dot, y_dot64, atol=1e-5, rtol=1e-5)
        assert_close("dw13", g13, g64[0], atol=1e-4, rtol=1e-5)
        assert_close("dw2", g2, g64[1], atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
def test_swiglu_tangent_rows_end_on_a_tile_boundary(device):
    """Gate-kernel tiles of 8 rows x 128 units: N = 8 tokens and kt = 1 end the tangent rows on a tile boundary;
    hidden 130 leaves a 2-unit column tail."""
    B, N, C, kt, hidden = 3, 8, 16, 1, 130
    x, x_dot = rand(B, N, C, dtype=torch.float32, device=device), rand(kt, N, C, dtype=torch.float32, device=device)
    params = [p.detach() for p in make_params(C, hidden, C, torch.float32, device)]
    y, y_dot = swiglu_jvp(x, *params, x_dot)
    y64, y_dot64 = swiglu_jvp_ref(x.double(), *(p.double() for p in params), x_dot.double())
    assert_close("y", y, y64, atol=1e-5, rtol=1e-5)
    assert_close("y_dot", y_dot, y_dot64, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_swiglu_saves_x_and_pre_activations_only(device):
    """Saved for backward: x, [a | b] (B*N rows, not B*N + kt*N), w13, b13, w2. Not g, nothing of the tangent."""
    B, N, C, kt, hidden = 3, 4, 24, 3, 40
    x = rand(B, N, C, dtype=torch.float32, device=device, requires_grad=True)
    params = make_params(C, hidden, C, torch.float32, device)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu_jvp(x, *params, rand(kt, N, C, dtype=torch.float32, device=device))
    assert sorted(saved) == sorted([(B, N, C), (B * N, 2 * hidden), (2 * hidden, C), (2 * hidden,), (C, hidden)])


@pytest.mark.gpu
def test_backward_recomputes_when_nothing_was_saved(device):
    """The op called directly with save_pre=False (as opcheck does) still has a correct backward: [a | b] recomputed."""
    x = rand(2, 3, 16, dtype=torch.float64, device=device, requires_grad=True)
    w13, b13, w2, b2 = make_params(16, 24, 16, torch.float64, device)
    y, _, ab = torch.ops.mfkernels.swiglu_fwd(x, w13, b13, w2, b2, x[:1].detach(), False)
    assert ab.shape == (0, 48)
    grads = torch.autograd.grad(y.square().sum(), (x, w13, b13, w2, b2))
    y64 = plain_swiglu(x, w13, b13, w2, b2)
    grads64 = torch.autograd.grad(y64.square().sum(), (x, w13, b13, w2, b2))
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g, g64, atol=1e-10, rtol=1e-10)


def test_swiglu_under_autocast_cpu():
    B, N, C, kt = 2, 3, 24, 1
    x = rand(B, N, C, dtype=torch.float32, device="cpu", requires_grad=True)
    x_dot = rand(kt, N, C, dtype=torch.float32, device="cpu")
    params = make_params(C, 64, C, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_dot = swiglu_jvp(x, *params, x_dot)
    assert y.dtype == y_dot.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().square().sum(), (x, *params))
    assert [g.dtype for g in grads] == [torch.float32] * 5
    y64, y_dot64 = swiglu_jvp_ref(*f64(x, *params), x_dot.double())
    assert_close("y", y.float(), y64, atol=3e-2, rtol=2e-2)
    assert_close("y_dot", y_dot.float(), y_dot64, atol=3e-2, rtol=2e-2)


def test_opcheck():
    x = torch.randn(3, 4, 8, requires_grad=True)
    w13, b13, w2, b2 = make_params(8, 12, 8, torch.float32, "cpu")
    for kt in (0, 2):
        for save in (False, True):
            torch.library.opcheck(torch.ops.mfkernels.swiglu_fwd.default,
                                  (x, w13, b13, w2, b2, torch.randn(kt, 4, 8), save))
    torch.library.opcheck(torch.ops.mfkernels.swiglu_fwd.default, (x, w13, None, w2, None, torch.randn(1, 4, 8), True))
    ab = torch.randn(12, 24)
    for flags in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(torch.ops.mfkernels.swiglu_bwd.default,
                              (torch.randn(3, 4, 8), x.detach(), ab, w13.detach(), b13.detach(), w2.detach(),
                               *flags))


def _bad_cases():
    B, N, C, H = 3, 4, 24, 20
    x = torch.randn(B, N, C)
    w13, b13, w2, b2 = (p.detach() for p in make_params(C, H, C, torch.float32, "cpu"))
    xd = torch.randn(2, N, C)
    return {
        "x_dot shape": (x, w13, b13, w2, b2, torch.randn(2, N, C + 1)),
        "x_dot dtype": (x, w13, b13, w2, b2, xd.double()),
        "kt > B": (x, w13, b13, w2, b2, torch.randn(B + 1, N, C)),
        "w13 features": (x, w13[:, :-1], b13, w2, b2, xd),
        "w13 odd rows": (x, w13[:-1], None, w2, b2, xd),
        "b13 shape": (x, w13, b13[:-1], w2, b2, xd),
        "w2 hidden": (x, w13, b13, w2[:, :-1], b2, xd),
        "b2 shape": (x, w13, b13, w2, b2[:-1], xd),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_like_the_reference(case):
    args = _bad_cases()[case]
    assert_same_error(lambda: swiglu_jvp(*args), lambda: swiglu_jvp_ref(*args))


def test_parameter_dtype_mismatch_is_refused():
    x = torch.randn(2, 3, 8)
    w13, b13, w2, b2 = (p.detach() for p in make_params(8, 16, 8, torch.float32, "cpu"))
    with pytest.raises(TypeError, match="w2 has dtype torch.float64"):
        swiglu_jvp(x, w13, b13, w2.double(), b2, x[:1])


def test_falls_back_to_the_reference_without_triton(monkeypatch):
    x = torch.randn(2, 3, 24, requires_grad=True)
    params = make_params(24, 40, 24, torch.float32, "cpu")
    check_fallback(monkeypatch, "swiglu_jvp", lambda: swiglu_jvp(x, *params, x[:1].detach()),
                   lambda: swiglu_jvp_ref(x, *params, x[:1].detach()))
