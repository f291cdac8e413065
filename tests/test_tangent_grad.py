"""Gradients through the tangent (`tangent_grad`) of every op a network calls through the op table, both tables.

For each op, the gradient of a random scalar of (y, y_dot), L = <R, y> + <R', y_dot>, with respect to the primal
inputs, the tangents and the weights, against an independent oracle: a float64 plain function of the op (written here
from ordinary torch ops, the layer norms included: torch's forward-mode F.layer_norm is not twice differentiable
correctly), its tangent by torch.func.jvp over the first kt rows, both differentiated by autograd. Every argument is
built from the leaves by the same `build` on both sides, so the layouts users pass (per-head views of a qkv projection,
adaLN chunks with a row stride, stride-0 gates broadcast over the batch, tangents whose strides differ from the
primal's) reach the ops while the gradients are compared on the leaves. Kernel outputs are NaN-poisoned (conftest).

Also: with tangent_grad off the tangent stays detached and no op saves a tangent (the stop-gradient path is
unchanged); the None rule; the op table's tangent_grad; opcheck of the ops with tangent_grad; torch.compile
(fullgraph) of a chain against eager. Long sweeps (every op x kt x dtype) are marked `sweep` (run with --full).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from mfkernels import nn as mnn
from mfkernels.ops import ops_table

F64 = torch.float64
GELU_K, GELU_C = math.sqrt(2 / math.pi), 0.044715
# max |got - want| / max |want| per leaf; bf16 stores every kernel output (and the reference its products) in bf16
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.5e-2}


# ------------------------------------------------------------------------------------------- plain float64 oracles
def gelu_tanh(a):
    return 0.5 * a * (1 + torch.tanh(GELU_K * (a + GELU_C * a ** 3)))


def layer_norm(x, eps=1e-6):
    xc = x - x.mean(-1, keepdim=True)
    return xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)


def rms_norm(x, w, eps=1e-6):
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def rotate(x, cos, sin, interleaved):
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def attention(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return p @ v


# ----------------------------------------------------------------------------------------------------- op specs
@dataclass
class Spec:
    """An op under test. leaves(B, kt) -> {name: tensor}; build(L) -> the op's arguments (views of the leaves);
    batched: the argument names of the batch-row primals, tangents: their tangents' names (same order);
    op(ops, A) -> (outputs, tangent outputs); plain(A) -> outputs (A with the batch-row primals possibly sliced)."""

    leaves: Callable
    build: Callable
    batched: tuple[str, ...]
    tangents: tuple[str, ...]
    op: Callable
    plain: Callable
    constants: tuple[str, ...] = field(default=())  # leaves that take no gradient (RoPE angles)


def _r(*shape):
    return torch.randn(*shape, dtype=F64)


def _same(L):
    return dict(L)


N, C, H, DH = 3, 13, 10, 6  # odd widths; DH: three RoPE pairs


def _views_of_qkv(L):
    """q, k, v as (B, heads, N, Dh) views of a fused (B, N, 3, heads, Dh) projection; tangents from a (kt, 3, N, heads,
    Dh) buffer: strides unlike the primals'."""
    q, k, v = L["qkv"].permute(2, 0, 3, 1, 4).unbind(0)
    qd, kd, vd = L["qkv_dot"].permute(1, 0, 3, 2, 4).unbind(0)
    return q, k, v, qd, kd, vd


SPECS = {
    "linear": Spec(
        lambda B, kt: dict(x=_r(B, N, 7), w=_r(5, 7), b=_r(5), x_dot=_r(kt, N, 7)), _same,
        ("x",), ("x_dot",),
        lambda ops, A: tuple(map(lambda t: (t,), ops.linear(A["x"], A["w"], A["b"], A["x_dot"]))),
        lambda A: (F.linear(A["x"], A["w"], A["b"]),)),
    "silu": Spec(
        lambda B, kt: dict(a=_r(B, C), a_dot=_r(kt, C)), _same, ("a",), ("a_dot",),
        lambda ops, A: tuple(map(lambda t: (t,), ops.silu(A["a"], A["a_dot"]))),
        lambda A: (A["a"] * torch.sigmoid(A["a"]),)),
    "gelu_tanh": Spec(
        lambda B, kt: dict(a=_r(B, N, C), a_dot=_r(kt, N, C)), _same, ("a",), ("a_dot",),
        lambda ops, A: tuple(map(lambda t: (t,), ops.gelu_tanh(A["a"], A["a_dot"]))),
        lambda A: (gelu_tanh(A["a"]),)),
    "mlp": Spec(
        lambda B, kt: dict(x=_r(B, N, 6), w1=_r(H, 6) * 0.4, b1=_r(H), w2=_r(6, H) * 0.3, b2=_r(6),
                           x_dot=_r(kt, N, 6)), _same, ("x",), ("x_dot",),
        lambda ops, A: tuple(map(lambda t: (t,), ops.mlp(A["x"], A["w1"], A["b1"], A["w2"], A["b2"], A["x_dot"]))),
        lambda A: (F.linear(gelu_tanh(F.linear(A["x"], A["w1"], A["b1"])), A["w2"], A["b2"]),)),
    "swiglu": Spec(
        lambda B, kt: dict(x=_r(B, N, 6), w13=_r(2 * H, 6) * 0.4, b13=_r(2 * H), w2=_r(5, H) * 0.3, b2=_r(5),
                           x_dot=_r(kt, N, 6)), _same, ("x",), ("x_dot",),
        lambda ops, A: tuple(map(lambda t: (t,), ops.swiglu(A["x"], A["w13"], A["b13"], A["w2"], A["b2"],
                                                            A["x_dot"]))),
        lambda A: (F.linear((lambda ab: F.silu(ab[0]) * ab[1])(F.linear(A["x"], A["w13"], A["b13"]).chunk(2, -1)),
                            A["w2"], A["b2"]),)),
    # adaLN chunks: shift / scale (and their tangents) are (B, C) column blocks of one (B, 3C) buffer (row stride 3C);
    # x_dot is a transposed buffer's view (its own strides)
    "layernorm_modulate": Spec(
        lambda B, kt: dict(x=_r(B, N, C), mod=_r(B, 3 * C) * 0.5, x_dot=_r(kt, C, N), mod_dot=_r(kt, 3 * C)),
        lambda L: dict(x=L["x"], shift=L["mod"][:, :C], scale=L["mod"][:, 2 * C:], x_dot=L["x_dot"].transpose(1, 2),
                       shift_dot=L["mod_dot"][:, :C], scale_dot=L["mod_dot"][:, 2 * C:]),
        ("x", "shift", "scale"), ("x_dot", "shift_dot", "scale_dot"),
        lambda ops, A: tuple(map(lambda t: (t,), ops.layernorm_modulate(A["x"], A["shift"], A["scale"], A["x_dot"],
                                                                        A["shift_dot"], A["scale_dot"]))),
        lambda A: (layer_norm(A["x"]) * (1 + A["scale"][:, None]) + A["shift"][:, None],)),
    "gated_residual": Spec(
        lambda B, kt: dict(x=_r(B, N, C), gate=_r(B, 2 * C), f=_r(B, N, C), x_dot=_r(kt, N, C), gate_dot=_r(kt, C),
                           f_dot=_r(kt, N, C)),
        lambda L: dict(x=L["x"], gate=L["gate"][:, C:], f=L["f"], x_dot=L["x_dot"], gate_dot=L["gate_dot"],
                       f_dot=L["f_dot"]),
        ("x", "gate", "f"), ("x_dot", "gate_dot", "f_dot"),
        lambda ops, A: tuple(map(lambda t: (t,), ops.gated_residual(A["x"], A["gate"], A["f"], A["x_dot"],
                                                                    A["gate_dot"], A["f_dot"]))),
        lambda A: (A["x"] + A["gate"][:, None] * A["f"],)),
    # iMF's scaled residual: the gate is a (C,) parameter broadcast over the batch (a stride-0 view), no tangent
    "scaled_residual": Spec(
        lambda B, kt: dict(x=_r(B, N, C), f=_r(B, N, C), scale=_r(C), x_dot=_r(kt, N, C), f_dot=_r(kt, N, C)),
        _same, ("x", "f"), ("x_dot", "f_dot"),
        lambda ops, A: tuple(map(lambda t: (t,), mnn.scaled_residual_jvp(A["x"], A["f"], A["scale"], A["x_dot"],
                                                                         A["f_dot"], ops))),
        lambda A: (A["x"] + A["f"] * A["scale"],)),
    "rmsnorm": Spec(
        lambda B, kt: dict(qkv=_r(B, N, 3, 2, DH), w=_r(DH), qkv_dot=_r(kt, 3, N, 2, DH)),
        lambda L: dict(x=L["qkv"][:, :, 1].transpose(1, 2), w=L["w"],
                       x_dot=L["qkv_dot"][:, 1].transpose(1, 2)),
        ("x",), ("x_dot",),
        lambda ops, A: tuple(map(lambda t: (t,), ops.rmsnorm(A["x"], A["w"], A["x_dot"]))),
        lambda A: (rms_norm(A["x"], A["w"]),)),
    "rope": Spec(
        lambda B, kt: dict(qkv=_r(B, N, 3, 2, DH), qkv_dot=_r(kt, 3, N, 2, DH), cos=_r(N, DH // 2),
                           sin=_r(N, DH // 2)),
        lambda L: dict(x=L["qkv"][:, :, 0].transpose(1, 2), x_dot=L["qkv_dot"][:, 0].transpose(1, 2), cos=L["cos"],
                       sin=L["sin"]),
        ("x",), ("x_dot",),
        lambda ops, A: tuple(map(lambda t: (t,), ops.rope(A["x"], A["cos"], A["sin"], A["x_dot"]))),
        lambda A: (rotate(A["x"], A["cos"], A["sin"], True),), constants=("cos", "sin")),
    "qk_norm_rope": Spec(
        lambda B, kt: dict(qkv=_r(B, N, 3, 2, DH), qkv_dot=_r(kt, 3, N, 2, DH), wq=_r(DH), wk=_r(DH),
                           cos=_r(N, DH // 2), sin=_r(N, DH // 2)),
        lambda L: dict(zip(("q", "k", "v", "q_dot", "k_dot", "v_dot"), _views_of_qkv(L)), wq=L["wq"], wk=L["wk"],
                       cos=L["cos"], sin=L["sin"]),
        ("q", "k"), ("q_dot", "k_dot"),
        lambda ops, A: (lambda o: (o[:2], o[2:]))(ops.qk_norm_rope(A["q"], A["k"], A["wq"], A["wk"], A["cos"],
                                                                  A["sin"], A["q_dot"], A["k_dot"])),
        lambda A: (rotate(rms_norm(A["q"], A["wq"]), A["cos"], A["sin"], True),
                   rotate(rms_norm(A["k"], A["wk"]), A["cos"], A["sin"], True)), constants=("cos", "sin")),
    "attention": Spec(
        lambda B, kt: dict(qkv=_r(B, N + 2, 3, 2, 8), qkv_dot=_r(kt, 3, N + 2, 2, 8)),
        lambda L: dict(zip(("q", "k", "v", "q_dot", "k_dot", "v_dot"), _views_of_qkv(L))),
        ("q", "k", "v"), ("q_dot", "k_dot", "v_dot"),
        lambda ops, A: tuple(map(lambda t: (t,), ops.attention(A["q"], A["k"], A["v"], A["q_dot"], A["k_dot"],
                                                               A["v_dot"]))),
        lambda A: (attention(A["q"], A["k"], A["v"]),)),
}


def make_leaves(spec: Spec, batch: int, kt: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fresh leaves, rounded once to `dtype` (so the oracle sees exactly the values the op gets)."""
    return {n: t.to(dtype).to(F64) for n, t in spec.leaves(batch, kt).items()}


def grads_of(spec: Spec, leaves, weights, kt: int, run: Callable, dtype: torch.dtype):
    """(gradients of L w.r.t. the differentiable leaves, the tangent outputs) for run(A) -> (outs, dots)."""
    L = {n: t.to(dtype).requires_grad_(n not in spec.constants) for n, t in leaves.items()}
    outs, dots = run(spec.build(L))
    loss = sum((r.to(o.dtype) * o).sum() for r, o in zip(weights[0], outs))
    loss = loss + sum((r.to(d.dtype) * d).sum() for r, d in zip(weights[1], dots))
    names = [n for n in L if n not in spec.constants]
    grads = torch.autograd.grad(loss, [L[n] for n in names], allow_unused=True)
    return dict(zip(names, grads)), dots


def oracle(spec: Spec, A, kt: int):
    """(outputs, tangent outputs) of the plain float64 function: torch.func.jvp over the first kt rows."""
    outs = spec.plain(A)
    if kt == 0:
        return outs, tuple(o[:0] for o in outs)

    def f(*rows):
        return spec.plain({**A, **dict(zip(spec.batched, rows))})

    _, dots = torch.func.jvp(f, tuple(A[n][:kt] for n in spec.batched), tuple(A[n] for n in spec.tangents))
    return outs, dots


def check_op(name: str, impl: str, dtype: torch.dtype, batch: int = 3, kt: int = 2, ops=None):
    spec = SPECS[name]
    leaves = make_leaves(spec, batch, kt, dtype)
    outs = spec.plain(spec.build(leaves))
    out_dots = tuple(o[:kt] for o in outs)
    weights = ([_r(*o.shape) for o in outs], [_r(*o.shape) for o in out_dots])
    want, want_dots = grads_of(spec, leaves, weights, kt, lambda A: oracle(spec, A, kt), F64)
    ops = ops or ops_table(impl, tangent_grad=True)
    got, dots = grads_of(spec, leaves, weights, kt, lambda A: spec.op(ops, A), dtype)
    if kt:
        assert all(d.requires_grad for d in dots), f"{name}: a tangent output is detached under tangent_grad=True"
    for leaf, w in want.items():
        g = got[leaf]
        if w is None or w.numel() == 0:
            continue
        assert g is not None, f"{name} [{impl}, {dtype}]: no gradient for {leaf}"
        assert torch.isfinite(g).all(), f"{name} [{impl}, {dtype}]: non-finite gradient for {leaf}"
        err = (g.to(F64) - w).abs().max().item() / max(w.abs().max().item(), 1e-12)
        assert err <= TOL[dtype], f"{name} [{impl}, {dtype}, kt={kt}/{batch}]: d/d{leaf} relative error {err:.3g}"


# ---------------------------------------------------------------------------------------------- default run
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("name", list(SPECS))
def test_tangent_grad_float64(name, impl):
    """Every op, both tables, float64, an odd shape with kt = 2 of B = 3 rows and the op's strided layout."""
    check_op(name, impl, F64)


@pytest.mark.parametrize("name,kt", [("layernorm_modulate", 0), ("rmsnorm", 1), ("qk_norm_rope", 3), ("swiglu", 3)])
def test_tangent_grad_tangent_batches(name, kt):
    """kt = 0 (no tangent: the primal backward), 1, and B (every row), fused, float64."""
    check_op(name, "fused", F64, batch=3, kt=kt)


@pytest.mark.parametrize("name,dtype", [("layernorm_modulate", torch.float32), ("qk_norm_rope", torch.float32),
                                        ("rmsnorm", torch.bfloat16), ("mlp", torch.bfloat16)])
def test_tangent_grad_low_precision(name, dtype):
    """fp32 and bf16 against the float64 oracle on the same rounded inputs (TOL per dtype)."""
    check_op(name, "fused", dtype)


def test_rope_half_pairing_and_per_sample_angles():
    """RoPE's other pairing (x[i], x[i + D/2]) and angles with a batch dim of their own (sliced to the tangent rows)."""
    spec = SPECS["rope"]
    per_sample = Spec(
        lambda B, kt: dict(x=_r(B, N, DH), x_dot=_r(kt, N, DH), cos=_r(B, N, DH // 2), sin=_r(B, N, DH // 2)), _same,
        ("x",), ("x_dot",),
        lambda ops, A: tuple(map(lambda t: (t,), ops.rope(A["x"], A["cos"], A["sin"], A["x_dot"],
                                                          interleaved=False))),
        lambda A: (rotate(A["x"], A["cos"][:A["x"].shape[0]], A["sin"][:A["x"].shape[0]], False),),
        constants=spec.constants)
    SPECS["rope_per_sample"] = per_sample
    try:
        for impl in ("reference", "fused"):
            check_op("rope_per_sample", impl, F64)
    finally:
        del SPECS["rope_per_sample"]


# ----------------------------------------------------------------------------------------------- sweeps (--full)
@pytest.mark.sweep
@pytest.mark.parametrize("kt", [0, 1, 3])
@pytest.mark.parametrize("name", list(SPECS))
def test_sweep_tangent_batches(name, kt):
    check_op(name, "fused", F64, batch=3, kt=kt)


@pytest.mark.sweep
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", [n for n in SPECS if n != "attention"])
def test_sweep_dtypes(name, dtype):
    check_op(name, "fused", dtype)


@pytest.mark.sweep
@pytest.mark.parametrize("name", list(SPECS))
def test_sweep_batch_one(name):
    check_op(name, "fused", F64, batch=1, kt=1)


# --------------------------------------------------------------------------------------- the stop-gradient path
def _saved(fn):
    """The tensors autograd saves while fn runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("name", ["layernorm_modulate", "gated_residual", "rmsnorm", "qk_norm_rope", "mlp", "swiglu",
                                  "gelu_tanh"])
def test_off_saves_no_tangent(name, impl):
    """tangent_grad False (and the default with tangents that need no grad): the tangent outputs are detached and no
    op saves a tangent input; with tangent_grad True the same call saves them (so the check can fail)."""
    spec = SPECS[name]
    leaves = {n: t.requires_grad_(n not in spec.constants and n not in ("x_dot", "qkv_dot", "mod_dot", "gate_dot",
                                                                        "f_dot", "a_dot"))
              for n, t in make_leaves(spec, 3, 2, F64).items()}
    A = spec.build(leaves)
    tangent_ptrs = {A[n].untyped_storage().data_ptr() for n in spec.tangents}
    counts = []
    for tangent_grad in (None, False):
        (outs, dots), saved = _saved(lambda: spec.op(ops_table(impl, tangent_grad=tangent_grad), A))
        assert not any(d.requires_grad for d in dots)
        assert all(o.requires_grad for o in outs)
        assert not tangent_ptrs & {t.untyped_storage().data_ptr() for t in saved}, f"{name}: a tangent was saved"
        counts.append(len(saved))
    _, saved = _saved(lambda: spec.op(ops_table(impl, tangent_grad=True), A))
    assert counts[0] == counts[1] < len(saved)


def test_none_rule_follows_the_tangents():
    """tangent_grad=None: the tangent output is differentiable exactly when a tangent input requires grad (and grad
    mode is on); an explicit False detaches even then."""
    fused = ops_table("fused")
    x, w = torch.randn(3, 4, 8), torch.randn(8)
    x_dot = torch.randn(2, 4, 8, requires_grad=True)
    assert fused.rmsnorm(x, w, x_dot)[1].requires_grad
    assert not fused.rmsnorm(x, w, x_dot.detach())[1].requires_grad
    assert not fused.rmsnorm(x, w, x_dot, tangent_grad=False)[1].requires_grad
    with torch.no_grad():
        assert not fused.rmsnorm(x, w, x_dot, tangent_grad=True)[1].requires_grad
    # the weight's dependence is what True adds: x_dot needs no grad, w does
    assert fused.rmsnorm(x, w.requires_grad_(), x_dot.detach(), tangent_grad=True)[1].requires_grad


def test_tables():
    """ops_table(impl, tangent_grad=...) is built once per choice and says which it is."""
    for impl in ("reference", "fused"):
        for choice in (None, True, False):
            table = ops_table(impl, checked=False, tangent_grad=choice)
            assert table is ops_table(impl, checked=False, tangent_grad=choice)
            assert table.tangent_grad is choice and table.name == impl and not table.checked
    with pytest.raises(TypeError, match="tangent_grad"):
        ops_table("fused", tangent_grad="yes")
    with pytest.raises(TypeError, match="tangent_grad"):
        ops_table("fused").rmsnorm(torch.randn(2, 4), None, torch.randn(1, 4), tangent_grad=1)


# ------------------------------------------------------------------------------------------- registration, compile
def _r64(*shape, grad=False):
    return torch.randn(*shape, dtype=F64).requires_grad_(grad)


def opcheck_cases():
    """The forward ops with tangent_grad=True and tangents that require grad: opcheck also runs their autograd
    formula, the tangent backward ops included."""
    B, kt, L, D = 3, 2, 4, 8
    g = lambda *s: _r64(*s, grad=True)  # noqa: E731
    ops_table("fused")  # registers the ops
    ops = torch.ops.mfkernels
    cos, sin = _r64(L, D // 2), _r64(L, D // 2)
    return {
        "layernorm_modulate_fwd": (ops.layernorm_modulate_fwd, (g(B, L, D), g(B, D), g(B, D), g(kt, L, D), g(kt, D),
                                                                 g(kt, D), 1e-6, True, True)),
        "gelu_tanh_fwd": (ops.gelu_tanh_fwd, (g(B, L, D), g(kt, L, D), True)),
        "mlp_fwd": (ops.mlp_fwd, (g(B, L, D), g(6, D), g(6), g(D, 6), g(D), g(kt, L, D), True, True)),
        "swiglu_fwd": (ops.swiglu_fwd, (g(B, L, D), g(12, D), None, g(5, 6), g(5), g(kt, L, D), True, True)),
        "gated_residual_fwd": (ops.gated_residual_fwd, (g(B, L, D), g(B, D), g(B, L, D), g(kt, L, D), g(kt, D),
                                                         g(kt, L, D), True)),
        "rmsnorm_fwd": (ops.rmsnorm_fwd, (g(B, 2, L, D), g(D), g(kt, 2, L, D), 1e-6, True)),
        "rope_fwd": (ops.rope_fwd, (g(B, 2, L, D), cos, sin, g(kt, 2, L, D), True, True)),
        "qk_norm_rope_fwd": (ops.qk_norm_rope_fwd, (g(B, 2, L, D), g(B, 2, L, D), g(D), g(D), cos, sin,
                                                     g(kt, 2, L, D), g(kt, 2, L, D), 1e-6, True, True)),
    }


@pytest.mark.parametrize("case", ["layernorm_modulate_fwd", "gelu_tanh_fwd", "mlp_fwd", "swiglu_fwd",
                                  "gated_residual_fwd", "rmsnorm_fwd", "rope_fwd", "qk_norm_rope_fwd"])
def test_opcheck_tangent_grad(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op.default, args)


def _chain(ops, p, t):
    """A DiT-like chain of the fused ops with a loss of the final tangent, as TVM's."""
    c, c_dot = ops.silu(p["c"], t["c_dot"])
    h, h_dot = ops.layernorm_modulate(p["x"], c, p["scale"], t["x_dot"], c_dot, t["scale_dot"])
    m, m_dot = ops.mlp(h, p["w1"], p["b1"], p["w2"], p["b2"], h_dot)
    y, y_dot = ops.gated_residual(p["x"], c, m, t["x_dot"], c_dot, m_dot)
    r, r_dot = ops.rmsnorm(y, p["wr"], y_dot)
    return (r * r).sum() + (r_dot * torch.sin(r[:r_dot.shape[0]])).sum()


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compile_fullgraph_equals_eager(backend):
    """torch.compile(fullgraph=True) of a chain with tangent_grad=True: one graph, gradients equal to eager (the
    tangent backward ops traced by AOT autograd through their registered fakes)."""
    torch.manual_seed(0)
    B, L, D, Hd, kt = 3, 4, 8, 12, 2
    p = {n: torch.randn(*s).requires_grad_() for n, s in dict(c=(B, D), x=(B, L, D), scale=(B, D), w1=(Hd, D),
                                                                b1=(Hd,), w2=(D, Hd), b2=(D,), wr=(D,)).items()}
    t = dict(c_dot=torch.randn(kt, D), x_dot=torch.randn(kt, L, D), scale_dot=torch.randn(kt, D))
    ops = ops_table("fused", tangent_grad=True)
    eager = torch.autograd.grad(_chain(ops, p, t), list(p.values()))
    torch._dynamo.reset()
    compiled = torch.compile(_chain, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(ops, p, t), list(p.values()))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
