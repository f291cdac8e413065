"""Head dims that are not powers of two: D = 72 (DiT-XL/2), 80, 96, 112 and odd ones run as power-of-two
pieces (mfkernels/attention/_pieces.py) in the forward + JVP, the plain forward and the flash backward (the tangent
backward, padded there, is checked too); with masks, GQA, Dv != D (split differently), causal, every dtype; and the
opt-in Hopper levers (mfkernels/attention/_levers.py: tensor descriptors, persistent programs) and the forced padding
switch.

References as in tests/test_attention_masks.py: torch's math SDPA (torch.func.jvp for tangents, autograd for
gradients) in float64; exact dtype 1e-10 (fp64 in the interpreter, fp32 rounding on CUDA), 16-bit within 2x torch's own
error in that dtype plus a floor. A few shapes per head dim keep the interpreter time small.
"""
from __future__ import annotations

import pytest
import torch

from mfkernels.attention import _levers, _pieces, attention_jvp, forward
from tests.test_attention_masks import (_close, _close_fa, _exact_dtype, _inputs, _make_mask, _n, math_grads,
                                        math_jvp)
from tests.test_attention_tangent_grad import NAMES, _loss, _ref_attn, _ref_grads, _torch_attn


# -------------------------------------------------------------------------------------------------- the mapping
def test_head_pieces_cover_the_head_dim_with_less_work(monkeypatch):
    monkeypatch.delenv("MFKERNELS_ATTN_PAD_D", raising=False)
    expected = {72: (64, 16), 80: (64, 16), 96: (64, 32), 112: (64, 32, 16), 40: (32, 16), 48: (32, 16),
                65: (64, 16), 100: (64, 32, 16), 127: (128,)}
    for d, pieces in expected.items():
        assert _pieces.head_pieces(d) == pieces, d
    # powers of two, D <= 32 and D > 128 keep today's single padded tile
    for d, pieces in {16: (16,), 32: (32,), 64: (64,), 128: (128,), 256: (256,), 1: (16,), 20: (32,), 24: (32,),
                      136: (256,), 200: (256,)}.items():
        assert _pieces.head_pieces(d) == pieces, d
    for d in range(1, 257):
        pieces = _pieces.head_pieces(d)
        assert sum(pieces) >= d and all(p >= 16 and p & (p - 1) == 0 for p in pieces)
        assert list(pieces) == sorted(pieces, reverse=True) and len(pieces) <= 3
        assert sum(pieces) <= max(16, 1 << (d - 1).bit_length())  # never more work than padding
        assert sum(pieces) - d < 16 or len(pieces) == 1  # a split wastes less than one 16-wide column block
    monkeypatch.setenv("MFKERNELS_ATTN_PAD_D", "1")
    assert _pieces.head_pieces(72) == (128,) and _pieces.head_dim_args(72, 96)["DV_PIECES"] == (128,)


# -------------------------------------------------------------------------------------------- forward + JVP
# (B, Hq, Hkv, Nq, Nk, D, Dv, kt): every split head dim once, Dv split differently from D, kt < B, kt = 0, GQA
SHAPES = [
    (2, 2, 2, 19, 23, 72, 72, 1),
    (1, 2, 1, 17, 12, 80, 40, 1),
    (2, 4, 2, 13, 21, 96, 72, 2),
    (3, 1, 1, 11, 17, 112, 112, 0),
    (2, 2, 2, 15, 9, 37, 112, 2),
]


@pytest.mark.sweep
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hq{}Hkv{}q{}k{}D{}Dv{}kt{}".format(*s))
def test_split_forward_jvp_and_backward(device, shape, causal):
    """o, o_dot against torch.func.jvp over the math SDPA; dq, dk, dv of o against autograd (exact dtype)."""
    b, hq, hkv, nq, nk, d, dv, kt = shape
    nq, nk, dtype = _n(nq, device), _n(nk, device), _exact_dtype(device)
    q, k, v, q_dot, k_dot, v_dot = _inputs(b, hq, hkv, nq, nk, d, dv, kt, dtype, device)
    gqa = hq != hkv
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, o_dot = attention_jvp(*leaves, q_dot, k_dot, v_dot, causal=causal, enable_gqa=gqa)
    ref_o, ref_o_dot = math_jvp(q, k, v, q_dot, k_dot, v_dot, is_causal=causal, enable_gqa=gqa)
    _close("o", o, ref_o)
    _close("o_dot", o_dot, ref_o_dot)
    grad_o = torch.randn_like(o)
    for name, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(o, leaves, grad_o),
                          math_grads(q, k, v, grad_o, is_causal=causal, enable_gqa=gqa)):
        _close(name, g, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
def test_split_dtypes(device, dtype):
    """D = 72 (DiT-XL/2) in every kernel dtype: forward + JVP and backward within 2x torch's own error (+ floor)."""
    b, h, nq, nk, d = 2, 2, _n(17, device), _n(22, device), 72
    q, k, v, q_dot, k_dot, v_dot = _inputs(b, h, h, nq, nk, d, d, 1, dtype, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, o_dot = attention_jvp(*leaves, q_dot, k_dot, v_dot)
    args = (q, k, v, q_dot, k_dot, v_dot)
    ref, low = math_jvp(*args), math_jvp(*args, dtype=dtype)
    assert o.dtype == dtype and o_dot.dtype == dtype
    _close_fa("o", o, ref[0], low[0], dtype)
    _close_fa("o_dot", o_dot, ref[1], low[1], dtype)
    grad_o = torch.randn_like(o)
    got = torch.autograd.grad(o, leaves, grad_o)
    for name, g, r, lw in zip(("dq", "dk", "dv"), got, math_grads(q, k, v, grad_o),
                              math_grads(q, k, v, grad_o, dtype=dtype)):
        _close_fa(name, g, r, lw, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["keypad", "additive", "bool_full"])
def test_split_masks_gqa(device, kind):
    """Masks (key padding with fully masked rows, a 2-D additive bias, a full bool mask) with GQA, D = 72, Dv = 96."""
    b, hq, hkv, nq, nk, d, dv, kt = 2, 4, 2, _n(11, device), _n(19, device), 72, 96, 1
    dtype = _exact_dtype(device)
    q, k, v, q_dot, k_dot, v_dot = _inputs(b, hq, hkv, nq, nk, d, dv, kt, dtype, device)
    mask = _make_mask(kind, b, hq, nq, nk, dtype, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, o_dot = attention_jvp(*leaves, q_dot, k_dot, v_dot, attn_mask=mask, enable_gqa=True)
    ref_o, ref_o_dot = math_jvp(q, k, v, q_dot, k_dot, v_dot, mask, enable_gqa=True)
    _close("o", o, ref_o)
    _close("o_dot", o_dot, ref_o_dot)
    grad_o = torch.randn_like(o)
    for name, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(o, leaves, grad_o),
                          math_grads(q, k, v, grad_o, mask, enable_gqa=True)):
        _close(name, g, r)


# (mask kind or None, causal, B, Hq, Hkv, Nq, Nk, D, Dv, kt)
TANGENT_CASES = [
    (None, True, 2, 2, 1, 13, 17, 72, 112, 2),
    ("keypad", False, 3, 2, 2, 9, 14, 96, 80, 2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", TANGENT_CASES, ids=lambda c: "{}-{}-D{}Dv{}".format(
    c[0] or "nomask", "causal" if c[1] else "full", c[7], c[8]))
def test_split_tangent_grad(device, case):
    """Gradients of a loss of (o, o_dot) into all six inputs at split head dims (the forward + JVP split; the tangent
    backward runs padded tiles there: _pieces.py)."""
    kind, causal, b, hq, hkv, nq, nk, d, dv, kt = case
    nq, nk, dtype = _n(nq, device), _n(nk, device), _exact_dtype(device)
    args = _inputs(b, hq, hkv, nq, nk, d, dv, kt, dtype, device)
    mask = _make_mask(kind, b, hq, nq, nk, dtype, device) if kind else None
    gqa = hq != hkv
    leaves = [t.clone().requires_grad_() for t in args]
    o, o_dot = attention_jvp(*leaves, attn_mask=mask, causal=causal, enable_gqa=gqa, tangent_grad=True)
    got = torch.autograd.grad(_loss(o, o_dot), leaves)
    attn = _ref_attn(mask, causal, gqa) if kind else _torch_attn(None, is_causal=causal, enable_gqa=gqa)
    for name, g, r in zip(NAMES, got, _ref_grads(args[:3], args[3:], attn)):
        _close(name, g, r)


@pytest.mark.gpu
def test_forced_padding_matches_the_split(device, monkeypatch):
    """MFKERNELS_ATTN_PAD_D=1 (the A/B switch of the benchmark) runs the padded tiles: the same exact result."""
    dtype = _exact_dtype(device)
    args = _inputs(2, 2, 2, _n(14, device), _n(19, device), 72, 80, 1, dtype, device)
    split = attention_jvp(*args, causal=True)
    monkeypatch.setenv("MFKERNELS_ATTN_PAD_D", "1")
    padded = attention_jvp(*args, causal=True)
    ref = math_jvp(*args, is_causal=True)
    for name, s, p, r in zip(("o", "o_dot"), split, padded, ref):
        _close(name + " split", s, r)
        _close(name + " padded", p, r)


# ------------------------------------------------------------------------------------------------------ levers
def _spy_levers(monkeypatch) -> list[dict]:
    """Record the lever constexprs each forward launch gets."""
    seen = []
    real = forward.forward_levers

    def spy(tensors):
        levers = real(tensors)
        seen.append(levers)
        return levers

    monkeypatch.setattr(forward, "forward_levers", spy)
    return seen


# (lever env, D, Dv, causal, mask kind, GQA)
LEVER_CASES = [
    ({"MFKERNELS_ATTN_TMA": "1"}, 72, 72, False, None, False),
    ({"MFKERNELS_ATTN_TMA": "1"}, 64, 112, True, None, True),
    ({"MFKERNELS_ATTN_TMA": "1"}, 96, 96, False, "additive_keypad", False),
    ({"MFKERNELS_ATTN_PERSISTENT": "1"}, 72, 72, True, None, True),
    ({"MFKERNELS_ATTN_PERSISTENT": "1"}, 64, 64, False, "bool_full", False),
    ({"MFKERNELS_ATTN_TMA": "1", "MFKERNELS_ATTN_PERSISTENT": "1"}, 72, 96, False, "keypad", True),
]


@pytest.mark.sweep
@pytest.mark.gpu
@pytest.mark.parametrize("case", LEVER_CASES, ids=lambda c: "{}-D{}Dv{}-{}-{}{}".format(
    "+".join(k.split("_")[-1].lower() for k in c[0]), c[1], c[2], "causal" if c[3] else "full", c[4] or "nomask",
    "-gqa" if c[5] else ""))
def test_levers_exact(device, monkeypatch, case):
    """Each Hopper lever on (tensor descriptors, persistent programs) gives the exact result, with kt < B (tangent and
    plain rows in one launch), masks and GQA; the launcher really applied it."""
    env, d, dv, causal, kind, gqa = case
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = _spy_levers(monkeypatch)
    b, hq, hkv, nq, nk, kt = 3, 4 if gqa else 2, 2, _n(13, device), _n(21, device), 2
    dtype = _exact_dtype(device)
    q, k, v, q_dot, k_dot, v_dot = _inputs(b, hq, hkv, nq, nk, d, dv, kt, dtype, device)
    mask = _make_mask(kind, b, hq, nq, nk, dtype, device) if kind else None
    o, o_dot = attention_jvp(q, k, v, q_dot, k_dot, v_dot, attn_mask=mask, causal=causal, enable_gqa=gqa)
    ref_o, ref_o_dot = math_jvp(q, k, v, q_dot, k_dot, v_dot, mask, is_causal=causal, enable_gqa=gqa)
    _close("o", o, ref_o)
    _close("o_dot", o_dot, ref_o_dot)
    assert seen and seen[-1]["USE_TMA"] == ("MFKERNELS_ATTN_TMA" in env)
    assert seen[-1]["PERSISTENT"] == ("MFKERNELS_ATTN_PERSISTENT" in env)


@pytest.mark.gpu
def test_tma_lever_falls_back_where_descriptors_cannot_apply(device, monkeypatch):
    """Views of a packed projection whose row stride is not a multiple of 16 bytes cannot back a tensor descriptor:
    the launcher takes the pointer path (TMA off for that call) and the result is still exact."""
    monkeypatch.setenv("MFKERNELS_ATTN_TMA", "1")
    seen = _spy_levers(monkeypatch)
    dtype = _exact_dtype(device)
    b, h, n, d = 2, 2, _n(12, device), 72
    packed = torch.randn(b, n, 3 * h * d + 1, dtype=dtype, device=device)  # row stride 3 H D + 1: misaligned
    q, k, v = (packed[..., i * h * d:(i + 1) * h * d].unflatten(-1, (h, d)).transpose(1, 2) for i in range(3))
    tangents = [torch.randn((1,) + t.shape[1:], dtype=dtype, device=device) for t in (q, k, v)]
    assert not _levers.tma_applies(k) and _levers.tma_applies(k.contiguous())
    o, o_dot = attention_jvp(q, k, v, *tangents)
    assert seen[-1]["USE_TMA"] is False
    ref = math_jvp(q, k, v, *tangents)
    _close("o", o, ref[0])
    _close("o_dot", o_dot, ref[1])
