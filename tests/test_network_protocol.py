"""The JVPNetwork protocol beyond (z, t, h, y): extra per-row conditions and a second output head (iMF's u and v).

A small two-head network written against the op table checks what every backend must give: the plain outputs, v alone
(head="v"), (u, u_dot, v) with tangents where u_dot equals torch.func.jvp of the plain u, and clear errors."""
import pytest
import torch
import torch.nn.functional as F

from meanflow import CUDAGraphModel, MLPNet
from meanflow.models import JVPNetwork
from mfkernels.nn import Linear
from tests.utils import max_rel_err, randomize_

F64 = torch.float64


class TwoHeadNet(JVPNetwork):
    """A shared trunk on [z, h, 1 - 1/omega, t_min, t_max], then a u-branch and a v-branch (the v-branch sees no
    tangent). t is ignored, as in iMF."""

    heads = ("u", "v")
    conditions = ("omega", "t_min", "t_max")

    def __init__(self, dim=3, hidden=16, backend="explicit"):
        super().__init__(backend)
        self.data_shape = (dim,)
        self.trunk = Linear(dim + 4, hidden)
        self.u_out = Linear(hidden, dim)
        self.v_hidden = Linear(hidden, hidden)
        self.v_out = Linear(hidden, dim)

    def _inputs(self, z, h, omega, t_min, t_max):
        cols = [h, 1 - 1 / omega, t_min, t_max]
        return torch.cat([z] + [c[:, None].to(z.dtype) for c in cols], dim=-1)

    def _v(self, a):
        return self.v_out(F.silu(self.v_hidden(a)))

    def _forward_plain(self, z, t, h, y, *, head=None, omega, t_min, t_max):
        a = F.silu(self.trunk(self._inputs(z, h, omega, t_min, t_max)))
        if head == "v":
            return self._v(a)
        u = self.u_out(a)
        return u if head == "u" else (u, self._v(a))

    def _forward_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, ops, *, head=None, omega, t_min, t_max):
        kt = z_dot.shape[0]
        x = self._inputs(z, h, omega, t_min, t_max)
        zeros = torch.zeros_like(h_dot)  # the conditions carry no tangent
        x_dot = torch.cat([z_dot] + [c[:, None].to(z.dtype) for c in (h_dot, zeros, zeros, zeros)], dim=-1)
        a, a_dot = ops.silu(*self.trunk.forward_jvp(x, x_dot, ops))
        u, u_dot = self.u_out.forward_jvp(a, a_dot, ops)
        assert kt <= z.shape[0]
        return (u, u_dot) if head == "u" else (u, u_dot, self._v(a))


def _conditions(batch):
    return {"omega": 1 + 7 * torch.rand(batch, dtype=F64), "t_min": 0.5 * torch.rand(batch, dtype=F64),
            "t_max": 0.5 + 0.5 * torch.rand(batch, dtype=F64)}


def _inputs(batch=4):
    z = torch.randn(batch, 3, dtype=F64)
    t = torch.rand(batch, dtype=F64)
    return z, t, t * torch.rand(batch, dtype=F64)


@pytest.mark.parametrize("backend", ["explicit", "fused", "autograd"])
@pytest.mark.parametrize("kt", [0, 1, 4])
def test_two_heads_with_tangents_on_every_backend(backend, kt):
    net = randomize_(TwoHeadNet().double())
    z, t, h = _inputs()
    cond = _conditions(4)
    tangents = (torch.randn(kt, 3, dtype=F64), torch.randn(kt, dtype=F64), torch.randn(kt, dtype=F64))
    u_plain, v_plain = net(z, t, h, **cond)
    assert torch.equal(net(z, t, h, head="v", **cond), v_plain) and torch.equal(net(z, t, h, head="u", **cond), u_plain)
    u, u_dot, v = net(z, t, h, tangents=tangents, backend=backend, **cond)
    assert max_rel_err(u, u_plain) < 1e-12 and max_rel_err(v, v_plain) < 1e-12
    assert u_dot.shape == (kt, 3) and not u_dot.requires_grad
    if kt:
        _, ref = torch.func.jvp(lambda z_, t_, h_: net(z_, t_, h_, head="u", **{k: c[:kt] for k, c in cond.items()}),
                                (z[:kt], t[:kt], h[:kt]), tangents)
        assert max_rel_err(u_dot, ref) < 1e-12
    u1, u1_dot = net(z, t, h, tangents=tangents, backend=backend, head="u", **cond)
    assert torch.equal(u1, u) and torch.equal(u1_dot, u_dot)
    # u and v both backpropagate into the parameters: the same gradients as the plain forward
    grads = torch.autograd.grad((u.square().sum() + v.sum()), list(net.parameters()))
    ref_grads = torch.autograd.grad((u_plain.square().sum() + v_plain.sum()), list(net.parameters()))
    assert all(max_rel_err(g, r) < 1e-12 for g, r in zip(grads, ref_grads))


def test_conditions_and_heads_are_validated():
    net = TwoHeadNet().double()
    z, t, h = _inputs()
    cond = _conditions(4)
    with pytest.raises(TypeError, match=r"needs the condition\(s\) \['t_max'\]"):
        net(z, t, h, omega=cond["omega"], t_min=cond["t_min"])
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['gamma'\]"):
        net(z, t, h, gamma=cond["omega"], **cond)
    with pytest.raises(ValueError, match=r"omega must have shape \(B,\) = \(4,\)"):
        net(z, t, h, **{**cond, "omega": cond["omega"][:3]})
    with pytest.raises(TypeError, match="omega must be a floating tensor"):
        net(z, t, h, **{**cond, "omega": torch.ones(4, dtype=torch.int64)})
    with pytest.raises(ValueError, match="head must be None .* one of \\['u', 'v'\\]; got 'w'"):
        net(z, t, h, head="w", **cond)
    tangents = (torch.randn(2, 3, dtype=F64), torch.randn(2, dtype=F64), torch.randn(2, dtype=F64))
    with pytest.raises(ValueError, match="only the 'u' head has a tangent"):
        net(z, t, h, tangents=tangents, head="v", **cond)
    mlp = MLPNet(3, 8, 2).double()
    with pytest.raises(TypeError, match="takes no extra conditions"):
        mlp(z, t, h, omega=cond["omega"])
    with pytest.raises(ValueError, match="has one output head"):
        mlp(z, t, h, head="v")


def test_cuda_graph_wrapper_passes_heads_and_conditions_through_on_cpu():
    net = randomize_(TwoHeadNet().double())
    z, t, h = _inputs()
    cond = _conditions(4)
    graphed = CUDAGraphModel(net)
    u, v = graphed(z, t, h, **cond)
    assert torch.equal(graphed(z, t, h, head="v", **cond), v)
    tangents = (torch.randn(2, 3, dtype=F64), torch.randn(2, dtype=F64), torch.randn(2, dtype=F64))
    u2, u_dot, v2 = graphed(z, t, h, tangents=tangents, **cond)
    # the tangent call's primal rows come from a stacked GEMM whose rounding may differ from the plain call's:
    # the wrapper must return exactly what the network's own tangent call returns
    u_e, u_dot_e, v_e = net(z, t, h, tangents=tangents, **cond)
    assert torch.equal(u2, u_e) and torch.equal(v2, v_e) and torch.equal(u_dot, u_dot_e) and u_dot.shape == (2, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_replay_two_heads_with_conditions():
    """Conditions are static inputs of the graph and (u, u_dot, v) its outputs; gradients flow from u and v."""
    net = randomize_(TwoHeadNet().cuda())
    graphed = CUDAGraphModel(net, warmup=1)
    z, t, h = (a.float().cuda() for a in _inputs())
    cond = {k: c.float().cuda() for k, c in _conditions(4).items()}
    tangents = (torch.randn(2, 3, device="cuda"), torch.ones(2, device="cuda"), torch.ones(2, device="cuda"))
    for _ in range(3):  # eager warm-up, capture, replay
        u, u_dot, v = graphed(z, t, h, tangents=tangents, **cond)
        grads = torch.autograd.grad(u.square().sum() + v.sum(), list(net.parameters()))
    u_e, u_dot_e, v_e = net(z, t, h, tangents=tangents, **cond)
    grads_e = torch.autograd.grad(u_e.square().sum() + v_e.sum(), list(net.parameters()))
    assert graphed.captures_made == 1
    assert max_rel_err(u, u_e) < 1e-5 and max_rel_err(u_dot, u_dot_e) < 1e-5 and max_rel_err(v, v_e) < 1e-5
    assert all(max_rel_err(g, r) < 1e-5 for g, r in zip(grads, grads_e))
