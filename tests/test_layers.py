"""Each layer's explicit forward_jvp equals torch.func.jvp over its plain forward (float64), for k = 0, 1, B."""
import pytest
import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow.models.backends import ops_for
from meanflow.models.layers import Attention, DiTBlock, FinalLayer, Linear, TimestepEmbedder, timestep_embedding_jvp
from mfkernels.nn import MLP as Mlp
from tests.utils import max_rel_err, randomize_

F64 = torch.float64
B, N, C = 3, 7, 24


def _ragged_check(fn_plain, fn_jvp, primals, k):
    """fn_jvp(primals, tangents) must equal jvp(fn_plain) restricted to the first k rows, and its y must carry the
    graph: the gradients of y with respect to the primals and fn_plain's parameters equal the plain forward's (a
    forward_jvp that returns a detached or otherwise wrong y fails here)."""
    primals = tuple(p.detach().requires_grad_() for p in primals)
    tangents = tuple(torch.randn((k,) + p.shape[1:], dtype=F64) for p in primals)
    y, y_dot = fn_jvp(primals, tangents)
    y_ref = fn_plain(*primals)
    assert max_rel_err(y, y_ref) < 1e-12
    assert y.requires_grad and y.grad_fn is not None, "y must be differentiable"
    wrt = list(primals) + (list(fn_plain.parameters()) if isinstance(fn_plain, torch.nn.Module) else [])
    w = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y * w).sum(), wrt, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), wrt, allow_unused=True)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert (g is None) == (g_ref is None), f"gradient {i}: one of forward_jvp / forward does not reach it"
        if g is not None:
            assert max_rel_err(g, g_ref) < 1e-10, f"gradient {i}"
    assert y_dot.shape == (k,) + y_ref.shape[1:]
    assert not y_dot.requires_grad, "tangent outputs must be detached"
    if k:
        with sdpa_kernel(SDPBackend.MATH):  # torch's fused SDPA kernels have no forward-mode rule
            _, y_dot_ref = jvp(fn_plain, tuple(p[:k].detach() for p in primals), tangents)
        assert max_rel_err(y_dot, y_dot_ref) < 1e-10


@pytest.mark.parametrize("k", [0, 1, B])
def test_linear(k):
    layer = randomize_(Linear(C, 10).double())
    x = torch.randn(B, N, C, dtype=F64)
    _ragged_check(layer, lambda p, d: layer.forward_jvp(p[0], d[0], ops_for("explicit")), (x,), k)


@pytest.mark.parametrize("k", [0, 1, B])
def test_timestep_embedder(k):
    layer = randomize_(TimestepEmbedder(C, freq_dim=33).double())
    t = torch.rand(B, dtype=F64)
    _ragged_check(layer, lambda p, d: layer.forward_jvp(p[0], d[0], ops_for("explicit")), (t,), k)


def test_timestep_embedding_tangent_closed_form():
    t, t_dot = torch.rand(4, dtype=F64), torch.randn(2, dtype=F64)
    emb, emb_dot = timestep_embedding_jvp(t, t_dot, 16)
    _, ref = jvp(lambda s: timestep_embedding_jvp(s, s[:0], 16)[0], (t[:2],), (t_dot,))
    assert max_rel_err(emb_dot, ref) < 1e-13


@pytest.mark.parametrize("k", [0, 1, B])
def test_mlp(k):
    layer = randomize_(Mlp(C, 40).double())
    x = torch.randn(B, N, C, dtype=F64)
    _ragged_check(layer, lambda p, d: layer.forward_jvp(p[0], d[0], ops_for("explicit")), (x,), k)


@pytest.mark.parametrize("k", [0, 1, B])
def test_attention(k):
    layer = randomize_(Attention(C, 4).double())
    x = torch.randn(B, N, C, dtype=F64)
    _ragged_check(layer, lambda p, d: layer.forward_jvp(p[0], d[0], ops_for("explicit")), (x,), k)


@pytest.mark.parametrize("k", [0, 1, B])
def test_dit_block(k):
    layer = randomize_(DiTBlock(C, 4).double(), std=0.1)
    x, c = torch.randn(B, N, C, dtype=F64), torch.randn(B, C, dtype=F64)
    _ragged_check(layer, lambda p, d: layer.forward_jvp(p[0], d[0], p[1], d[1], ops_for("explicit")), (x, c), k)


@pytest.mark.parametrize("k", [0, 1, B])
def test_final_layer(k):
    layer = randomize_(FinalLayer(C, 12).double())
    x, c = torch.randn(B, N, C, dtype=F64), torch.randn(B, C, dtype=F64)
    _ragged_check(layer, lambda p, d: layer.forward_jvp(p[0], d[0], p[1], d[1], ops_for("explicit")), (x, c), k)


def test_linear_backward_keeps_no_tangent_rows():
    """The stacked GEMM must not make the backward depend on (or save) the tangent rows."""
    layer = randomize_(Linear(C, 10).double())
    x = torch.randn(B, N, C, dtype=F64, requires_grad=True)
    y, _ = layer.forward_jvp(x, torch.randn(B, N, C, dtype=F64), ops_for("explicit"))
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    layer2 = Linear(C, 10).double()
    layer2.load_state_dict(layer.state_dict())
    (layer2(x2) * g).sum().backward()
    assert max_rel_err(x.grad, x2.grad) < 1e-13
    assert max_rel_err(layer.weight.grad, layer2.weight.grad) < 1e-13
    assert max_rel_err(layer.bias.grad, layer2.bias.grad) < 1e-13


def test_patchify_is_dits_strided_conv_in_row_major_token_order():
    """DiT embeds patches with a p x p conv of stride p and reads its output row by row; the position embedding
    follows that order. patchify + a Linear on its (c, p1, p2) features must equal that conv token by token, token
    i = patch (i // grid_w, i % grid_w), and unpatchify must put every token's (p1, p2, c) features back where they
    came from (checked against a loop over patches, so an order that is merely self-consistent fails)."""
    import torch.nn.functional as F

    from meanflow.models.layers import patchify, unpatchify

    b, c, p, gh, gw, hidden = 2, 3, 2, 3, 4, 5
    z = torch.randn(b, c, gh * p, gw * p, dtype=F64)
    tokens = patchify(z, p)
    assert tokens.shape == (b, gh * gw, c * p * p)
    weight = torch.randn(hidden, c, p, p, dtype=F64)
    conv = F.conv2d(z, weight, stride=p).flatten(2).transpose(1, 2)        # (B, gh * gw, hidden), row-major
    torch.testing.assert_close(tokens @ weight.reshape(hidden, -1).T, conv, atol=1e-12, rtol=1e-12)
    for i in range(gh * gw):
        row, col = divmod(i, gw)
        patch = z[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p]
        assert torch.equal(tokens[:, i], patch.reshape(b, -1))             # (c, p1, p2) order
    out_tokens = torch.randn(b, gh * gw, p * p * c, dtype=F64)             # the final layer emits (p1, p2, c)
    image = unpatchify(out_tokens, p, gh)
    assert image.shape == (b, c, gh * p, gw * p)
    for i in range(gh * gw):
        row, col = divmod(i, gw)
        expected = out_tokens[:, i].reshape(b, p, p, c).permute(0, 3, 1, 2)
        assert torch.equal(image[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p], expected)
    from meanflow.models.dit import sincos_pos_embed_2d

    pos = sincos_pos_embed_2d(8, gh, gw).reshape(gh, gw, 8)  # token i = (i // gw, i % gw): rows share one half
    assert torch.equal(pos[:, :1, :4].expand(gh, gw, 4), pos[..., :4]) and not torch.equal(pos[:1, :, :4], pos[1:2, :, :4])
    assert torch.equal(pos[:1, :, 4:].expand(gh, gw, 4), pos[..., 4:]) and not torch.equal(pos[:, :1, 4:], pos[:, 1:2, 4:])
