"""Improved MeanFlow (iMF; docs/design.md, 'iMF'; official JAX code: Lyy-iiis/imeanflow imf.py), on the same
fused ops.

The network has two heads, u (average velocity, with a tangent) and v (instantaneous velocity, primal only), and is
conditioned on the guidance scale omega and interval [t_min, t_max]:  (u, v) = net(z, t, h, y, omega, t_min, t_max).

    t, r ~ sigmoid(N(t_mean, t_std)) iid, (t, r) = (max, min); a fraction 1 - ratio of the rows get r = t
    omega = omega_max^s, s ~ U(0, 1);  t_min ~ U(0, t_min_high), t_max ~ U(t_max_low, 1); r = t rows get [0, 1]
    z = (1 - t) x + t e,  v = e - x,  w = omega where t in [t_min, t_max], else 1
    vhead(z, t | w, y) = net(z, t, h = 0, y, w, 0, 1)[v]              (no grad)
    v_c = vhead(w, y),  v_u = vhead(1, null),  v_g = v + (1 - 1/w)(v_c - v_u);  dropped labels: null label, v_g = v
    (u, du_dt, v_pred) = net(z, t, t - r, y_in, omega, t_min, t_max) with tangents (v_c, 1, 1) on (z, t, h)
    loss_u = adp(sum (u + (t - r) sg(du_dt) - v_g)^2),  loss_v = adp(sum (v_pred - v_g)^2),
    adp(L) = L / sg((L + eps)^p)
    loss = mean_i (loss_u + loss_v)

The tangent is the model's own guided velocity v_c (not v_g, not e - x). Because du_dt is stop-gradient, loss_u is the
MeanFlow loss with target v_g - (t - r) du_dt and loss_v the same op with no tangent rows: both run through the native
target/loss op.

Guidance forwards, kept small. The official code evaluates vhead(omega, y) and vhead(1, null) on every row, then
vhead(w, y) on every row again. Here ONE no-grad call evaluates exactly what is used:
- v_c = vhead(w, y) on the tangent rows (r != t; every one of them, dropped labels included: it is their tangent) and
  on the r = t rows with a kept label and w != 1 (their v_g);
- v_u = vhead(1, null) on the rows with a kept label and w != 1 (elsewhere 1 - 1/w = 0 or the label is dropped).
Where w = omega this v_c IS the official v_c1 = vhead(omega, y); where w = 1 (t outside the interval) it is the
official second evaluation, needed only on tangent rows. Unconditional networks train without guidance (omega = 1):
then only the tangent rows' v_c is evaluated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.heads import IMF_CONDITIONS, NetworkSpec
from .base import Objective, ObjectiveConfig, as_rows, check_unit_interval, jvp_rows_first, knob, null_labels
from .meanflow import LOSS_OPS, loss_op
from .time_sampling import num_jvp_rows, sample_t_r


@dataclass
class IMFConfig(ObjectiveConfig):
    """Every knob of the iMF objective. Defaults follow the official ImageNet setting (imf.py)."""

    objective: str = knob("imf", "training objective: fm | meanflow | imf | scm | alphaflow")
    t_mean: float = knob(-0.4, "logit-normal mean of t and r (drawn iid, then (t, r) = (max, min))")
    t_std: float = knob(1.0, "logit-normal std of t and r")
    ratio: float = knob(0.5, "fraction of rows with r != t (official: 50% of rows have r = t)")
    p: float = knob(1.0, "adaptive loss weight power: L_i / (L_i + eps)^p, for loss_u and loss_v")
    eps: float = knob(0.01, "adaptive loss weight offset")
    omega_max: float = knob(8.0, "training guidance scales omega = omega_max^s, s ~ U(0, 1) (log-uniform on "
                                 "[1, omega_max]); 1: no guidance (unconditional models)")
    t_min_high: float = knob(0.5, "guidance interval starts t_min ~ U(0, t_min_high)")
    t_max_low: float = knob(0.5, "guidance interval ends t_max ~ U(t_max_low, 1)")
    label_dropout: float = knob(0.1, "fraction of labels replaced by the null class (their v_g = v)")
    loss_op: str = knob("auto", "target/loss implementation: auto (native op when built) | native | torch")
    sample_omega: float = knob(8.0, "sampling: guidance scale omega the network is conditioned on (1: none)")
    sample_t_min: float = knob(0.4, "sampling: guidance interval start")
    sample_t_max: float = knob(0.65, "sampling: guidance interval end")

    def __post_init__(self):
        self._check_name("imf")
        if self.t_std <= 0:
            raise ValueError(f"t_std must be > 0; got {self.t_std}")
        check_unit_interval("ratio", self.ratio)
        check_unit_interval("label_dropout", self.label_dropout)
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0; got {self.eps}")
        if self.omega_max < 1.0:
            raise ValueError(f"omega_max must be >= 1 (omega = omega_max^s lies in [1, omega_max]); got "
                             f"{self.omega_max}")
        check_unit_interval("t_min_high", self.t_min_high)
        check_unit_interval("t_max_low", self.t_max_low)
        if self.loss_op not in LOSS_OPS:
            raise ValueError(f"loss_op must be one of {LOSS_OPS}; got {self.loss_op!r}")
        if self.sample_omega < 1.0:
            raise ValueError(f"sample_omega must be >= 1; got {self.sample_omega}")
        if not 0.0 <= self.sample_t_min <= self.sample_t_max <= 1.0:
            raise ValueError(f"the sampling interval must satisfy 0 <= sample_t_min <= sample_t_max <= 1; got "
                             f"[{self.sample_t_min}, {self.sample_t_max}]")

    @property
    def guided(self) -> bool:
        return self.omega_max != 1.0 or self.sample_omega != 1.0


def dropped_rows(coin: torch.Tensor, k: int) -> torch.Tensor:
    """The official placement of label dropout: as many rows as coins came up (each with probability label_dropout),
    taken from the start of the official row order, which puts the r = t rows first (imf.py `sample_tr`, then
    `cond_drop` drops the first n rows). Here the k tangent rows come first, so the official order is rows k..B-1,
    then 0..k-1: dropped labels land on r = t rows, and on a tangent row only when more labels drop than there are
    r = t rows. (Dropping rows independently would train u(.|null) on tangent rows with the conditional guided
    tangent v_c, which the official code never does.) No host sync: the count stays on the device."""
    batch = coin.shape[0]
    official_position = (torch.arange(batch, device=coin.device) - k) % max(batch, 1)
    return official_position < coin.sum()


class IMFLoss(Objective):
    """loss_fn(model, x, y=None, *, noise=None, t=None, r=None, omega=None, t_min=None, t_max=None, drop=None,
    generator=None) -> (loss, stats).

    stats: loss (weighted loss_u + loss_v), raw_loss (mean sum (V - v_g)^2, the unweighted loss_u), v_loss (mean
    sum (v_pred - v_g)^2, the unweighted loss_v), loss_u / loss_v (their weighted means), jvp_rows, guidance_rows.
    """

    name = "imf"
    config_class = IMFConfig
    draw_names = ("noise", "drop", "t", "r", "omega", "t_min", "t_max")
    log_keys = ("loss", "v_loss", "raw_loss", "loss_u", "loss_v")

    def network_spec(self) -> NetworkSpec:
        return NetworkSpec(heads=("u", "v"), conditions=IMF_CONDITIONS, conditional=self.guided)

    def guidance_description(self) -> str:
        c = self.config
        return f"iMF guidance (omega_max = {c.omega_max}, sample_omega = {c.sample_omega})"

    def draw(self, batch, like, *, conditional, generator=None):
        """noise, label dropout, (t, r) (tangent rows first), omega, (t_min, t_max) (r = t rows: [0, 1])."""
        c, dev = self.config, like.device
        out = {"noise": torch.randn(like.shape, device=dev, dtype=like.dtype, generator=generator)}
        k = num_jvp_rows(batch, c.ratio)
        if conditional:
            out["drop"] = dropped_rows(torch.rand(batch, device=dev, generator=generator) < c.label_dropout, k)
        out["t"], out["r"] = sample_t_r(batch, sampler="logit_normal", ratio=c.ratio, t_mean=c.t_mean,
                                        t_std=c.t_std, device=dev, generator=generator)
        s = torch.rand(batch, device=dev, generator=generator)
        out["omega"] = torch.exp(s * math.log(c.omega_max))
        ends = torch.rand(2, batch, device=dev, generator=generator)
        flow = torch.arange(batch, device=dev) >= k  # the r = t rows: no interval
        out["t_min"] = torch.where(flow, 0.0, ends[0] * c.t_min_high)
        out["t_max"] = torch.where(flow, 1.0, c.t_max_low + ends[1] * (1.0 - c.t_max_low))
        return out

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor | None = None, *, noise=None, t=None, r=None,
                 omega=None, t_min=None, t_max=None, drop=None, generator: torch.Generator | None = None):
        c = self.config
        net = self.network(model)
        batch = self.check_data(net, x, noise)
        conditional = net.num_classes > 0
        given = {"noise": noise, "drop": drop, "t": t, "r": r, "omega": omega, "t_min": t_min, "t_max": t_max}
        d, drawn = self._draw_missing(given, batch, x, conditional, generator)
        self.check_labels(net, y, d.get("drop"), batch)
        if drawn:
            k = num_jvp_rows(batch, c.ratio)  # sample_t_r puts the r != t rows first
        else:
            self._check_draws(d, batch, x, conditional)
            k, rows = jvp_rows_first(d["r"] != d["t"], x=x, y=y, **d)
            x, y = rows.pop("x"), rows.pop("y")
            d = rows
        dt = x.dtype
        t, r = d["t"].to(dt), d["r"].to(dt)
        cond = {name: d[name].to(dt) for name in IMF_CONDITIONS}
        drop = d.get("drop")
        noise = d["noise"]

        tb = as_rows(t, x)
        z = (1 - tb) * x + tb * noise
        v = noise - x
        v_c, v_g, guidance_rows = self._guidance(model, net, z, t, v, y, drop, cond, k)

        h = t - r
        y_in = null_labels(net, y, drop)
        if k > 0:
            ones = torch.ones(k, device=x.device, dtype=dt)
            u, du_dt, v_pred = model(z, t, h, y_in, tangents=(v_c[:k].to(z.dtype), ones, ones), **cond)
        else:
            u, v_pred = model(z, t, h, y_in, **cond)
            du_dt = u.new_zeros((0,) + tuple(u.shape[1:]))

        acc = torch.promote_types(torch.promote_types(u.dtype, v_g.dtype), torch.float32)
        op = loss_op(c.loss_op)
        v_g, ta = v_g.to(acc), t.to(acc)
        loss_u, per_u, _ = op(u.to(acc), v_g, du_dt.detach().to(acc), ta, r.to(acc), p=c.p, eps=c.eps)
        loss_v, per_v, _ = op(v_pred.to(acc), v_g, v_g.new_zeros((0,) + tuple(v_g.shape[1:])), ta, ta, p=c.p,
                              eps=c.eps)
        loss = loss_u + loss_v
        stats = {"loss": loss.detach(), "raw_loss": per_u.mean(), "v_loss": per_v.mean(), "loss_u": loss_u.detach(),
                 "loss_v": loss_v.detach(), "jvp_rows": k, "guidance_rows": guidance_rows}
        return loss, stats

    @torch.no_grad()
    def _guidance(self, model, net, z, t, v, y, drop, cond, k):
        """(v_c for the tangent rows' use, v_g, rows evaluated): one no-grad v-head call (module docstring)."""
        omega, t_min, t_max = cond["omega"], cond["t_min"], cond["t_max"]
        rows = torch.arange(t.shape[0], device=t.device)
        # the r = t rows (rows >= k) are guided with omega whatever their interval (the official v_g_fm)
        w = torch.where((t >= t_min) & (t <= t_max) | (rows >= k), omega, torch.ones_like(omega))
        kept = ~drop if drop is not None else torch.ones_like(t, dtype=torch.bool)
        guide = kept & (w != 1.0)                              # rows whose v_g differs from v
        if net.num_classes <= 0 and bool(guide.any()):
            raise ValueError("iMF guidance (omega != 1 inside the interval) needs a class-conditional model; this "
                             "network is unconditional: draw omega = 1 (IMFConfig.omega_max = 1)")
        need_c = (rows < k) | guide
        a = need_c.nonzero().squeeze(1)                          # v_c = vhead(w, y)
        b = guide.nonzero().squeeze(1)                           # v_u = vhead(1, null)
        idx = torch.cat([a, b])
        v_g = v.clone()
        v_c = torch.zeros_like(v)
        if idx.numel() == 0:
            return v_c, v_g, 0
        ones = torch.ones(idx.numel(), device=t.device, dtype=t.dtype)
        w_in = torch.cat([w[a], ones[a.numel():]])
        labels = None
        if y is not None:
            labels = torch.cat([y[a], torch.full((b.numel(),), net.null_class, dtype=y.dtype, device=y.device)])
        tg = t[idx]
        out = model(z[idx], tg, torch.zeros_like(tg), labels, head="v", omega=w_in, t_min=torch.zeros_like(tg),
                    t_max=torch.ones_like(tg))
        out_c, out_u = out.to(v.dtype).split([a.numel(), b.numel()])
        v_c[a] = out_c
        if b.numel():
            gain = as_rows(1.0 - 1.0 / w[b], v)
            v_g[b] = v[b] + gain * (v_c[b] - out_u)
        return v_c, v_g, idx.numel()

    def _check_draws(self, d, batch, x, conditional):
        self.check_times(d["t"], d["r"], batch, x)
        for name in ("t_min", "t_max"):
            self.check_rows(name, d[name], batch, x, 0.0, 1.0)
        self.check_rows("omega", d["omega"], batch, x, 1.0, None)


__all__ = ["IMFConfig", "IMFLoss"]
