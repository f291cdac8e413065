"""alpha-Flow (docs/design.md, 'alpha-Flow'; official code: snap-research/alphaflow src/training/loss.py,
AlphaFlowLoss), on the same fused ops.

A curriculum from flow matching to MeanFlow, driven by alpha in [0, 1] as a function of the training step:

    (t, r) as MeanFlow draws them (a fraction 1 - ratio of the rows has r = t);  z = (1 - t) x + t e,  v_g as MeanFlow
    rows with r = t, or every row when alpha = 0 ("continuous"): the MeanFlow target with tangents (v_g, 1, 1),
        u_tgt = v_g - (t - r) du/dt                      (only the r != t rows need a tangent; none when r = t)
    the other rows ("discrete", 0 < alpha <= 1): dt = alpha (t - r), one extra no-grad forward where alpha < 1,
        u_tgt = clip((dt v_g + (t - dt - r) u(z - dt v_g, r, t - dt)) / (t - r), -clamp, clamp)
    L_i = mean_D (u(z, r, t) - u_tgt)^2,  loss = mean_i w_i L_i / sg((L_i + eps)^p),
    w_i = alpha on discrete rows, else 1
(p = 1 in the official code; p < 1, a softer weighting, is this engine's generalisation, as MeanFlow's p)

alpha = 1: u_tgt = v_g on every row (trajectory flow matching: no tangent, no extra forward; r != t rows clipped as
every discrete target); alpha = 0: MeanFlow with
eps scaled by D (mean instead of sum over the sample). Both limits run through the native target/loss op (with
eps * D and the constant factor D^(p - 1), which give the mean form's loss and gradient); the weighted middle in torch.

alpha by step (the official get_ratio): before alpha_start_step alpha_start, after alpha_end_step alpha_end, between
    "sigmoid": alpha_start + (alpha_end - alpha_start) sigmoid(gamma (step - mid) / (alpha_end_step - alpha_start_step))
    "linear":  alpha_start + (alpha_end - alpha_start) (step - alpha_start_step) / (alpha_end_step - alpha_start_step)
then snapped to 0 below alpha_snap and to 1 above 1 - alpha_snap ("constant": alpha_start always).

Guidance: MeanFlow's (omega, kappa, [t_start, t_end], dropped labels get v_g = v), with its small guidance forwards
(meanflow.objectives.guidance). The official code drops labels only inside the guidance interval and guides dropped
rows with the null prediction; here label dropout and guidance follow the engine's MeanFlow convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Objective, ObjectiveConfig, as_rows, check_unit_interval, jvp_rows_first, knob, null_labels
from .guidance import guided_velocity
from .meanflow import LOSS_OPS, loss_op
from .time_sampling import TIME_SAMPLERS, num_jvp_rows, sample_t_r

ALPHA_SCHEDULES = ("sigmoid", "linear", "constant")


@dataclass
class AlphaFlowConfig(ObjectiveConfig):
    """Every knob of the alpha-Flow objective (defaults: the official ImageNet B/2 runs with training guidance)."""

    objective: str = knob("alphaflow", "training objective: fm | meanflow | imf | scm | alphaflow")
    time_sampler: str = knob("logit_normal", "(t, r) sampler: logit_normal (v0), logit_normal_v1 or uniform")
    t_mean: float = knob(-0.4, "logit-normal mean of t (and of r in v0)")
    t_std: float = knob(1.0, "logit-normal std of t (and of r in v0)")
    r_mean: float = knob(-0.4, "v1 only: logit-normal mean of r")
    r_std: float = knob(1.0, "v1 only: logit-normal std of r")
    ratio: float = knob(0.75, "fraction of rows with r != t (official ratio_fm = 1 - ratio = 0.25)")
    eps: float = knob(1e-3, "adaptive weight offset: w / (L_i + eps)^p, L_i the per-sample MEAN squared error")
    p: float = knob(1.0, "adaptive weight power (official: 1; < 1 weights softer, as MeanFlow's p)")
    alpha_schedule: str = knob("sigmoid", "alpha by training step: sigmoid | linear | constant")
    alpha_start: float = knob(1.0, "alpha before alpha_start_step (1: trajectory flow matching)")
    alpha_end: float = knob(0.0, "alpha after alpha_end_step (0: MeanFlow)")
    alpha_start_step: int = knob(0, "step where alpha starts to move")
    alpha_end_step: int = knob(0, "step where alpha reaches alpha_end (0: the last training step, train.steps)")
    gamma: float = knob(25.0, "steepness of the sigmoid schedule")
    alpha_snap: float = knob(0.005, "alpha below this is 0, above 1 - this is 1")
    clamp: float = knob(4.0, "discrete targets are clipped to [-clamp, clamp] (official clamp_utgt)")
    omega: float = knob(1.0, "training-time guidance scale (1: none), as MeanFlow")
    kappa: float = knob(0.0, "weight of the conditional prediction in the guided target, as MeanFlow")
    t_start: float = knob(0.0, "guidance applies for t in [t_start, t_end]")
    t_end: float = knob(1.0, "guidance applies for t in [t_start, t_end]")
    label_dropout: float = knob(0.1, "fraction of labels replaced by the null class")
    loss_op: str = knob("auto", "target/loss implementation (alpha = 0 or 1): auto | native | torch")

    def __post_init__(self):
        self._check_name("alphaflow")
        if self.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"time_sampler must be one of {TIME_SAMPLERS}; got {self.time_sampler!r}")
        check_unit_interval("ratio", self.ratio)
        check_unit_interval("label_dropout", self.label_dropout)
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0; got {self.eps}")
        if self.alpha_schedule not in ALPHA_SCHEDULES:
            raise ValueError(f"alpha_schedule must be one of {ALPHA_SCHEDULES}; got {self.alpha_schedule!r}")
        check_unit_interval("alpha_start", self.alpha_start)
        check_unit_interval("alpha_end", self.alpha_end)
        if self.alpha_start_step < 0 or self.alpha_end_step < 0:
            raise ValueError("alpha_start_step and alpha_end_step must be >= 0")
        if self.alpha_end_step and self.alpha_end_step <= self.alpha_start_step:
            raise ValueError(f"alpha_end_step ({self.alpha_end_step}) must be > alpha_start_step "
                             f"({self.alpha_start_step}) (or 0: the last training step)")
        if not 0.0 <= self.alpha_snap < 0.5:
            raise ValueError(f"alpha_snap must lie in [0, 0.5); got {self.alpha_snap}")
        if self.clamp <= 0:
            raise ValueError(f"clamp must be > 0; got {self.clamp}")
        if not 0.0 <= self.t_start <= self.t_end <= 1.0:
            raise ValueError(f"the guidance interval must satisfy 0 <= t_start <= t_end <= 1; got "
                             f"[{self.t_start}, {self.t_end}]")
        if self.kappa != 0.0 and not 0.0 <= self.kappa < 1.0:
            raise ValueError(f"kappa must lie in [0, 1); got {self.kappa}")
        if self.loss_op not in LOSS_OPS:
            raise ValueError(f"loss_op must be one of {LOSS_OPS}; got {self.loss_op!r}")

    @property
    def guided(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0


def alpha_at(step: int, cfg: AlphaFlowConfig, total_steps: int | None = None) -> float:
    """alpha at a training step (module docstring); alpha_end_step = 0 means total_steps."""
    if cfg.alpha_schedule == "constant":
        a = cfg.alpha_start
    else:
        end = cfg.alpha_end_step or total_steps
        if not end:
            raise ValueError("alpha_end_step = 0 means 'the last training step': pass total_steps (the trainer does) "
                             "or set alpha_end_step")
        start = cfg.alpha_start_step
        if end <= start:
            raise ValueError(f"the alpha schedule ends (step {end}) before it starts (step {start})")
        if step < start:
            a = cfg.alpha_start
        elif step > end:
            a = cfg.alpha_end
        elif cfg.alpha_schedule == "linear":
            a = cfg.alpha_start + (cfg.alpha_end - cfg.alpha_start) * (step - start) / (end - start)
        else:
            progress = (step - (start + (end - start) / 2)) / (end - start)
            a = cfg.alpha_start + (cfg.alpha_end - cfg.alpha_start) / (1 + math.exp(-progress * cfg.gamma))
    if a < cfg.alpha_snap:
        return 0.0
    if a > 1 - cfg.alpha_snap:
        return 1.0
    return a


class AlphaFlowLoss(Objective):
    """loss_fn(model, x, y=None, *, noise=None, t=None, r=None, drop=None, step=None, alpha=None, generator=None).

    alpha comes from `alpha` if given, else from the schedule at `step` (the trainer passes it; `total_steps` at
    construction resolves alpha_end_step = 0). stats: loss, raw_loss (mean_i L_i), v_loss (mean_i sum (u - v)^2),
    alpha, jvp_rows, guidance_rows, extra_rows (the discrete rows' no-grad forward).
    """

    name = "alphaflow"
    config_class = AlphaFlowConfig
    draw_names = ("noise", "drop", "t", "r")
    uses_step = True
    log_keys = ("loss", "v_loss", "raw_loss", "alpha")

    def __init__(self, config=None, *, model=None, total_steps: int | None = None, **overrides):
        super().__init__(config, model=model, **overrides)
        self.total_steps = total_steps

    def guidance_description(self) -> str:
        return f"guidance (omega = {self.config.omega}, kappa = {self.config.kappa})"

    def alpha(self, step: int | None) -> float:
        """alpha at a training step (None: the end of the schedule)."""
        if step is None:
            return self.config.alpha_end if self.config.alpha_schedule != "constant" else self.config.alpha_start
        return alpha_at(step, self.config, self.total_steps)

    def draw(self, batch, like, *, conditional, generator=None):
        """noise, label dropout, (t, r) (r != t rows first): MeanFlow's draws."""
        c, dev = self.config, like.device
        out = {"noise": torch.randn(like.shape, device=dev, dtype=like.dtype, generator=generator)}
        if conditional:
            out["drop"] = torch.rand(batch, device=dev, generator=generator) < c.label_dropout
        out["t"], out["r"] = sample_t_r(batch, sampler=c.time_sampler, ratio=c.ratio, t_mean=c.t_mean, t_std=c.t_std,
                                        r_mean=c.r_mean, r_std=c.r_std, device=dev, generator=generator)
        return out

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor | None = None, *, noise=None, t=None, r=None,
                 drop=None, step: int | None = None, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        c = self.config
        net = self.network(model)
        batch = self.check_data(net, x, noise)
        conditional = net.num_classes > 0
        d, drawn = self._draw_missing({"noise": noise, "drop": drop, "t": t, "r": r}, batch, x, conditional,
                                      generator)
        self.check_labels(net, y, d.get("drop"), batch)
        if drawn:
            k = num_jvp_rows(batch, c.ratio)
        else:
            self.check_times(d["t"], d["r"], batch, x)
            k, rows = jvp_rows_first(d["r"] != d["t"], x=x, y=y, **d)
            x, y, d = rows.pop("x"), rows.pop("y"), rows
        a = float(alpha) if alpha is not None else self.alpha(step)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1]; got {a}")
        dt_ = x.dtype
        t, r, drop, noise = d["t"].to(dt_), d["r"].to(dt_), d.get("drop"), d["noise"]
        tb = as_rows(t, x)
        z = (1 - tb) * x + tb * noise
        v = noise - x
        y_in = null_labels(net, y, drop)

        pending, guidance_rows = None, 0
        v_g = v
        if c.guided:
            v_g, pending = guided_velocity(model, z, t, v, y, drop, k, omega=c.omega, kappa=c.kappa,
                                           t_start=c.t_start, t_end=c.t_end, null_class=net.null_class)
            guidance_rows = pending.forward_rows

        h = t - r
        du_dt, extra_rows, target = None, 0, None
        if a == 0.0 and k > 0:  # continuous: the MeanFlow target on the r != t rows
            ones = torch.ones(k, device=x.device, dtype=dt_)
            u, du_dt = model(z, t, h, y_in, tangents=(v_g[:k].to(z.dtype), ones, ones))
        else:
            if 0.0 < a < 1.0 and k > 0:  # discrete rows: the extra no-grad forward
                target, extra_rows = self._discrete_target(model, z, t, r, v_g[:k], y_in, a, k), k
            u = model(z, t, h, y_in)
        if pending is not None:
            v_g = pending.finish(v_g, v, u, c.omega, c.kappa)

        acc = torch.promote_types(torch.promote_types(u.dtype, v_g.dtype), torch.float32)
        D = x[0].numel()
        if target is None:  # every weight 1: the native op, on sums with eps * D
            du = du_dt.detach().to(acc) if du_dt is not None else u.new_zeros((0,) + tuple(u.shape[1:])).to(acc)
            tgt = v_g.to(acc)
            if a == 1.0 and k > 0:  # discrete rows with dt = t - r: the target v_g, clipped like every discrete one
                tgt = torch.cat([tgt[:k].clamp(-c.clamp, c.clamp), tgt[k:]])
            loss, per_sum, _ = loss_op(c.loss_op)(u.to(acc), tgt, du, t.to(acc), r.to(acc), p=c.p, eps=c.eps * D)
            if c.p != 1.0:  # sum form -> mean form: L/D / ((L + D eps)/D)^p = D^(p - 1) L / (L + D eps)^p
                loss = loss * D ** (c.p - 1.0)
            per_row = per_sum / D
        else:
            tgt = torch.cat([target.to(acc), v_g[k:].to(acc)])
            per_row = (u.to(acc) - tgt).pow(2).reshape(batch, -1).mean(1)
            weight = torch.ones_like(per_row)
            weight[:k] = a
            loss = (weight * per_row / (per_row.detach() + c.eps) ** c.p).mean()
        with torch.no_grad():
            v_loss = (u.detach().to(acc) - v.to(acc)).pow(2).reshape(batch, -1).sum(1).mean()
        stats = {"loss": loss.detach(), "raw_loss": per_row.detach().mean(), "v_loss": v_loss, "alpha": a,
                 "jvp_rows": k if du_dt is not None else 0, "guidance_rows": guidance_rows, "extra_rows": extra_rows}
        return loss, stats

    @torch.no_grad()
    def _discrete_target(self, model, z, t, r, v_g, y_in, a: float, k: int) -> torch.Tensor:
        """u_tgt of the first k rows (r != t) for 0 < alpha < 1 (module docstring)."""
        tk, rk = t[:k], r[:k]
        dt = a * (tk - rk)
        dtb = as_rows(dt, z)
        t_next = tk - dt
        labels = y_in[:k] if y_in is not None else None
        u_next = model(z[:k] - dtb * v_g.to(z.dtype), t_next, (t_next - rk).clamp_min(0), labels).to(v_g.dtype)
        target = (dtb.to(v_g.dtype) * v_g + as_rows(t_next - rk, v_g) * u_next) / as_rows(tk - rk, v_g)
        return target.clamp(-self.config.clamp, self.config.clamp)


__all__ = ["AlphaFlowConfig", "AlphaFlowLoss", "ALPHA_SCHEDULES", "alpha_at"]
