"""Attention as an SDPA drop-in: attn_mask (bool / additive, broadcast like torch), fully masked rows,
GQA / MQA (enable_gqa) and a value head dim Dv != D, through attention_jvp, its backward and the drop-in in every mode.

Reference: torch's own F.scaled_dot_product_attention forced to the MATH backend, under torch.func.jvp for tangents and
autograd for gradients, in float64. fp64 runs exact (1e-10); fp32 at fp32 rounding; bf16 / fp16 within 2x torch's own
error in that dtype plus a floor (tests/test_attention.py's rule). On CPU the kernels run in the Triton interpreter at
tiny odd shapes; tests marked `gpu` run compiled on CUDA at larger ones.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mfkernels.attention import _common, attention_jvp, scaled_dot_product_attention

FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _n(n: int, device: str) -> int:
    return n if device == "cpu" else 8 * n + 3


def _exact_dtype(device: str) -> torch.dtype:
    return torch.float64 if device == "cpu" else torch.float32


def _inputs(b, hq, hkv, nq, nk, d, dv, kt, dtype, device):
    shapes = ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv))
    prim = [torch.randn(s, dtype=torch.float64).to(device, dtype) for s in shapes]
    tan = [torch.randn((kt,) + s[1:], dtype=torch.float64).to(device, dtype) for s in shapes]
    return prim + tan


def _tangent_mask(mask, kt):
    """The mask rows that go with the first kt batch rows (a mask with a batch dim of B is sliced, others broadcast)."""
    if mask is not None and mask.dim() == 4 and mask.shape[0] > 1:
        return mask[:kt]
    return mask


def sdpa_math(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def math_jvp(q, k, v, q_dot, k_dot, v_dot, attn_mask=None, dtype=torch.float64, **kw):
    """(o, o_dot) of torch's MATH SDPA (torch.func.jvp over the first kt rows) in `dtype`."""
    q, k, v, q_dot, k_dot, v_dot = (t.detach().to(dtype) for t in (q, k, v, q_dot, k_dot, v_dot))
    m = attn_mask.to(dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    kt = q_dot.shape[0]
    with torch.no_grad():
        o = sdpa_math(q, k, v, attn_mask=m, **kw)
        fn = lambda a, b, c: sdpa_math(a, b, c, attn_mask=_tangent_mask(m, kt), **kw)  # noqa: E731
        _, o_dot = torch.func.jvp(fn, (q[:kt], k[:kt], v[:kt]), (q_dot, k_dot, v_dot))
    return o, o_dot


def math_grads(q, k, v, grad_o, attn_mask=None, dtype=torch.float64, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    m = attn_mask.to(dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    return torch.autograd.grad(sdpa_math(*leaves, attn_mask=m, **kw), leaves, grad_o.to(dtype))


def _close(name, got, ref):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    tol = dict(rtol=1e-10, atol=1e-11) if got.dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got.double(), ref.double(), msg=name, **tol)


def _err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _close_fa(name, got, ref, low, dtype):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, err_torch = _err(got, ref), _err(low, ref)
    assert err <= 2 * err_torch + FLOOR[dtype], f"{name} ({dtype}): error {err:.3g} > 2 x torch's {err_torch:.3g}"


def _make_mask(kind, b, hq, nq, nk, dtype, device):
    """Masks in the layouts users pass. Every kind but 'bool_2d' leaves whole rows masked somewhere."""
    gen = torch.Generator().manual_seed(7)
    if kind == "keypad":  # (B, 1, 1, Nk): ~30% padded keys; batch row 1 fully padded (fully masked rows)
        keep = torch.rand(b, 1, 1, nk, generator=gen) > 0.3
        keep[1] = False
        return keep.to(device)
    if kind == "bool_full":  # (B, Hq, Nq, Nk); a few rows with every key masked
        keep = torch.rand(b, hq, nq, nk, generator=gen) > 0.4
        keep[0, -1, 2] = False
        keep[-1, 0, -1] = False
        return keep.to(device)
    if kind == "bool_2d":  # (Nq, Nk): broadcast over batch and heads
        keep = torch.rand(nq, nk, generator=gen) > 0.5
        keep[:, 0] = True
        return keep.to(device)
    if kind == "bool_strided":  # a non-contiguous view: (B, Hq, Nk, Nq) transposed; rows 0 and 2 of head 1 dead
        keep = torch.rand(b, hq, nk, nq, generator=gen) > 0.5
        keep[:, 1, :, ::2] = False
        return keep.to(device).transpose(-1, -2)
    if kind == "additive":  # (1, Hq, Nq, Nk) float bias, -inf holes and a fully -inf row
        bias = torch.randn(1, hq, nq, nk, generator=gen, dtype=torch.float64)
        bias[torch.rand(1, hq, nq, nk, generator=gen) < 0.2] = float("-inf")
        bias[0, 0, 1] = float("-inf")
        return bias.to(device, dtype)
    if kind == "additive_keypad":  # (B, 1, 1, Nk) float: -inf holes; batch row 1 all finfo.min (uniform rows)
        bias = torch.zeros(b, 1, 1, nk, dtype=torch.float64)
        bias[torch.rand(b, 1, 1, nk, generator=gen) < 0.3] = float("-inf")
        bias[..., 0] = 0.0
        bias = bias.to(dtype)
        bias[1] = torch.finfo(dtype).min
        return bias.to(device)
    if kind == "additive_finfo_min":  # (B, 1, Nq, Nk) HF-style padding masks: finfo.min, one row all finfo.min
        bias = torch.zeros(b, 1, nq, nk, dtype=dtype)
        bias[..., nk // 2:] = torch.finfo(dtype).min
        bias[0, 0, 3] = torch.finfo(dtype).min  # torch: a uniform average over every key, not a masked row
        return bias.to(device)
    raise ValueError(kind)


# (kind, B, Hq, Hkv, Nq, Nk, D, Dv, kt): odd N and D, GQA / MQA, Dv != D, kt < B and kt = 0 / B
MASK_CASES = [
    ("keypad", 3, 4, 2, 13, 21, 24, 40, 2),
    ("bool_full", 2, 2, 2, 17, 11, 16, 16, 1),
    ("bool_2d", 2, 4, 1, 9, 19, 32, 24, 2),
    ("additive", 2, 2, 1, 11, 14, 40, 16, 0),
    ("additive_finfo_min", 2, 2, 2, 9, 21, 16, 16, 2),
    ("additive_keypad", 2, 2, 1, 10, 23, 16, 32, 1),
    ("bool_strided", 1, 2, 2, 7, 12, 8, 8, 1),
]


@pytest.mark.sweep
@pytest.mark.gpu
@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: f"{c[0]}-Hq{c[2]}Hkv{c[3]}-D{c[6]}Dv{c[7]}-kt{c[8]}")
def test_masked_forward_jvp_and_backward(device, case):
    """o, o_dot and (dq, dk, dv) against torch's math SDPA (func.jvp / autograd), exact dtype."""
    kind, b, hq, hkv, nq, nk, d, dv, kt = case
    nq, nk, dtype = _n(nq, device), _n(nk, device), _exact_dtype(device)
    q, k, v, q_dot, k_dot, v_dot = _inputs(b, hq, hkv, nq, nk, d, dv, kt, dtype, device)
    mask = _make_mask(kind, b, hq, nq, nk, dtype, device)
    gqa = hkv != hq
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, o_dot = attention_jvp(*leaves, q_dot, k_dot, v_dot, attn_mask=mask, enable_gqa=gqa)
    ref_o, ref_o_dot = math_jvp(q, k, v, q_dot, k_dot, v_dot, mask, enable_gqa=gqa)
    _close("o", o, ref_o)
    _close("o_dot", o_dot, ref_o_dot)
    grad_o = torch.randn_like(o)
    got = torch.autograd.grad(o, leaves, grad_o)
    for name, g, r in zip(("dq", "dk", "dv"), got, math_grads(q, k, v, grad_o, mask, enable_gqa=gqa)):
        _close(name, g, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
def test_masked_dtypes(device, dtype):
    """Key padding + GQA in fp32 / 16-bit: within 2x torch's own math-SDPA error in that dtype (+ floor)."""
    b, hq, hkv, nq, nk, d, dv, kt = 2, 4, 2, _n(13, device), _n(22, device), 32, 32, 1
    q, k, v, q_dot, k_dot, v_dot = _inputs(b, hq, hkv, nq, nk, d, dv, kt, dtype, device)
    keep = _make_mask("keypad", b, hq, nq, nk, dtype, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, o_dot = attention_jvp(*leaves, q_dot, k_dot, v_dot, attn_mask=keep, enable_gqa=True)
    args = (q, k, v, q_dot, k_dot, v_dot, keep)
    ref, low = math_jvp(*args, enable_gqa=True), math_jvp(*args, dtype=dtype, enable_gqa=True)
    _close_fa("o", o, ref[0], low[0], dtype)
    _close_fa("o_dot", o_dot, ref[1], low[1], dtype)
    grad_o = torch.randn_like(o)
    got = torch.autograd.grad(o, leaves, grad_o)
    ref_g = math_grads(q, k, v, grad_o, keep, enable_gqa=True)
    low_g = math_grads(q, k, v, grad_o, keep, dtype=dtype, enable_gqa=True)
    for name, g, r, lw in zip(("dq", "dk", "dv"), got, ref_g, low_g):
        _close_fa(name, g, r, lw, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa", "mqa"])
def test_gqa_causal_strided_tangents(device, hkv):
    """GQA / MQA with causal Nq != Nk, Dv != D; primal views of a packed projection with contiguous tangents, and
    the reverse (tangents as transposed views), kt = 2 of B = 3."""
    dtype = _exact_dtype(device)
    b, hq, n, d, dv, kt = 3, 4, _n(15, device), 16, 24, 2
    packed = torch.randn(b, n, hq * d + hkv * (d + dv), dtype=dtype, device=device)
    q = packed[..., :hq * d].unflatten(-1, (hq, d)).transpose(1, 2)
    k = packed[..., hq * d:hq * d + hkv * d].unflatten(-1, (hkv, d)).transpose(1, 2)
    v = packed[..., hq * d + hkv * d:].unflatten(-1, (hkv, dv)).transpose(1, 2)
    tangents = [torch.randn((kt,) + t.shape[1:], dtype=dtype, device=device) for t in (q, k, v)]
    for prim, tan in (((q, k, v), tangents),
                      ([t.contiguous() for t in (q, k, v)], [t.transpose(2, 3).contiguous().transpose(2, 3)
                                                             for t in tangents])):
        assert not prim[0].is_contiguous() or not tan[0].is_contiguous()
        leaves = [t.detach().clone().requires_grad_() if t.is_contiguous() else t.detach().requires_grad_()
                  for t in prim]
        o, o_dot = attention_jvp(*leaves, *tan, causal=True, enable_gqa=True)
        ref = math_jvp(*prim, *tan, is_causal=True, enable_gqa=True)
        _close("o", o, ref[0])
        _close("o_dot", o_dot, ref[1])
        grad_o = torch.randn_like(o)
        for name, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(o, leaves, grad_o),
                              math_grads(*prim, grad_o, is_causal=True, enable_gqa=True)):
            _close(name, g, r)


# ----------------------------------------------------------------------------------------- the drop-in, every mode
@pytest.mark.gpu
def test_dropin_masks_gqa_forward_modes_and_autograd(device):
    """scaled_dot_product_attention with a key-padding mask and GQA under torch.func.jvp, forward_ad (tangent on q and
    v only) and plain autograd, against torch's math SDPA."""
    dtype = _exact_dtype(device)
    b, hq, hkv, nq, nk, d, dv = 2, 4, 2, _n(11, device), _n(17, device), 16, 24
    q, k, v, q_dot, k_dot, v_dot = _inputs(b, hq, hkv, nq, nk, d, dv, b, dtype, device)
    keep = _make_mask("keypad", b, hq, nq, nk, dtype, device)
    kw = dict(attn_mask=keep, enable_gqa=True)
    got = torch.func.jvp(lambda a, c, e: scaled_dot_product_attention(a, c, e, **kw), (q, k, v), (q_dot, k_dot, v_dot))
    ref = math_jvp(q, k, v, q_dot, k_dot, v_dot, keep, enable_gqa=True)
    _close("func.jvp o", got[0], ref[0])
    _close("func.jvp o_dot", got[1], ref[1])
    with fwAD.dual_level():
        out = scaled_dot_product_attention(fwAD.make_dual(q, q_dot), k, fwAD.make_dual(v, v_dot), **kw)
        primal, tangent = fwAD.unpack_dual(out)
    ref = math_jvp(q, k, v, q_dot, torch.zeros_like(k_dot), v_dot, keep, enable_gqa=True)
    _close("forward_ad o", primal, ref[0])
    _close("forward_ad o_dot", tangent, ref[1])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = scaled_dot_product_attention(*leaves, **kw)
    grad_o = torch.randn_like(o)
    for name, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(o, leaves, grad_o),
                          math_grads(q, k, v, grad_o, keep, enable_gqa=True)):
        _close(name, g, r)


@pytest.mark.gpu
def test_dropin_compile_with_mask_and_gqa(device):
    """Without forward mode the drop-in with a mask and GQA compiles whole (aot_eager, fullgraph) and matches eager;
    in forward mode under compile (the documented graph break, pytorch #192985) its tangents equal eager's."""
    b, hq, hkv, nq, nk, d = 2, 4, 1, _n(9, device), _n(13, device), 16
    q, k, v, q_dot, k_dot, v_dot = _inputs(b, hq, hkv, nq, nk, d, d, b, torch.float32, device)
    bias = _make_mask("additive", b, hq, nq, nk, torch.float32, device)
    sdpa = lambda a, c, e: scaled_dot_product_attention(a, c, e, attn_mask=bias, enable_gqa=True)  # noqa: E731
    torch._dynamo.reset()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.compile(lambda *a: sdpa(*a).square().sum(), backend="aot_eager", fullgraph=True)(*leaves)
    got = torch.autograd.grad(out, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(sdpa(*ref_leaves).square().sum(), ref_leaves)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    fn = lambda *a: torch.func.jvp(sdpa, a[:3], a[3:])  # noqa: E731
    eager = fn(q, k, v, q_dot, k_dot, v_dot)
    compiled = torch.compile(fn, backend="aot_eager")(q, k, v, q_dot, k_dot, v_dot)
    assert compiled[1].abs().max() > 0.1
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ layout and errors
def test_key_padding_mask_is_read_broadcast_not_materialised():
    """The launchers hand the kernels an expand view: stride 0 on every broadcast dim, the user's storage untouched."""
    keep = torch.rand(3, 1, 1, 20) > 0.3
    mask, strides, kind, _ = _common.mask_args(keep, (3, 8, 16, 20), torch.float32, torch.empty(0))
    assert kind == _common.KEY_BOOL_MASK and strides == (20, 0, 0, 1)
    assert mask.dtype == torch.uint8 and mask.untyped_storage().data_ptr() == keep.untyped_storage().data_ptr()
    bias = torch.randn(16, 20)
    mask, strides, kind, neg_max = _common.mask_args(bias, (3, 8, 16, 20), torch.bfloat16, torch.empty(0))
    assert kind == _common.ADDITIVE_MASK and strides == (0, 0, 20, 1) and mask.data_ptr() == bias.data_ptr()
    assert neg_max == -torch.finfo(torch.float32).max


def _small(hq=2, hkv=2, dtype=torch.float32):
    return _inputs(2, hq, hkv, 6, 7, 16, 16, 1, dtype, "cpu")


@pytest.mark.parametrize("case", ["mask_shape", "mask_5d", "mask_dtype_f64", "mask_dtype_int", "mask_and_causal",
                                  "mask_device", "gqa_not_multiple", "gqa_without_flag", "mask_requires_grad",
                                  "gqa_flag_type"])
def test_argument_errors_name_the_argument(case):
    q, k, v, q_dot, k_dot, v_dot = _small()
    kw, expect = {}, ValueError
    if case == "mask_shape":
        kw = dict(attn_mask=torch.ones(2, 6, 5, dtype=torch.bool))
        match = r"attn_mask has shape \(2, 6, 5\).*\(2, 2, 6, 7\)"
    elif case == "mask_5d":
        kw, match = dict(attn_mask=torch.ones(1, 2, 2, 6, 7, dtype=torch.bool)), "attn_mask has shape"
    elif case == "mask_dtype_f64":
        kw, expect = dict(attn_mask=torch.zeros(6, 7, dtype=torch.float64)), TypeError
        match = "attn_mask has dtype torch.float64"
    elif case == "mask_dtype_int":
        kw, expect = dict(attn_mask=torch.zeros(6, 7, dtype=torch.int32)), TypeError
        match = "attn_mask has dtype torch.int32"
    elif case == "mask_and_causal":
        kw, match = dict(attn_mask=torch.ones(6, 7, dtype=torch.bool), causal=True), "attn_mask and causal"
    elif case == "mask_device":
        kw, match = dict(attn_mask=torch.ones(6, 7, dtype=torch.bool, device="meta")), "attn_mask is on meta"
    elif case == "gqa_not_multiple":
        q, k, v, q_dot, k_dot, v_dot = _small(hq=3, hkv=2)
        kw, match = dict(enable_gqa=True), "Hq = 3 to be a multiple of k's and v's Hkv = 2"
    elif case == "gqa_without_flag":
        q, k, v, q_dot, k_dot, v_dot = _small(hq=4, hkv=2)
        match = "k and v have 2 heads but q has 4; pass enable_gqa=True"
    elif case == "mask_requires_grad":
        kw, match = dict(attn_mask=torch.zeros(6, 7, requires_grad=True)), "attn_mask requires grad"
    elif case == "gqa_flag_type":
        kw, expect, match = dict(enable_gqa=1), TypeError, "enable_gqa must be a bool"
    with pytest.raises(expect, match=match):
        attention_jvp(q, k, v, q_dot, k_dot, v_dot, **kw)
    if "causal" in kw:
        kw["is_causal"] = kw.pop("causal")
    with pytest.raises(expect, match=match):
        scaled_dot_product_attention(q, k, v, **kw)


def test_dropin_refuses_dropout_and_mask_tangent():
    q, k, v, *_ = _small()
    with pytest.raises(NotImplementedError, match="dropout_p must be 0.0"):
        scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    bias = torch.zeros(6, 7)
    with pytest.raises(ValueError, match="attn_mask carries a tangent"):
        torch.func.jvp(lambda m: scaled_dot_product_attention(q, k, v, attn_mask=m), (bias,), (torch.ones_like(bias),))
    with fwAD.dual_level(), pytest.raises(ValueError, match="attn_mask carries a tangent"):
        scaled_dot_product_attention(fwAD.make_dual(q, q), k, v, attn_mask=fwAD.make_dual(bias, torch.ones_like(bias)))
    # a closed-over mask is a constant: no error under torch.func.jvp (functorch hands the jvp a zero tangent for it)
    torch.func.jvp(lambda a: scaled_dot_product_attention(a, k, v, attn_mask=bias), (q,), (q,))
