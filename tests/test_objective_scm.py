"""sCM on TrigFlow (meanflow.objectives.scm) against an independent float64 implementation in FastGen's structure
(NVlabs/FastGen sCM.py; docs/design.md, 'sCM'): F and logvar from a plain forward, F_jvp from torch.func.jvp of the
wrapper F(x_t, t) along (cos t sin t dx_t/dt, cos t sin t), then the normalised tangent g and the logvar-weighted
loss. Both parametrizations, every backend, ragged labels; the tangent equals a finite difference of F along the
TrigFlow path; the tangent target vanishes for the exact consistency function of Gaussian data; the draws follow the
truncated log-normal; the 1- and 2-step samplers are the consistency function."""
import math

import pytest
import torch
from torch.func import jvp

from meanflow.models import JVPNetwork
from meanflow.objectives import SCMConfig, SCMLoss
from meanflow.objectives.scm import consistency_fn, sample_trigflow_times, tangent_target, trigflow_F
from mfkernels.nn import math_attention
from tests._objective_util import F64, NUM_CLASSES, Spy, assert_same_loss_and_grads, data, drop_mask, small_mlp, \
    tiny_dit

TOL = 1e-9


def scm_net(kind: str, num_classes: int = NUM_CLASSES):
    return (tiny_dit if kind == "dit" else small_mlp)(num_classes, logvar=True)


def rows(s, like):
    return s.reshape((-1,) + (1,) * (like.dim() - 1))


def independent_F(net, x_t, t, y, sd, parametrization):
    """F(x_t, t | y) as FastGen's TrigFlowPrecond-style wrapper, written out directly."""
    zero = torch.zeros_like(t)
    if parametrization == "direct":
        return net._forward_plain(x_t / sd, 2 * t / math.pi, zero, y, head="u")
    a = torch.cos(t) + sd * torch.sin(t)
    v = net._forward_plain(x_t / rows(a, x_t), sd * torch.sin(t) / a, zero, y, head="u")
    return (x_t * rows(torch.cos(t) - torch.sin(t) / sd, x_t) + v) / rows(a, x_t)


def independent_scm(net, x, y, noise, t, drop, cfg: SCMConfig, r_w: float):
    sd = cfg.sigma_data
    labels = torch.where(drop, torch.full_like(y, NUM_CLASSES), y) if y is not None else None
    cos, sin = rows(torch.cos(t), x), rows(torch.sin(t), x)
    z = sd * noise
    x_t = cos * x + sin * z
    dxdt = cos * z - sin * x
    F = independent_F(net, x_t, t, labels, sd, cfg.parametrization)
    if cfg.parametrization == "direct":
        logvar = net._forward_plain(x_t, 2 * t / math.pi, torch.zeros_like(t), labels, head="logvar")
    else:
        logvar = net._forward_plain(x_t, sd * torch.sin(t) / (torch.cos(t) + sd * torch.sin(t)), torch.zeros_like(t),
                                    labels, head="logvar")
    with torch.no_grad(), math_attention():
        v_t = torch.cos(t) * torch.sin(t)
        _, F_jvp = jvp(lambda a, b: independent_F(net, a, b, labels, sd, cfg.parametrization), (x_t, t),
                       (rows(v_t, x) * dxdt, v_t))
        g = -cos * cos * (sd * F.detach() - dxdt) - r_w * (cos * sin * x_t + sd * F_jvp)
        norm = g.flatten(1).norm(dim=1) / math.sqrt(x[0].numel())
        g = g / (rows(norm, g) + cfg.g_norm_eps)
    D = x[0].numel()
    per_row = (F - F.detach() - g).pow(2).flatten(1).mean(1)
    return (1 / (sd * torch.tan(t)) / (torch.exp(logvar) * D) * per_row + logvar).mean()


def draws(batch=8, conditional=True):
    t = torch.rand(batch, dtype=F64) * 1.5 + 0.02            # TrigFlow time in (0, pi/2)
    return dict(t=t, drop=drop_mask(batch) if conditional else None)


CASES = [("dit", "explicit"), ("dit", "autograd"), ("mlp", "explicit"), ("mlp", "fused"), ("mlp", "autograd")]


@pytest.mark.parametrize("kind,backend", CASES, ids=[f"{k}-{b}" for k, b in CASES])
@pytest.mark.parametrize("parametrization", ["direct", "flow"])
def test_loss_and_gradients_match_fastgen_structure(kind, backend, parametrization):
    net = scm_net(kind)
    net.backend = backend
    cfg = SCMConfig(parametrization=parametrization, sigma_data=0.7, warmup_steps=100)
    x, y = data(net)
    noise, d = torch.randn_like(x), draws()
    loss, stats = SCMLoss(cfg)(net, x, y, noise=noise, step=40, **d)
    ref = independent_scm(net, x, y, noise, d["t"], d["drop"], cfg, r_w=0.4)
    params = list(net.parameters())
    assert_same_loss_and_grads(loss, ref, params, TOL)
    assert stats["jvp_rows"] == 8 and stats["r_w"] == 0.4
    # the logvar head is trained: it has a gradient
    grads = dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(loss, params)))
    assert grads["logvar.linear.weight"].abs().max() > 0


def test_every_row_gets_a_tangent_with_its_own_time_tangent():
    net = scm_net("mlp")
    spy = Spy(net)
    x, y = data(net)
    SCMLoss()(spy, x, y, noise=torch.randn_like(x), **draws())
    (call,) = spy.calls
    assert call["kt"] == 8 and call["grad"] and call["h_zero"] and call["head"] is None


@pytest.mark.parametrize("parametrization", ["direct", "flow"])
def test_tangent_is_a_finite_difference_along_the_trigflow_path(parametrization):
    """F_jvp = cos t sin t dF/dt along x_t = cos t x0 + sin t z: a central difference of F at t +- delta."""
    net = scm_net("mlp")
    obj = SCMLoss(sigma_data=0.6, parametrization=parametrization)
    x0, y = data(net)
    z = 0.6 * torch.randn_like(x0)
    t = torch.rand(8, dtype=F64) * 1.4 + 0.05

    def path(s):
        return rows(torch.cos(s), x0) * x0 + rows(torch.sin(s), x0) * z

    dxdt = rows(torch.cos(t), x0) * z - rows(torch.sin(t), x0) * x0
    _, F_jvp, _ = obj.F_and_tangent(net, path(t), t, dxdt, y)
    delta = 1e-6
    with torch.no_grad():
        f_plus = trigflow_F(net, path(t + delta), t + delta, y, 0.6, parametrization)
        f_minus = trigflow_F(net, path(t - delta), t - delta, y, 0.6, parametrization)
    fd = rows(torch.cos(t) * torch.sin(t), x0) * (f_plus - f_minus) / (2 * delta)
    assert (F_jvp - fd).abs().max() < 1e-7 * fd.abs().max()


def test_times_at_the_ends_are_refused():
    net = scm_net("mlp")
    x, y = data(net)
    for bad in (0.0, math.pi / 2):
        t = torch.full((8,), 0.5, dtype=F64)
        t[3] = bad
        with pytest.raises(ValueError, match=r"must lie in \(0, pi/2\) strictly"):
            SCMLoss()(net, x, y, noise=torch.randn_like(x), t=t, drop=drop_mask())


def test_warmup_scales_the_tangent_term():
    obj = SCMLoss(warmup_steps=1000)
    assert [obj.warmup(s) for s in (0, 250, 1000, 5000, None)] == [0.0, 0.25, 1.0, 1.0, 1.0]
    assert SCMLoss(warmup_steps=0).warmup(3) == 1.0


def test_a_call_without_step_is_the_end_of_the_warm_up():
    """Outside the trainer (evaluation, a user's loop) the loss is called without `step`: the tangent term is then
    complete (r_w = 1), the loss of step >= warmup_steps, not of step 0."""
    net = scm_net("mlp")
    x, y = data(net)
    obj = SCMLoss(warmup_steps=1000)
    draws = obj.draw(x.shape[0], x, conditional=True, generator=torch.Generator().manual_seed(0))
    without = obj(net, x, y, **draws)[0]
    assert without.item() == obj(net, x, y, step=1000, **draws)[0].item()
    assert without.item() != obj(net, x, y, step=0, **draws)[0].item()


def test_times_follow_the_truncated_log_normal():
    cfg = SCMConfig(p_mean=-1.0, p_std=1.4, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    t = sample_trigflow_times(200_000, cfg, "cpu", dtype=F64, generator=torch.Generator().manual_seed(0))
    log_sigma = torch.log(0.5 * torch.tan(t))
    assert log_sigma.min() >= math.log(0.002) - 1e-9 and log_sigma.max() <= math.log(80.0) + 1e-9
    # truncation at +-2.5 to 3.3 std removes little: mean and std close to the untruncated ones
    assert abs(log_sigma.mean().item() + 1.0) < 0.02 and abs(log_sigma.std().item() - 1.4) < 0.03
    narrow = SCMConfig(sigma_min=0.3, sigma_max=0.5)
    t = sample_trigflow_times(1000, narrow, "cpu", dtype=F64)
    s = 0.5 * torch.tan(t)
    assert s.min() >= 0.3 - 1e-9 and s.max() <= 0.5 + 1e-9


# ------------------------------------------------------------------------------------------------ closed form
MU, S, SD = 1.5, 0.5, 0.8   # data N(MU, S^2), sigma_d


def _m(t):
    return torch.cos(t) * MU


def _v(t):
    return torch.sqrt(torch.cos(t) ** 2 * S**2 + torch.sin(t) ** 2 * SD**2)


def consistency_F(x_t, t):
    """The exact TrigFlow consistency function of 1-D Gaussian data: f = MU + (S / v_t)(x_t - m_t) (the PF-ODE map is
    affine), and F = (cos t x_t - f) / (sigma_d sin t)."""
    f = MU + S / _v(t) * (x_t - _m(t))
    return (torch.cos(t) * x_t - f) / (SD * torch.sin(t))


def pf_velocity(x_t, t):
    dv = (torch.sin(t) * torch.cos(t) * (SD**2 - S**2)) / _v(t)
    return -torch.sin(t) * MU + dv / _v(t) * (x_t - _m(t))


class GaussianConsistency(JVPNetwork):
    """F as a network of (x_t / sigma_d, 2t/pi) with a zero logvar head (autograd backend)."""

    data_shape = (1,)
    heads = ("u", "logvar")

    def __init__(self):
        super().__init__(backend="autograd")

    def _forward_plain(self, z, c, h, y, head=None):
        t = c * math.pi / 2
        logvar = 0 * c
        if head == "logvar":
            return logvar
        F = consistency_F(z * SD, t[:, None])
        return F if head == "u" else (F, logvar)


def test_tangent_target_vanishes_for_the_exact_consistency_function():
    """With F the exact consistency function and dx_t/dt the PF-ODE velocity, g = 0 (df/dt = 0 along the ODE); and
    with draws whose conditional velocity is that velocity (x0 = cos x_t - sin v, z = sin x_t + cos v) the whole loss
    is logvar = 0."""
    net = GaussianConsistency()
    obj = SCMLoss(sigma_data=SD)
    t = torch.rand(64, dtype=F64) * 1.4 + 0.1
    x_t = (_m(t) + _v(t) * torch.linspace(-2, 2, 64, dtype=F64))[:, None]
    dxdt = pf_velocity(x_t, t[:, None])
    F, F_jvp, _ = obj.F_and_tangent(net, x_t, t, dxdt, None)
    g = tangent_target(F, F_jvp, x_t, dxdt, t, SD, r_w=1.0)
    assert g.abs().max() < 1e-12 and (F - consistency_F(x_t, t[:, None])).abs().max() < 1e-12
    cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x0, z = cos * x_t - sin * dxdt, sin * x_t + cos * dxdt
    loss, stats = obj(net, x0, None, noise=z / SD, t=t)
    assert abs(loss.item()) < 1e-20 and stats["raw_loss"] < 1e-20


def test_samplers_apply_the_consistency_function():
    """1 step: x0 = f(sigma_d e, t_max); 2 steps: re-noise to t_mid and apply f again (exact for the closed form)."""
    from meanflow.evaluation.samplers import scm_sample

    net = GaussianConsistency()
    cfg = SCMConfig(sigma_data=SD)
    e = torch.randn(20_000, 1, dtype=F64)
    x1 = scm_sample(net, e, None, steps=1, config=cfg)
    t_max = torch.full((20_000,), cfg.t_max, dtype=F64)
    assert torch.allclose(x1, consistency_fn(net, SD * e, t_max, None, SD, "direct"))
    assert abs(x1.mean().item() - MU) < 0.03 and abs(x1.std().item() - S) < 0.03
    x2 = scm_sample(net, e, None, steps=2, config=cfg, generator=torch.Generator().manual_seed(1))
    assert abs(x2.mean().item() - MU) < 0.03 and abs(x2.std().item() - S) < 0.03 and not torch.equal(x1, x2)
