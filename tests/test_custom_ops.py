"""The fused block ops as torch.library custom ops (mfkernels._library.FusedOp): opcheck, the eager fast path against
the registered op, and torch.compile(fullgraph=True) of a chain of every op against eager, forward and backward."""
import pytest
import torch

from mfkernels import activations, mlp, norm, residual
from mfkernels._library import FusedOp, _plain_eager

OPS = torch.ops.mfkernels
F64 = torch.float64


@pytest.fixture(autouse=True)
def _no_stale_aot_autograd_cache():
    """AOTAutogradCache keys a compiled graph on the Dynamo graph, not on a custom op's Python autograd formula: after
    an edit of an op's backward (or with another checkout's cache in a shared /tmp) it could replay the old one."""
    import torch._functorch.config

    # the config module's own patch: monkeypatch's undo deletes the key on torch 2.13 + pytest 9.2
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def r(*shape, grad=False, dtype=F64):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def opcheck_cases(kt):
    """(op, args) for every fused op; primals that require grad so that opcheck also checks the autograd formula."""
    B, N, C, H = 3, 5, 24, 40
    x, mod = r(B, N, C), r(B, C)
    stats = r(B * N).abs() + 0.5
    return {
        "layernorm_modulate_fwd": (OPS.layernorm_modulate_fwd, (r(B, N, C, grad=True), r(B, C, grad=True),
                                                                 r(B, C, grad=True), r(kt, N, C), r(kt, C), r(kt, C),
                                                                 1e-6, True)),
        "layernorm_modulate_fwd (no stats)": (OPS.layernorm_modulate_fwd, (x, mod, mod, r(kt, N, C), r(kt, C),
                                                                            r(kt, C), 1e-6, False)),
        "layernorm_modulate_bwd": (OPS.layernorm_modulate_bwd, (r(B, N, C), x, mod, stats, stats, True, True)),
        "layernorm_modulate_bwd (dmod only)": (OPS.layernorm_modulate_bwd, (r(B, N, C), x, mod, stats, stats,
                                                                             False, True)),
        "gelu_tanh_fwd": (OPS.gelu_tanh_fwd, (r(B, N, C, grad=True), r(kt, N, C))),
        "gelu_tanh_bwd": (OPS.gelu_tanh_bwd, (r(B, N, C), r(B, N, C))),
        "silu_fwd": (OPS.silu_fwd, (r(B, C, grad=True), r(kt, C))),
        "silu_bwd": (OPS.silu_bwd, (r(B, C), r(B, C))),
        "mlp_fwd": (OPS.mlp_fwd, (r(B, N, C, grad=True), r(H, C, grad=True), r(H, grad=True), r(C, H, grad=True),
                                  r(C, grad=True), r(kt, N, C), True)),
        "mlp_fwd (no biases)": (OPS.mlp_fwd, (r(B, N, C, grad=True), r(H, C, grad=True), None, r(C, H, grad=True),
                                              None, r(kt, N, C), True)),
        "gelu_tanh_bias_bwd": (OPS.gelu_tanh_bias_bwd, (r(B * N, H), r(H), r(B * N, H), True, True)),
        "gated_residual_fwd": (OPS.gated_residual_fwd, (r(B, N, C, grad=True), r(B, C, grad=True),
                                                         r(B, N, C, grad=True), r(kt, N, C), r(kt, C), r(kt, N, C))),
    }


@pytest.mark.sweep
@pytest.mark.parametrize("kt", [0, 2])
@pytest.mark.parametrize("case", list(opcheck_cases(0)))
def test_opcheck(case, kt):
    """Schema, fake tensor kernel (shapes, dtypes, strides), autograd registration, AOT dispatch (static and dynamic)."""
    op, args = opcheck_cases(kt)[case]
    torch.library.opcheck(op.default, args)


# ----------------------------------------------------------------------------------------------- one chain of every op
B, N, C, H, KT = 3, 5, 24, 40, 2


def make_inputs(dtype=torch.float32):
    torch.manual_seed(0)
    primals = dict(x=r(B, N, C, grad=True, dtype=dtype), shift=r(B, C, grad=True, dtype=dtype),
                   scale=r(B, C, grad=True, dtype=dtype) * 0.5, w1=r(H, C, grad=True, dtype=dtype) * C ** -0.5,
                   b1=r(H, grad=True, dtype=dtype), w2=r(C, H, grad=True, dtype=dtype) * H ** -0.5,
                   b2=r(C, grad=True, dtype=dtype), wl=r(C, C, grad=True, dtype=dtype) * C ** -0.5)
    primals = {k: v.detach().requires_grad_() for k, v in primals.items()}
    tangents = dict(x_dot=r(KT, N, C, dtype=dtype), shift_dot=r(KT, C, dtype=dtype), scale_dot=r(KT, C, dtype=dtype))
    return primals, tangents


def chain(p, t):
    """Every fused op once, in DiT order; returns a scalar to differentiate and the tangent outputs."""
    s, s_dot = activations.silu_jvp(p["shift"], t["shift_dot"])                       # conditioning path
    h, h_dot = norm.layernorm_modulate_jvp(p["x"], s, p["scale"], t["x_dot"], s_dot, t["scale_dot"])
    a, a_dot = mlp.linear_jvp(h, p["wl"], None, h_dot)
    g, g_dot = activations.gelu_tanh_jvp(a, a_dot)
    m, m_dot = mlp.mlp_jvp(g, p["w1"], p["b1"], p["w2"], p["b2"], g_dot)
    y, y_dot = residual.gated_residual_jvp(p["x"], s, m, t["x_dot"], s_dot, m_dot)
    return y.square().sum(), y_dot, m_dot, h_dot


def run(fn, p, t):
    loss, *tangent_outs = fn(p, t)
    grads = torch.autograd.grad(loss, list(p.values()))
    return loss, tangent_outs, grads


def test_eager_fast_path_equals_the_registered_ops(monkeypatch):
    """An eager call skips the custom op's dispatch (FusedOp runs the same functions through an autograd.Function);
    forcing every call through torch.ops.mfkernels.* must give bit-identical outputs and gradients."""
    p, t = make_inputs()
    fast = run(chain, p, t)
    assert _plain_eager((p["x"],)) and not _plain_eager((torch.empty(1, device="meta").as_subclass(_Sub),))
    monkeypatch.setattr("mfkernels._library._plain_eager", lambda args: False)
    via_ops = run(chain, p, t)
    for a, b in zip(torch.utils._pytree.tree_leaves(fast), torch.utils._pytree.tree_leaves(via_ops)):
        assert torch.equal(a, b)


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_equals_eager(backend):
    """fullgraph=True (any graph break raises), outputs and every parameter gradient equal to eager; y_dot stays
    non-differentiable in the compiled graph too."""
    p, t = make_inputs()
    eager = run(chain, p, t)
    torch._dynamo.reset()
    compiled_chain = torch.compile(chain, fullgraph=True, backend=backend)
    got = run(compiled_chain, p, t)
    tol = dict(atol=1e-5, rtol=1e-5) if backend == "aot_eager" else dict(atol=1e-4, rtol=1e-4)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(eager)):
        torch.testing.assert_close(a, b, **tol)
    _, y_dot, *_ = compiled_chain(p, t)
    assert not y_dot.requires_grad


def test_explain_reports_no_graph_break_and_one_node_per_op():
    p, t = make_inputs()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(chain)(p, t)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    for name in ("silu_fwd", "layernorm_modulate_fwd", "gelu_tanh_fwd", "mlp_fwd", "gated_residual_fwd"):
        assert sum(f"mfkernels.{name}" in s for s in targets) == 1, (name, targets)


def test_compile_under_autocast_matches_eager():
    """The MLP / linear cast to the autocast dtype before their ops (traced by Dynamo as in eager)."""
    p, t = make_inputs()

    def fn(p, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return chain(p, t)

    eager = run(fn, p, t)
    torch._dynamo.reset()
    got = run(torch.compile(fn, fullgraph=True, backend="aot_eager"), p, t)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(eager)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_fused_op_refuses_where_triton_cannot_run(monkeypatch):
    """The registered op names what it needs (the public functions fall back to the reference before calling it)."""
    from mfkernels import _runtime

    monkeypatch.setattr(_runtime, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="mfkernels::gated_residual_fwd runs Triton kernels"):
        OPS.gated_residual_fwd(r(2, 3, 8), r(2, 8), r(2, 3, 8), r(1, 3, 8), r(1, 8), r(1, 3, 8))
    assert isinstance(norm._fwd, FusedOp) and "layernorm_modulate_fwd" in repr(norm._fwd)
