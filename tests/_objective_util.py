"""Shared pieces of the objective tests (tests/test_objective_*.py): small float64 networks with random weights, a
batch with ragged rows (r = t rows scattered, some labels dropped), a spy that records network calls, and gradient
comparison."""
from __future__ import annotations

import torch

from meanflow.models import IMF_CONDITIONS, DiT, MLPNet
from tests.utils import max_rel_err, randomize_

F64 = torch.float64
NUM_CLASSES = 3


def tiny_dit(num_classes: int = NUM_CLASSES, **kw) -> DiT:
    """8x8x2 inputs, patch 4 (4 tokens), 16 wide, 2 blocks: cheap on the explicit and autograd backends."""
    return randomize_(DiT(8, 2, 16, 2, 2, 4, num_classes=num_classes, **kw).double(), 0.1)


def small_mlp(num_classes: int = NUM_CLASSES, **kw) -> MLPNet:
    """3-D data, 16 wide, 3 layers: cheap on every backend, the fused one (Triton interpreter) included."""
    return randomize_(MLPNet(3, 16, 3, num_classes=num_classes, **kw).double(), 0.3)


def imf_net(kind: str, num_classes: int = NUM_CLASSES):
    make = tiny_dit if kind == "dit" else small_mlp
    return make(num_classes, v_depth=1, conditions=IMF_CONDITIONS)


def data(net, batch: int = 8, conditional: bool = True):
    x = torch.randn((batch,) + tuple(net.data_shape), dtype=F64)
    y = torch.randint(0, NUM_CLASSES, (batch,)) if conditional else None
    return x, y


def ragged_times(batch: int = 8, equal_rows=(1, 4, 6)):
    """t in (0.05, 0.95), r <= t, with r = t exactly on `equal_rows` (scattered: the objective must reorder them)."""
    t = torch.rand(batch, dtype=F64) * 0.9 + 0.05
    r = t * torch.rand(batch, dtype=F64)
    r[list(equal_rows)] = t[list(equal_rows)]
    return t, r


def drop_mask(batch: int = 8, rows=(2, 4)):
    drop = torch.zeros(batch, dtype=torch.bool)
    drop[list(rows)] = True
    return drop


def assert_same_loss_and_grads(loss, ref, params, rtol: float = 1e-9):
    assert abs(loss.item() - ref.item()) <= rtol * max(1.0, abs(ref.item())), (loss.item(), ref.item())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
    checked = 0
    for g, gr in zip(grads, ref_grads):
        if gr is None or gr.abs().max() == 0:
            assert g is None or g.abs().max() == 0
            continue
        assert max_rel_err(g, gr) < rtol * 10, max_rel_err(g, gr)
        checked += 1
    assert checked > 0


class Spy:
    """Wraps a network and records each call: batch, tangent batch, head, whether grad was on, the conditions."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, z, t, h, y=None, tangents=None, backend=None, **kw):
        self.calls.append(dict(batch=z.shape[0], kt=None if tangents is None else tangents[0].shape[0],
                               grad=torch.is_grad_enabled(), head=kw.get("head"), h_zero=bool((h == 0).all()),
                               conditions={k: v for k, v in kw.items() if k != "head"}))
        return self.model(z, t, h, y, tangents=tangents, backend=backend, **kw)
