"""rmsnorm_jvp: fused RMSNorm (with and without a learned scale), its tangent and backward, on strided layouts."""
import pytest
import torch

from mfkernels._rows import row_layout
from mfkernels.reference import rmsnorm_jvp_ref
from mfkernels.rmsnorm import rmsnorm_jvp

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

EPS = 1e-6


def plain(x, w):
    """The primal written plainly (what torch.func.jvp differentiates for the reference tangent)."""
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)
    return y * w if w is not None else y


def check_against_f64(x, w, x_dot, y, y_dot, grads, *, atol, rtol, grad_weight=None):
    """y, y_dot and the gradients of sum(y * grad_weight) against float64 (plain + torch.func.jvp) and the _ref op."""
    kt = x_dot.shape[0]
    dtype = x.dtype
    primals = (x, w) if w is not None else (x,)
    p64 = f64(*primals, requires_grad=True)
    x64, w64 = p64[0], (p64[1] if w is not None else None)
    y64 = plain(x64, w64)
    grads64 = torch.autograd.grad((y64 * grad_weight).sum(), p64)
    fixed_w = w64.detach() if w64 is not None else None
    _, y_dot64 = torch.func.jvp(lambda t: plain(t, fixed_w), (x64[:kt].detach(),), (x_dot.double(),))
    _, y_dot_ref64 = rmsnorm_jvp_ref(x64, w64, x_dot.double(), eps=EPS)
    torch.testing.assert_close(y_dot_ref64, y_dot64, atol=1e-12, rtol=1e-12)  # the two references agree

    torch_y = torch_y_dot = None
    torch_grads = (None,) * len(primals)
    if dtype in LOW_PRECISION:  # torch's own error in this dtype: the _ref op run in it
        torch_y, torch_y_dot = rmsnorm_jvp_ref(x, w, x_dot, eps=EPS)
        torch_grads = torch.autograd.grad((torch_y * grad_weight.to(dtype)).sum(), primals)
    tol = dict(atol=atol, rtol=rtol)
    assert_close("y", y, y64, torch_lowp=torch_y, **tol)
    assert_close("y_dot", y_dot, y_dot64, torch_lowp=torch_y_dot, **tol)
    for name, g, g64, gt in zip(("dx", "dw"), grads, grads64, torch_grads):
        assert_close(name, g, g64, torch_lowp=gt, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("learned_scale", [True, False], ids=["w", "no-w"])
@pytest.mark.parametrize("B,N,C,kt", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_forward_tangent_and_gradients(device, B, N, C, kt, dtype, atol, rtol, learned_scale):
    x = (rand(B, N, C, dtype=dtype, device=device, scale=2.0) + 0.5).requires_grad_()
    w = rand(C, dtype=dtype, device=device, scale=0.5, requires_grad=True) if learned_scale else None
    x_dot = rand(kt, N, C, dtype=dtype, device=device)
    y, y_dot = rmsnorm_jvp(x, w, x_dot, eps=EPS)
    assert y.dtype == dtype and y_dot.dtype == dtype and y.shape == x.shape and y_dot.shape == (kt, N, C)
    assert_tangent_detached(y, y_dot)
    gw = rand(B, N, C, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((y * gw.to(dtype)).sum(), (x, w) if learned_scale else (x,))
    check_against_f64(x, w, x_dot, y, y_dot, grads, atol=atol, rtol=rtol, grad_weight=gw)


def _qk_views(B, N, H, Dh, dtype, device, transpose):
    """q and k as the views a fused qkv projection gives: (B, N, H, Dh), or (B, H, N, Dh) with `transpose`."""
    qkv = rand(B, N, 3 * H * Dh, dtype=dtype, device=device, requires_grad=True)
    q, k, _ = qkv.view(B, N, 3, H, Dh).unbind(2)
    if transpose:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return qkv, q, k


@pytest.mark.gpu
@pytest.mark.parametrize("transpose", [False, True], ids=["BNHD", "BHND"])
@pytest.mark.parametrize("tangent_layout", ["same", "contiguous", "transposed"])
def test_per_head_views_and_tangent_strides(device, transpose, tangent_layout):
    """QK-norm layouts: q of a fused qkv projection read in place (no copy), with a tangent that is a view like the
    primal, contiguous (primal strided, tangent not), or the transpose of the primal's layout (kt = 2)."""
    B, N, H, Dh, kt = 3, 5, 2, 24, 2
    qkv, q, _ = _qk_views(B, N, H, Dh, torch.float32, device, transpose)
    assert row_layout(tuple(q.shape), q) is not None  # in place: the leading dims merge into two
    qkv_dot = rand(kt, N, 3 * H * Dh, dtype=torch.float32, device=device)
    q_dot = qkv_dot.view(kt, N, 3, H, Dh)[:, :, 0]
    if transpose:
        q_dot = q_dot.transpose(1, 2)
    if tangent_layout == "contiguous":
        q_dot = q_dot.contiguous()
    elif tangent_layout == "transposed":  # memory order of the other layout, same logical shape
        q_dot = q_dot.transpose(1, 2).contiguous().transpose(1, 2)
    w = rand(Dh, dtype=torch.float32, device=device, requires_grad=True)
    y, y_dot = rmsnorm_jvp(q, w, q_dot, eps=EPS)
    assert y.is_contiguous() and y.shape == q.shape
    gw = rand(*q.shape, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((y * gw.float()).sum(), (q, w))
    check_against_f64(q.detach().requires_grad_(), w, q_dot, y, y_dot, grads, atol=1e-5, rtol=1e-5, grad_weight=gw)


@pytest.mark.gpu
def test_primal_strided_tangent_contiguous_and_reverse(device):
    """The residual-stream layout with mixed strides: a strided primal (every other token) and a contiguous tangent,
    then a contiguous primal and a strided tangent; kt = 2."""
    B, N, C, kt = 3, 6, 40, 2
    base = rand(B, 2 * N, C, dtype=torch.float32, device=device)
    x_strided = base[:, ::2]
    x_dot_contig = rand(kt, N, C, dtype=torch.float32, device=device)
    w = rand(C, dtype=torch.float32, device=device)
    for x, x_dot in ((x_strided, x_dot_contig), (x_strided.contiguous(), rand(kt, 2 * N, C, dtype=torch.float32,
                                                                              device=device)[:, 1::2])):
        x = x.detach().requires_grad_()
        y, y_dot = rmsnorm_jvp(x, w, x_dot, eps=EPS)
        y_ref, y_dot_ref = rmsnorm_jvp_ref(x.double(), w.double(), x_dot.double(), eps=EPS)
        assert_close("y", y, y_ref, atol=1e-5, rtol=1e-5)
        assert_close("y_dot", y_dot, y_dot_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_layout_that_needs_a_copy(device):
    """Three non-mergeable leading dims (a permuted 5-D view) are copied, never computed wrong."""
    x = rand(2, 3, 4, 5, 8, dtype=torch.float64, device=device).permute(0, 3, 2, 1, 4)
    assert row_layout(tuple(x.shape), x) is None
    x_dot = rand(1, 5, 4, 3, 8, dtype=torch.float64, device=device)
    y, y_dot = rmsnorm_jvp(x, None, x_dot, eps=EPS)
    y_ref, y_dot_ref = rmsnorm_jvp_ref(x, None, x_dot, eps=EPS)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y_dot, y_dot_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [4, 5])
def test_wide_rows_several_backward_programs_and_mixed_weight_dtype(device, N):
    """C = 1152 (BLOCK_D 2048: two rows a tile, so 8 or 10 rows make 4 or 5 tiles over 3 backward programs; the tangent
    rows end exactly on a tile boundary with N = 4, inside a tile with N = 5); a bf16 input with an fp32 weight
    (autocast's parameters); only the weight's gradient requested."""
    B, C, kt = 2, 1152, 1
    x = rand(B, N, C, dtype=torch.bfloat16, device=device)
    w = rand(C, dtype=torch.float32, device=device, requires_grad=True)
    x_dot = rand(kt, N, C, dtype=torch.bfloat16, device=device)
    y, y_dot = rmsnorm_jvp(x, w, x_dot, eps=EPS)
    assert y.dtype == torch.bfloat16 and y_dot.dtype == torch.bfloat16
    (dw,) = torch.autograd.grad(y.float().square().sum(), w)
    assert dw.dtype == torch.float32
    x64, w64 = x.double(), w.detach().double().requires_grad_()
    y64, y_dot64 = rmsnorm_jvp_ref(x64, w64, x_dot.double(), eps=EPS)
    upstream = 2 * y.detach().double()  # what the fused op received: the gradient of sum(y^2) at its bf16 output
    (dw64,) = torch.autograd.grad((y64 * upstream).sum(), w64)
    torch_y, torch_y_dot = rmsnorm_jvp_ref(x, w.detach(), x_dot, eps=EPS)
    assert_close("y", y, y64, torch_lowp=torch_y, atol=4e-3, rtol=4e-3)
    assert_close("y_dot", y_dot, y_dot64, torch_lowp=torch_y_dot, atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(dw.double(), dw64, atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
def test_no_grad_and_empty_rows(device):
    x, w = rand(2, 3, 24, dtype=torch.float32, device=device), rand(24, dtype=torch.float32, device=device)
    x_dot = rand(1, 3, 24, dtype=torch.float32, device=device)
    with torch.no_grad():
        y, y_dot = rmsnorm_jvp(x, w, x_dot)
    y_ref, y_dot_ref = rmsnorm_jvp_ref(x, w, x_dot)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(y_dot, y_dot_ref)

    x = torch.zeros(2, 0, 24, device=device, requires_grad=True)
    w = torch.ones(24, device=device, requires_grad=True)
    y, y_dot = rmsnorm_jvp(x, w, torch.zeros(1, 0, 24, device=device))
    assert y.shape == (2, 0, 24) and y_dot.shape == (1, 0, 24)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == x.shape and gw.abs().sum() == 0


def test_opcheck():
    x = torch.randn(3, 4, 2, 8).transpose(1, 2).requires_grad_()
    w = torch.randn(8, requires_grad=True)
    for kt in (0, 2):
        for weight in (w, None):
            torch.library.opcheck(torch.ops.mfkernels.rmsnorm_fwd.default, (x, weight, torch.randn(kt, 2, 4, 8), 1e-6))
    rstd = torch.rand(24) + 0.5
    torch.library.opcheck(torch.ops.mfkernels.rmsnorm_bwd.default, (torch.randn(3, 2, 4, 8), x.detach(), w.detach(),
                                                                      rstd, True, True))


def _bad_cases():
    x, w, xd = torch.randn(3, 4, 24), torch.randn(24), torch.randn(2, 4, 24)
    return {
        "x not float": (x.long(), w, xd),
        "x 1-D": (x[0, 0], w, xd[0, 0]),
        "no features": (x[..., :0], w[:0], xd[..., :0]),
        "weight shape": (x, w[:-1], xd),
        "weight device": (x, w.to("meta"), xd),
        "x_dot shape": (x, w, xd[..., :-1]),
        "x_dot dtype": (x, w, xd.double()),
        "kt > B": (x, w, torch.randn(4, 4, 24)),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_like_the_reference(case):
    args = _bad_cases()[case]
    assert_same_error(lambda: rmsnorm_jvp(*args), lambda: rmsnorm_jvp_ref(*args))


def test_bad_eps_raises():
    x = torch.randn(2, 3, 8)
    for eps in (0.0, -1e-6, True):
        with pytest.raises(ValueError, match="eps must be a positive number"):
            rmsnorm_jvp(x, None, x[:1], eps=eps)


def test_falls_back_to_the_reference_without_triton(monkeypatch):
    x, w, x_dot = torch.randn(2, 3, 24), torch.randn(24), torch.randn(1, 3, 24)
    check_fallback(monkeypatch, "rmsnorm_jvp", lambda: rmsnorm_jvp(x, w, x_dot), lambda: rmsnorm_jvp_ref(x, w, x_dot))
