"""mfkernels.nn modern layers (RMSNorm, SwiGLU, RotaryAttention, scaled residual): forward_jvp on the reference and
fused op tables equals torch.func.jvp of the plain forward; the fused ops compile whole under torch.compile."""
import dataclasses

import pytest
import torch

from mfkernels.nn import (
    RMSNorm,
    RotaryAttention,
    SwiGLU,
    math_attention,
    rope_angles,
    scaled_residual,
    scaled_residual_jvp,
)
from mfkernels.ops import ops_table

from tests.utils import max_rel_err, randomize_

F64 = torch.float64
TABLES = ["reference", "fused"]


def _ops(table: str):
    """"fused-glue": the fused table with the reference attention. The attention kernels are tested on their own and
    take seconds a call under the interpreter; the modules' own fused ops (RMSNorm, QK-norm + RoPE, SwiGLU, ...) are
    what these tests check. One test runs the fully fused table."""
    if table == "fused-glue":
        from mfkernels.reference import attention_jvp_ref

        return dataclasses.replace(ops_table("fused"), attention=attention_jvp_ref)
    return ops_table(table)


def _check_module_jvp(fn_plain, fn_jvp, x, kt):
    """forward_jvp(x, x_dot) against (forward(x), torch.func.jvp(forward)) in float64, and its gradient."""
    x = x.detach().requires_grad_()
    x_dot = torch.randn((kt,) + x.shape[1:], dtype=F64)
    y, y_dot = fn_jvp(x, x_dot)
    with math_attention():
        y_plain = fn_plain(x)
        _, ref_dot = torch.func.jvp(fn_plain, (x[:kt].detach(),), (x_dot,))
    assert y_dot.shape == ref_dot.shape and not y_dot.requires_grad
    assert max_rel_err(y, y_plain) < 1e-12
    if kt:
        assert max_rel_err(y_dot, ref_dot) < 1e-11
    gw = torch.randn_like(y_plain)  # a random upstream gradient (sum(y^2) of an RMSNorm is nearly constant in x)
    (g,) = torch.autograd.grad((y * gw).sum(), x)
    (g_plain,) = torch.autograd.grad((y_plain * gw).sum(), x)
    assert max_rel_err(g, g_plain) < 1e-11


@pytest.mark.gpu
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("kt", [0, 1, 3])
def test_rmsnorm_and_swiglu_modules(table, kt):
    ops = ops_table(table)
    x = torch.randn(3, 5, 24, dtype=F64)
    for module in (randomize_(RMSNorm(24).double()), RMSNorm(24, learned_scale=False).double(),
                   randomize_(SwiGLU(24, 64).double()), randomize_(SwiGLU(24, 40, out=16, bias=True).double())):
        _check_module_jvp(module, lambda a, a_dot: module.forward_jvp(a, a_dot, ops), x, kt)


@pytest.mark.gpu
@pytest.mark.parametrize("table,kt", [("reference", 0), ("reference", 1), ("reference", 3), ("fused-glue", 0),
                                      ("fused-glue", 1), ("fused-glue", 3)])
@pytest.mark.parametrize("variant", ["qknorm-rope", "qknorm", "rope", "plain", "qknorm-rope-half"])
def test_rotary_attention_module(table, kt, variant):
    ops = _ops(table)
    B, N, C, H = 3, 6, 32, 4
    attn = randomize_(RotaryAttention(C, H, qk_norm="qknorm" in variant, qkv_bias=variant == "plain",
                                      interleaved=not variant.endswith("half")).double(), std=0.3)
    cos, sin = rope_angles(C // H, N, dtype=F64) if "rope" in variant else (None, None)
    x = torch.randn(B, N, C, dtype=F64)
    _check_module_jvp(lambda a: attn(a, cos, sin), lambda a, a_dot: attn.forward_jvp(a, a_dot, cos, sin, ops), x, kt)


@pytest.mark.gpu
def test_rotary_attention_fully_fused(device):
    """Once with the fused attention kernels too (kt = 2 of 3)."""
    attn = randomize_(RotaryAttention(32, 4).double(), std=0.3)
    cos, sin = rope_angles(8, 6, dtype=F64)
    _check_module_jvp(lambda a: attn(a, cos, sin),
                      lambda a, a_dot: attn.forward_jvp(a, a_dot, cos, sin, ops_table("fused")),
                      torch.randn(3, 6, 32, dtype=F64), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("table", TABLES)
def test_scaled_residual(table):
    ops = ops_table(table)
    x, f = torch.randn(3, 4, 8, dtype=F64, requires_grad=True), torch.randn(3, 4, 8, dtype=F64, requires_grad=True)
    scale = torch.randn(8, dtype=F64, requires_grad=True)
    x_dot, f_dot = torch.randn(2, 4, 8, dtype=F64), torch.randn(2, 4, 8, dtype=F64)
    y, y_dot = scaled_residual_jvp(x, f, scale, x_dot, f_dot, ops)
    y_plain = scaled_residual(x, f, scale)
    _, ref_dot = torch.func.jvp(lambda a, b: scaled_residual(a, b, scale.detach()),
                                (x[:2].detach(), f[:2].detach()), (x_dot, f_dot))
    assert max_rel_err(y, y_plain) < 1e-14 and max_rel_err(y_dot, ref_dot) < 1e-14
    grads = torch.autograd.grad(y.square().sum(), (x, f, scale))
    grads_plain = torch.autograd.grad(y_plain.square().sum(), (x, f, scale))
    assert all(max_rel_err(g, r) < 1e-12 for g, r in zip(grads, grads_plain))


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_attention_against_its_formula_with_distinct_q_and_k_norms(interleaved):
    """RotaryAttention's plain forward and its tangent call against the formula written out, with q and k norm
    scales that differ (at init both are ones, so swapping them, or normalising k with q's, would pass everything
    that compares the module with itself)."""
    B, N, C, H = 2, 5, 16, 2
    D = C // H
    attn = randomize_(RotaryAttention(C, H, interleaved=interleaved).double(), std=0.3)
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.linspace(0.5, 2.0, D, dtype=F64))
        attn.k_norm.weight.copy_(torch.linspace(-1.5, 0.3, D, dtype=F64))
    cos, sin = rope_angles(D, N, dtype=F64)
    x = torch.randn(B, N, C, dtype=F64)

    def formula(x):
        q, k, v = (x @ attn.qkv.weight.T).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)

        def rms(a, w):
            return a / a.pow(2).mean(-1, keepdim=True).add(attn.eps).sqrt() * w

        def rope(a):
            if interleaved:  # pairs (2i, 2i + 1)
                a1, a2 = a[..., 0::2], a[..., 1::2]
                return torch.stack([a1 * cos - a2 * sin, a1 * sin + a2 * cos], -1).flatten(-2)
            a1, a2 = a[..., : D // 2], a[..., D // 2:]  # halves (i, i + D/2)
            return torch.cat([a1 * cos - a2 * sin, a1 * sin + a2 * cos], -1)

        q, k = rope(rms(q, attn.q_norm.weight)), rope(rms(k, attn.k_norm.weight))
        p = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1)
        return (p @ v).transpose(1, 2).reshape(B, N, C) @ attn.proj.weight.T

    torch.testing.assert_close(attn(x, cos, sin), formula(x), atol=1e-12, rtol=1e-12)
    x_dot = torch.randn(1, N, C, dtype=F64)
    y, y_dot = attn.forward_jvp(x, x_dot, cos, sin, ops_table("reference"))
    _, y_dot_ref = torch.func.jvp(lambda a: formula(torch.cat([a, x[1:]])), (x[:1],), (x_dot,))
    torch.testing.assert_close(y, formula(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y_dot, y_dot_ref[:1], atol=1e-12, rtol=1e-12)


def test_rope_angles_match_imf_table():
    """iMF's precompute_rope_freqs: freqs = theta^(-arange(0, D, 2) / D), angle = position x freq."""
    cos, sin = rope_angles(8, torch.tensor([0.0, 1.0, 5.0]), dtype=F64)
    freqs = 10000.0 ** (-torch.arange(0, 8, 2, dtype=F64) / 8)
    torch.testing.assert_close(cos[2], torch.cos(5 * freqs))
    torch.testing.assert_close(sin[1], torch.sin(freqs))
    with pytest.raises(ValueError, match="even head dim"):
        rope_angles(7, 3)


def test_fused_ops_compile_fullgraph_and_match_eager():
    """The new fused ops (RMSNorm, QK-norm + RoPE, RoPE, SwiGLU) with backward under torch.compile(fullgraph=True,
    backend="aot_eager"): the custom ops go into the graph whole (no graph break) and the results equal eager."""
    torch.manual_seed(0)
    B, N, C, H, kt = 2, 5, 32, 4, 1
    attn, mlp, norm = RotaryAttention(C, H), SwiGLU(C, 48), RMSNorm(C)
    for m in (attn, mlp, norm):
        randomize_(m)
    cos, sin = rope_angles(C // H, N)
    ops = ops_table("fused")
    params = [p for m in (attn, mlp, norm) for p in m.parameters() if p is not attn.proj.weight]

    def forward(x, x_dot):
        h, h_dot = norm.forward_jvp(x, x_dot, ops)
        qkv, qkv_dot = attn.qkv.forward_jvp(h, h_dot, ops)
        (q, k, v), (q_dot, k_dot, v_dot) = attn.split_heads(qkv), attn.split_heads(qkv_dot)
        q, k, q_dot, k_dot = attn.norm_rope_jvp(q, k, q_dot, k_dot, cos, sin, ops)
        v, v_dot = ops.rope(v, cos, sin, v_dot)  # RoPE alone, on the third head group
        a, a_dot = attn.merge_heads(q * k + v), attn.merge_heads(q_dot * k + q[:kt] * k_dot + v_dot)
        return mlp.forward_jvp(a, a_dot, ops)

    def run(fn):
        x = x0.clone().requires_grad_()
        y, y_dot = fn(x, x_dot)
        return y, y_dot, torch.autograd.grad(y.square().sum(), [x] + params)  # through AOT autograd's backward

    x0, x_dot = torch.randn(B, N, C), torch.randn(kt, N, C)
    eager = run(forward)
    compiled = run(torch.compile(forward, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    for g, ge in zip(compiled[2], eager[2]):
        torch.testing.assert_close(g, ge)
