"""MMDiT joint-attention block (meanflow.models.mmdit): forward_jvp on the reference and fused tables equals
torch.func.jvp of the plain forward, with a key-padding mask on the context stream."""
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from meanflow.models.mmdit import MMDiTBlock, joint_mask
from mfkernels.nn import math_attention, rope_angles
from mfkernels.ops import ops_table
from mfkernels.reference import attention_jvp_ref

from tests.utils import max_rel_err, randomize_

F64 = torch.float64
B, NX, NC, C, H = 3, 5, 4, 16, 2


def _inputs():
    x, c = torch.randn(B, NX, C, dtype=F64), torch.randn(B, NC, C, dtype=F64)
    vec_act = F.silu(torch.randn(B, C, dtype=F64))
    c_mask = torch.tensor([[True] * NC, [True, True, False, False], [True, False, False, False]])
    return x, c, vec_act, c_mask


def _ops(table):
    """"fused-glue": fused ops with the reference attention (the attention kernels take seconds a call under the
    interpreter and are tested on their own); one test runs the fully fused table."""
    if table == "fused-glue":
        return dataclasses.replace(ops_table("fused"), attention=attention_jvp_ref)
    return ops_table(table)


def _check(block, ops, kt, cos=None, sin=None, c_tangent=True):
    x, c, vec_act, c_mask = _inputs()
    x, c, vec_act = (t.requires_grad_() for t in (x, c, vec_act))
    x_dot, vec_dot = torch.randn(kt, NX, C, dtype=F64), torch.randn(kt, C, dtype=F64)
    c_dot = torch.randn(kt, NC, C, dtype=F64) if c_tangent else torch.zeros(kt, NC, C, dtype=F64)
    xo, co, xo_dot, co_dot = block.forward_jvp(x, c, x_dot, c_dot, vec_act, vec_dot, c_mask, cos, sin, ops)
    with math_attention():
        xp, cp = block(x, c, vec_act, c_mask, cos, sin)
        _, (x_ref, c_ref) = torch.func.jvp(lambda a, b, e: block(a, b, e, c_mask[:kt], cos, sin),
                                           (x[:kt].detach(), c[:kt].detach(), vec_act[:kt].detach()),
                                           (x_dot, c_dot, vec_dot))
    assert max_rel_err(xo, xp) < 1e-12 and max_rel_err(co, cp) < 1e-12
    assert not xo_dot.requires_grad and not co_dot.requires_grad
    if kt:
        assert max_rel_err(xo_dot, x_ref) < 1e-11 and max_rel_err(co_dot, c_ref) < 1e-11
    gx, gc = torch.randn_like(xp), torch.randn_like(cp)
    grads = torch.autograd.grad((xo * gx).sum() + (co * gc).sum(), [x, c, vec_act, *block.parameters()])
    grads_p = torch.autograd.grad((xp * gx).sum() + (cp * gc).sum(), [x, c, vec_act, *block.parameters()])
    assert max(max_rel_err(g, r) for g, r in zip(grads, grads_p)) < 1e-10


@pytest.mark.gpu
@pytest.mark.parametrize("table", ["reference", "fused-glue"])
@pytest.mark.parametrize("kt", [0, 1, 3])
def test_block_jvp_with_key_padding_mask(table, kt):
    block = randomize_(MMDiTBlock(C, H).double(), std=0.3)
    _check(block, _ops(table), kt)


@pytest.mark.gpu
@pytest.mark.parametrize("table", ["reference", "fused-glue"])
def test_block_jvp_with_rope_without_qk_norm_and_zero_context_tangent(table):
    """RoPE over the joint positions [c; x] (QK-norm off: the two RoPE calls per stream), and a context stream that
    enters with a zero tangent, as text does in the first block."""
    block = randomize_(MMDiTBlock(C, H, qk_norm=False).double(), std=0.3)
    cos, sin = rope_angles(C // H, NC + NX, dtype=F64)
    _check(block, _ops(table), 2, cos, sin, c_tangent=False)


@pytest.mark.gpu
def test_block_fully_fused(monkeypatch):
    """The fused table's attention takes attn_mask: the masked joint attention runs in the fused kernel, never in the
    torch-ops fallback."""
    import meanflow.models.mmdit as mmdit

    def no_fallback(*args, **kwargs):
        raise AssertionError("the masked attention fell back to torch ops")

    monkeypatch.setattr(mmdit, "masked_attention_jvp", no_fallback)
    block = randomize_(MMDiTBlock(C, H).double(), std=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float64 on CPU: mfkernels' reference path, with a warning
        _check(block, ops_table("fused"), 2)


def test_padded_context_tokens_do_not_reach_the_image_stream():
    """Masked keys are invisible: changing padded context tokens leaves x unchanged (their own rows change)."""
    block = randomize_(MMDiTBlock(C, H).double(), std=0.3)
    x, c, vec_act, c_mask = _inputs()
    c2 = c.clone()
    c2[~c_mask] = torch.randn(int((~c_mask).sum()), C, dtype=F64)
    xo, co = block(x, c, vec_act, c_mask)
    xo2, co2 = block(x, c2, vec_act, c_mask)
    torch.testing.assert_close(xo, xo2, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(co[c_mask], co2[c_mask], atol=1e-12, rtol=1e-12)
    assert joint_mask(c_mask, NX).shape == (B, 1, 1, NC + NX)
    with pytest.raises(ValueError, match="c_mask must be a bool"):
        joint_mask(c_mask.float(), NX)
