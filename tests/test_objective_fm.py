"""Flow matching (meanflow.objectives.flow_matching): the loss equals the formula written out in float64 on every
backend, with label dropout; no call has a tangent; the guided Euler sampler is classifier-free guidance; the loss
vanishes at the closed-form velocity of Gaussian data."""
import pytest
import torch

from meanflow.evaluation.samplers import fm_sample, sampler_for
from meanflow.objectives import FlowMatchingConfig, FlowMatchingLoss
from tests._objective_util import F64, NUM_CLASSES, Spy, assert_same_loss_and_grads, data, drop_mask, small_mlp, \
    tiny_dit


def independent_fm(net, x, y, noise, t, drop):
    tb = t.reshape((-1,) + (1,) * (x.dim() - 1))
    z = (1 - tb) * x + tb * noise
    labels = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
    u = net._forward_plain(z, t, torch.zeros_like(t), labels)
    return (u - (noise - x)).pow(2).flatten(1).sum(1).mean()


@pytest.mark.parametrize("kind,backend", [("dit", "explicit"), ("mlp", "fused"), ("mlp", "autograd")])
def test_loss_matches_the_formula(kind, backend):
    net = tiny_dit() if kind == "dit" else small_mlp()
    net.backend = backend
    x, y = data(net)
    noise, t, drop = torch.randn_like(x), torch.rand(8, dtype=F64), drop_mask()
    spy = Spy(net)
    loss, stats = FlowMatchingLoss(loss_op="torch")(spy, x, y, noise=noise, t=t, drop=drop)
    assert_same_loss_and_grads(loss, independent_fm(net, x, y, noise, t, drop), list(net.parameters()), 1e-10)
    assert [c["kt"] for c in spy.calls] == [None] and stats["jvp_rows"] == 0


def test_native_op_and_own_draws():
    net = small_mlp()
    x, y = data(net)
    noise, t, drop = torch.randn_like(x), torch.rand(8, dtype=F64), drop_mask()
    a = FlowMatchingLoss(loss_op="torch")(net, x, y, noise=noise, t=t, drop=drop)[0]
    b = FlowMatchingLoss(loss_op="native")(net, x, y, noise=noise, t=t, drop=drop)[0]
    assert abs(a.item() - b.item()) < 1e-12
    d = FlowMatchingLoss(t_mean=0.0, t_std=1.0).draw(50_000, torch.zeros(50_000, 2), conditional=True,
                                                   generator=torch.Generator().manual_seed(0))
    logit = torch.log(d["t"] / (1 - d["t"]))
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1.0) < 0.02
    assert abs(d["drop"].float().mean().item() - 0.1) < 0.01


def test_guided_euler_is_classifier_free_guidance():
    net = small_mlp()
    e = torch.randn(6, 3, dtype=F64)
    y = torch.randint(0, NUM_CLASSES, (6,))
    s = 2.5
    x = fm_sample(net, e, y, steps=2, cfg_scale=s)
    z = e
    for t in (1.0, 0.5):
        ones = torch.full((6,), t, dtype=F64)
        v_c = net(z, ones, 0 * ones, y)
        v_n = net(z, ones, 0 * ones, torch.full_like(y, NUM_CLASSES))
        z = z - 0.5 * (v_n + s * (v_c - v_n))
    assert torch.allclose(x, z, rtol=1e-12, atol=1e-12)
    assert sampler_for(FlowMatchingConfig(sample_cfg=s)).nfe(2) == 4
    assert torch.equal(fm_sample(net, e, y, steps=3), sampler_for(FlowMatchingConfig())(net, e, y, steps=3))


def test_loss_vanishes_at_the_closed_form_velocity():
    """Gaussian data, u(z, t, 0) = v*(z, t), draws with e - x = v*(z): the flow-matching loss is 0."""
    from meanflow.models import JVPNetwork
    from tests.test_identity import true_v

    class GaussianVelocity(JVPNetwork):
        data_shape = (1,)

        def _forward_plain(self, z, t, h, y):
            return true_v(z, t[:, None])

    net = GaussianVelocity(backend="autograd")
    t = torch.rand(32, dtype=F64) * 0.98 + 0.01
    z = torch.randn(32, 1, dtype=F64)
    v = true_v(z, t[:, None])
    loss, _ = FlowMatchingLoss(loss_op="torch")(net, z - t[:, None] * v, None, noise=z + (1 - t[:, None]) * v, t=t)
    assert loss.item() < 1e-20
