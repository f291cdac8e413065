"""The whole network: explicit forward_jvp equals torch.func.jvp (autograd backend) in float64, for every tangent
batch k in {0, 1, B}, with and without classes; and the registry builds every size."""
import pytest
import torch

from meanflow.models import DIT_MODELS, MLPNet, build_dit, count_parameters
from tests.utils import max_rel_err, randomize_

F64 = torch.float64


def _dit(num_classes):
    return randomize_(build_dit("DiT-Micro/4", input_size=(12, 8), in_channels=3, num_classes=num_classes).double(), 0.1)


def _inputs(model, batch, num_classes):
    z = torch.randn((batch,) + model.data_shape, dtype=F64)
    t = torch.rand(batch, dtype=F64)
    h = t * torch.rand(batch, dtype=F64)
    y = torch.randint(0, num_classes + 1, (batch,)) if num_classes else None
    return z, t, h, y


def _tangents(model, k):
    return (torch.randn((k,) + model.data_shape, dtype=F64), torch.randn(k, dtype=F64), torch.randn(k, dtype=F64))


@pytest.mark.parametrize("num_classes", [0, 5])
@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("net", ["dit", "mlp"])
def test_explicit_equals_autograd(net, num_classes, k):
    model = _dit(num_classes) if net == "dit" else randomize_(MLPNet(3, 32, 3, num_classes=num_classes).double())
    z, t, h, y = _inputs(model, 4, num_classes)
    tangents = _tangents(model, k)
    u_e, du_e = model(z, t, h, y, tangents=tangents, backend="explicit")
    u_a, du_a = model(z, t, h, y, tangents=tangents, backend="autograd")
    u_plain = model(z, t, h, y)
    assert du_e.shape == du_a.shape == (k,) + model.data_shape
    assert max_rel_err(u_e, u_plain) < 1e-12 and max_rel_err(u_a, u_plain) < 1e-12
    if k:
        assert du_e.abs().max() > 1e-3, "vacuous comparison: the tangent is ~0"
        assert max_rel_err(du_e, du_a) < 1e-10
    assert u_e.grad_fn is not None and u_a.grad_fn is not None, "u must be differentiable"
    assert not du_e.requires_grad and not du_a.requires_grad, "u_dot must be detached"


def test_explicit_tangent_rows_do_not_depend_on_other_rows():
    """Row i's tangent only depends on row i: computing k rows equals computing all rows and slicing."""
    model = _dit(5)
    z, t, h, y = _inputs(model, 5, 5)
    full = _tangents(model, 5)
    _, du_full = model(z, t, h, y, tangents=full)
    _, du_two = model(z, t, h, y, tangents=tuple(d[:2] for d in full))
    assert max_rel_err(du_two, du_full[:2]) < 1e-12


def test_zero_init_gives_zero_output():
    """adaLN-Zero: a fresh DiT outputs exactly zero (and so does its tangent)."""
    model = build_dit("DiT-Micro/4", input_size=8, in_channels=2, num_classes=3)
    z, t, h, y = (torch.randn(2, 2, 8, 8), torch.rand(2), torch.zeros(2), torch.tensor([0, 3]))
    u, du = model(z, t, h, y, tangents=(torch.randn(2, 2, 8, 8), torch.ones(2), torch.ones(2)))
    assert u.abs().max() == 0 and du.abs().max() == 0


def test_registry_sizes():
    expected = {"DiT-S/2": (384, 12, 6), "DiT-B/2": (768, 12, 12), "DiT-L/2": (1024, 24, 16), "DiT-XL/2": (1152, 28, 16)}
    for name, (hidden, depth, heads) in expected.items():
        cfg = DIT_MODELS[name]
        assert (cfg.hidden, cfg.depth, cfg.heads, cfg.patch) == (hidden, depth, heads, 2)
    for name in ["DiT-S/4", "DiT-B/4", "DiT-Tiny/2", "DiT-Tiny/4"]:
        assert name in DIT_MODELS
    # DiT-B/2 on 32x32x4 latents has ~130M parameters with the two time embedders (DiT-B/2 alone: 130M).
    assert 125e6 < count_parameters(build_dit("DiT-B/2", num_classes=1000)) < 140e6
    with pytest.raises(ValueError, match="unknown model 'DiT-Q/2'"):
        build_dit("DiT-Q/2")


def test_any_input_size_and_channels():
    model = build_dit("DiT-Micro/2", input_size=(6, 10), in_channels=1)
    z = torch.randn(2, 1, 6, 10)
    assert model(z, torch.rand(2), torch.zeros(2)).shape == z.shape
    with pytest.raises(ValueError, match="divisible by the patch size"):
        build_dit("DiT-Micro/4", input_size=10)
