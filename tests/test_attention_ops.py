"""The attention custom ops as torch.library ops: opcheck (schema, fake tensors, autograd registration, AOT dispatch;
the tangent-backward op: test_attention_tangent_grad.py) and torch.compile with fullgraph=True under inductor on CPU of
attention_jvp and of the SDPA drop-in without forward mode, equal to eager, with zero graph breaks."""
from __future__ import annotations

import warnings

import pytest
import torch

from mfkernels.attention import attention_jvp, scaled_dot_product_attention


def _t(*shape, grad=False, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


def test_opcheck_forward_and_backward_ops():
    q, k, v = _t(2, 2, 5, 16, grad=True), _t(2, 2, 7, 16, grad=True), _t(2, 2, 7, 16, grad=True)
    q_dot, k_dot, v_dot = _t(1, 2, 5, 16), _t(1, 2, 7, 16), _t(1, 2, 7, 16)
    args = (q, k, v, q_dot, k_dot, v_dot, None, False, 0.25)
    torch.library.opcheck(torch.ops.mfkernels.attention_jvp_fwd.default, args + (False,))
    o, _, lse, _ = torch.ops.mfkernels.attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, None, True, 0.25, False)
    args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse, None, True, 0.25)
    torch.library.opcheck(torch.ops.mfkernels.attention_bwd.default, args)


def _loss(q, k, v, q_dot, k_dot, v_dot):
    o, o_dot = attention_jvp(q, k, v, q_dot, k_dot, v_dot, causal=True, scale=0.3, tangent_grad=True)
    o2 = scaled_dot_product_attention(q, k, v)
    return (o * o2).sum() + torch.sin(o_dot).sum()


@pytest.mark.gpu
def test_compile_inductor_fullgraph_matches_eager(device):
    """attention_jvp with a differentiable tangent (the tangent backward op) and the drop-in (no forward mode) in one
    fullgraph-compiled loss under inductor (aot_eager: test_attention.py, test_attention_masks.py): the loss and the
    gradients of all six inputs equal eager, and Dynamo reports no graph break."""
    prims = [_t(2, 2, n, 16, grad=True, device=device) for n in (9, 11, 11)]
    tangents = [_t(1, 2, n, 16, grad=True, device=device) for n in (9, 11, 11)]
    leaves = prims + tangents
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Dynamo's note on an lru_cache'd helper
        assert torch._dynamo.explain(_loss)(*leaves).graph_break_count == 0
        torch._dynamo.reset()
        out = torch.compile(_loss, backend="inductor", fullgraph=True)(*leaves)
    got = torch.autograd.grad(out, leaves)
    ref_out = _loss(*leaves)
    ref = torch.autograd.grad(ref_out, leaves)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
