"""alpha-Flow (meanflow.objectives.alphaflow) against an independent float64 implementation in the official code's
structure (snap-research/alphaflow src/training/loss.py; docs/design.md, 'alpha-Flow'): the batch split into
continuous rows (dt = 0: the MeanFlow target by torch.func.jvp along (v_g, 0 on r, 1 on t)) and discrete rows (dt =
alpha (t - r): one extra forward at (z - dt v_g, r, t - dt), clipped), per-sample mean errors weighted (1 or alpha) /
(L + eps). Every backend, guidance, ragged rows, label dropout, alpha in {0, 0.3, 1}; the alpha = 0 and alpha = 1
limits equal MeanFlow and flow matching; the schedule follows the official get_ratio."""
import pytest
import torch
from torch.func import jvp

from meanflow.objectives import AlphaFlowConfig, AlphaFlowLoss, FlowMatchingLoss, MeanFlowConfig, MeanFlowLoss, \
    alpha_at
from mfkernels.nn import math_attention
from tests._objective_util import NUM_CLASSES, Spy, assert_same_loss_and_grads, data, drop_mask, ragged_times, \
    small_mlp, tiny_dit

TOL = 1e-9


def rows(s, like):
    return s.reshape((-1,) + (1,) * (like.dim() - 1))


def guided(net, z, t, v, y, drop, cfg):
    """MeanFlow's guided velocity (docs/design.md, 'Guidance folded into training'), two full no-grad forwards."""
    if not cfg.guided:
        return v
    null = torch.full_like(y, NUM_CLASSES)
    zero = torch.zeros_like(t)
    with torch.no_grad():
        u_null = net._forward_plain(z, t, zero, null)
        u_cond = net._forward_plain(z, t, zero, y)
    v_hat = cfg.omega * v + (1 - cfg.omega - cfg.kappa) * u_null + cfg.kappa * u_cond
    apply = (t >= cfg.t_start) & (t <= cfg.t_end) & ~drop
    return torch.where(rows(apply, v), v_hat, v)


def independent_alphaflow(net, x, y, noise, t, r, drop, cfg: AlphaFlowConfig, alpha: float):
    z = (1 - rows(t, x)) * x + rows(t, x) * noise
    v = noise - x
    labels = torch.where(drop, torch.full_like(y, NUM_CLASSES), y) if y is not None else None
    v_g = guided(net, z, t, v, y, drop, cfg) if y is not None else v
    dt = torch.where(r == t, torch.zeros_like(t), alpha * (t - r))
    mask_c = dt == 0
    target = torch.empty_like(v)
    with torch.no_grad():
        if mask_c.any():
            c = mask_c
            with math_attention():
                _, dudt = jvp(lambda z_, r_, t_: net._forward_plain(z_, t_, t_ - r_, labels[c] if labels is not None
                                                                    else None),
                              (z[c], r[c], t[c]), (v_g[c], torch.zeros_like(t[c]), torch.ones_like(t[c])))
            target[c] = v_g[c] - rows(t[c] - r[c], dudt) * dudt
        d = ~mask_c
        if d.any():
            dd = dt[d]
            t_next = t[d] - dd
            u_next = net._forward_plain(z[d] - rows(dd, z) * v_g[d], t_next, t_next - r[d],
                                        labels[d] if labels is not None else None)
            tgt = (rows(dd, z) * v_g[d] + rows(t_next - r[d], z) * u_next) / rows(t[d] - r[d], z)
            target[d] = tgt.clamp(-cfg.clamp, cfg.clamp)
    pred = net._forward_plain(z, t, t - r, labels)
    L = (pred - target).pow(2).flatten(1).mean(1)
    weight = torch.where(mask_c, torch.ones_like(t), alpha * torch.ones_like(t)) / (L.detach() + cfg.eps) ** cfg.p
    return (weight * L).mean()


GUIDANCE = [dict(), dict(omega=0.6, p=0.5), dict(omega=1.0, kappa=0.5, t_start=0.1, t_end=0.8)]
CASES = [("dit", "explicit"), ("dit", "autograd"), ("mlp", "explicit"), ("mlp", "fused"), ("mlp", "autograd")]


def af_net(kind, num_classes=NUM_CLASSES):
    return (tiny_dit if kind == "dit" else small_mlp)(num_classes)


@pytest.mark.parametrize("kind,backend", CASES, ids=[f"{k}-{b}" for k, b in CASES])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_and_gradients_match_the_official_structure(kind, backend, alpha):
    net = af_net(kind)
    net.backend = backend
    cfg = AlphaFlowConfig(omega=1.0, kappa=0.5, clamp=2.0, loss_op="torch")
    x, y = data(net)
    noise = torch.randn_like(x)
    t, r = ragged_times()
    drop = drop_mask()
    loss, stats = AlphaFlowLoss(cfg)(net, x, y, noise=noise, t=t, r=r, drop=drop, alpha=alpha)
    ref = independent_alphaflow(net, x, y, noise, t, r, drop, cfg, alpha)
    assert_same_loss_and_grads(loss, ref, list(net.parameters()), TOL)
    assert stats["jvp_rows"] == (5 if alpha == 0 else 0) and stats["extra_rows"] == (5 if alpha == 0.3 else 0)


@pytest.mark.parametrize("guidance", GUIDANCE, ids=["none", "omega", "kappa-interval"])
def test_guidance_settings(guidance):
    net = af_net("mlp")
    cfg = AlphaFlowConfig(loss_op="torch", clamp=1.5, **guidance)
    x, y = data(net)
    noise, (t, r), drop = torch.randn_like(x), ragged_times(), drop_mask()
    for alpha in (0.0, 0.6):
        loss = AlphaFlowLoss(cfg)(net, x, y, noise=noise, t=t, r=r, drop=drop, alpha=alpha)[0]
        ref = independent_alphaflow(net, x, y, noise, t, r, drop, cfg, alpha)
        assert_same_loss_and_grads(loss, ref, list(net.parameters()), TOL)


def test_alpha_zero_is_meanflow():
    """alpha = 0: the MeanFlow loss with p = 1 and eps * D (alpha-Flow averages over the sample, MeanFlow sums):
    the same value and gradients, and the same calls (tangents on the r != t rows only, small guidance forwards)."""
    net = af_net("dit")
    x, y = data(net)
    noise, (t, r), drop = torch.randn_like(x), ragged_times(), drop_mask()
    g = dict(omega=0.5, kappa=0.3, t_start=0.2, t_end=0.9)
    af, mf = Spy(net), Spy(net)
    loss = AlphaFlowLoss(AlphaFlowConfig(eps=1e-3, loss_op="torch", **g))(af, x, y, noise=noise, t=t, r=r, drop=drop,
                                                                         alpha=0.0)[0]
    ref = MeanFlowLoss(MeanFlowConfig(p=1.0, eps=1e-3 * x[0].numel(), loss_op="torch", **g))(
        mf, x, y, noise=noise, t=t, r=r, drop=drop)[0]
    assert_same_loss_and_grads(loss, ref, list(net.parameters()), 1e-12)
    assert [(c["batch"], c["kt"]) for c in af.calls] == [(c["batch"], c["kt"]) for c in mf.calls]


def test_alpha_one_is_flow_matching():
    """alpha = 1 on r = t rows everywhere (ratio 0): every target is v_g, the loss is flow matching's per-sample error
    under the adaptive weight, mean_i L_i / (sg L_i + eps) with L_i = FM's L_i / D, and no row needs a tangent."""
    net = af_net("mlp")
    x, y = data(net)
    noise, t = torch.randn_like(x), torch.rand(8, dtype=x.dtype)
    drop = drop_mask()
    spy = Spy(net)
    loss, stats = AlphaFlowLoss(eps=1e-3, loss_op="torch")(spy, x, y, noise=noise, t=t, r=t, drop=drop, alpha=1.0)
    assert [c["kt"] for c in spy.calls] == [None] and stats["jvp_rows"] == 0
    _, fm_stats = FlowMatchingLoss(loss_op="torch")(net, x, y, noise=noise, t=t, drop=drop)
    # per-row FM errors, recomputed from FM's own definition
    z = (1 - t[:, None]) * x + t[:, None] * noise
    y_in = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
    L = (net(z, t, torch.zeros_like(t), y_in) - (noise - x)).pow(2).sum(1)
    assert abs(L.mean().item() - fm_stats["loss"].item()) < 1e-12
    L = L / x.shape[1]
    assert_same_loss_and_grads(loss, (L / (L.detach() + 1e-3)).mean(), list(net.parameters()), 1e-12)
    # with r != t rows, alpha = 1 still takes v_g as every target (trajectory flow matching): no tangent, no extra call
    t2, r2 = ragged_times()
    spy.calls.clear()
    _, stats = AlphaFlowLoss(loss_op="torch")(spy, x, y, noise=noise, t=t2, r=r2, drop=drop, alpha=1.0)
    assert [c["kt"] for c in spy.calls] == [None] and stats["extra_rows"] == 0


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_native_op_used_at_the_limits_gives_the_mean_form(p):
    net = af_net("mlp")
    x, y = data(net)
    noise, (t, r), drop = torch.randn_like(x), ragged_times(), drop_mask()
    cfg = AlphaFlowConfig(p=p, clamp=2.0)
    for alpha in (0.0, 1.0):
        a = AlphaFlowLoss(cfg.replace(loss_op="torch"))(net, x, y, noise=noise, t=t, r=r, drop=drop, alpha=alpha)[0]
        b = AlphaFlowLoss(cfg.replace(loss_op="native"))(net, x, y, noise=noise, t=t, r=r, drop=drop, alpha=alpha)[0]
        assert abs(a.item() - b.item()) < 1e-12
        assert_same_loss_and_grads(a, independent_alphaflow(net, x, y, noise, t, r, drop, cfg, alpha),
                                   list(net.parameters()), 1e-9)


def test_schedule_follows_the_official_sigmoid():
    import math

    cfg = AlphaFlowConfig(alpha_start_step=100, alpha_end_step=1100, gamma=25.0, alpha_snap=0.005)
    assert alpha_at(0, cfg) == 1.0 and alpha_at(100, cfg) == 1.0 and alpha_at(1100, cfg) == 0.0
    assert alpha_at(5000, cfg) == 0.0 and alpha_at(600, cfg) == pytest.approx(0.5)
    step = 700
    expected = 1.0 - 1.0 / (1 + math.exp(-25.0 * (step - 600) / 1000))
    assert alpha_at(step, cfg) == pytest.approx(expected, abs=1e-15)
    values = [alpha_at(s, cfg) for s in range(0, 1200, 10)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    snapped = [a for a in values if 0 < a < 1]
    assert min(snapped) >= 0.005 and max(snapped) <= 0.995                      # snapped to exactly 0 / 1 beyond
    # alpha_end_step = 0: the run's length (the trainer passes total_steps)
    lazy = AlphaFlowConfig()
    with pytest.raises(ValueError, match="pass total_steps"):
        alpha_at(3, lazy)
    assert AlphaFlowLoss(lazy, total_steps=1000).alpha(500) == pytest.approx(0.5)
    assert alpha_at(7, AlphaFlowConfig(alpha_schedule="constant", alpha_start=0.3)) == 0.3
    assert alpha_at(600, AlphaFlowConfig(alpha_schedule="linear", alpha_start_step=100,
                                         alpha_end_step=1100)) == pytest.approx(0.5)


def test_step_drives_alpha():
    net = af_net("mlp")
    x, y = data(net)
    obj = AlphaFlowLoss(alpha_end_step=100)
    g = torch.Generator().manual_seed(0)
    assert obj(net, x, y, step=0, generator=g)[1]["alpha"] == 1.0
    assert obj(net, x, y, step=50, generator=g)[1]["alpha"] == pytest.approx(0.5)
    assert obj(net, x, y, step=100, generator=g)[1]["alpha"] == 0.0


def test_a_call_without_step_is_the_end_of_the_schedule():
    """Without `step` (outside the trainer) alpha is the schedule's end: the MeanFlow end of the curriculum."""
    net = af_net("mlp")
    x, y = data(net)
    obj = AlphaFlowLoss(alpha_end_step=100)
    draws = obj.draw(x.shape[0], x, conditional=True, generator=torch.Generator().manual_seed(0))
    loss, stats = obj(net, x, y, **draws)
    assert stats["alpha"] == 0.0
    assert loss.item() == obj(net, x, y, step=100, **draws)[0].item()
    assert loss.item() != obj(net, x, y, step=0, **draws)[0].item()

