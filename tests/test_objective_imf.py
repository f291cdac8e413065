"""iMF (meanflow.objectives.imf) against an independent float64 implementation written from the official code's
structure (Lyy-iiis/imeanflow imf.py; docs/design.md, 'iMF'): vhead(omega, y) and vhead(1, null) on every row,
vhead(w, y) on every row again, the r = t rows' own guided velocity, the JVP over the whole batch along (v_c, 1, 0) on
(z, t, r) with torch.func.jvp. Loss and parameter gradients agree for every backend, with guidance, ragged rows and
label dropout; the guidance call evaluates only what is used; the loss vanishes at the closed-form solution of
Gaussian data."""
import math

import pytest
import torch
from torch.func import jvp

from meanflow.models import IMF_CONDITIONS, JVPNetwork
from meanflow.objectives import IMFConfig, IMFLoss
from mfkernels.nn import math_attention
from tests._objective_util import F64, NUM_CLASSES, Spy, assert_same_loss_and_grads, data, drop_mask, imf_net, \
    ragged_times

TOL = 1e-9


def imf_draws(batch=8, conditional=True, equal_rows=(1, 4, 6)):
    t, r = ragged_times(batch, equal_rows)
    omega = torch.exp(torch.rand(batch, dtype=F64) * math.log(8.0))
    t_min = 0.5 * torch.rand(batch, dtype=F64)
    t_max = 0.5 + 0.5 * torch.rand(batch, dtype=F64)
    flow = r == t
    t_min[flow], t_max[flow] = 0.0, 1.0
    # a tangent row outside its interval (w = 1 there: the second v_c evaluation) and one inside
    t[0], r[0], t_min[0], t_max[0] = 0.8, 0.3, 0.2, 0.7
    t[3], r[3], t_min[3], t_max[3] = 0.6, 0.1, 0.1, 0.9
    # an r = t row given an interval that excludes t: the official code guides r = t rows with omega regardless
    t_max[6] = 0.5 * t[6]
    out = dict(t=t, r=r, omega=omega if conditional else torch.ones(batch, dtype=F64), t_min=t_min, t_max=t_max)
    if conditional:
        out["drop"] = drop_mask(batch)
    return out


def independent_imf(net, x, y, noise, d, cfg: IMFConfig):
    """The official structure, in float64."""
    t, r, omega, t_min, t_max = d["t"], d["r"], d["omega"], d["t_min"], d["t_max"]
    rows = lambda s: s[:, None, None, None] if x.dim() == 4 else s[:, None]  # noqa: E731
    z = (1 - rows(t)) * x + rows(t) * noise
    v = noise - x
    zero, one = torch.zeros_like(t), torch.ones_like(t)

    def vhead(w, labels):
        return net._forward_plain(z, t, zero, labels, head="v", omega=w, t_min=zero, t_max=one)

    with torch.no_grad():
        if y is not None:
            null = torch.full_like(y, NUM_CLASSES)
            v_c1, v_u = vhead(omega, y), vhead(one, null)
            v_g_fm = v + rows(1 - 1 / omega) * (v_c1 - v_u)
            w = torch.where((t >= t_min) & (t <= t_max), omega, one)
            v_c = vhead(w, y)
            v_g = v + rows(1 - 1 / w) * (v_c - v_u)
            v_g = torch.where(rows(r == t), v_g_fm, v_g)
            v_g = torch.where(rows(d["drop"]), v, v_g)
            labels = torch.where(d["drop"], null, y)
        else:
            v_c, v_g, labels = vhead(one, None), v, None
    cond = dict(omega=omega, t_min=t_min, t_max=t_max)
    with math_attention():
        (u, v_pred), (du_dt, _) = jvp(lambda z_, t_, r_: net._forward_plain(z_, t_, t_ - r_, labels, **cond),
                                      (z, t, r), (v_c, one, zero))
    big_v = u + rows(t - r) * du_dt.detach()

    def adp(L):
        return L / (L.detach() + cfg.eps) ** cfg.p

    loss_u = adp((big_v - v_g).pow(2).flatten(1).sum(1))
    loss_v = adp((v_pred - v_g).pow(2).flatten(1).sum(1))
    return (loss_u + loss_v).mean()


CASES = [("dit", "explicit"), ("dit", "autograd"), ("mlp", "explicit"), ("mlp", "fused"), ("mlp", "autograd")]


@pytest.mark.parametrize("kind,backend", CASES, ids=[f"{k}-{b}" for k, b in CASES])
@pytest.mark.parametrize("p", [1.0, 0.5])
def test_loss_and_gradients_match_the_official_structure(kind, backend, p):
    net = imf_net(kind)
    net.backend = backend
    cfg = IMFConfig(p=p, loss_op="torch")
    x, y = data(net)
    noise = torch.randn_like(x)
    d = imf_draws()
    loss, stats = IMFLoss(cfg)(net, x, y, noise=noise, **d)
    ref = independent_imf(net, x, y, noise, d, cfg)
    assert_same_loss_and_grads(loss, ref, list(net.parameters()), TOL)
    assert stats["jvp_rows"] == 5


@pytest.mark.parametrize("backend", ["explicit", "autograd"])
def test_iMF_own_network_plugs_in(backend):
    """The faithful iMF network (meanflow.models.imf_dit: in-context tokens, RMSNorm, SwiGLU, RoPE) trains with this
    objective through the same protocol: loss and gradients against the official structure."""
    from meanflow.models.imf_dit import build_imf_dit
    from tests.utils import randomize_

    net = randomize_(build_imf_dit("iMF-Micro/4", input_size=8, in_channels=2, num_classes=NUM_CLASSES,
                                   backend=backend).double(), 0.1)
    cfg = IMFConfig(loss_op="torch")
    x, y = data(net)
    noise, d = torch.randn_like(x), imf_draws()
    loss, _ = IMFLoss(cfg, model=net)(net, x, y, noise=noise, **d)
    assert_same_loss_and_grads(loss, independent_imf(net, x, y, noise, d, cfg), list(net.parameters()), TOL)


def test_native_op_gives_the_same_loss():
    net = imf_net("mlp")
    x, y = data(net)
    noise, d = torch.randn_like(x), imf_draws()
    a = IMFLoss(loss_op="torch")(net, x, y, noise=noise, **d)[0]
    b = IMFLoss(loss_op="native")(net, x, y, noise=noise, **d)[0]
    assert abs(a.item() - b.item()) < 1e-12


def test_unconditional_imf_takes_the_tangent_from_its_own_v_head():
    net = imf_net("mlp", num_classes=0)
    x, _ = data(net, conditional=False)
    noise, d = torch.randn_like(x), imf_draws(conditional=False)
    cfg = IMFConfig(omega_max=1.0, sample_omega=1.0, loss_op="torch")
    spy = Spy(net)
    loss, stats = IMFLoss(cfg)(spy, x, None, noise=noise, **d)
    ref = independent_imf(net, x, None, noise, d, cfg)
    assert_same_loss_and_grads(loss, ref, list(net.parameters()), TOL)
    guidance, main = spy.calls
    assert guidance["head"] == "v" and not guidance["grad"] and guidance["batch"] == 5  # the tangent rows only
    assert main["kt"] == 5 and main["grad"]


def test_guidance_call_evaluates_only_what_is_used():
    """One no-grad v-head call: v_c = vhead(w, y) on the 5 tangent rows (the dropped row 2 included: it is its
    tangent) and on the kept r = t rows (rows 1 and 6: row 4 is dropped), v_u = vhead(1, null) on the kept rows with
    w != 1 (not row 0, which lies outside its interval, nor the dropped rows 2 and 4)."""
    net = imf_net("mlp")
    x, y = data(net)
    d = imf_draws()
    spy = Spy(net)
    IMFLoss(loss_op="torch")(spy, x, y, noise=torch.randn_like(x), **d)
    guidance, main = spy.calls
    assert guidance["head"] == "v" and guidance["h_zero"] and not guidance["grad"]
    assert guidance["batch"] == (5 + 2) + (8 - 1 - 2)
    cond = guidance["conditions"]
    assert (cond["t_min"] == 0).all() and (cond["t_max"] == 1).all()
    assert (cond["omega"][-5:] == 1).all()                                  # the v_u rows
    assert main["kt"] == 5 and main["head"] is None and main["grad"]
    assert torch.equal(main["conditions"]["omega"].sort().values, d["omega"].sort().values)


def test_row_order_does_not_matter():
    net = imf_net("mlp")
    x, y = data(net)
    noise, d = torch.randn_like(x), imf_draws()
    loss = IMFLoss(loss_op="torch")(net, x, y, noise=noise, **d)[0]
    perm = torch.randperm(8)
    permuted = IMFLoss(loss_op="torch")(net, x[perm], y[perm], noise=noise[perm],
                                        **{k: v[perm] for k, v in d.items()})[0]
    assert abs(loss.item() - permuted.item()) < 1e-12


def test_own_draws_match_the_official_distributions():
    obj = IMFLoss()
    d = obj.draw(4000, torch.zeros(4000, 3), conditional=True, generator=torch.Generator().manual_seed(0))
    k = 2000
    assert (d["r"][k:] == d["t"][k:]).all() and (d["r"][:k] < d["t"][:k]).all()
    assert (d["t_min"][k:] == 0).all() and (d["t_max"][k:] == 1).all()
    assert d["t_min"][:k].max() <= 0.5 and d["t_max"][:k].min() >= 0.5
    log_omega = d["omega"].log() / math.log(8.0)                               # ~ U(0, 1)
    assert 0 <= log_omega.min() and log_omega.max() <= 1 and abs(log_omega.mean().item() - 0.5) < 0.03
    assert abs(d["drop"].float().mean().item() - 0.1) < 0.02
    assert not d["drop"][:k].any()  # the official placement: a dropped label is never a tangent row's


def official_dropped_rows(coin: torch.Tensor, k: int) -> torch.Tensor:
    """imf.py written out: rows in the official order (r = t rows first), the first sum(coin) of them dropped,
    mapped back to the engine's order (tangent rows first)."""
    batch = coin.shape[0]
    official_order = list(range(k, batch)) + list(range(k))
    drop = torch.zeros(batch, dtype=torch.bool)
    for position, row in enumerate(official_order):
        drop[row] = position < int(coin.sum())
    return drop


@pytest.mark.parametrize("batch, ratio, p", [(16, 0.5, 0.1), (7, 0.5, 0.3), (8, 0.75, 0.5), (5, 0.5, 0.95),
                                             (6, 0.0, 0.5), (6, 1.0, 0.5), (1, 0.5, 0.9)])
def test_label_dropout_follows_the_official_placement(batch, ratio, p):
    """Over many draws: the dropped rows are the official ones for the coins drawn (r = t rows first; tangent rows
    only once every r = t row is dropped), and their count is Binomial(batch, p)."""
    from meanflow.objectives.imf import dropped_rows
    from meanflow.objectives.time_sampling import num_jvp_rows

    obj = IMFLoss(IMFConfig(ratio=ratio, label_dropout=p))
    k = num_jvp_rows(batch, ratio)
    g = torch.Generator().manual_seed(batch)
    counts = []
    for _ in range(200):
        coin = torch.rand(batch, generator=g) < p
        assert torch.equal(dropped_rows(coin, k), official_dropped_rows(coin, k))
        d = obj.draw(batch, torch.zeros(batch, 2), conditional=True, generator=g)
        counts.append(int(d["drop"].sum()))
        if counts[-1] <= batch - k:
            assert not d["drop"][:k].any()
    assert abs(sum(counts) / len(counts) - batch * p) < 4 * (batch * p * (1 - p) / len(counts)) ** 0.5 + 1e-9


class GaussianIMF(JVPNetwork):
    """The closed-form average velocity u* (tests/test_identity.py) and the marginal velocity v* as the two heads of
    an unconditional network (conditions ignored: no guidance)."""

    data_shape = (1,)
    heads = ("u", "v")
    conditions = IMF_CONDITIONS

    def __init__(self):
        super().__init__(backend="autograd")

    def _forward_plain(self, z, t, h, y, head=None, **conditions):
        from tests.test_identity import true_u, true_v

        t_, h_ = t[:, None], h[:, None]
        v = true_v(z, t_)
        u = torch.where(h_ > 0, true_u(z, t_ - h_, t_), v) if head != "v" else None
        return v if head == "v" else (u if head == "u" else (u, v))


def test_loss_vanishes_at_the_closed_form_solution():
    """Gaussian data: with u = u*, v = v* and draws whose conditional velocity e - x equals v*(z) (x = z - t v*,
    e = z + (1 - t) v*), V = u + (t - r) du/dt along the model's own v is v* exactly: loss_u = loss_v = 0."""
    from tests.test_identity import true_v

    net = GaussianIMF()
    batch = 16
    t, r = ragged_times(batch, equal_rows=(3, 7, 11))
    z = torch.randn(batch, 1, dtype=F64) * 2
    v_star = true_v(z, t[:, None])
    x, noise = z - t[:, None] * v_star, z + (1 - t[:, None]) * v_star
    d = dict(t=t, r=r, omega=torch.ones(batch, dtype=F64), t_min=torch.zeros(batch, dtype=F64),
             t_max=torch.ones(batch, dtype=F64))
    _, stats = IMFLoss(omega_max=1.0, sample_omega=1.0, p=0.0, loss_op="torch")(net, x, None, noise=noise, **d)
    assert stats["raw_loss"] < 1e-20 and stats["v_loss"] < 1e-20


@pytest.mark.parametrize("where", ["t_min", "t_max", "inside", "just_below", "just_above"])
def test_rows_exactly_on_an_interval_end_are_guided(where):
    """The official w = where((t >= t_min) & (t <= t_max), omega, 1): a tangent row with t exactly on either end of
    its interval is guided; a hair outside it is not. Checked against the official structure."""
    net = imf_net("mlp")
    x, y = data(net)
    noise = torch.randn_like(x)
    d = imf_draws()
    d["drop"][:] = False
    lo, hi = 0.3, 0.6
    t0 = {"t_min": lo, "t_max": hi, "inside": 0.45, "just_below": lo - 1e-9, "just_above": hi + 1e-9}[where]
    d["t"][0], d["r"][0], d["t_min"][0], d["t_max"][0], d["omega"][0] = t0, 0.1, lo, hi, 5.0
    cfg = IMFConfig(loss_op="torch")
    loss, _ = IMFLoss(cfg)(net, x, y, noise=noise, **d)
    assert_same_loss_and_grads(loss, independent_imf(net, x, y, noise, d, cfg), list(net.parameters()), TOL)


def test_sampler_takes_the_configured_guidance_and_interval():
    """imf_sample / sampler_for(IMFConfig) against the official sample_one_step written out: z_r = z_t - (t - r)
    u(z_t, t, t - r | y, omega, t_min, t_max) with the config's sample_omega, sample_t_min and sample_t_max."""
    from meanflow.evaluation.samplers import sampler_for

    net = imf_net("mlp")
    cfg = IMFConfig(sample_omega=3.0, sample_t_min=0.2, sample_t_max=0.7)
    noise = torch.randn(5, *net.data_shape, dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1])
    seen = []
    real = net._forward_plain

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("omega", "t_min", "t_max")})
        return real(*args, **kwargs)

    z = noise
    for t, r in ((1.0, 0.5), (0.5, 0.0)):  # 2 steps: the default midpoint 0.5
        ones = torch.ones(5, dtype=F64)
        u = real(z, t * ones, (t - r) * ones, y, head="u", omega=3.0 * ones, t_min=0.2 * ones, t_max=0.7 * ones)
        z = z - (t - r) * u
    net._forward_plain = spy
    out = sampler_for(cfg)(net, noise, y, steps=2)
    torch.testing.assert_close(out, z, atol=1e-13, rtol=1e-13)
    assert len(seen) == 2 and all((c["omega"] == 3.0).all() and (c["t_min"] == 0.2).all() and
                                  (c["t_max"] == 0.7).all() for c in seen)

