"""The MeanFlow identity on 1-D Gaussian data, where everything is known in closed form.

Data x ~ N(mu, s^2), noise e ~ N(0, 1), z_t = (1 - t) x + t e. The marginal at time t is N(m_t, sigma_t^2) with
m_t = (1 - t) mu, sigma_t^2 = (1 - t)^2 s^2 + t^2; in 1-D the flow is the monotone (affine) map between these Gaussians:
    z_r = m_r + (sigma_r / sigma_t) (z_t - m_t),   so   u(z, r, t) = (z - m_r - (sigma_r / sigma_t)(z - m_t)) / (t - r)
and the instantaneous marginal velocity is v(z, t) = -mu + (sigma_t' / sigma_t) (z - m_t).
"""
import pytest
import torch

from meanflow import MeanFlowLoss, MLPNet, sample
from meanflow.models import JVPNetwork

F64 = torch.float64
MU, S = 1.5, 0.5


def _m(t):
    return (1 - t) * MU


def _sigma(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def true_u(z, r, t):
    return (z - _m(r) - _sigma(r) / _sigma(t) * (z - _m(t))) / (t - r)


def true_v(z, t):
    dsigma = (-(1 - t) * S**2 + t) / _sigma(t)
    return -MU + dsigma / _sigma(t) * (z - _m(t))


class GaussianAverageVelocity(JVPNetwork):
    """The exact average velocity as a 'network' u(z, t, h), differentiated by the autograd backend."""

    data_shape = (1,)

    def __init__(self):
        super().__init__(backend="autograd")

    def _forward_plain(self, z, t, h, y):
        t_, h_ = t[:, None], h[:, None]
        return true_u(z, t_ - h_, t_)


def test_target_reproduces_the_true_average_velocity():
    """With v_g = the marginal velocity, u_tgt = v - (t - r) (v d_z u + d_t u) equals u exactly."""
    net = GaussianAverageVelocity()
    z = torch.randn(64, 1, dtype=F64) * 2
    t = torch.rand(64, dtype=F64) * 0.98 + 0.01
    r = t * torch.rand(64, dtype=F64) * 0.99
    v = true_v(z, t[:, None])
    ones = torch.ones_like(t)
    u, du_dt = net(z, t, t - r, tangents=(v, ones, ones))
    u_tgt = v - (t - r)[:, None] * du_dt
    assert (u_tgt - u).abs().max() < 1e-10
    assert (u - true_u(z, r[:, None], t[:, None])).abs().max() < 1e-12
    # and the limit r -> t of the average velocity is the instantaneous one
    assert (true_u(z, t[:, None] - 1e-7, t[:, None]) - v).abs().max() < 1e-5


def test_conditional_target_is_unbiased():
    """With the conditional velocity e - x (what training sees), the target equals u on average over (x, e) | z."""
    net = GaussianAverageVelocity()
    t0, r0, z0 = 0.7, 0.2, 0.3
    n = 400_000
    # sample (x, e) from the posterior given z_t = z0: x | z is Gaussian (linear-Gaussian model)
    a, b = 1 - t0, t0
    var_x = 1 / (1 / S**2 + a**2 / b**2)
    mean_x = var_x * (MU / S**2 + a * z0 / b**2)
    x = mean_x + var_x**0.5 * torch.randn(n, 1, dtype=F64)
    e = (z0 - a * x) / b
    z = torch.full((n, 1), z0, dtype=F64)
    t, r = torch.full((n,), t0, dtype=F64), torch.full((n,), r0, dtype=F64)
    u, du_dt = net(z, t, t - r, tangents=(e - x, torch.ones_like(t), torch.ones_like(t)))
    u_tgt = (e - x) - (t0 - r0) * du_dt
    assert abs(u_tgt.mean().item() - u[0].item()) < 4 * u_tgt.std().item() / n**0.5 + 1e-9


def _grid_error(model):
    """Mean relative error of u against the closed form on a grid of (z, r, t) where the marginal has mass."""
    t = torch.tensor([0.3, 0.6, 0.9]).repeat_interleave(3 * 41)
    r = t * torch.tensor([0.0, 0.4, 0.8]).repeat_interleave(41).repeat(3)
    z = (_m(t) + _sigma(t) * torch.linspace(-2, 2, 41).repeat(9))[:, None]
    with torch.no_grad():
        u = model(z, t, t - r)
    target = true_u(z.double(), r[:, None].double(), t[:, None].double()).float()
    return ((u - target).abs().mean() / target.abs().mean()).item()


@pytest.mark.full
def test_small_mlp_learns_the_closed_form():
    """A real learning test: MeanFlowLoss on 1-D Gaussian data (conditional velocities, as in training) drives an MLP
    to the closed-form average velocity, and its 1-step samples to the data distribution."""
    torch.manual_seed(0)
    model = MLPNet(dim=1, hidden=64, depth=2)
    assert _grid_error(model) > 0.5
    steps = 1000
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    loss_fn = MeanFlowLoss(time_sampler="uniform", ratio=0.75, p=0.0, loss_op="torch")
    for _ in range(steps):
        loss, _ = loss_fn(model, MU + S * torch.randn(1024, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    err = _grid_error(model)
    assert err < 0.08, f"relative mean error {err:.3f} against the closed form"
    for steps in (1, 2):
        x = sample(model, torch.randn(20_000, 1), steps=steps)
        assert abs(x.mean().item() - MU) < 0.08 and abs(x.std().item() - S) < 0.08, (steps, x.mean(), x.std())
