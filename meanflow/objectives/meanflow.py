"""The MeanFlow loss (docs/design.md, 'The MeanFlow loss'), with guidance folded into training and ragged tangents.

    z = (1 - t) x + t e,  v = e - x,  h = t - r
    (u, du_dt) = jvp(u_theta, (z, t, h), (v_g, 1, 1))          # tangent only for the rows with r != t
    u_tgt = stopgrad(v_g - clip(t - r, 0, 1) du_dt)
    L_i = sum (u_i - u_tgt_i)^2,  loss = mean_i L_i / stopgrad((L_i + eps)^p)

Rows are ordered so that the r != t rows come first; only those k rows enter the tangent computation (the `autograd`
backend, like peers, still differentiates the whole batch). Any row order of the inputs gives the same loss.

Under torch.compile the whole call traces into one graph (fullgraph=True): value checks become device-side asserts,
the guidance call takes a fixed bucket of rows (guidance.py), and with t, r passed in (rows not drawn by the sampler,
so k would be data-dependent) every row gets a tangent: rows with r = t have clip(t - r) = 0, so the loss is the same.
Draw the randomness outside, or from the global RNG (a torch.Generator argument is not traced).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .base import Objective, ObjectiveConfig, as_rows, jvp_rows_first, null_labels
from .base import knob as _knob
from .guidance import guided_velocity
from .time_sampling import TIME_SAMPLERS, num_jvp_rows, sample_t_r

LOSS_OPS = ("auto", "native", "torch")


@dataclass
class MeanFlowConfig(ObjectiveConfig):
    """Every knob of the MeanFlow objective. Defaults follow the paper's ImageNet setting."""

    time_sampler: str = _knob("logit_normal", "(t, r) sampler: logit_normal (paper v0), logit_normal_v1 or uniform")
    t_mean: float = _knob(-0.4, "logit-normal mean of t (and of r in v0)")
    t_std: float = _knob(1.0, "logit-normal std of t (and of r in v0)")
    r_mean: float = _knob(-0.4, "v1 only: logit-normal mean of r")
    r_std: float = _knob(1.0, "v1 only: logit-normal std of r")
    ratio: float = _knob(0.25, "fraction of rows with r != t (the rest have r = t and need no JVP)")
    p: float = _knob(1.0, "adaptive loss weight power: L_i / (L_i + eps)^p")
    eps: float = _knob(0.01, "adaptive loss weight offset")
    omega: float = _knob(1.0, "training-time guidance scale (1: none)")
    kappa: float = _knob(0.0, "weight of the conditional prediction in the guided target "
                              "(sampling guidance = omega / (1 - kappa))")
    t_start: float = _knob(0.0, "guidance applies for t in [t_start, t_end]")
    t_end: float = _knob(1.0, "guidance applies for t in [t_start, t_end]")
    label_dropout: float = _knob(0.1, "fraction of labels replaced by the null class")
    loss_op: str = _knob("auto", "target/loss implementation: auto (native op when built) | native | torch")
    flow_matching: bool = _knob(False, "plain flow-matching baseline: r = t everywhere, unweighted loss "
                                       "(overrides ratio and p while set)")
    objective: str = _knob("meanflow", "training objective: fm | meanflow | imf | scm | alphaflow")

    def __post_init__(self):
        self._check_name("meanflow")
        if self.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"time_sampler must be one of {TIME_SAMPLERS}; got {self.time_sampler!r}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must lie in [0, 1]; got {self.ratio}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1]; got {self.label_dropout}")
        if not 0.0 <= self.t_start <= self.t_end <= 1.0:
            raise ValueError(f"the guidance interval must satisfy 0 <= t_start <= t_end <= 1; "
                             f"got [{self.t_start}, {self.t_end}]")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0; got {self.eps}")
        if self.loss_op not in LOSS_OPS:
            raise ValueError(f"loss_op must be one of {LOSS_OPS}; got {self.loss_op!r}")
        if self.kappa != 0.0 and not 0.0 <= self.kappa < 1.0:
            raise ValueError(f"kappa must lie in [0, 1) (the sampling guidance is omega / (1 - kappa)); got {self.kappa}")
    @property
    def jvp_ratio(self) -> float:
        """The fraction of rows with r != t actually used: 0 for the flow-matching baseline."""
        return 0.0 if self.flow_matching else self.ratio

    @property
    def weight_power(self) -> float:
        """The adaptive-weight power actually used: 0 (plain mean squared error) for the flow-matching baseline."""
        return 0.0 if self.flow_matching else self.p

    @property
    def guided(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0

    def replace(self, **changes) -> "MeanFlowConfig":
        return dataclasses.replace(self, **changes)


_LOSS_OPS: dict = {}


def loss_op(name: str):
    """The target/loss implementation: mfkernels' native op (C++/CUDA) or its pure-torch reference (looked up once; a
    dict rather than functools.lru_cache, which torch.compile warns about)."""
    op = _LOSS_OPS.get(name)
    if op is None:
        op = _LOSS_OPS[name] = _find_loss_op(name)
    return op


def _find_loss_op(name: str):
    if name in ("auto", "native"):
        try:
            from mfkernels.target import meanflow_loss
        except ImportError:
            if name == "native":
                raise
        else:
            return meanflow_loss
    from mfkernels.reference import meanflow_loss_ref

    return meanflow_loss_ref


class MeanFlowLoss(Objective):
    """loss_fn(model, x, y=None, *, noise=None, t=None, r=None, drop=None) -> (loss, stats).

    The keyword arguments override the random draws (tests, reproducibility). `stats` holds detached tensors: loss
    (weighted), v_loss (mean sum (u - v)^2, a monitor), raw_loss (mean L_i), weight (mean adaptive weight) and ints:
    jvp_rows (rows that needed a tangent), guidance_rows (rows evaluated by the no-grad guidance call).
    """

    name = "meanflow"
    config_class = MeanFlowConfig
    draw_names = ("noise", "drop", "t", "r")

    def guidance_description(self) -> str:
        return f"guidance (omega = {self.config.omega}, kappa = {self.config.kappa})"

    def draw(self, batch: int, like: torch.Tensor, *, conditional: bool,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """noise, label dropout, (t, r): in the order __call__ draws them itself."""
        out = {"noise": torch.randn(like.shape, device=like.device, dtype=like.dtype, generator=generator)}
        if conditional:
            out["drop"] = torch.rand(batch, device=like.device, generator=generator) < self.config.label_dropout
        out["t"], out["r"] = self.sample_times(batch, like.device, generator)
        return out

    def sample_times(self, batch: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return sample_t_r(batch, sampler=c.time_sampler, ratio=c.jvp_ratio, t_mean=c.t_mean, t_std=c.t_std,
                          r_mean=c.r_mean, r_std=c.r_std, device=device, generator=generator)

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor | None = None, *, noise=None, t=None, r=None,
                 drop=None, generator: torch.Generator | None = None):
        c = self.config
        net = self.network(model)
        batch = self.check_data(net, x, noise)
        conditional = net.num_classes > 0
        if c.guided and not conditional:
            raise ValueError("guidance (omega != 1 or kappa != 0) needs a class-conditional model")
        if noise is None:
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if conditional and drop is None:
            drop = torch.rand(batch, device=x.device, generator=generator) < c.label_dropout
        self.check_labels(net, y, drop, batch)

        if (t is None) != (r is None):
            raise ValueError("pass both t and r, or neither")
        if t is None:
            t, r = self.sample_times(batch, x.device, generator)       # already ordered: r != t rows first
            k = num_jvp_rows(batch, c.jvp_ratio)
        else:
            self.check_times(t, r, batch, x)
            # Under torch.compile k would be data-dependent: every row gets a tangent instead (same loss, see above).
            k, rows = jvp_rows_first(r != t, count=not torch.compiler.is_compiling(), x=x, noise=noise, t=t, r=r,
                                     y=y, drop=drop)
            x, noise, t, r, y, drop = (rows[n] for n in ("x", "noise", "t", "r", "y", "drop"))
        t, r = t.to(x.dtype), r.to(x.dtype)

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
        if k > 0:
            ones = torch.ones(k, device=x.device, dtype=x.dtype)
            u, du_dt = model(z, t, h, y_in, tangents=(v_g[:k].to(z.dtype), ones, ones))
        else:
            u = model(z, t, h, y_in)
            du_dt = u.new_zeros((0,) + tuple(u.shape[1:]))
        if pending is not None:
            v_g = pending.finish(v_g, v, u, c.omega, c.kappa)

        # The loss is computed in fp32 (or fp64): under autocast u and du_dt come in bf16, v_g in the data's dtype.
        acc = torch.promote_types(torch.promote_types(u.dtype, v_g.dtype), torch.float32)
        loss, per_sample, weight = loss_op(c.loss_op)(u.to(acc), v_g.to(acc), du_dt.detach().to(acc), t.to(acc),
                                                      r.to(acc), p=c.weight_power, eps=c.eps)
        with torch.no_grad():
            acc = torch.promote_types(u.dtype, torch.float32)
            v_loss = (u.detach().to(acc) - v.to(acc)).pow(2).reshape(batch, -1).sum(1).mean()
        stats = {"loss": loss.detach(), "v_loss": v_loss, "raw_loss": per_sample.mean(), "weight": weight.mean(),
                 "jvp_rows": k, "guidance_rows": guidance_rows}
        return loss, stats
