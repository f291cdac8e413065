"""rope_jvp and qk_norm_rope_jvp: rotary embeddings (both pairings) and the fused QK-norm + RoPE of q and k."""
import pytest
import torch

from mfkernels.qk_norm_rope import qk_norm_rope_jvp
from mfkernels.reference import qk_norm_rope_jvp_ref, rmsnorm_jvp_ref, rope_jvp_ref
from mfkernels.rope import rope_jvp

from tests._blockops_util import (
    DTYPE_TOLS,
    LOW_PRECISION,
    assert_close,
    assert_same_error,
    assert_tangent_detached,
    check_fallback,
    f64,
    rand,
)

EPS = 1e-6
PAIRINGS = [pytest.param(True, id="interleaved"), pytest.param(False, id="half")]
# (B, H, N, D, kt): one token and several, a head dim whose D/2 = 3 is not a power of two, kt in {0, 1, B}
SHAPES = [
    pytest.param(1, 1, 1, 8, 0, id="B1H1N1D8-kt0"),
    pytest.param(1, 1, 1, 8, 1, id="B1H1N1D8-kt1"),
    pytest.param(3, 2, 7, 6, 1, id="B3H2N7D6-kt1"),
    pytest.param(3, 2, 7, 24, 0, id="B3H2N7D24-kt0"),
    pytest.param(3, 2, 7, 24, 3, id="B3H2N7D24-kt3"),
]


def angles(n, d, dtype=torch.float64, device="cpu", theta=10000.0):
    """iMF's table: angle(p, i) = p theta^(-2i/D), positions 0..n-1 -> (n, D/2) cos and sin."""
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None]
    return ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


def plain_rope(x, cos, sin, interleaved):
    """Independent statement of each pairing: a complex product (interleaved, as iMF's apply_rotary_pos_emb) or
    x cos + rotate_half(x) sin on the full width (GPT-NeoX)."""
    if interleaved:
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).contiguous())
        return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cat([cos, cos], -1) + rotated * torch.cat([sin, sin], -1)


def plain_rms(x, w):
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)
    return y * w if w is not None else y


# ---------------------------------------------------------------------------------------------------------- RoPE
@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", PAIRINGS)
@pytest.mark.parametrize("B,H,N,D,kt", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_rope_forward_tangent_and_gradient(device, B, H, N, D, kt, dtype, atol, rtol, interleaved):
    x = rand(B, H, N, D, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    x_dot = rand(kt, H, N, D, dtype=dtype, device=device)
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = (t[3:] for t in angles(N + 3, D, table_dtype, device))  # positions 3..N+2: a sliced, longer table
    y, y_dot = rope_jvp(x, cos, sin, x_dot, interleaved=interleaved)
    assert y.shape == x.shape and y_dot.shape == x_dot.shape and y.dtype == y_dot.dtype == dtype
    assert_tangent_detached(y, y_dot)
    gw = rand(B, H, N, D, dtype=torch.float64, device=device)
    (dx,) = torch.autograd.grad((y * gw.to(dtype)).sum(), x)

    (x64,) = f64(x, requires_grad=True)
    c64, s64 = cos.double(), sin.double()
    y64 = plain_rope(x64, c64, s64, interleaved)
    (dx64,) = torch.autograd.grad((y64 * gw).sum(), x64)
    _, y_dot64 = torch.func.jvp(lambda t: plain_rope(t, c64, s64, interleaved), (x64[:kt].detach(),),
                                (x_dot.double(),))
    y_ref64, y_dot_ref64 = rope_jvp_ref(x64, c64, s64, x_dot.double(), interleaved=interleaved)
    torch.testing.assert_close(y_ref64, y64, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y_dot_ref64, y_dot64, atol=1e-12, rtol=1e-12)

    torch_y = torch_y_dot = torch_dx = None
    if dtype in LOW_PRECISION:
        torch_y, torch_y_dot = rope_jvp_ref(x, cos, sin, x_dot, interleaved=interleaved)
        (torch_dx,) = torch.autograd.grad((torch_y * gw.to(dtype)).sum(), x)
    tol = dict(atol=atol, rtol=rtol)
    assert_close("y", y, y64, torch_lowp=torch_y, **tol)
    assert_close("y_dot", y_dot, y_dot64, torch_lowp=torch_y_dot, **tol)
    assert_close("dx", dx, dx64, torch_lowp=torch_dx, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["BNHD", "BHND"])
@pytest.mark.parametrize("tangent", ["same", "contiguous", "transposed"])
def test_rope_on_qkv_views_with_tangent_strides(device, layout, tangent):
    """q as a fused qkv projection gives it, (B, N, H, D) with angles (N, 1, D/2), or its (B, H, N, D) transpose with
    (N, D/2); the tangent a view like the primal, contiguous, or in the other memory order (kt = 2)."""
    B, N, H, D, kt = 3, 5, 2, 8, 2
    qkv = rand(B, N, 3 * H * D, dtype=torch.float64, device=device, requires_grad=True)
    qkv_dot = rand(kt, N, 3 * H * D, dtype=torch.float64, device=device)
    q, q_dot = qkv.view(B, N, 3, H, D)[:, :, 0], qkv_dot.view(kt, N, 3, H, D)[:, :, 0]
    cos, sin = angles(N, D, device=device)
    if layout == "BHND":
        q, q_dot = q.transpose(1, 2), q_dot.transpose(1, 2)
    else:
        cos, sin = cos[:, None], sin[:, None]
    if tangent == "contiguous":
        q_dot = q_dot.contiguous()
    elif tangent == "transposed":
        q_dot = q_dot.transpose(1, 2).contiguous().transpose(1, 2)
    y, y_dot = rope_jvp(q, cos, sin, q_dot)
    (dqkv,) = torch.autograd.grad(y.square().sum(), qkv)
    y_ref, y_dot_ref = rope_jvp_ref(q, cos, sin, q_dot)
    (dqkv_ref,) = torch.autograd.grad(y_ref.square().sum(), qkv)
    for name, a, b in (("y", y, y_ref), ("y_dot", y_dot, y_dot_ref), ("dqkv", dqkv, dqkv_ref)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
def test_rope_per_sample_angles(device):
    """Angles that differ per sample (cos / sin (B, 1, N, D/2): a non-zero batch stride), fp32 data with fp64 angles."""
    B, H, N, D, kt = 2, 3, 4, 8, 1
    x = rand(B, H, N, D, dtype=torch.float32, device=device)
    ang = torch.rand(B, 1, N, D // 2, dtype=torch.float64, device=device) * 6
    y, y_dot = rope_jvp(x, ang.cos(), ang.sin(), x[:kt] * 0.5)
    y_ref, y_dot_ref = rope_jvp_ref(x.double(), ang.cos(), ang.sin(), x[:kt].double() * 0.5)
    assert_close("y", y, y_ref, atol=1e-6, rtol=1e-6)
    assert_close("y_dot", y_dot, y_dot_ref, atol=1e-6, rtol=1e-6)


def test_rope_refuses_angles_that_need_a_gradient():
    x = torch.randn(2, 3, 8)
    cos, sin = (t.requires_grad_() for t in angles(3, 8, torch.float32))
    with pytest.raises(ValueError, match="cos / sin require grad"):
        rope_jvp(x, cos, sin, x[:1])
    with pytest.raises(ValueError, match="cos / sin require grad"):
        qk_norm_rope_jvp(x, x, None, None, cos, sin, x[:1], x[:1])


# ------------------------------------------------------------------------------------------------ QK-norm + RoPE
def _qk(B, N, H, D, kt, dtype, device):
    qkv = rand(B, N, 3 * H * D, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    qkv_dot = rand(kt, N, 3 * H * D, dtype=dtype, device=device)
    q, k, _ = qkv.view(B, N, 3, H, D).transpose(1, 3).unbind(2)  # (B, H, N, D) views: (B, H, 3, N, D) unbound
    q_dot, k_dot, _ = qkv_dot.view(kt, N, 3, H, D).transpose(1, 3).unbind(2)
    return qkv, q, k, q_dot, k_dot


def plain_qk(q, k, wq, wk, cos, sin, interleaved):
    qn, kn = plain_rms(q, wq), plain_rms(k, wk)
    if cos is None:
        return qn, kn
    return plain_rope(qn, cos, sin, interleaved), plain_rope(kn, cos, sin, interleaved)


@pytest.mark.sweep
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["w-rope", "w-norope", "now-rope", "w-rope-half"])
@pytest.mark.parametrize("kt", [0, 1, 3])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_qk_norm_rope_forward_tangent_and_gradients(device, dtype, atol, rtol, kt, variant):
    B, N, H, D = 3, 5, 2, 24
    learned, rope, interleaved = variant.startswith("w-"), "norope" not in variant, not variant.endswith("half")
    qkv, q, k, q_dot, k_dot = _qk(B, N, H, D, kt, dtype, device)
    wq = rand(D, dtype=dtype, device=device, scale=0.5, requires_grad=True) if learned else None
    wk = rand(D, dtype=dtype, device=device, scale=0.5, requires_grad=True) if learned else None
    cos, sin = angles(N, D, torch.float64 if dtype == torch.float64 else torch.float32, device) if rope else (None,) * 2
    qo, ko, qo_dot, ko_dot = qk_norm_rope_jvp(q, k, wq, wk, cos, sin, q_dot, k_dot, eps=EPS, interleaved=interleaved)
    assert qo.shape == ko.shape == (B, H, N, D) and qo.is_contiguous() and qo_dot.shape == (kt, H, N, D)
    assert_tangent_detached(qo, qo_dot)
    gq, gk = (rand(B, H, N, D, dtype=torch.float64, device=device) for _ in range(2))
    primals = (qkv, wq, wk) if learned else (qkv,)
    grads = torch.autograd.grad((qo * gq.to(dtype)).sum() + (ko * gk.to(dtype)).sum(), primals)

    p64 = f64(*primals, requires_grad=True)
    w64 = (p64[1], p64[2]) if learned else (None, None)
    c64, s64 = (cos.double(), sin.double()) if rope else (None, None)
    q64, k64, _ = p64[0].view(B, N, 3, H, D).transpose(1, 3).unbind(2)
    qo64, ko64 = plain_qk(q64, k64, *w64, c64, s64, interleaved)
    grads64 = torch.autograd.grad((qo64 * gq).sum() + (ko64 * gk).sum(), p64)
    fixed = [w.detach() if w is not None else None for w in w64]
    _, (qo_dot64, ko_dot64) = torch.func.jvp(lambda a, b: plain_qk(a, b, *fixed, c64, s64, interleaved),
                                             (q64[:kt].detach(), k64[:kt].detach()),
                                             (q_dot.double(), k_dot.double()))
    ref = qk_norm_rope_jvp_ref(q64, k64, *w64, c64, s64, q_dot.double(), k_dot.double(), eps=EPS,
                               interleaved=interleaved)
    for a, b in zip(ref, (qo64, ko64, qo_dot64, ko_dot64)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)  # the two references agree

    lowp = (None,) * 4
    torch_grads = (None,) * len(primals)
    if dtype in LOW_PRECISION:
        lowp = qk_norm_rope_jvp_ref(q, k, wq, wk, cos, sin, q_dot, k_dot, eps=EPS, interleaved=interleaved)
        torch_grads = torch.autograd.grad((lowp[0] * gq.to(dtype)).sum() + (lowp[1] * gk.to(dtype)).sum(), primals)
    tol = dict(atol=atol, rtol=rtol)
    for name, a, b, t in zip(("q'", "k'", "q'_dot", "k'_dot"), (qo, ko, qo_dot, ko_dot),
                             (qo64, ko64, qo_dot64, ko_dot64), lowp):
        assert_close(name, a, b, torch_lowp=t, **tol)
    for name, g, g64, gt in zip(("dqkv", "dw_q", "dw_k"), grads, grads64, torch_grads):
        assert_close(name, g, g64, torch_lowp=gt, **tol)


@pytest.mark.gpu
def test_qk_norm_rope_head_dim_64_several_backward_programs(device):
    """Dh = 64 (a tile of 64 rows): 240 rows per tensor make 4 tiles over 3 backward programs; only the scales'
    gradients requested; q and k in the (B, N, H, D) layout with (N, 1, D/2) angles; contiguous and strided tangents."""
    B, N, H, D, kt = 2, 20, 6, 64, 1
    qkv = rand(B, N, 3 * H * D, dtype=torch.float32, device=device)
    q, k, _ = qkv.view(B, N, 3, H, D).unbind(2)
    q_dot, k_dot = rand(kt, N, H, D, dtype=torch.float32, device=device), q[:kt] * 0.25
    wq, wk = (rand(D, dtype=torch.float32, device=device, requires_grad=True) for _ in range(2))
    cos, sin = (t[:, None].float() for t in angles(N, D))
    qo, ko, qo_dot, ko_dot = qk_norm_rope_jvp(q, k, wq, wk, cos, sin, q_dot, k_dot)
    gwq, gwk = torch.autograd.grad(qo.square().sum() * 0.5 + (ko * qo.detach()).sum(), (wq, wk))
    wq64, wk64 = f64(wq, wk, requires_grad=True)
    ref = qk_norm_rope_jvp_ref(q.double(), k.double(), wq64, wk64, cos.double(), sin.double(), q_dot.double(),
                               k_dot.double())
    g64 = torch.autograd.grad(ref[0].square().sum() * 0.5 + (ref[1] * qo.detach().double()).sum(), (wq64, wk64))
    for name, a, b in zip(("q'", "k'", "q'_dot", "k'_dot", "dw_q", "dw_k"), (qo, ko, qo_dot, ko_dot, gwq, gwk),
                          (*ref, *g64)):
        assert_close(name, a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kt", [1, 2])
def test_qk_norm_rope_tangent_rows_end_on_a_tile_boundary(device, kt):
    """Dh = 64: 64-row tiles; 64 rows per sample, so the tangent rows end exactly on a tile boundary."""
    B, H, N, D = 3, 4, 16, 64
    q, k = (rand(B, H, N, D, dtype=torch.float32, device=device) for _ in range(2))
    q_dot, k_dot = (rand(kt, H, N, D, dtype=torch.float32, device=device) for _ in range(2))
    w = rand(D, dtype=torch.float32, device=device)
    cos, sin = (t.float() for t in angles(N, D))
    out = qk_norm_rope_jvp(q, k, w, w, cos, sin, q_dot, k_dot)
    ref = qk_norm_rope_jvp_ref(*(t.double() for t in (q, k, w, w, cos, sin, q_dot, k_dot)))
    for name, a, b in zip(("q'", "k'", "q'_dot", "k'_dot"), out, ref):
        assert_close(name, a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("used", ["q", "k"])
def test_qk_norm_rope_gradients_when_one_output_is_unused(device, used):
    """A loss of q' alone (or k' alone): the other output's gradient never arrives (no zero-filled gradients), and the
    gradients of q, k and both scales still match the reference's."""
    q, k = (rand(2, 2, 5, 8, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    wq, wk = (rand(8, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    cos, sin = angles(5, 8, device=device)
    index = 0 if used == "q" else 1
    grads = []
    for op in (qk_norm_rope_jvp, qk_norm_rope_jvp_ref):
        out = op(q, k, wq, wk, cos, sin, q[:1].detach(), k[:1].detach(), eps=EPS)
        grads.append(torch.autograd.grad(out[index].square().sum(), (q, k, wq, wk), allow_unused=True))
    for name, got, ref in zip(("q", "k", "q_weight", "k_weight"), *grads):
        if ref is None or not ref.abs().any():  # the unused side: no gradient, or zeros
            assert got is None or not got.abs().any(), name
        else:
            torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.gpu
def test_qk_norm_odd_head_dim_without_rope(device):
    q, k = rand(2, 3, 5, dtype=torch.float64, device=device), rand(2, 3, 5, dtype=torch.float64, device=device)
    w = rand(5, dtype=torch.float64, device=device)
    out = qk_norm_rope_jvp(q, k, w, w, None, None, q[:1], k[:1])
    ref = (*rmsnorm_jvp_ref(q, w, q[:1], eps=EPS), *rmsnorm_jvp_ref(k, w, k[:1], eps=EPS))
    for a, b in zip(out, (ref[0], ref[2], ref[1], ref[3])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_opcheck():
    x = torch.randn(2, 3, 4, 8).transpose(1, 2).requires_grad_()  # (B, H, N, D) = (2, 4, 3, 8), strided
    cos, sin = angles(3, 8, torch.float32)
    w, w2 = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    k = torch.randn(2, 4, 3, 8, requires_grad=True)
    for kt in (0, 2):
        xd = torch.randn(kt, 4, 3, 8)
        torch.library.opcheck(torch.ops.mfkernels.rope_fwd.default, (x, cos, sin, xd, True))
        torch.library.opcheck(torch.ops.mfkernels.rope_fwd.default, (x, cos, sin, xd, False))
        torch.library.opcheck(torch.ops.mfkernels.qk_norm_rope_fwd.default, (x, k, w, w2, cos, sin, xd, xd, 1e-6,
                                                                              True))
    torch.library.opcheck(torch.ops.mfkernels.qk_norm_rope_fwd.default,
                          (x, x, None, None, None, None, x[:1].detach(), x[:1].detach(), 1e-6, True))
    torch.library.opcheck(torch.ops.mfkernels.rope_bwd.default, (torch.randn(2, 4, 3, 8), cos, sin, True))
    rstd = torch.rand(2, 24) + 0.5
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.mfkernels.qk_norm_rope_bwd.default,
                              (torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8), x.detach(), x.detach(), w.detach(),
                               w.detach(), cos, sin, rstd, False, *flags))


def _bad_rope_cases():
    x, xd = torch.randn(2, 3, 4, 8), torch.randn(1, 3, 4, 8)
    cos, sin = angles(4, 8, torch.float32)
    return {
        "odd head dim": (x[..., :7], cos, sin, xd[..., :7]),
        "cos/sin shapes differ": (x, cos, sin[:-1], xd),
        "angles do not broadcast": (x, cos[:-1], sin[:-1], xd),
        "angles too many dims": (x, cos[None, None, None], sin[None, None, None], xd),
        "cos not float": (x, cos.long(), sin.long(), xd),
        "x_dot shape": (x, cos, sin, xd[..., :6]),
        "kt > B": (x, cos, sin, torch.randn(3, 3, 4, 8)),
    }


@pytest.mark.parametrize("case", list(_bad_rope_cases()))
def test_rope_bad_input_raises_like_the_reference(case):
    args = _bad_rope_cases()[case]
    assert_same_error(lambda: rope_jvp(*args), lambda: rope_jvp_ref(*args))


def _bad_qk_cases():
    q, qd = torch.randn(2, 3, 4, 8), torch.randn(1, 3, 4, 8)
    w = torch.randn(8)
    cos, sin = angles(4, 8, torch.float32)
    return {
        "k shape": (q, q[:, :2], w, w, cos, sin, qd, qd[:, :2]),
        "k dtype": (q, q.double(), w, w, cos, sin, qd, qd.double()),
        "one weight": (q, q, w, None, cos, sin, qd, qd),
        "cos without sin": (q, q, w, w, cos, None, qd, qd),
        "weight shape": (q, q, w[:4], w[:4], cos, sin, qd, qd),
        "tangent batches differ": (q, q, w, w, cos, sin, qd, torch.randn(2, 3, 4, 8)),
        "angles do not broadcast": (q, q, w, w, cos[:3], sin[:3], qd, qd),
    }


@pytest.mark.parametrize("case", list(_bad_qk_cases()))
def test_qk_bad_input_raises_like_the_reference(case):
    args = _bad_qk_cases()[case]
    assert_same_error(lambda: qk_norm_rope_jvp(*args), lambda: qk_norm_rope_jvp_ref(*args))


def test_falls_back_to_the_references_without_triton(monkeypatch):
    x = torch.randn(2, 3, 4, 8)
    cos, sin = angles(4, 8, torch.float32)
    w = torch.randn(8)
    check_fallback(monkeypatch, "rope_jvp", lambda: rope_jvp(x, cos, sin, x[:1]),
                   lambda: rope_jvp_ref(x, cos, sin, x[:1]))
    monkeypatch.undo()

    def call(fn):
        def run():
            r = fn(x, x * 2, w, w, cos, sin, x[:1], x[:1])
            return r[0], r[2]  # check_fallback compares pairs
        return run

    check_fallback(monkeypatch, "qk_norm_rope_jvp", call(qk_norm_rope_jvp), call(qk_norm_rope_jvp_ref))
