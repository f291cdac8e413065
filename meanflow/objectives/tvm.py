"""Terminal Velocity Matching (TVM; Zhou, Parger, Haque, Song 2025, arXiv 2511.19797; official PyTorch code:
lumalabs/tvm, training/loss.py, wrapper.py, training_loop.py), on this engine's conventions: t = 1 is noise,
z_t = (1 - t) x + t e, v = e - x, and the network F(z, t, h | y, beta) with h = t - r. TVM's own letters: its s is r
here, its s' is t_fm.

The network maps (z_t, t) to the displacement towards an earlier time r <= t: f(z_t, t, r) = z_t - h a F(z_t, t, h),
a = 1 / beta when scale_param (official do_scale_param), else 1, with beta = 1 / cfg the guidance condition. TVM
matches the velocity of that map at its END point r (the terminal velocity) to the flow the network itself predicts
there, through a slowly moving teacher, and trains F at h = 0 as a guided flow-matching velocity:

    draws   gap = sigmoid(N(gap_mean, gap_std));  logit(r) ~ N(time_mean, time_std) truncated to r <= 1 - gap;
            t = min(r + gap, 1);  t_fm = sigmoid(N(time_mean, time_std));  beta = 1 / cfg (fixed, 1 / U(cfg_min,
            cfg_max), or U(0, 1));  dropped labels: the null class and beta = 1
    (F, dF/dr) = net(z_t, t, h = t - r | y, beta) with tangents (z_dot, t_dot, h_dot) = (0, 0, -1) on (z, t, h)
    f       = z_t - h a F                            the jump from t to r
    df/dr   = a (F - h dF/dr)                        differentiated through the JVP (not stop-gradient)
    F_T     = teacher(sg(f), r, 0 | y, beta)         no grad; times w = 1 / beta when scale_param
    F_u     = teacher(z_fm, t_fm, 0 | null, 1)       no grad; only rows with w != 1 need it
    F_fm    = net(z_fm, t_fm, 0 | y, beta)           with grad; times w when scale_param
    terminal_i = mean_D ((df/dr - F_T) beta)^2,  0 where isclose(r, t)
    fm_i       = mean_D ((F_fm - (w v + (1 - w) F_u)) beta)^2
    loss = mean_i (terminal_i + fm_i)

The teacher is an EMA of the network at rate 1 - teacher_decay (0.01), equal to the network at step 0 and updated after
every optimizer step: the trainer owns it (checkpointed, sharded like the model), builds it because this objective
declares `teacher_decay`, and passes it as `teacher=`. Called without a teacher, the objective uses the network itself
(no grad), which is the teacher of step 0.

Engine choices, same numbers as the official code: the two differentiable network evaluations (the JVP rows and the
flow-matching rows) are ONE call of 2B rows whose first B rows carry the tangent (one forward through DDP / FSDP, one
backward); the teacher's F_T and F_u rows are one no-grad call, with F_u only on the kept-label rows whose w != 1
(elsewhere (1 - w) F_u = 0). What the official code does not have: rows whose loss is not finite are counted
(`nonfinite_rows`) and, by default, left in the loss so that the trainer stops with its non-finite-loss error;
`zero_nonfinite=True` zeroes them in the loss as the official code does with NaN rows (their gradient can still be
non-finite: the trainer then stops on the gradient norm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mfkernels._checks import require_values

from ..models.heads import TVM_CONDITIONS, NetworkSpec
from .base import Objective, ObjectiveConfig, as_rows, check_unit_interval, knob, null_labels

BETA_SAMPLERS = ("fixed", "cfg_uniform", "uniform")


@dataclass
class TVMConfig(ObjectiveConfig):
    """Every knob of the TVM objective. Defaults follow the official ImageNet-256 config (configs/im256_w2.yaml)."""

    objective: str = knob("tvm", "training objective: fm | meanflow | imf | scm | alphaflow | tvm")
    time_mean: float = knob(-0.4, "logit-normal mean of r (TVM's s; truncated so that r <= 1 - gap) and of t_fm")
    time_std: float = knob(1.0, "logit-normal std of r and t_fm")
    gap_mean: float = knob(-0.8, "the interval t - r = sigmoid(N(gap_mean, gap_std)) (t clipped to 1)")
    gap_std: float = knob(1.0, "logit-normal std of the interval t - r")
    beta_sampler: str = knob("fixed", "guidance draws: fixed (beta = 1 / cfg) | cfg_uniform (cfg ~ U(cfg_min, "
                                      "cfg_max) per row) | uniform (beta ~ U(0, 1))")
    cfg: float = knob(2.0, "training guidance scale of beta_sampler=fixed (1: no guidance)")
    cfg_min: float = knob(1.0, "beta_sampler=cfg_uniform: lowest guidance scale")
    cfg_max: float = knob(4.0, "beta_sampler=cfg_uniform: highest guidance scale")
    label_dropout: float = knob(0.1, "fraction of labels replaced by the null class (their beta = 1)")
    scale_param: bool = knob(True, "official do_scale_param: the network's output is scaled by 1 / beta = cfg")
    detach_jvp: bool = knob(False, "official detach_jvp: stop-gradient on dF/dr (True runs on every backend; False "
                                   "differentiates through the JVP: model.backend=autograd for now)")
    teacher_decay: float = knob(0.99, "the teacher is an EMA of the network with this decay (rate 1 - decay)")
    zero_nonfinite: bool = knob(False, "zero the rows whose loss is not finite (official); False: the run stops")
    sample_cfg: float = knob(2.0, "sampling: guidance scale the network is conditioned on (beta = 1 / sample_cfg)")

    def __post_init__(self):
        self._check_name("tvm")
        for name in ("time_std", "gap_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.beta_sampler not in BETA_SAMPLERS:
            raise ValueError(f"beta_sampler must be one of {BETA_SAMPLERS}; got {self.beta_sampler!r}")
        if self.cfg < 1.0:
            raise ValueError(f"cfg must be >= 1 (beta = 1 / cfg lies in (0, 1]); got {self.cfg}")
        if not 1.0 <= self.cfg_min <= self.cfg_max:
            raise ValueError(f"need 1 <= cfg_min <= cfg_max; got cfg_min={self.cfg_min}, cfg_max={self.cfg_max}")
        check_unit_interval("label_dropout", self.label_dropout)
        if not 0.0 <= self.teacher_decay < 1.0:
            raise ValueError(f"teacher_decay must lie in [0, 1); got {self.teacher_decay}")
        if self.sample_cfg < 1.0:
            raise ValueError(f"sample_cfg must be >= 1; got {self.sample_cfg}")

    @property
    def guided(self) -> bool:
        return self.beta_sampler != "fixed" or self.cfg != 1.0 or self.sample_cfg != 1.0


# ------------------------------------------------------------------------------------------------- draws
def sample_tvm_times(batch: int, cfg: TVMConfig, device, dtype=torch.float32,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, r, t_fm): gap = sigmoid(N(gap_mean, gap_std)); logit(r) ~ N(time_mean, time_std) truncated above at
    logit(1 - gap) by the inverse CDF; t = min(r + gap, 1); t_fm = sigmoid(N(time_mean, time_std)). Made in float64
    and rounded once, so r <= t holds after rounding."""
    f64 = dict(device=device, dtype=torch.float64, generator=generator)
    gap = torch.sigmoid(torch.randn(batch, **f64) * cfg.gap_std + cfg.gap_mean)
    high = torch.logit(1 - gap)
    std_normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64, device=device),
                                            torch.ones((), dtype=torch.float64, device=device))
    u = torch.rand(batch, **f64) * std_normal.cdf((high - cfg.time_mean) / cfg.time_std)
    r = torch.sigmoid(cfg.time_mean + cfg.time_std * math.sqrt(2.0) * torch.erfinv(2 * u - 1))
    t = (r + gap).clamp(max=1.0)
    t_fm = torch.sigmoid(torch.randn(batch, **f64) * cfg.time_std + cfg.time_mean)
    return t.to(dtype), r.to(dtype), t_fm.to(dtype)


def sample_beta(batch: int, cfg: TVMConfig, device, dtype=torch.float32,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """beta = 1 / cfg per row (before label dropout, whose rows get beta = 1 in the loss)."""
    if cfg.beta_sampler == "fixed":
        return torch.full((batch,), 1.0 / cfg.cfg, device=device, dtype=dtype)
    u = torch.rand(batch, device=device, dtype=dtype, generator=generator)
    if cfg.beta_sampler == "uniform":
        return u
    return 1.0 / (u * (cfg.cfg_max - cfg.cfg_min) + cfg.cfg_min)


class TVMLoss(Objective):
    """loss_fn(model, x, y=None, *, noise=None, t=None, r=None, t_fm=None, beta=None, drop=None, teacher=None,
    generator=None) -> (loss, stats).

    stats: loss (mean of terminal + fm), raw_loss (mean of the terminal term: TVM's own loss), v_loss (mean of the
    flow-matching term), nonfinite_rows (rows whose terminal + fm is not finite), masked_rows (isclose(r, t): terminal
    term zeroed), jvp_rows (= B), guidance_rows (rows of the teacher's unconditional call).
    """

    name = "tvm"
    config_class = TVMConfig
    draw_names = ("noise", "drop", "t", "r", "t_fm", "beta")
    log_keys = ("loss", "v_loss", "raw_loss", "nonfinite_rows")

    def network_spec(self) -> NetworkSpec:
        return NetworkSpec(conditions=TVM_CONDITIONS, conditional=self.guided)

    def guidance_description(self) -> str:
        c = self.config
        return f"TVM guidance (beta_sampler = {c.beta_sampler}, cfg = {c.cfg}, sample_cfg = {c.sample_cfg})"

    @property
    def teacher_decay(self) -> float:
        """The decay of the teacher EMA the trainer keeps for this objective (base class: None, no teacher)."""
        return self.config.teacher_decay

    def draw(self, batch, like, *, conditional, generator=None):
        """noise, label dropout, (t, r, t_fm), beta (before dropout)."""
        c, dev = self.config, like.device
        out = {"noise": torch.randn(like.shape, device=dev, dtype=like.dtype, generator=generator)}
        if conditional:
            out["drop"] = torch.rand(batch, device=dev, generator=generator) < c.label_dropout
        out["t"], out["r"], out["t_fm"] = sample_tvm_times(batch, c, dev, generator=generator)
        out["beta"] = sample_beta(batch, c, dev, generator=generator)
        return out

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor | None = None, *, noise=None, t=None, r=None,
                 t_fm=None, beta=None, drop=None, teacher=None, generator: torch.Generator | None = None):
        c = self.config
        net = self.network(model)
        batch = self.check_data(net, x, noise)
        conditional = net.num_classes > 0
        given = {"noise": noise, "drop": drop, "t": t, "r": r, "t_fm": t_fm, "beta": beta}
        d, drawn = self._draw_missing(given, batch, x, conditional, generator)
        self.check_labels(net, y, d.get("drop"), batch)
        if not drawn:
            self._check_draws(d, batch, x)
        dt = x.dtype
        t, r, t_fm, noise = d["t"].to(dt), d["r"].to(dt), d["t_fm"].to(dt), d["noise"]
        drop = d.get("drop")
        beta = d["beta"].to(dt)
        if drop is not None:
            beta = torch.where(drop, torch.ones_like(beta), beta)
        masked = torch.isclose(r, t)  # the official rule (rtol 1e-5, atol 1e-8): no interval, no terminal term

        tb, fb = as_rows(t, x), as_rows(t_fm, x)
        z_t = (1 - tb) * x + tb * noise
        z_fm = (1 - fb) * x + fb * noise
        v = noise - x
        h = t - r
        y_in = null_labels(net, y, drop)
        # ONE differentiable call: rows [0, B) at (z_t, t, h) with the tangent d/dr, rows [B, 2B) at (z_fm, t_fm, 0)
        tangents = (torch.zeros_like(z_t), torch.zeros_like(t), -torch.ones_like(t))
        u, du_dr = model(torch.cat([z_t, z_fm]), torch.cat([t, t_fm]), torch.cat([h, torch.zeros_like(h)]),
                         torch.cat([y_in, y_in]) if y_in is not None else None, tangents=tangents,
                         tangent_grad=not c.detach_jvp, beta=torch.cat([beta, beta]))

        acc = torch.promote_types(torch.promote_types(u.dtype, x.dtype), torch.float32)
        F, F_fm = u.to(acc).split(batch)
        du_dr, z_t, z_fm, v = du_dr.to(acc), z_t.to(acc), z_fm.to(acc), v.to(acc)
        ha, betaa = as_rows(h.to(acc), F), as_rows(beta.to(acc), F)
        w = 1.0 / betaa
        a = w if c.scale_param else 1.0
        f = z_t - ha * a * F
        df_dr = a * (F - ha * du_dr)
        F_T, F_u, guidance_rows = self._teacher(teacher, net, f.detach().to(dt), r, z_fm.to(dt), t_fm, y_in, beta,
                                                drop)
        F_T, F_u = F_T.to(acc), F_u.to(acc)
        if c.scale_param:
            F_T = w * F_T
            F_fm = w * F_fm
        dims = tuple(range(1, x.dim()))
        # residuals; the masked rows' terminal residual is 0 (its gradient too, whatever the row holds)
        rows = (-1,) + (1,) * (F.dim() - 1)
        res_T = torch.where(masked.reshape(rows), 0.0, (df_dr - F_T) * betaa)
        res_fm = (F_fm - (w * v + (1 - w) * F_u)) * betaa
        terminal, fm = res_T.pow(2).mean(dims), res_fm.pow(2).mean(dims)
        bad = ~torch.isfinite(terminal + fm)
        if c.zero_nonfinite:
            # zeroed before the square: a row made non-finite by the teacher's (no-grad) output then adds exactly 0 to
            # the gradient, where zeroing the squared loss (the official nan_to_num) leaves 0 * NaN in it
            keep = (~bad).reshape(rows)
            res_T, res_fm = torch.where(keep, res_T, 0.0), torch.where(keep, res_fm, 0.0)
            terminal, fm = res_T.pow(2).mean(dims), res_fm.pow(2).mean(dims)
        loss = (terminal + fm).mean()
        stats = {"loss": loss.detach(), "raw_loss": terminal.detach().mean(), "v_loss": fm.detach().mean(),
                 "nonfinite_rows": bad.sum().to(acc), "masked_rows": masked.sum(), "jvp_rows": batch,
                 "guidance_rows": guidance_rows}
        return loss, stats

    @torch.no_grad()
    def _teacher(self, teacher, net, f, r, z_fm, t_fm, y_in, beta, drop):
        """(F_T, F_u, rows of F_u) from one no-grad teacher call: F_T = teacher(f, r, 0 | y, beta) on every row, F_u =
        teacher(z_fm, t_fm, 0 | null, 1) on the kept-label rows with beta != 1 (F_u is 0 elsewhere: unused)."""
        teacher = net if teacher is None else teacher
        kept = ~drop if drop is not None else torch.ones_like(r, dtype=torch.bool)
        guide = kept & (beta != 1.0)
        if net.num_classes <= 0 and bool(guide.any()):
            raise ValueError("TVM guidance (beta != 1) needs a class-conditional model; this network is "
                             "unconditional: draw beta = 1 (TVMConfig(cfg=1, beta_sampler='fixed'))")
        g = guide.nonzero().squeeze(1)
        k = g.numel()
        labels = None
        if y_in is not None:
            labels = torch.cat([y_in, torch.full((k,), net.null_class, dtype=y_in.dtype, device=y_in.device)])
        times = torch.cat([r, t_fm[g]])
        out = teacher(torch.cat([f, z_fm[g]]), times, torch.zeros_like(times), labels,
                      beta=torch.cat([beta, torch.ones_like(beta[g])]))
        F_T, out_u = out.split([r.shape[0], k])
        F_u = torch.zeros_like(F_T)
        F_u[g] = out_u
        return F_T, F_u, k

    def _check_draws(self, d, batch, x):
        self.check_times(d["t"], d["r"], batch, x)
        self.check_rows("t_fm", d["t_fm"], batch, x, 0.0, 1.0)
        beta = d["beta"]
        self.check_rows("beta", beta, batch, x, None, 1.0)
        require_values(beta > 0, "beta (= 1 / cfg) must lie in (0, 1]",
                       lambda: f"; got values in [{beta.min().item():.4g}, {beta.max().item():.4g}]")


__all__ = ["TVMConfig", "TVMLoss", "BETA_SAMPLERS", "sample_tvm_times", "sample_beta"]
