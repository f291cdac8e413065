"""Exact gradients through the tangent output: a loss of (o, o_dot) differentiated with respect to
q, k, v and the tangents q_dot, k_dot, v_dot, through attention_jvp(tangent_grad=True) and through the SDPA drop-in
after torch.func.jvp / forward_ad (reverse-over-forward), against torch's math SDPA under torch.func.jvp (float64).

Where rows are fully masked torch's math backend itself returns NaN gradients (its safe softmax is not NaN-free under
reverse-over-forward); the exact gradient there is 0 (those rows are constant), which reference.attention_ref gives:
it is the reference for those cases. Also: the stop-gradient path (MeanFlow) saves no tangent and runs the ordinary
flash backward; opcheck of the tangent-backward op; compile.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

from mfkernels import reference
from mfkernels.attention import attention_jvp, scaled_dot_product_attention
from tests.test_attention_masks import (_close, _close_fa, _exact_dtype, _inputs, _make_mask, _n, _tangent_mask,
                                        sdpa_math)


def _loss(o, o_dot):
    """A loss that uses both outputs non-linearly (so every gradient term is exercised)."""
    return (o * o).sum() + torch.sin(o_dot).sum()


def _ref_grads(prim, tan, attn, dtype=torch.float64):
    """Gradients of _loss for (q, k, v, q_dot, k_dot, v_dot) with attn(q, k, v, mask_rows) in `dtype`, its tangent by
    torch.func.jvp over the first kt rows."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (*prim, *tan)]
    q, k, v, q_dot, k_dot, v_dot = leaves
    kt = q_dot.shape[0]
    o = attn(q, k, v, None)
    _, o_dot = torch.func.jvp(lambda a, b, c: attn(a, b, c, kt), (q[:kt], k[:kt], v[:kt]), (q_dot, k_dot, v_dot))
    return torch.autograd.grad(_loss(o, o_dot), leaves)


def _torch_attn(mask, dtype=torch.float64, **kw):
    m = mask.to(dtype) if mask is not None and mask.is_floating_point() else mask
    return lambda a, b, c, kt: sdpa_math(a, b, c, attn_mask=m if kt is None else _tangent_mask(m, kt), **kw)


def _ref_attn(mask, causal=False, gqa=False):
    m = mask.double() if mask is not None and mask.is_floating_point() else mask
    return lambda a, b, c, kt: reference.attention_ref(a, b, c, attn_mask=m if kt is None else _tangent_mask(m, kt),
                                                       causal=causal, enable_gqa=gqa)


NAMES = ("dq", "dk", "dv", "dq_dot", "dk_dot", "dv_dot")
# (mask kind or None, causal, B, Hq, Hkv, Nq, Nk, D, Dv, kt)
CASES = [
    (None, False, 3, 2, 2, 13, 19, 16, 16, 2),
    (None, True, 2, 4, 2, 17, 11, 24, 40, 2),
    ("keypad", False, 3, 4, 1, 11, 21, 16, 24, 2),
    ("additive_finfo_min", False, 2, 2, 2, 9, 21, 16, 16, 1),
    ("additive_keypad", False, 2, 4, 2, 10, 19, 16, 16, 2),
    ("bool_full", False, 2, 2, 1, 9, 14, 16, 24, 1),
]


@pytest.mark.sweep
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-{}-Hq{}Hkv{}-D{}Dv{}-kt{}".format(
    c[0] or "nomask", "causal" if c[1] else "full", c[3], c[4], c[7], c[8], c[9]))
def test_attention_jvp_tangent_grad(device, case):
    kind, causal, b, hq, hkv, nq, nk, d, dv, kt = case
    nq, nk, dtype = _n(nq, device), _n(nk, device), _exact_dtype(device)
    q, k, v, q_dot, k_dot, v_dot = args = _inputs(b, hq, hkv, nq, nk, d, dv, kt, dtype, device)
    mask = _make_mask(kind, b, hq, nq, nk, dtype, device) if kind else None
    gqa = hkv != hq
    leaves = [t.clone().requires_grad_() for t in args]
    o, o_dot = attention_jvp(*leaves, attn_mask=mask, causal=causal, enable_gqa=gqa, tangent_grad=True)
    assert o_dot.requires_grad
    got = torch.autograd.grad(_loss(o, o_dot), leaves)
    if kind in ("keypad", "bool_full"):  # fully masked rows: torch's math backend gives NaN gradients; exact: 0
        attn = _ref_attn(mask, causal, gqa)
    else:
        attn = _torch_attn(mask, is_causal=causal, enable_gqa=gqa)
    for name, g, r in zip(NAMES, got, _ref_grads((q, k, v), (q_dot, k_dot, v_dot), attn)):
        _close(name, g, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bfloat16"])
def test_tangent_grad_low_precision(device, dtype):
    """bf16: within 2x torch's own math-SDPA error in bf16 (+ floor), GQA with a key-padding mask without dead rows."""
    b, hq, hkv, nq, nk, d, kt = 2, 4, 2, _n(12, device), _n(18, device), 32, 2
    args = _inputs(b, hq, hkv, nq, nk, d, d, kt, dtype, device)
    keep = torch.rand(b, 1, 1, nk, device=device) > 0.3
    keep[..., 0] = True
    leaves = [t.clone().requires_grad_() for t in args]
    o, o_dot = attention_jvp(*leaves, attn_mask=keep, enable_gqa=True, tangent_grad=True)
    got = torch.autograd.grad(_loss(o, o_dot), leaves)
    ref = _ref_grads(args[:3], args[3:], _torch_attn(keep, enable_gqa=True))
    low = _ref_grads(args[:3], args[3:], _torch_attn(keep, dtype, enable_gqa=True), dtype=dtype)
    for name, g, r, lw in zip(NAMES, got, ref, low):
        _close_fa(name, g, r, lw, dtype)


@pytest.mark.gpu
def test_dropin_reverse_over_forward(device):
    """o, o_dot = torch.func.jvp(drop-in) (and forward_ad), then autograd.grad of a loss of both: equal to torch's
    math SDPA; torch.func.grad over torch.func.jvp (functorch all the way) too."""
    dtype = _exact_dtype(device)
    b, hq, hkv, n, d = 2, 4, 2, _n(10, device), 16
    prim = _inputs(b, hq, hkv, n, n, d, d, b, dtype, device)
    kw = dict(is_causal=True, enable_gqa=True)
    ref = _ref_grads(prim[:3], prim[3:], _torch_attn(None, **kw))
    leaves = [t.clone().requires_grad_() for t in prim]
    o, o_dot = torch.func.jvp(lambda a, c, e: scaled_dot_product_attention(a, c, e, **kw), tuple(leaves[:3]),
                              tuple(leaves[3:]))
    for name, g, r in zip(NAMES, torch.autograd.grad(_loss(o, o_dot), leaves), ref):
        _close("func.jvp " + name, g, r)
    leaves = [t.clone().requires_grad_() for t in prim]
    with fwAD.dual_level():
        out = scaled_dot_product_attention(*(fwAD.make_dual(p, t) for p, t in zip(leaves[:3], leaves[3:])), **kw)
        o, o_dot = fwAD.unpack_dual(out)
        grads = torch.autograd.grad(_loss(o, o_dot), leaves)
    for name, g, r in zip(NAMES, grads, ref):
        _close("forward_ad " + name, g, r)

    def loss_of_q(qq):
        o, o_dot = torch.func.jvp(lambda a, c, e: scaled_dot_product_attention(a, c, e, **kw), (qq, *prim[1:3]),
                                  tuple(prim[3:]))
        return _loss(o, o_dot)

    _close("func.grad dq", torch.func.grad(loss_of_q)(prim[0]), ref[0])


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.name()))
        return func(*args, **(kwargs or {}))


def test_stop_gradient_path_keeps_its_cost():
    """MeanFlow's path: detached tangents -> o_dot detached, no tangent (nor mu) saved, the flash backward runs. With
    tangent_grad but a loss of o alone, the flash backward runs too (grad_o_dot is None: no tangent backward)."""
    q, k, v, q_dot, k_dot, v_dot = _inputs(2, 2, 2, 9, 9, 16, 16, 1, torch.float32, "cpu")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        o, o_dot = attention_jvp(*leaves, q_dot, k_dot, v_dot)
    assert not o_dot.requires_grad
    assert not any(s.data_ptr() in {t.data_ptr() for t in (q_dot, k_dot, v_dot, o_dot)} for s in saved if s.numel())
    assert sum(s.numel() for s in saved) == sum(t.numel() for t in (q, k, v, o)) + 2 * 2 * 9  # + the LSE
    with _OpLog() as log:
        torch.autograd.grad(o.sum(), leaves)
    assert "mfkernels::attention_bwd" in log.ops and "mfkernels::attention_jvp_bwd" not in log.ops
    tangents = [t.clone().requires_grad_() for t in (q_dot, k_dot, v_dot)]
    o, o_dot = attention_jvp(*leaves, *tangents)  # tangent_grad=None: on, since the tangents require grad
    assert o_dot.requires_grad
    with _OpLog() as log:
        torch.autograd.grad(o.sum(), leaves)
    assert "mfkernels::attention_bwd" in log.ops and "mfkernels::attention_jvp_bwd" not in log.ops
    with _OpLog() as log:
        o, o_dot = attention_jvp(*leaves, *tangents)
        torch.autograd.grad(_loss(o, o_dot), leaves + tangents)
    assert "mfkernels::attention_jvp_bwd" in log.ops and "mfkernels::attention_bwd" not in log.ops


def test_opcheck_tangent_ops():
    q, k, v = (torch.randn(2, 2, n, 16, requires_grad=True) for n in (5, 7, 7))
    q_dot, k_dot, v_dot = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (5, 7, 7))
    keep = torch.rand(2, 1, 1, 7) > 0.3
    fwd = (q, k, v, q_dot, k_dot, v_dot, keep, False, 0.25, True)
    torch.library.opcheck(torch.ops.mfkernels.attention_jvp_fwd.default, fwd)
    o, o_dot, lse, mu = (t.detach() for t in torch.ops.mfkernels.attention_jvp_fwd(*fwd))
    prims = [t.detach() for t in (q, k, v, q_dot, k_dot, v_dot)]
    for grad_o in (torch.randn_like(o), None):
        args = (grad_o, torch.randn_like(o_dot), *prims, o, o_dot, lse, mu, keep, False, 0.25)
        torch.library.opcheck(torch.ops.mfkernels.attention_jvp_bwd.default, args)
