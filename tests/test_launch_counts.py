"""Kernel launches of each fused block op, forward and backward, counted on CPU below autograd (bench/bench_host.py's
LaunchCounter: aten ops that are not views or pure allocations, plus Triton launches; the kernels themselves are
stubbed out, counting needs no interpreter). Exact counts: a regression (an extra copy, a zero-filled gradient, an
unfused bias) fails here. The per-block totals are measured by `python bench/bench_host.py --parts launches`."""
import pytest
import torch

from bench.bench_host import LaunchCounter
from mfkernels.ops import ops_table

B, N, C, H, KT = 3, 4, 16, 24, 2

# op -> ((forward aten ops, forward Triton kernels), (backward aten ops, backward Triton kernels))
EXPECTED = {
    "layernorm_modulate": (({}, {"_layernorm_modulate_jvp_fwd_kernel": 1}),
                           ({"aten.sum.dim_IntList": 1}, {"_layernorm_modulate_bwd_kernel": 1})),  # dshift, dscale
    # df = gate dy; dgate = sum dy f; dx = dy as is (here x is a leaf, so AccumulateGrad copies it: a leaf cannot
    # take a gradient that another node still holds; in a network x comes from another op and no copy is made)
    "gated_residual": (({}, {"_gated_residual_jvp_fwd_kernel": 1}),
                       ({"aten.mul.Tensor": 2, "aten.sum.dim_IntList": 1, "aten.copy_.default": 1}, {})),
    "gelu_tanh": (({}, {"_act_jvp_fwd_kernel": 1}), ({}, {"_act_bwd_kernel": 1})),
    "silu": (({}, {"_act_jvp_fwd_kernel": 1}), ({}, {"_act_bwd_kernel": 1})),
    # y = addmm (bias in the GEMM's epilogue), y_dot = mm; dx, dW: mm, db: sum
    "linear": (({"aten.addmm.default": 1, "aten.mm.default": 1}, {}),
               ({"aten.mm.default": 2, "aten.sum.dim_IntList": 1}, {})),
    # GEMM 1 primal + tangent, GELU with bias and tangent, GEMM 2 primal (addmm) + tangent;
    # backward: dg, dW2, dW1, dx GEMMs, GELU' with g recomputed in one kernel, db1 and db2 sums
    "mlp": (({"aten.mm.default": 3, "aten.addmm.default": 1}, {"_act_jvp_fwd_kernel": 1}),
            ({"aten.mm.default": 4, "aten.sum.dim_IntList": 2}, {"_act_bwd_kernel": 1})),
    # the flash backward: delta, dK/dV, dQ; nothing is zero-filled for o_dot or the row statistics
    "attention": (({}, {"_attn_jvp_fwd_kernel": 1}),
                  ({}, {"_attn_bwd_preprocess_kernel": 1, "_attn_bwd_dkdv_kernel": 1, "_attn_bwd_dq_kernel": 1})),
    "rmsnorm": (({}, {"_rmsnorm_jvp_fwd_kernel": 1}), ({"aten.sum.dim_IntList": 1}, {"_rmsnorm_bwd_kernel": 1})),  # dw
    # GEMM 1 over [x; x_dot] (one cat), GEMM 2 primal + tangent; backward: dg, dx, dW13, dW2 GEMMs (no biases here)
    "swiglu": (({"aten.cat.default": 1, "aten.mm.default": 3}, {"_swiglu_jvp_fwd_kernel": 1}),
               ({"aten.mm.default": 4}, {"_swiglu_bwd_kernel": 1})),
    "rope": (({}, {"_rope_jvp_fwd_kernel": 1}), ({}, {"_rope_bwd_kernel": 1})),
    # q and k in one launch each way; dw_q, dw_k from the per-program partials
    "qk_norm_rope": (({}, {"_rope_jvp_fwd_kernel": 1}), ({"aten.sum.dim_IntList": 2}, {"_rope_bwd_kernel": 1})),
}


def call(op: str):
    """A call of the op on fresh leaves: () -> (the primal outputs, one tangent output)."""
    fused = ops_table("fused")
    leaf = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    x, shift, scale, f = leaf(B, N, C), leaf(B, C), leaf(B, C), leaf(B, N, C)
    xd, md = torch.randn(KT, N, C), torch.randn(KT, C)
    w1, b1, w2, b2 = leaf(H, C), leaf(H), leaf(C, H), leaf(C)
    q, k, v, wq, wk = leaf(B, 2, N, 8), leaf(B, 2, N, 8), leaf(B, 2, N, 8), leaf(8), leaf(8)  # (B, heads, N, Dh)
    qd, kd, vd = (torch.randn(KT, 2, N, 8) for _ in range(3))
    cos, sin = torch.randn(N, 4), torch.randn(N, 4)
    w13, w2h = leaf(2 * H, C), leaf(C, H)

    def one(y, y_dot):
        return (y,), y_dot

    return {
        "layernorm_modulate": lambda: one(*fused.layernorm_modulate(x, shift, scale, xd, md, md)),
        "gated_residual": lambda: one(*fused.gated_residual(x, scale, f, xd, md, xd)),
        "gelu_tanh": lambda: one(*fused.gelu_tanh(x, xd)),
        "silu": lambda: one(*fused.silu(shift, md)),
        "linear": lambda: one(*fused.linear(x, w1, b1, xd)),
        "mlp": lambda: one(*fused.mlp(x, w1, b1, w2, b2, xd)),
        "attention": lambda: one(*fused.attention(q, k, v, qd, kd, vd)),
        "rmsnorm": lambda: one(*fused.rmsnorm(q, wq, qd)),
        "swiglu": lambda: one(*fused.swiglu(x, w13, None, w2h, None, xd)),
        "rope": lambda: one(*fused.rope(q, cos, sin, qd)),
        "qk_norm_rope": lambda: (lambda o: (o[:2], o[2]))(fused.qk_norm_rope(q, k, wq, wk, cos, sin, qd, kd)),
    }[op]


@pytest.fixture(autouse=True)
def _no_poison():
    """Outputs allocated as in production (conftest's NaN poisoning would add a fill per output)."""
    from mfkernels import _runtime

    _runtime.set_poison(False)


@pytest.mark.parametrize("op", list(EXPECTED))
def test_launches_per_op(op):
    fn = call(op)
    with LaunchCounter(stub_triton=True) as fwd:
        ys, y_dot = fn()
    assert y_dot.shape[0] == KT
    with LaunchCounter(stub_triton=True) as bwd:
        # one gradient per leaf, referenced nowhere else: AccumulateGrad takes it as is (no accumulation kernel)
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
    assert bwd.aten.pop("aten.ones_like.default") == len(ys)
    (fwd_aten, fwd_triton), (bwd_aten, bwd_triton) = EXPECTED[op]
    assert (dict(fwd.aten), dict(fwd.triton)) == (fwd_aten, fwd_triton)
    assert (dict(bwd.aten), dict(bwd.triton)) == (bwd_aten, bwd_triton)


def test_a_dit_block_backward_fills_no_zero_gradients():
    """The tangent outputs are non-differentiable: their gradients must not be materialised as zero tensors (every
    op's setup_context sets ctx.set_materialize_grads(False)). Per block = depth 2 minus depth 1; the fused table,
    attention included."""
    from meanflow import DiT

    ops = ops_table("fused")

    def filled(depth):
        torch.manual_seed(0)
        net = DiT(input_size=4, in_channels=1, hidden=16, depth=depth, heads=2, patch=2, num_classes=3,
                  backend="fused")
        z, t = torch.randn(4, 1, 4, 4), torch.rand(4)
        with LaunchCounter(stub_triton=True):
            u, _ = net._forward_jvp(z, t, t * 0.5, torch.tensor([0, 1, 2, 3]), z[:KT], torch.ones(KT),
                                    torch.ones(KT), ops)
        with LaunchCounter(stub_triton=True) as bwd:
            u.sum().backward()
        return sum(v for k, v in bwd.aten.items() if "zero" in k or "fill" in k or "full" in k), bwd.total

    (fill1, total1), (fill2, total2) = filled(1), filled(2)
    assert fill2 == fill1 and total2 > total1
