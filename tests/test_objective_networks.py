"""The network side of the objectives beyond MeanFlow (meanflow.models.heads): DiT and MLPNet with iMF's v-branch and
(omega, t_min, t_max) conditioning, or with sCM's logvar head. Outputs and tangents on every backend against the plain
forward and torch.func.jvp; the v-branch forks where it should; the registry builds what a NetworkSpec asks for."""
import pytest
import torch

from meanflow.models import ARCHS, IMF_CONDITIONS, DiT, MLPNet, NetworkSpec, build_model, register_arch
from meanflow.training.config import ModelConfig
from mfkernels.nn import math_attention
from tests.utils import max_rel_err, randomize_

F64 = torch.float64


def _make(kind: str, extra: str):
    opts = dict(v_depth=1, conditions=IMF_CONDITIONS) if extra == "v" else dict(logvar=True)
    net = DiT(8, 2, 16, 3, 2, 4, num_classes=3, **opts) if kind == "dit" else MLPNet(3, 16, 3, num_classes=3, **opts)
    return randomize_(net.double(), 0.1)


def _inputs(net, batch=5, kt=3):
    shape = tuple(net.data_shape)
    z = torch.randn((batch,) + shape, dtype=F64)
    t = torch.rand(batch, dtype=F64)
    h = t * torch.rand(batch, dtype=F64)
    y = torch.randint(0, 3, (batch,))
    cond = {"omega": 1 + 7 * torch.rand(batch, dtype=F64), "t_min": 0.5 * torch.rand(batch, dtype=F64),
            "t_max": 0.5 + 0.5 * torch.rand(batch, dtype=F64)} if net.conditions else {}
    tangents = (torch.randn((kt,) + shape, dtype=F64), torch.randn(kt, dtype=F64), torch.randn(kt, dtype=F64))
    return z, t, h, y, cond, tangents


CASES = [("dit", "explicit"), ("dit", "autograd"), ("mlp", "explicit"), ("mlp", "fused"), ("mlp", "autograd")]


@pytest.mark.parametrize("kind,backend", CASES, ids=[f"{k}-{b}" for k, b in CASES])
@pytest.mark.parametrize("extra", ["v", "logvar"])
def test_heads_and_tangents(kind, backend, extra):
    net = _make(kind, extra)
    z, t, h, y, cond, tangents = _inputs(net)
    kt = tangents[0].shape[0]
    u, second = net(z, t, h, y, **cond)
    assert torch.equal(net(z, t, h, y, head="u", **cond), u)
    assert torch.equal(net(z, t, h, y, head=net.heads[1], **cond), second)
    assert second.shape == (z.shape if extra == "v" else (5,))
    u2, u_dot, second2 = net(z, t, h, y, tangents=tangents, backend=backend, **cond)
    assert max_rel_err(u2, u) < 1e-12 and max_rel_err(second2, second) < 1e-12 and not u_dot.requires_grad
    with math_attention():
        _, ref = torch.func.jvp(lambda a, b, c: net(a, b, c, y[:kt], head="u", **{k: v[:kt] for k, v in cond.items()}),
                                (z[:kt], t[:kt], h[:kt]), tangents)
    assert max_rel_err(u_dot, ref) < 1e-12
    # both heads backpropagate like the plain forward
    params = list(net.parameters())
    grads = torch.autograd.grad(u2.square().sum() + second2.sin().sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(u.square().sum() + second.sin().sum(), params, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None) and (g is None or max_rel_err(g, r) < 1e-11)


@pytest.mark.gpu
def test_dit_v_branch_on_the_fused_backend(device):
    net = _make("dit", "v").to(device)
    z, t, h, y, cond, tangents = (a.to(device) if torch.is_tensor(a) else a for a in _inputs(net))
    cond = {k: v.to(device) for k, v in cond.items()}
    tangents = tuple(a.to(device) for a in tangents)
    u, u_dot, v = net(z, t, h, y, tangents=tangents, backend="fused", **cond)
    ue, ue_dot, ve = net(z, t, h, y, tangents=tangents, backend="explicit", **cond)
    assert max_rel_err(u, ue) < 1e-10 and max_rel_err(u_dot, ue_dot) < 1e-10 and max_rel_err(v, ve) < 1e-12


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_v_branch_forks_before_the_last_blocks_and_sees_the_conditions(kind):
    net = _make(kind, "v")
    z, t, h, y, cond, _ = _inputs(net)
    u, v = net(z, t, h, y, **cond)
    last = net.blocks[-1] if kind == "dit" else net.layers[-1]
    with torch.no_grad():
        for p in last.parameters():
            p.add_(0.5)
    u2, v2 = net(z, t, h, y, **cond)
    assert torch.equal(v2, v) and not torch.allclose(u2, u)        # the u-path's last block is not in the v-branch
    u3, v3 = net(z, t, h, y, **{**cond, "omega": cond["omega"] + 1})
    assert not torch.allclose(v3, v2) and not torch.allclose(u3, u2)
    # omega enters as 1 - 1/omega: omega = 1 and the feature 0 agree by construction
    from meanflow.models.heads import condition_features
    assert condition_features("omega", torch.ones(2)).abs().max() == 0


def test_options_are_validated_and_plain_networks_unchanged():
    with pytest.raises(ValueError, match="at most one extra head"):
        DiT(8, 1, 16, 2, 2, 4, v_depth=1, logvar=True)
    with pytest.raises(ValueError, match=r"v_depth .* must lie in \[0, depth = 2\]"):
        DiT(8, 1, 16, 2, 2, 4, v_depth=3)
    with pytest.raises(ValueError, match=r"v_depth .* must lie in \[1, depth - 1 = 1\]"):
        MLPNet(2, 8, 2, v_depth=2)
    # without options: the same parameters (checkpoints of earlier runs load) and one head
    assert not any(k.startswith(("v_", "logvar", "cond_")) for k in DiT(8, 1, 16, 2, 2, 4).state_dict())
    assert DiT(8, 1, 16, 2, 2, 4).heads == ("u",) and MLPNet().heads == ("u",)
    # zero-initialised extra outputs, as adaLN-Zero: the v-branch and logvar start at 0
    net = DiT(8, 1, 16, 2, 2, 4, num_classes=2, v_depth=1, conditions=IMF_CONDITIONS)
    z, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    ones = torch.ones(3)
    assert net(z, t, 0 * t, torch.zeros(3, dtype=torch.long), head="v", omega=ones, t_min=0 * ones,
               t_max=ones).abs().max() == 0
    assert DiT(8, 1, 16, 2, 2, 4, logvar=True)(z, t, 0 * t, head="logvar").abs().max() == 0


def test_registry_builds_what_the_spec_asks_for():
    dit = ModelConfig(arch="dit", name="DiT-Micro/4", hidden=16, depth=4, heads=2, backend="explicit")
    net = build_model(dit, (1, 8, 8), 10, torch.device("cpu"), spec=NetworkSpec(("u", "v"), IMF_CONDITIONS, True))
    assert net.heads == ("u", "v") and net.conditions == IMF_CONDITIONS and net.v_depth == 2   # auto: depth // 2
    mlp = ModelConfig(arch="mlp", hidden=8, depth=4, v_depth=3, backend="explicit")
    assert build_model(mlp, (2,), 0, torch.device("cpu"), spec=NetworkSpec(("u", "v"))).v_depth == 3
    assert build_model(mlp, (2,), 0, torch.device("cpu"), spec=NetworkSpec(("u", "logvar"))).heads == ("u", "logvar")
    with pytest.raises(ValueError, match=r"has no head\(s\) \['w'\]"):
        build_model(mlp, (2,), 0, torch.device("cpu"), spec=NetworkSpec(("u", "w")))
    with pytest.raises(ValueError, match="model.arch must be one of"):
        build_model(ModelConfig(arch="unet"), (2,), 0, torch.device("cpu"))
    register_arch("tiny_mlp", lambda cfg, shape, classes, backend, spec: MLPNet(shape[0], 4, 2, classes,
                                                                                backend=backend))
    try:
        net = build_model(ModelConfig(arch="tiny_mlp", backend="auto"), (2,), 0, torch.device("cpu"))
        assert isinstance(net, MLPNet) and net.backend == "explicit"
    finally:
        del ARCHS["tiny_mlp"]
