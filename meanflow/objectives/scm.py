"""Continuous-time consistency training, sCM on TrigFlow (docs/design.md, 'sCM'; arXiv 2410.11081 Algorithm 1;
PyTorch reference NVlabs/FastGen methods/consistency_model/sCM.py), trained from scratch on the same fused JVP ops.

TrigFlow: x_t = cos(t) x0 + sin(t) z, z = sigma_d e, t in (0, pi/2); the consistency function is
f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t, t). The network is F, in one of two parametrizations:
- "direct" (default):  F(x_t, t) = net(x_t / sigma_d, c = (2/pi) t, h = 0, y);
- "flow":  F from a flow-matching velocity v = net(z_s, s, h = 0, y) at the point of the FM path z_s = (1 - s) x0 + s e
  with the same signal-to-noise ratio: a = cos t + sigma_d sin t, z_s = x_t / a, s = sigma_d sin t / a, and
  F = (x_t (cos t - sin t / sigma_d) + v) / a exactly. A network trained by flow matching (model.init_from) is then,
  at step 0, the TrigFlow flow of the same data: the consistency training starts from a pretrained flow, as sCT does
  from a pretrained diffusion model.

Training (every row has a tangent, with a per-row time tangent):
    sigma = exp(tau), tau ~ N(p_mean, p_std) truncated to [sigma_min, sigma_max];  t = arctan(sigma / sigma_d)
    dx_t/dt = cos(t) z - sin(t) x0
    (F, F_jvp, logvar) = net call with tangents d/dt scaled by cos(t) sin(t):  F_jvp = cos t sin t dF/dt along the path
    r_w = min(1, step / warmup_steps)                                        (tangent warm-up)
    g = -cos^2(t) (sigma_d sg(F) - dx_t/dt) - r_w (cos t sin t x_t + sigma_d F_jvp);  g <- g / (rms(g) + g_norm_eps)
    loss_i = w / (exp(logvar_i) D) mean_D (F - sg(F) - g)^2 + logvar_i,  w = 1 / (sigma_d tan t),  loss = mean_i
(FastGen's defaults: prior weighting 1/sigma, g normalised by its RMS, the extra 1/D.) logvar(t) is the network's
"logvar" head (meanflow.models.heads.LogVarHead). The loss is elementwise with per-row weights: plain torch, not the
MeanFlow target op (whose weighting has another form).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.heads import NetworkSpec
from .base import Objective, ObjectiveConfig, as_rows, check_unit_interval, knob, null_labels

PARAMETRIZATIONS = ("direct", "flow")


@dataclass
class SCMConfig(ObjectiveConfig):
    """Every knob of the sCM objective. Defaults follow FastGen's sCM config (CIFAR-10, consistency training)."""

    objective: str = knob("scm", "training objective: fm | meanflow | imf | scm | alphaflow")
    sigma_data: float = knob(0.5, "data standard deviation sigma_d (0.5 for images in [-1, 1])")
    p_mean: float = knob(-1.0, "log sigma ~ N(p_mean, p_std), truncated to [sigma_min, sigma_max]")
    p_std: float = knob(1.4, "log sigma ~ N(p_mean, p_std)")
    sigma_min: float = knob(0.002, "smallest training noise level")
    sigma_max: float = knob(80.0, "largest noise level (training and the sampler's start t_max = arctan(sigma_max "
                                  "/ sigma_d))")
    warmup_steps: int = knob(10_000, "tangent warm-up: r_w = min(1, step / warmup_steps) (0: none)")
    g_norm_eps: float = knob(0.1, "tangent normalisation g / (rms(g) + g_norm_eps)")
    label_dropout: float = knob(0.0, "fraction of labels replaced by the null class")
    parametrization: str = knob("direct", "F = net(x_t / sigma_d, 2t/pi) ('direct') or from a flow-matching "
                                          "velocity at the same SNR ('flow'; for train.init_from an FM run)")
    sample_t_mid: float = knob(1.1, "sampling: the TrigFlow time 2-step sampling re-noises to (sCM: 1.1)")

    def __post_init__(self):
        self._check_name("scm")
        if self.sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0; got {self.sigma_data}")
        if self.p_std <= 0:
            raise ValueError(f"p_std must be > 0; got {self.p_std}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {self.warmup_steps}")
        if self.g_norm_eps <= 0:
            raise ValueError(f"g_norm_eps must be > 0; got {self.g_norm_eps}")
        check_unit_interval("label_dropout", self.label_dropout)
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}; got {self.parametrization!r}")
        if not 0.0 < self.sample_t_mid < math.pi / 2:
            raise ValueError(f"sample_t_mid must lie in (0, pi/2); got {self.sample_t_mid}")

    @property
    def t_max(self) -> float:
        return math.atan(self.sigma_max / self.sigma_data)


# ------------------------------------------------------------------------------------------- the TrigFlow F
def network_inputs(x_t: torch.Tensor, t: torch.Tensor, sigma_data: float, parametrization: str):
    """(net's z, net's time, a) for F at (x_t, t): direct: (x_t / sigma_d, 2t/pi, 1); flow: (x_t / a, s, a)."""
    if parametrization == "direct":
        return x_t / sigma_data, t * (2 / math.pi), None
    a = torch.cos(t) + sigma_data * torch.sin(t)
    return x_t / as_rows(a, x_t), sigma_data * torch.sin(t) / a, a


def network_input_tangents(x_t, x_dot, t, t_dot, sigma_data: float, parametrization: str):
    """Tangents of the network's (z, time) given tangents (x_dot, t_dot) of (x_t, t) (t_dot per row)."""
    if parametrization == "direct":
        return x_dot / sigma_data, t_dot * (2 / math.pi)
    a = torch.cos(t) + sigma_data * torch.sin(t)
    a_dot = (sigma_data * torch.cos(t) - torch.sin(t)) * t_dot
    z_dot = x_dot / as_rows(a, x_t) - x_t * as_rows(a_dot / a**2, x_t)
    return z_dot, sigma_data * t_dot / a**2          # ds/dt = sigma_d / a^2


def F_from_output(out: torch.Tensor, x_t, t, sigma_data: float, parametrization: str) -> torch.Tensor:
    """F from the network's output (direct: F = out; flow: F = (x_t (cos t - sin t / sigma_d) + v) / a)."""
    if parametrization == "direct":
        return out
    a = torch.cos(t) + sigma_data * torch.sin(t)
    b = torch.cos(t) - torch.sin(t) / sigma_data
    return (x_t * as_rows(b, x_t) + out) / as_rows(a, x_t)


def F_tangent(out, out_dot, x_t, x_dot, t, t_dot, sigma_data: float, parametrization: str) -> torch.Tensor:
    """The tangent of F given the network's output tangent (flow: the product rule through a(t), b(t))."""
    if parametrization == "direct":
        return out_dot
    a = torch.cos(t) + sigma_data * torch.sin(t)
    b = torch.cos(t) - torch.sin(t) / sigma_data
    a_dot = (sigma_data * torch.cos(t) - torch.sin(t)) * t_dot
    b_dot = (-torch.sin(t) - torch.cos(t) / sigma_data) * t_dot
    F = (x_t * as_rows(b, x_t) + out) / as_rows(a, x_t)
    return (x_dot * as_rows(b, x_t) + x_t * as_rows(b_dot, x_t) + out_dot - F * as_rows(a_dot, x_t)) / as_rows(a, x_t)


def trigflow_F(model, x_t: torch.Tensor, t: torch.Tensor, y, sigma_data: float, parametrization: str,
               **kwargs) -> torch.Tensor:
    """F(x_t, t | y) with the network's u head alone (sampling, finite differences)."""
    z, s, _ = network_inputs(x_t, t, sigma_data, parametrization)
    head = {"head": "u"} if len(getattr(model, "heads", ("u",))) > 1 else {}
    out = model(z.to(x_t.dtype), s.to(x_t.dtype), torch.zeros_like(s).to(x_t.dtype), y, **head, **kwargs)
    return F_from_output(out.to(x_t.dtype), x_t, t, sigma_data, parametrization)


def consistency_fn(model, x_t, t, y, sigma_data: float, parametrization: str) -> torch.Tensor:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t, t): the one-step estimate of x0."""
    F = trigflow_F(model, x_t, t, y, sigma_data, parametrization)
    return as_rows(torch.cos(t), x_t) * x_t - as_rows(torch.sin(t), x_t) * sigma_data * F


def tangent_target(F_minus, F_jvp, x_t, dxdt, t, sigma_data: float, r_w: float) -> torch.Tensor:
    """g = -cos^2(t) (sigma_d F- - dx_t/dt) - r_w (cos t sin t x_t + sigma_d F_jvp), before its normalisation. With the
    exact consistency function and the PF-ODE velocity for dx_t/dt, g = 0 (df/dt = 0 along the ODE)."""
    cos, sin = as_rows(torch.cos(t), x_t), as_rows(torch.sin(t), x_t)
    return -cos**2 * (sigma_data * F_minus - dxdt) - r_w * (cos * sin * x_t + sigma_data * F_jvp)


def sample_trigflow_times(batch: int, cfg: SCMConfig, device, dtype=torch.float32,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """t = arctan(sigma / sigma_d), log sigma ~ N(p_mean, p_std) truncated to [sigma_min, sigma_max] (inverse CDF)."""
    normal = torch.distributions.Normal(torch.tensor(cfg.p_mean, dtype=torch.float64),
                                        torch.tensor(cfg.p_std, dtype=torch.float64))
    lo, hi = (normal.cdf(torch.tensor(math.log(s), dtype=torch.float64)).item() for s in (cfg.sigma_min,
                                                                                           cfg.sigma_max))
    u = torch.rand(batch, device=device, dtype=torch.float64, generator=generator) * (hi - lo) + lo
    log_sigma = cfg.p_mean + cfg.p_std * math.sqrt(2) * torch.erfinv(2 * u - 1)
    return torch.atan(torch.exp(log_sigma) / cfg.sigma_data).clamp(1e-6, math.pi / 2 - 1e-6).to(dtype)


class SCMLoss(Objective):
    """loss_fn(model, x, y=None, *, noise=None, t=None, drop=None, step=None, generator=None) -> (loss, stats).

    `t` is the TrigFlow time in (0, pi/2); `noise` is standard normal (z = sigma_d noise); `step` the training step of
    the tangent warm-up (None: warm-up over, r_w = 1). stats: loss, raw_loss (mean_i mean_D (F - F- - g)^2, i.e. of g),
    v_loss (mean_i sum (sigma_d F - dx_t/dt)^2: how far sigma_d F is from the conditional TrigFlow velocity),
    logvar (mean), r_w, jvp_rows (= B), guidance_rows (0).
    """

    name = "scm"
    config_class = SCMConfig
    draw_names = ("noise", "drop", "t")
    uses_step = True
    log_keys = ("loss", "v_loss", "raw_loss", "logvar")

    def network_spec(self) -> NetworkSpec:
        return NetworkSpec(heads=("u", "logvar"))

    def draw(self, batch, like, *, conditional, generator=None):
        """noise (standard normal), label dropout, t (TrigFlow time)."""
        c = self.config
        out = {"noise": torch.randn(like.shape, device=like.device, dtype=like.dtype, generator=generator)}
        if conditional:
            out["drop"] = torch.rand(batch, device=like.device, generator=generator) < c.label_dropout
        out["t"] = sample_trigflow_times(batch, c, like.device, generator=generator)
        return out

    def warmup(self, step: int | None) -> float:
        """The tangent warm-up factor r_w at a training step (1 without a step or warm-up)."""
        w = self.config.warmup_steps
        return 1.0 if step is None or w == 0 else min(1.0, step / w)

    def F_and_tangent(self, model, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor, y):
        """(F, F_jvp, logvar) at (x_t, t) in one network call: F differentiable (fp32 or wider), F_jvp = cos t sin t
        dF/dt along the path with velocity dx_t/dt (detached), logvar the network's logvar head."""
        sd, par = self.config.sigma_data, self.config.parametrization
        scale = torch.cos(t) * torch.sin(t)              # FastGen / Algorithm 1: the tangent scaled by cos t sin t
        x_dot = as_rows(scale, x_t) * dxdt
        z_in, s_in, _ = network_inputs(x_t, t, sd, par)
        z_dot, s_dot = network_input_tangents(x_t, x_dot, t, scale, sd, par)
        out, out_dot, logvar = model(z_in, s_in, torch.zeros_like(s_in), y,
                                     tangents=(z_dot.to(z_in.dtype), s_dot, torch.zeros_like(s_dot)))
        acc = torch.promote_types(torch.promote_types(out.dtype, x_t.dtype), torch.float32)
        x_t, x_dot, t, scale = x_t.to(acc), x_dot.to(acc), t.to(acc), scale.to(acc)
        F = F_from_output(out.to(acc), x_t, t, sd, par)
        with torch.no_grad():
            F_jvp = F_tangent(out.detach().to(acc), out_dot.to(acc), x_t, x_dot, t, scale, sd, par)
        return F, F_jvp, logvar.to(acc)

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor | None = None, *, noise=None, t=None, drop=None,
                 step: int | None = None, generator: torch.Generator | None = None):
        c = self.config
        net = self.network(model)
        batch = self.check_data(net, x, noise)
        conditional = net.num_classes > 0
        d, drawn = self._draw_missing({"noise": noise, "t": t, "drop": drop}, batch, x, conditional, generator)
        self.check_labels(net, y, d.get("drop"), batch)
        if not drawn:
            self.check_rows("t", d["t"], batch, x, 0.0, math.pi / 2)
            if bool(((d["t"] <= 0) | (d["t"] >= math.pi / 2)).any()):  # the weight 1 / tan(t) needs 0 < t < pi/2
                raise ValueError("t (TrigFlow time) must lie in (0, pi/2) strictly: the weight 1 / (sigma_d tan t) is "
                                 "infinite at 0 and the path has no data at pi/2")
        sd = c.sigma_data
        t = d["t"].to(x.dtype)
        cos, sin = as_rows(torch.cos(t), x), as_rows(torch.sin(t), x)
        z = sd * d["noise"]
        x_t = cos * x + sin * z
        dxdt = cos * z - sin * x
        F, F_jvp, logvar = self.F_and_tangent(model, x_t, t, dxdt, null_labels(net, y, d.get("drop")))

        acc = F.dtype
        x_t, dxdt, t = x_t.to(acc), dxdt.to(acc), t.to(acc)
        r_w = self.warmup(step)
        with torch.no_grad():
            g = tangent_target(F.detach(), F_jvp, x_t, dxdt, t, sd, r_w)
            dims = tuple(range(1, g.dim()))
            g = g / (g.pow(2).mean(dims, keepdim=True).sqrt() + c.g_norm_eps)
        D = x[0].numel()
        per_row = (F - F.detach() - g).pow(2).mean(dims)
        lv = logvar
        weight = 1.0 / (sd * torch.tan(t))
        loss = (weight / (torch.exp(lv) * D) * per_row + lv).mean()
        with torch.no_grad():
            v_loss = (sd * F - dxdt).pow(2).reshape(batch, -1).sum(1).mean()
        stats = {"loss": loss.detach(), "raw_loss": per_row.detach().mean(), "v_loss": v_loss,
                 "logvar": lv.detach().mean(), "r_w": r_w, "jvp_rows": batch, "guidance_rows": 0}
        return loss, stats


__all__ = ["SCMConfig", "SCMLoss", "PARAMETRIZATIONS", "trigflow_F", "consistency_fn", "sample_trigflow_times",
           "network_inputs", "network_input_tangents", "F_from_output", "F_tangent", "tangent_target"]
