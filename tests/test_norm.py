"""layernorm_modulate_jvp: fused LayerNorm (no affine) + adaLN modulate, its tangent and the backward of the primal."""
import pytest
import torch
import torch.nn.functional as F

from mfkernels.norm import layernorm_modulate_jvp
from mfkernels.reference import layernorm_modulate_jvp_ref

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


def plain(x, shift, scale):
    """The primal, written plainly: what torch.func.jvp differentiates for the reference tangent."""
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale[:, None, :]) + shift[:, None, :]


def make_inputs(B, N, C, kt, dtype, device):
    x = rand(B, N, C, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    x = (x.detach() + 0.5).requires_grad_()  # a non-zero mean, so the centring matters
    shift = rand(B, C, dtype=dtype, device=device, requires_grad=True)
    scale = rand(B, C, dtype=dtype, device=device, scale=0.5, requires_grad=True)
    tangents = (rand(kt, N, C, dtype=dtype, device=device), rand(kt, C, dtype=dtype, device=device),
                rand(kt, C, dtype=dtype, device=device))
    return (x, shift, scale), tangents


@pytest.mark.sweep
@pytest.mark.gpu
@pytest.mark.parametrize("B,N,C,kt", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_forward_tangent_and_gradients(device, B, N, C, kt, dtype, atol, rtol):
    primals, tangents = make_inputs(B, N, C, kt, dtype, device)
    y, y_dot = layernorm_modulate_jvp(*primals, *tangents, eps=EPS)
    assert y.dtype == dtype and y_dot.dtype == dtype and y_dot.shape == (kt, N, C)
    assert_tangent_detached(y, y_dot)
    w = rand(B, N, C, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((y * w.to(dtype)).sum(), primals)

    # float64 references from the same rounded inputs: the plain primal (+ torch.func.jvp) and the _ref op
    p64, t64 = f64(*primals, requires_grad=True), f64(*tangents)
    y64 = plain(*p64)
    grads64 = torch.autograd.grad((y64 * w).sum(), p64)
    _, y_dot64 = torch.func.jvp(plain, tuple(p[:kt].detach() for p in p64), tuple(t64))
    y_ref64, y_dot_ref64 = layernorm_modulate_jvp_ref(*p64, *t64, eps=EPS)
    torch.testing.assert_close(y_dot_ref64, y_dot64, atol=1e-12, rtol=1e-12)  # the two references agree

    torch_y = torch_y_dot = torch_grads = (None,) * 3
    if dtype in LOW_PRECISION:  # torch's own error in this dtype: the _ref op run in it
        torch_y, torch_y_dot = layernorm_modulate_jvp_ref(*primals, *tangents, eps=EPS)
        torch_grads = torch.autograd.grad((torch_y * w.to(dtype)).sum(), primals)
    tol = dict(atol=atol, rtol=rtol)
    assert_close("y", y, y64, torch_lowp=torch_y, **tol)
    assert_close("y vs _ref", y, y_ref64, torch_lowp=torch_y, **tol)
    assert_close("y_dot", y_dot, y_dot64, torch_lowp=torch_y_dot, **tol)
    for name, g, g64, gt in zip(("dx", "dshift", "dscale"), grads, grads64, torch_grads):
        assert g.dtype == dtype
        assert_close(name, g, g64, torch_lowp=gt, **tol)


@pytest.mark.gpu
def test_dit_width_strided_modulation_and_partial_grads(device):
    """C = 1152 (DiT-XL: BLOCK_C 2048, 8 warps), shift/scale as chunks of one (B, 6C) adaLN output (row stride 6C),
    tokens spread over several backward chunks; gradients requested for a subset of inputs only."""
    B, N, C, kt = 2, 5, 1152, 1
    ada = rand(B, 6 * C, dtype=torch.float32, device=device, requires_grad=True)
    shift, scale = ada[:, :C], ada[:, C:2 * C]
    ada_dot = rand(kt, 6 * C, dtype=torch.float32, device=device)
    x = rand(B, N, C, dtype=torch.float32, device=device, requires_grad=True)
    x_dot = rand(kt, N, C, dtype=torch.float32, device=device)
    y, y_dot = layernorm_modulate_jvp(x, shift, scale, x_dot, ada_dot[:, :C], ada_dot[:, C:2 * C])
    (g_ada,) = torch.autograd.grad(y.square().sum(), ada)  # x's gradient not requested

    x64, ada64 = f64(x, ada, requires_grad=True)
    y64, y_dot64 = layernorm_modulate_jvp_ref(x64, ada64[:, :C], ada64[:, C:2 * C], x_dot.double(),
                                              ada_dot.double()[:, :C], ada_dot.double()[:, C:2 * C])
    (g_ada64,) = torch.autograd.grad(y64.square().sum(), ada64)
    assert_close("y", y, y64, atol=1e-5, rtol=1e-5)
    assert_close("y_dot", y_dot, y_dot64, atol=1e-5, rtol=1e-5)
    assert_close("d adaLN", g_ada, g_ada64, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
def test_no_grad_and_empty_token_axis(device):
    primals, tangents = make_inputs(2, 3, 24, 1, torch.float32, device)
    with torch.no_grad():
        y, y_dot = layernorm_modulate_jvp(*primals, *tangents)
        y_ref, y_dot_ref = layernorm_modulate_jvp_ref(*primals, *tangents)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(y_dot, y_dot_ref)

    primals, tangents = make_inputs(2, 0, 24, 1, torch.float32, device)  # N = 0: nothing to normalise
    y, y_dot = layernorm_modulate_jvp(*primals, *tangents)
    assert y.shape == (2, 0, 24) and y_dot.shape == (1, 0, 24)
    grads = torch.autograd.grad(y.sum(), primals)
    assert all(g.abs().sum() == 0 for g in grads)


def _bad_cases():
    B, N, C = 3, 4, 24
    x, shift, scale = torch.randn(B, N, C), torch.randn(B, C), torch.randn(B, C)
    xd, sd, cd = torch.randn(2, N, C), torch.randn(2, C), torch.randn(2, C)
    return {
        "x not 3-D": (x[0], shift, scale, xd, sd, cd),
        "x not float": (x.long(), shift, scale, xd, sd, cd),
        "shift shape": (x, shift[:, :-1], scale, xd, sd, cd),
        "scale dtype": (x, shift, scale.double(), xd, sd, cd),
        "x_dot shape": (x, shift, scale, xd[:, :, :-1], sd, cd),
        "x_dot dtype": (x, shift, scale, xd.half(), sd, cd),
        "x_dot device": (x, shift, scale, xd.to("meta"), sd, cd),
        "tangent batches differ": (x, shift, scale, xd, sd[:1], cd),
        "kt > B": (x, shift, scale, torch.randn(B + 1, N, C), torch.randn(B + 1, C), torch.randn(B + 1, C)),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_like_the_reference(case):
    args = _bad_cases()[case]
    assert_same_error(lambda: layernorm_modulate_jvp(*args), lambda: layernorm_modulate_jvp_ref(*args))


def test_falls_back_to_the_reference_without_triton(monkeypatch):
    primals, tangents = make_inputs(2, 3, 24, 1, torch.float32, "cpu")
    check_fallback(monkeypatch, "layernorm_modulate_jvp",
                   lambda: layernorm_modulate_jvp(*primals, *tangents),
                   lambda: layernorm_modulate_jvp_ref(*primals, *tangents))
