"""TVM (meanflow.objectives.tvm) against an independent float64 implementation written in the official code's structure
(lumalabs/tvm training/loss.py sample_ts and __call__, training/wrapper.py get_dfds and forward, training_loop.py's
reduction; generate_images.py generator_fn), with every random draw explicit: the loss and EVERY parameter gradient,
through the JVP, on every backend (autograd: torch.func.jvp; explicit: the reference ops with tangent_grad; fused: the
Triton ops' tangent backward, in the interpreter); the stop-gradient variant (detach_jvp) on every backend; the
isclose(r, t) masking; non-finite rows both ways; the time draws; the sampler; and in the trainer: the teacher (equal to
the network at step 0, then the 0.01 EMA), an exactly resumed run, the non-finite-loss error.

The network-level argument (`tangent_grad`) is checked in test_tangent_grad_* against a double-backward reference, for
every network (DiT, MLP, iMF, a wrapped diffusers DiT; the MMDiT block; the bring-your-own example in
tests/test_byo_network.py) on every backend, and its refusals."""
import contextlib
import copy
import json
import math
from unittest import mock

import pytest
import torch

from meanflow.models import TVM_CONDITIONS, DiT, MLPNet
from meanflow.objectives import TVMConfig, TVMLoss
from meanflow.objectives.tvm import sample_beta, sample_tvm_times
from meanflow.evaluation.samplers import sampler_for, tvm_sample
from meanflow.training import CUDAGraphModel, NonFiniteLossError
from meanflow.training.config import apply_overrides
from meanflow.training.presets import get_preset
from meanflow.training.trainer import Trainer
from mfkernels.nn import math_attention
from tests._objective_util import F64, NUM_CLASSES, assert_same_loss_and_grads
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)
from tests.utils import max_rel_err, randomize_

# Every backend differentiates the tangent: autograd (torch.func.jvp), explicit (the reference ops with
# tangent_grad) and fused (the Triton ops' tangent backward, in the interpreter here).
BACKENDS = [("dit", "autograd"), ("mlp", "autograd"), ("dit", "explicit"), ("mlp", "explicit"), ("dit", "fused"),
            ("mlp", "fused")]
IDS = ["dit-autograd", "mlp-autograd", "dit-explicit", "mlp-explicit", "dit-fused", "mlp-fused"]
B = 6


def tvm_net(kind: str, backend: str = "autograd", num_classes: int = NUM_CLASSES):
    if kind == "dit":
        net = DiT(8, 2, 16, 2, 2, 4, num_classes=num_classes, conditions=TVM_CONDITIONS, backend=backend)
    else:
        net = MLPNet(3, 16, 3, num_classes=num_classes, conditions=TVM_CONDITIONS, backend=backend)
    return randomize_(net.double(), 0.2)


# ------------------------------------------------------------------------- the official code, in float64
def _layer_norm_by_formula(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    y = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    return y * (weight if weight is not None else 1) + (bias if bias is not None else 0)


@contextlib.contextmanager
def exact_layer_norm():
    """The references' own layer norm while they differentiate a tangent: torch's F.layer_norm gives wrong gradients
    of its tangent (its forward-mode rule treats the saved statistics as constants; measured in
    test_torch_layer_norm_tangent_gradient_is_wrong), which would make the references wrong for the DiT."""
    with mock.patch("torch.nn.functional.layer_norm", _layer_norm_by_formula):
        yield


def official_sample_ts(eps_gap, u, eps_fm, s_P_mean=-0.4, s_P_std=1.0, gap_P_mean=-0.8, gap_P_std=1.0):
    """training/loss.py TVMLoss.sample_ts with its three random draws (two standard normals, one uniform) passed in."""
    log_len = eps_gap * gap_P_std + gap_P_mean
    len_ = log_len.sigmoid()
    maxs = 1 - len_
    max_logns = torch.log(maxs / (1 - maxs))
    dist = torch.distributions.Normal(loc=torch.full_like(len_, s_P_mean), scale=torch.full_like(len_, s_P_std))
    lowest = dist.cdf(torch.full_like(len_, -math.inf))
    cdf = u * (dist.cdf(max_logns) - lowest) + lowest
    s = dist.icdf(cdf).sigmoid()
    t = (s + len_).clamp(max=1)
    s_prime = (eps_fm * s_P_std + s_P_mean).sigmoid()
    return t, s, s_prime


class OfficialWrapper:
    """training/wrapper.py TVMWrapper around this engine's plain forward (the official DiT's call: one-hot labels whose
    all-zero rows are the null class, guidance_scale = beta). float64, no autocast."""

    def __init__(self, net, do_scale_param: bool, detach_jvp: bool = False):
        self.net, self.do_scale_param, self.detach_jvp = net, do_scale_param, detach_jvp

    def model(self, x, noise_labels_t, noise_labels_ts, class_labels, guidance_scale):
        y = None
        if class_labels is not None:  # the official DiT: cat([labels, 1 - sum]).argmax -> index, null = label_dim
            y = torch.cat([class_labels, 1 - class_labels.sum(dim=1, keepdim=True)], dim=1).argmax(dim=1)
        with math_attention():
            return self.net._forward_plain(x, noise_labels_t, noise_labels_ts, y, beta=guidance_scale)

    def forward_model(self, x, t, s, class_labels=None, beta_scale=None):
        return self.model(x, t.flatten(), (t - s).flatten(), class_labels, beta_scale.flatten())

    def get_dfds(self, x, t, s, class_labels=None, beta_scale=None):
        def model_wrapper(x_, t_, s_):
            return self.model(x_, t_, (t_ - s_), class_labels, beta_scale.flatten())

        F_ts, F_ts_grad = torch.func.jvp(model_wrapper, (x, t.flatten(), s.flatten()),
                                         (torch.zeros_like(x), torch.zeros_like(s).flatten(),
                                          torch.ones_like(s).flatten()))
        if self.detach_jvp:
            F_ts_grad = F_ts_grad.detach()
        out_scale = 1.0
        if self.do_scale_param:
            out_scale = 1 / beta_scale
        f_st = x + (s - t) * F_ts * out_scale
        df_ds = out_scale * (F_ts + (s - t) * F_ts_grad)
        return f_st, df_ds

    def forward(self, xt, xs_prime, t, s, s_prime, class_labels, beta_scale, v_target, teacher_model):
        rows = (-1,) + (1,) * (xt.dim() - 1)
        f_ts, df_ds = self.get_dfds(xt, t.reshape(rows), s.reshape(rows), class_labels, beta_scale.reshape(rows))
        with torch.no_grad():
            F_ss_from_fts, F_ss_uncond = teacher_model.forward_model(
                torch.cat([f_ts, xs_prime], dim=0), torch.cat([s, s_prime], dim=0).reshape(rows),
                torch.cat([s, s_prime], dim=0).reshape(rows),
                torch.cat([class_labels, torch.zeros_like(class_labels)], dim=0) if class_labels is not None else None,
                beta_scale=torch.cat([beta_scale, torch.ones_like(beta_scale)], dim=0).reshape(rows)).chunk(2, dim=0)
        F_ss = self.forward_model(xs_prime, s_prime.reshape(rows), s_prime.reshape(rows), class_labels,
                                  beta_scale=beta_scale.reshape(rows))
        beta_scale = beta_scale.reshape(rows)
        w_scale = 1 / beta_scale
        if self.do_scale_param:
            F_ss_from_fts = w_scale * F_ss_from_fts
            F_ss = w_scale * F_ss
        terminal_loss = (((df_ds - F_ss_from_fts) * beta_scale) ** 2).flatten(1).mean(-1)
        v_target = w_scale * v_target + (1 - w_scale) * F_ss_uncond
        fm_loss = (((F_ss - v_target) * beta_scale) ** 2).flatten(1).mean(-1)
        close = torch.isclose(s, t)
        if close.any():
            terminal_loss = terminal_loss.clone()
            terminal_loss[close.flatten()] = 0 * terminal_loss[close.flatten()]
        loss = terminal_loss + fm_loss
        if loss.isnan().any():
            loss = loss.nan_to_num(nan=0.0)
        return loss, terminal_loss, fm_loss


def official_loss(net, teacher, images, labels, noise, t, s, s_prime, beta_scale, uncond_sel, do_scale_param=True,
                  detach_jvp=False):
    """training/loss.py TVMLoss.__call__ (times and draws given) and the training loop's reduction loss.mean()."""
    beta_scale = beta_scale.clone()
    rows = (-1,) + (1,) * (images.dim() - 1)
    tb, sb = t.reshape(rows), s_prime.reshape(rows)
    yt = (1 - tb) * images + tb * noise
    ys_prime = (1 - sb) * images + sb * noise
    if labels is not None:
        labels = torch.nn.functional.one_hot(labels, NUM_CLASSES).to(images.dtype)
        labels[uncond_sel] = 0
        beta_scale[uncond_sel] = 1.0
    loss, terminal, fm = OfficialWrapper(net, do_scale_param, detach_jvp).forward(
        yt, ys_prime, t, s, s_prime, labels, beta_scale, noise - images, OfficialWrapper(teacher, do_scale_param))
    return loss.mean(), terminal, fm


def explicit_draws(x, conditional=True, beta=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps_gap, u, eps_fm = (torch.randn(B, dtype=F64, generator=g), torch.rand(B, dtype=F64, generator=g),
                          torch.randn(B, dtype=F64, generator=g))
    t, r, t_fm = official_sample_ts(eps_gap, u, eps_fm)
    d = {"noise": torch.randn(x.shape, dtype=F64, generator=g), "t": t, "r": r, "t_fm": t_fm,
         "beta": beta if beta is not None else 1 / (1 + 3 * torch.rand(B, dtype=F64, generator=g))}
    if conditional:
        d["drop"] = torch.tensor([False, True, False, False, True, False])
    return d


def case(kind, backend, conditional=True, teacher_seed=1):
    net = tvm_net(kind, backend, NUM_CLASSES if conditional else 0)
    torch.manual_seed(teacher_seed)
    teacher = randomize_(copy.deepcopy(net), 0.2).requires_grad_(False)   # another network than net: F_T != F
    x = torch.randn((B,) + tuple(net.data_shape), dtype=F64)
    y = torch.randint(0, NUM_CLASSES, (B,)) if conditional else None
    return net, teacher, x, y


def reference(net, teacher, x, y, d, **kw):
    with exact_layer_norm():
        return official_loss(net, teacher, x, y, d["noise"], d["t"], d["r"], d["t_fm"], d["beta"],
                             d.get("drop", torch.zeros(B, dtype=torch.bool)), **kw)


# ------------------------------------------------------------------------------------- loss and gradients
# the fused DiT runs its kernels in the interpreter (tens of seconds a case): one case by default, the other --full
CASES = [pytest.param(kind, backend, scale, id=f"{'scaled' if scale else 'unscaled'}-{i}",
                      marks=[pytest.mark.full] if (i == "dit-fused" and not scale) else [])
         for scale in (True, False) for (kind, backend), i in zip(BACKENDS, IDS)]


@pytest.mark.parametrize("kind,backend,scale_param", CASES)
def test_loss_and_every_gradient_equal_the_official_code(kind, backend, scale_param):
    net, teacher, x, y = case(kind, backend)
    d = explicit_draws(x)
    d["r"][3] = d["t"][3]                                 # a masked row (no interval) among the others
    obj = TVMLoss(TVMConfig(scale_param=scale_param, beta_sampler="cfg_uniform"), model=net)
    loss, stats = obj(net, x, y, teacher=teacher, **d)
    ref, terminal, fm = reference(net, teacher, x, y, d, do_scale_param=scale_param)
    assert_same_loss_and_grads(loss, ref, list(net.parameters()))
    assert stats["raw_loss"].item() == pytest.approx(terminal.mean().item(), rel=1e-10)
    assert stats["v_loss"].item() == pytest.approx(fm.mean().item(), rel=1e-10)
    assert int(stats["masked_rows"]) == 1 and stats["nonfinite_rows"].item() == 0 and stats["jvp_rows"] == B
    assert stats["guidance_rows"] == 4                      # F_u only where the label is kept and beta != 1
    assert terminal[3] == 0 and (terminal[[0, 1, 2, 4, 5]] > 0).all() and (fm > 0).all()


@pytest.mark.parametrize("kind,backend", [("dit", "autograd"), ("dit", "explicit"), ("mlp", "explicit"),
                                          ("mlp", "fused")], ids=["dit-autograd", "dit-explicit", "mlp-explicit",
                                                                  "mlp-fused"])
def test_stop_gradient_variant_equals_the_official_detach_jvp(kind, backend):
    """detach_jvp=True (the official option): dF/dr is stop-gradient, so every backend runs it today."""
    net, teacher, x, y = case(kind, backend)
    d = explicit_draws(x)
    loss, _ = TVMLoss(detach_jvp=True, model=net)(net, x, y, teacher=teacher, **d)
    ref, _, _ = reference(net, teacher, x, y, d, detach_jvp=True)
    assert_same_loss_and_grads(loss, ref, list(net.parameters()))


@pytest.mark.parametrize("kind,backend", [("dit", "autograd"), ("dit", "explicit"), ("mlp", "fused")])
def test_the_jvp_carries_gradient(kind, backend):
    """With and without the gradient through dF/dr: the same loss, different gradients (the tangent's share is not
    small), and the difference is the official detach_jvp's."""
    net, teacher, x, y = case(kind, backend)
    d = explicit_draws(x)
    params = list(net.parameters())
    through, _ = TVMLoss(model=net)(net, x, y, teacher=teacher, **d)
    stopped, _ = TVMLoss(detach_jvp=True, model=net)(net, x, y, teacher=teacher, **d)
    assert through.item() == pytest.approx(stopped.item(), rel=1e-12)
    g_through = torch.cat([g.flatten() for g in torch.autograd.grad(through, params)])
    g_stopped = torch.cat([g.flatten() for g in torch.autograd.grad(stopped, params, allow_unused=True,
                                                                     materialize_grads=True)])
    assert max_rel_err(g_stopped, g_through) > 1e-3


def test_unconditional_without_guidance_and_the_null_class_teacher():
    """An unconditional network trains with beta = 1 (no guidance: v_target = v, no unconditional teacher call); a
    missing teacher is the network itself (the teacher of step 0)."""
    net, _, x, _ = case("mlp", "autograd", conditional=False)
    d = explicit_draws(x, conditional=False, beta=torch.ones(B, dtype=F64))
    obj = TVMLoss(cfg=1.0, sample_cfg=1.0, label_dropout=0.0, model=net)
    loss, stats = obj(net, x, None, **d)
    twin = copy.deepcopy(net).requires_grad_(False)
    ref, _, _ = official_loss(net, twin, x, None, d["noise"], d["t"], d["r"], d["t_fm"], d["beta"], None)  # MLP: no LN
    assert_same_loss_and_grads(loss, ref, list(net.parameters()))
    assert stats["guidance_rows"] == 0
    with pytest.raises(ValueError, match="TVM guidance .* needs a class-conditional model"):
        TVMLoss(model=net)
    with pytest.raises(ValueError, match=r"TVM guidance \(beta != 1\) needs a class-conditional model"):
        obj(net, x, None, **{**d, "beta": torch.full((B,), 0.5, dtype=F64)})


def test_masking_follows_isclose_exactly():
    """The terminal term is dropped where isclose(r, t) (rtol 1e-5, atol 1e-8), and only there."""
    net, teacher, x, y = case("mlp", "autograd")
    d = explicit_draws(x)
    d["r"][0] = d["t"][0]                                   # equal
    d["r"][2] = d["t"][2] * (1 - 2e-6)                      # within isclose: masked like the official code
    d["r"][5] = d["t"][5] - 1e-3                            # a small interval: kept
    obj = TVMLoss(model=net)
    loss, stats = obj(net, x, y, teacher=teacher, **d)
    ref, terminal, _ = reference(net, teacher, x, y, d)
    assert int(stats["masked_rows"]) == 2 and terminal[0] == 0 and terminal[2] == 0 and terminal[5] > 0
    assert_same_loss_and_grads(loss, ref, list(net.parameters()))


class PoisonedTeacher(torch.nn.Module):
    """The teacher, with row `row` of its output replaced by NaN (a non-finite no-grad target)."""

    def __init__(self, teacher, row: int):
        super().__init__()
        self.teacher, self.row = teacher, row

    def forward(self, *args, **kw):
        out = self.teacher(*args, **kw).clone()
        out[self.row] = math.nan
        return out


def test_non_finite_rows_stop_or_are_zeroed():
    net, teacher, x, y = case("mlp", "autograd")
    d = explicit_draws(x)
    params = list(net.parameters())
    poisoned = PoisonedTeacher(teacher, 4)
    loss, stats = TVMLoss(model=net)(net, x, y, teacher=poisoned, **d)
    assert math.isnan(loss.item()) and stats["nonfinite_rows"].item() == 1
    zeroed, stats = TVMLoss(zero_nonfinite=True, model=net)(net, x, y, teacher=poisoned, **d)
    assert stats["nonfinite_rows"].item() == 1 and math.isfinite(stats["raw_loss"].item())
    # the official nan_to_num: row 4 counts as 0 in the mean over all rows
    keep = [0, 1, 2, 3, 5]
    per_row = [reference(net, teacher, x[[i]], y[[i]], {k: v[[i]] for k, v in d.items()})[0] for i in range(B)]
    assert zeroed.item() == pytest.approx(sum(per_row[i].item() for i in keep) / B, rel=1e-10)
    # zeroed before the square: the poisoned row gives no gradient, the others theirs (the official code's gradient
    # would be NaN here: 0 * NaN through its nan_to_num)
    grads = torch.autograd.grad(zeroed, params)
    ref_grads = torch.autograd.grad(sum(per_row[i] for i in keep) / B, params)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and max_rel_err(g, r) < 1e-9


# ---------------------------------------------------------------------------------------------- draws
def test_time_draws_follow_the_official_sample_ts():
    """sample_tvm_times makes the official times from the same standard draws (made here in the same order)."""
    cfg = TVMConfig(time_mean=-0.3, time_std=1.2, gap_mean=-0.5, gap_std=0.8)
    n = 4096
    t, r, t_fm = sample_tvm_times(n, cfg, "cpu", dtype=F64, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    raw = (torch.randn(n, dtype=F64, generator=g), torch.rand(n, dtype=F64, generator=g),
           torch.randn(n, dtype=F64, generator=g))
    rt, rs, rsp = official_sample_ts(*raw, s_P_mean=-0.3, s_P_std=1.2, gap_P_mean=-0.5, gap_P_std=0.8)
    for a, b in ((t, rt), (r, rs), (t_fm, rsp)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    t32, r32, _ = sample_tvm_times(n, TVMConfig(), "cpu", generator=torch.Generator().manual_seed(6))
    assert t32.dtype == torch.float32 and (r32 <= t32).all() and (r32 >= 0).all() and (t32 <= 1).all()
    # the interval's median is sigmoid(gap_mean) where t is not clipped at 1
    gap = (t - r)[t < 1]
    assert abs(gap.median().item() - 1 / (1 + math.exp(0.5))) < 0.03


def test_beta_draws():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_beta(5, TVMConfig(cfg=2.0), "cpu"), torch.full((5,), 0.5))
    b = sample_beta(2000, TVMConfig(beta_sampler="cfg_uniform", cfg_min=1.5, cfg_max=3.0), "cpu", generator=g)
    assert (1 / b).min() >= 1.5 and (1 / b).max() <= 3.0 and abs((1 / b).mean().item() - 2.25) < 0.05
    u = sample_beta(2000, TVMConfig(beta_sampler="uniform"), "cpu", generator=g)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match="beta_sampler must be one of"):
        TVMConfig(beta_sampler="log")
    with pytest.raises(ValueError, match="cfg must be >= 1"):
        TVMConfig(cfg=0.5)


def test_given_draws_are_checked():
    net, teacher, x, y = case("mlp", "autograd")
    d = explicit_draws(x)
    obj = TVMLoss(model=net)
    with pytest.raises(ValueError, match="r must be <= t"):
        obj(net, x, y, **{**d, "r": d["t"] + 0.01})
    with pytest.raises(ValueError, match=r"beta \(= 1 / cfg\) must lie in \(0, 1\]"):
        obj(net, x, y, **{**d, "beta": torch.zeros(B, dtype=F64)})
    with pytest.raises(ValueError, match="missing \\['beta'\\]"):
        obj(net, x, y, **{k: v for k, v in d.items() if k != "beta"})


# --------------------------------------------------------------------------------------------- sampler
def official_generator_fn(net, latents, class_labels=None, num_steps=None, cfg_scale=None):
    """generate_images.py generator_fn (do_scale_param=True)."""
    num_steps = 1 if num_steps is None else num_steps
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = latents.to(torch.float64)
    beta_scale = (1 / torch.as_tensor(cfg_scale, dtype=torch.float64).view(-1)).repeat(x.shape[0])
    out_scale = cfg_scale
    wrapper = OfficialWrapper(net, True)
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        ones = torch.ones(x.shape[0], dtype=torch.float64)
        F_ts = wrapper.forward_model(x, t_cur * ones, t_next * ones, class_labels=class_labels,
                                     beta_scale=beta_scale) * out_scale
        x = x + (t_next - t_cur) * F_ts
    return x


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_equals_the_official_generator(steps):
    net = tvm_net("dit")
    noise = torch.randn((5,) + tuple(net.data_shape), dtype=F64)
    y = torch.randint(0, NUM_CLASSES, (5,))
    sampler = sampler_for(TVMConfig(sample_cfg=1.75))
    out = sampler(net, noise, y, steps=steps)
    ref = official_generator_fn(net, noise, torch.nn.functional.one_hot(y, NUM_CLASSES).double(), steps, 1.75)
    assert max_rel_err(out, ref) < 1e-12
    assert sampler.nfe(steps) == steps
    if steps == 1:  # unscaled (scale_param=False): the one jump without the factor cfg
        plain = tvm_sample(net, noise, y, steps=1, cfg_scale=1.75, scale_param=False)
        assert max_rel_err(plain - noise, (ref - noise) / 1.75) < 1e-12


# ------------------------------------------------------------------------------------ the network argument
def _tangent_grad_inputs(net, kt=3):
    shape = tuple(net.data_shape)
    z = torch.randn((B,) + shape, dtype=F64)
    t = torch.rand(B, dtype=F64) * 0.9 + 0.05
    h = t * torch.rand(B, dtype=F64)
    y = torch.randint(0, NUM_CLASSES, (B,))
    beta = torch.rand(B, dtype=F64) * 0.9 + 0.1
    tangents = (torch.randn((kt,) + shape, dtype=F64), torch.randn(kt, dtype=F64), torch.randn(kt, dtype=F64))
    return z, t, h, y, beta, tangents


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_tangent_grad_gradients_equal_a_double_backward_reference(kind):
    """u_dot's gradient to every parameter (autograd backend) against torch.autograd.functional.jvp with create_graph
    (the double-backward trick: no torch.func)."""
    net = tvm_net(kind)
    z, t, h, y, beta, tangents = _tangent_grad_inputs(net)
    kt = tangents[0].shape[0]
    u, u_dot = net(z, t, h, y, tangents=tangents, tangent_grad=True, beta=beta)
    assert u_dot.requires_grad and u_dot.shape[0] == kt
    w = torch.randn_like(u_dot)
    params = list(net.parameters())
    grads = torch.autograd.grad((u_dot * w).sum() + u.square().sum(), params, allow_unused=True)

    def fn(z_, t_, h_):
        with math_attention():
            return net._forward_plain(z_, t_, h_, y[:kt], beta=beta[:kt])

    with math_attention(), exact_layer_norm():
        u_ref = net._forward_plain(z, t, h, y, beta=beta)
        _, ref_dot = torch.autograd.functional.jvp(fn, (z[:kt], t[:kt], h[:kt]), tangents, create_graph=True)
    assert max_rel_err(u_dot, ref_dot) < 1e-12
    ref_grads = torch.autograd.grad((ref_dot * w).sum() + u_ref.square().sum(), params, allow_unused=True)
    checked = 0
    for g, r in zip(grads, ref_grads):
        if r is None or r.abs().max() == 0:
            assert g is None or g.abs().max() == 0
            continue
        assert max_rel_err(g, r) < 1e-10
        checked += 1
    assert checked == len(params)
    # without tangent_grad the same call returns a detached u_dot
    _, detached = net(z, t, h, y, tangents=tangents, beta=beta)
    assert not detached.requires_grad and max_rel_err(detached, u_dot.detach()) < 1e-12  # torch's LN vs ours


@pytest.mark.parametrize("kind,weights", [("mlp", ["layers.1.weight", "layers.0.bias"]),
                                          ("dit", ["blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight",
                                                   "h_embedder.fc1.weight", "blocks.1.adaLN.bias"])])
def test_tangent_grad_equals_central_differences(kind, weights):
    """float64 central differences of u_dot (a first-order tangent: exact in torch) in single weights, against the
    gradient through the JVP; in the DiT the weights sit before, inside and after its layer norms."""
    net = tvm_net(kind)
    z, t, h, y, beta, tangents = _tangent_grad_inputs(net)
    params = dict(net.named_parameters())
    w_out = torch.randn(tangents[0].shape, dtype=F64)
    _, u_dot = net(z, t, h, y, tangents=tangents, tangent_grad=True, beta=beta)
    grads = torch.autograd.grad((u_dot * w_out).sum(), [params[n] for n in weights])
    eps = 1e-6
    for name, g in zip(weights, grads):
        p = params[name]
        for index in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                p[index] += eps
                plus = (net(z, t, h, y, tangents=tangents, beta=beta)[1] * w_out).sum()
                p[index] -= 2 * eps
                minus = (net(z, t, h, y, tangents=tangents, beta=beta)[1] * w_out).sum()
                p[index] += eps
            fd = (plus - minus).item() / (2 * eps)
            assert abs(fd - g[index].item()) < 1e-6 * max(1.0, abs(fd)), (name, index, fd, g[index].item())


def test_torch_layer_norm_tangent_gradient_is_wrong():
    """Why meanflow.models.tangent_grad exists: torch's own F.layer_norm gives a wrong gradient of its tangent (torch
    2.13; the day this fails, torch is fixed and the composite form can go). Our composite form is right."""
    from meanflow.models.tangent_grad import composite_layer_norm, differentiable_tangent_ops

    x, v = torch.randn(2, 3, 8, dtype=F64, requires_grad=True), torch.randn(2, 3, 8, dtype=F64)
    w_out = torch.randn(2, 3, 8, dtype=F64)

    def grad_of_tangent(fn, x_):
        return torch.autograd.grad((torch.func.jvp(fn, (x_,), (v,))[1] * w_out).sum(), x_)[0]

    def fd(fn, index, eps=1e-6):
        out = []
        for sign in (1, -1):
            xe = x.detach().clone()
            xe[index] += sign * eps
            out.append((torch.func.jvp(fn, (xe,), (v,))[1] * w_out).sum())
        return ((out[0] - out[1]) / (2 * eps)).item()

    def torch_ln(x_):
        return torch.nn.functional.layer_norm(x_, (8,), eps=1e-6)

    index = (0, 1, 2)
    expected = fd(torch_ln, index)
    assert abs(grad_of_tangent(torch_ln, x)[index].item() - expected) > 1e-2          # torch: wrong
    with differentiable_tangent_ops():
        assert abs(grad_of_tangent(torch_ln, x)[index].item() - expected) < 1e-7      # ours inside the context
    assert abs(grad_of_tangent(lambda x_: composite_layer_norm(x_, (8,), eps=1e-6), x)[index].item() - expected) < 1e-7
    torch.testing.assert_close(composite_layer_norm(x, (8,), torch.ones(8, dtype=F64) * 2, torch.ones(8, dtype=F64)),
                               torch.nn.functional.layer_norm(x, (8,), torch.ones(8, dtype=F64) * 2,
                                                              torch.ones(8, dtype=F64)))


def test_tangent_grad_refuses_batch_statistics():
    """A network with batch_norm in training mode has no exact tangent gradient on the autograd backend: refused."""

    class BatchNormMLP(MLPNet):
        def _forward_plain(self, z, t, h, y, **conditions):
            return super()._forward_plain(torch.nn.functional.batch_norm(z, None, None, training=True), t, h, y,
                                          **conditions)

    net = randomize_(BatchNormMLP(3, 16, 3, num_classes=NUM_CLASSES, conditions=TVM_CONDITIONS,
                                  backend="autograd").double())
    z, t, h, y, beta, tangents = _tangent_grad_inputs(net)
    with pytest.raises(NotImplementedError, match="F.batch_norm has no exact tangent gradient"):
        net(z, t, h, y, tangents=tangents, tangent_grad=True, beta=beta)
    net(z, t, h, y, tangents=tangents, beta=beta)                  # a detached tangent is fine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_refuses_tangent_grad():
    """The graphed call's backward is recorded for the outputs seen at capture; a differentiable tangent is refused
    there (not recorded untested), the stop-gradient call is captured as before."""
    net = tvm_net("mlp").float().cuda()
    z, t, h, y, beta, tangents = _tangent_grad_inputs(net)
    z, t, h, beta = (a.float().cuda() for a in (z, t, h, beta))
    y, tangents = y.cuda(), tuple(a.float().cuda() for a in tangents)
    graphed = CUDAGraphModel(net)
    with pytest.raises(NotImplementedError, match="CUDAGraphModel does not record calls with tangent_grad=True"):
        graphed(z, t, h, y, tangents=tangents, backend="autograd", tangent_grad=True, beta=beta)


def test_tangent_grad_refusals():
    """What cannot be exact is refused, naming tangent_grad: a call without tangents; a network whose _forward_jvp cuts
    the tangent's graph (a silently partial gradient otherwise); a wrapped network's finite-difference tangent. Off
    CUDA the CUDA-graph wrapper passes the call through, on every backend."""
    net = tvm_net("mlp")
    z, t, h, y, beta, tangents = _tangent_grad_inputs(net)
    with pytest.raises(ValueError, match="tangent_grad=True .* needs a call with tangents"):
        net(z, t, h, y, tangent_grad=True, beta=beta)

    class CutsTheTangent(MLPNet):
        def _forward_jvp(self, *args, **kw):
            u, u_dot = super()._forward_jvp(*args, **kw)
            return u, u_dot.detach()

    cut = randomize_(CutsTheTangent(3, 16, 3, num_classes=NUM_CLASSES, conditions=TVM_CONDITIONS).double())
    for backend in ("explicit", "fused"):
        with pytest.raises(RuntimeError, match=f"tangent_grad=True on the '{backend}' backend returned a u_dot "
                                               f"without a graph"):
            cut(z, t, h, y, tangents=tangents, backend=backend, tangent_grad=True, beta=beta)
    with torch.no_grad():  # nothing to differentiate: nothing refused
        cut(z, t, h, y, tangents=tangents, backend="explicit", tangent_grad=True, beta=beta)
    fd = _wrapped_dit(tangent="fd")
    zw, tw, hw, yw, _, tw_dots = _tangent_grad_inputs(fd)
    with pytest.raises(NotImplementedError, match="tangent_grad=True: a wrapped network with tangent='fd'"):
        fd(zw, tw, hw, yw % 3, tangents=tw_dots, backend="explicit", tangent_grad=True)
    graphed = CUDAGraphModel(net)                            # off CUDA the wrapper passes the call through
    for backend in ("autograd", "explicit", "fused"):
        u, u_dot = graphed(z, t, h, y, tangents=tangents, backend=backend, tangent_grad=True, beta=beta)
        assert u_dot.requires_grad


# ----------------------------------------------------------- tangent_grad of every network on every backend
def _wrapped_dit(**options):
    from meanflow.models import wrap
    from tests._diffusers_models import TINY

    module, shape, classes = TINY["DiT"]()
    return randomize_(wrap(module, data_shape=shape, num_classes=classes, **options).double(), 0.2)


def _imf():
    from meanflow.models import IMFDiT

    net = IMFDiT(8, 2, 16, 2, 2, 4, num_classes=NUM_CLASSES, head_depth=1, tokens=(2, 1, 1, 1, 1))
    return randomize_(net.double(), 0.2)


NETWORKS = {"dit": lambda: tvm_net("dit"), "mlp": lambda: tvm_net("mlp"), "imf": _imf, "wrapped": _wrapped_dit}


def _network_inputs(name, net):
    z, t, h, y, beta, tangents = _tangent_grad_inputs(net)
    if name in ("dit", "mlp"):
        extra = {"beta": beta}
    elif name == "imf":
        extra = {"omega": 1 + 2 * torch.rand(B, dtype=F64), "t_min": 0.2 * t, "t_max": torch.ones(B, dtype=F64)}
    else:
        extra, y = {}, y % net.num_classes
    return z, t, h, y, extra, tangents


def _double_backward_grads(net, z, t, h, y, extra, tangents, w, params):
    """The reference: torch.autograd.functional.jvp(create_graph=True) of the plain forward (math attention, torch's
    math SDPA, the layer norm by its formula), a loss of (u, u_dot), its parameter gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kt = tangents[0].shape[0]
    head = {"head": "u"} if len(net.heads) > 1 else {}
    rows = {k: v[:kt] for k, v in extra.items()}

    def fn(z_, t_, h_):
        return net._forward_plain(z_, t_, h_, None if y is None else y[:kt], **head, **rows)

    with math_attention(), exact_layer_norm(), sdpa_kernel(SDPBackend.MATH):
        u = net._forward_plain(z, t, h, y, **head, **extra)
        _, u_dot = torch.autograd.functional.jvp(fn, (z[:kt], t[:kt], h[:kt]), tangents, create_graph=True)
    loss = (u_dot * w).sum() + u.square().sum()
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


# the fused DiT is the TVM loss test's (above); the fused iMF's ops are tests/test_tangent_grad.py's (--full here)
NETWORK_CASES = [("dit", "explicit"), ("mlp", "explicit"), ("imf", "explicit"), ("wrapped", "explicit"),
                 ("mlp", "fused"), ("wrapped", "fused"), pytest.param("imf", "fused", marks=pytest.mark.full),
                 pytest.param("dit", "fused", marks=pytest.mark.full)]


@pytest.mark.parametrize("name,backend", NETWORK_CASES)
def test_tangent_grad_of_every_network_on_every_backend(name, backend):
    """u_dot's gradient (and u's) to every parameter with tangent_grad=True, against the double-backward reference;
    without tangent_grad the same call's u_dot is detached and equal."""
    net = NETWORKS[name]()
    z, t, h, y, extra, tangents = _network_inputs(name, net)
    head = {"head": "u"} if len(net.heads) > 1 else {}
    u, u_dot = net(z, t, h, y, tangents=tangents, backend=backend, tangent_grad=True, **head, **extra)
    assert u_dot.requires_grad
    w = torch.randn_like(u_dot)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad((u_dot * w).sum() + u.square().sum(), params, allow_unused=True,
                                materialize_grads=True)
    ref = _double_backward_grads(net, z, t, h, y, extra, tangents, w, params)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    scale = max(r.abs().max().item() for r in ref)
    for n, g, r in zip(names, grads, ref):  # exact, up to rounding (a key bias's gradient is 0 up to rounding)
        assert (g - r).abs().max().item() <= 1e-9 * r.abs().max().item() + 1e-11 * scale, (n, max_rel_err(g, r))
    _, detached = net(z, t, h, y, tangents=tangents, backend=backend, **head, **extra)
    assert not detached.requires_grad and max_rel_err(detached, u_dot.detach()) < 1e-11


@pytest.mark.parametrize("table", ["reference", "fused", "no-mask-reference"])
def test_mmdit_block_tangent_grad(table):
    """The MMDiT joint block's forward_jvp with a tangent-grad table (a key-padding mask, QK-norm, RoPE): gradients of
    a loss of both streams and their tangents against torch.func.jvp over its plain forward (float64). The table whose
    attention takes no mask runs the block's own masked attention tangent, with grad."""
    import dataclasses

    from meanflow.models.mmdit import MMDiTBlock
    from mfkernels.nn import rope_angles
    from mfkernels.ops import ops_table

    torch.manual_seed(0)
    block = randomize_(MMDiTBlock(16, 2, mlp_ratio=2.0).double(), 0.3)
    batch, kt, nx, nc = 2, 2, 4, 3
    x, c, vec = (torch.randn(batch, nx, 16, dtype=F64), torch.randn(batch, nc, 16, dtype=F64),
                 torch.randn(batch, 16, dtype=F64))
    x_dot, c_dot, vec_dot = (torch.randn(kt, nx, 16, dtype=F64), torch.randn(kt, nc, 16, dtype=F64),
                             torch.randn(kt, 16, dtype=F64))
    c_mask = torch.tensor([[True, True, False], [True, True, True]])
    cos, sin = (a.double() for a in rope_angles(8, nc + nx))
    if table == "no-mask-reference":
        ops = ops_table("reference", tangent_grad=True)
        ops = dataclasses.replace(ops, attention=lambda q, k, v, qd, kd, vd: ops.attention(q, k, v, qd, kd, vd))
    else:
        ops = ops_table(table, tangent_grad=True)
    wx, wc, wxd, wcd = (torch.randn_like(a) for a in (x, c, x_dot, c_dot))
    params = list(block.parameters())
    xo, co, xo_dot, co_dot = block.forward_jvp(x, c, x_dot, c_dot, vec, vec_dot, c_mask, cos, sin, ops=ops)
    loss = (xo * wx).sum() + (co * wc).sum() + (xo_dot * wxd).sum() + (co_dot * wcd).sum()
    grads = torch.autograd.grad(loss, params)

    def fn(x_, c_, v_):
        return block(x_, c_, v_, c_mask[:kt], cos, sin)

    with math_attention(), exact_layer_norm():
        xr, cr = block(x, c, vec, c_mask, cos, sin)
        _, (xr_dot, cr_dot) = torch.func.jvp(fn, (x[:kt], c[:kt], vec[:kt]), (x_dot, c_dot, vec_dot))
    ref_loss = (xr * wx).sum() + (cr * wc).sum() + (xr_dot * wxd).sum() + (cr_dot * wcd).sum()
    for (n, _), g, r in zip(block.named_parameters(), grads, torch.autograd.grad(ref_loss, params)):
        assert max_rel_err(g, r) < 1e-9, (n, max_rel_err(g, r))


# ------------------------------------------------------------------------------------------ the trainer
QUIET = ["train.progress=false", "train.log_every=1", "eval.enabled=false", "train.threads=1", "train.device=cpu",
         "train.grid_size=8"]


def toy_config(*extra):
    return apply_overrides(get_preset("toy-tvm"), QUIET + [
        "train.steps=4", "train.batch_size=16", "model.hidden=16", "model.depth=3", "train.ckpt_every=2",
        "train.keep_ckpts=0", "train.warmup_steps=0", *extra])


def digits_config(*extra):
    """A tiny class-conditional DiT, guidance drawn per row, label dropout."""
    return apply_overrides(get_preset("digits"), QUIET + [
        "loss.objective=tvm", "loss.beta_sampler=cfg_uniform", "loss.label_dropout=0.25", "train.steps=4",
        "train.batch_size=8", "model.hidden=16", "model.depth=2", "model.heads=2", "model.backend=autograd",
        "train.ckpt_every=2", "train.keep_ckpts=0", "train.ema_decays=0.9", *extra])


def state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_teacher_starts_as_the_network_and_follows_the_ema(tmp_path):
    trainer = Trainer(toy_config("loss.teacher_decay=0.99"), tmp_path / "run")
    assert trainer.teacher is not trainer.ema and trainer.teacher_model is not trainer.net
    before = state(trainer.teacher_model)
    assert all(torch.equal(before[k], v) for k, v in state(trainer.net).items())
    trainer.train_step()
    after_net, after_teacher = state(trainer.net), state(trainer.teacher_model)
    for k, v in after_teacher.items():
        torch.testing.assert_close(v, 0.99 * before[k] + 0.01 * after_net[k], rtol=1e-6, atol=1e-7)
        assert not torch.equal(v, after_net[k])
    # the evaluation EMA (the toy's decay 0.995) is another copy
    assert not any(torch.equal(a, after_teacher[k]) for k, a in state(trainer.ema.default).items())


def test_teacher_starts_from_init_from_weights(tmp_path):
    """train.init_from (another run's EMA weights): the teacher is the initialised network, not the random one."""
    source = Trainer(toy_config("train.steps=2", "train.ckpt_every=0", "train.seed=3"), tmp_path / "source")
    source.train()
    t = Trainer(toy_config(f"train.init_from={tmp_path / 'source'}"), tmp_path / "tvm")
    loaded = state(source.ema_model())
    assert all(torch.equal(v, loaded[k]) for k, v in state(t.net).items())
    assert all(torch.equal(v, loaded[k]) for k, v in state(t.teacher_model).items())


def test_resume_is_exact_with_the_teacher(tmp_path):
    """(The toy MLP's resume and gradient accumulation: tests/test_objective_training.py.)"""
    config = digits_config
    a = Trainer(config(), tmp_path / "a")
    a.train()
    b = Trainer(config(), tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "ckpt_00000002.pt")
    assert b.step == 2 and not all(torch.equal(x, y) for x, y in zip(state(b.teacher_model).values(),
                                                                      state(b.net).values()))
    b.train()
    for mine, theirs in ((b.net, a.net), (b.teacher_model, a.teacher_model), (b.ema.default, a.ema.default)):
        assert all(torch.equal(x, y) for x, y in zip(state(mine).values(), state(theirs).values()))
    straight = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == [r["loss"] for r in straight[2:]]
    assert all(r["nonfinite_rows"] == 0 for r in straight) and {"raw_loss", "v_loss"} <= set(straight[0])


def test_a_checkpoint_without_a_teacher_is_refused(tmp_path):
    from meanflow.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    a = Trainer(toy_config("train.steps=2"), tmp_path / "a")
    a.train()
    ckpt = load_checkpoint(tmp_path / "a")
    del ckpt["teacher"], ckpt["format"], ckpt["path"]
    step = ckpt.pop("step")
    save_checkpoint(tmp_path / "c", step, ckpt)
    with pytest.raises(CheckpointError, match="the checkpoint has no teacher; this run's objective \\(tvm\\)"):
        Trainer(toy_config(), tmp_path / "d", resume=tmp_path / "c")


class NaNTeacherLoss(TVMLoss):
    """TVM whose teacher output is NaN in row 0 (the no-grad side of the loss goes bad)."""

    def _teacher(self, teacher, *args):
        F_T, F_u, k = super()._teacher(teacher, *args)
        F_T = F_T.clone()
        F_T[0] = math.nan
        return F_T, F_u, k


def test_the_trainer_stops_on_non_finite_rows_unless_zeroed(tmp_path):
    cfg = toy_config()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan in 1 of 16 rows\) at step 1"):
        Trainer(cfg, tmp_path / "a", loss_fn=NaNTeacherLoss(cfg.loss)).train()
    cfg = toy_config("loss.zero_nonfinite=true")
    t = Trainer(cfg, tmp_path / "b", loss_fn=NaNTeacherLoss(cfg.loss))
    t.train()
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert t.step == 4 and all(r["nonfinite_rows"] == 1 and math.isfinite(r["grad_norm"]) for r in rows)
