"""The "Bring your own network" example, run from docs/byo_network.md itself (so the documented code cannot rot): a
network that is not in the registry, built from mfkernels.nn modules, trained with the fused ops through the public
API only. Its tangents follow the protocol on every backend, and register_arch puts it behind the trainer."""
import math
import re
from pathlib import Path

import pytest
import torch

from meanflow import JVPNetwork, get_preset, apply_overrides, register_arch
from meanflow.models import ARCHS
from mfkernels.nn import math_attention
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)
from tests.utils import max_rel_err, randomize_

PAGE = Path(__file__).resolve().parents[1] / "docs" / "byo_network.md"


def page_example() -> str:
    text = PAGE.read_text()
    block = re.search(r"<!-- byo-example:start -->\n```python\n(.*?)```\n<!-- byo-example:end -->", text, re.S)
    assert block, f"{PAGE} lost its bring-your-own-network example (markers byo-example:start / end)"
    return block.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The page's example, shortened (3 steps of 16 points instead of 2000 of 256), executed once."""
    code = page_example()
    assert "steps = 2000" in code and "data.sample(256," in code
    code = code.replace("steps = 2000", "steps = 3").replace("data.sample(256,", "data.sample(16,")
    namespace = {"__name__": "byo_network_example"}
    torch.set_num_threads(1)
    exec(compile(code, f"{PAGE}:byo-example", "exec"), namespace)
    return namespace


def test_the_example_trains_with_the_fused_ops(example, capsys):
    assert isinstance(example["model"], JVPNetwork) and example["model"].backend == "fused"
    assert example["step"] == 2 and math.isfinite(example["loss"].item())
    assert example["stats"]["jvp_rows"] > 0                              # tangents went through the fused kernels
    assert example["points"].shape == (2000, 2) and torch.isfinite(example["points"]).all()


@pytest.mark.parametrize("backend", ["explicit", "fused", "autograd"])
def test_the_example_network_follows_the_protocol(example, backend):
    net = randomize_(example["PointNet"](hidden=16, depth=2, backend=backend).double(), 0.3)
    z, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    h = t * torch.rand(5, dtype=torch.float64)
    tangents = (torch.randn(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                torch.ones(3, dtype=torch.float64))
    u, u_dot = net(z, t, h, tangents=tangents)
    with math_attention():
        _, ref = torch.func.jvp(lambda a, b, c: net(a, b, c), (z[:3], t[:3], h[:3]), tangents)
    assert max_rel_err(u, net(z, t, h)) < 1e-12 and max_rel_err(u_dot, ref) < 1e-10


@pytest.mark.parametrize("backend", ["explicit", "fused", "autograd"])
def test_the_example_network_differentiates_its_tangent(example, backend):
    """tangent_grad=True (TVM's gradient through the JVP) on the page's network, unchanged: its _forward_jvp calls the
    ops of the table it is handed, so the tangent-grad table makes u_dot differentiable. Gradients of a loss of (u,
    u_dot) to every parameter against torch.autograd.functional.jvp with create_graph (double backward) of its plain
    forward, with the layer norm written out (torch's forward-mode layer_norm is not twice differentiable)."""
    from meanflow.models.tangent_grad import differentiable_tangent_ops

    net = randomize_(example["PointNet"](hidden=16, depth=2, backend=backend).double(), 0.3)
    z, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    h = t * torch.rand(5, dtype=torch.float64)
    tangents = (torch.randn(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                torch.rand(3, dtype=torch.float64))
    u, u_dot = net(z, t, h, tangents=tangents, tangent_grad=True)
    w = torch.randn_like(u_dot)
    params = list(net.parameters())
    grads = torch.autograd.grad((u_dot * w).sum() + u.square().sum(), params)
    with differentiable_tangent_ops():
        u_ref = net._forward_plain(z, t, h, None)
        _, ref_dot = torch.autograd.functional.jvp(lambda a, b, c: net._forward_plain(a, b, c, None),
                                                   (z[:3], t[:3], h[:3]), tangents, create_graph=True)
    ref = torch.autograd.grad((ref_dot * w).sum() + u_ref.square().sum(), params)
    for g, r in zip(grads, ref):
        assert max_rel_err(g, r) < 1e-10


def test_register_arch_puts_it_behind_the_trainer(example, tmp_path):
    from meanflow import Trainer

    PointNet = example["PointNet"]
    register_arch("pointnet", lambda cfg, shape, classes, backend, spec: PointNet(shape[0], hidden=16, depth=1,
                                                                                   backend=backend))
    try:
        cfg = apply_overrides(get_preset("moons"), ["model.arch=pointnet", "train.steps=2", "train.batch_size=8",
                                                    "train.progress=false", "eval.enabled=false",
                                                    "train.grid_size=8", "train.device=cpu"])
        trainer = Trainer(cfg, tmp_path / "run")
        trainer.train()
        assert isinstance(trainer.net, PointNet) and trainer.step == 2
        # an objective it cannot serve is refused at construction, naming what is missing
        with pytest.raises(ValueError, match=r"needs a network with head\(s\) \['v'\]"):
            Trainer(apply_overrides(cfg, ["loss.objective=imf", "loss.omega_max=1", "loss.sample_omega=1"]),
                    tmp_path / "imf")
    finally:
        del ARCHS["pointnet"]
