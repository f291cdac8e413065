"""Flow matching (the baseline every one-step objective is compared with).

    z = (1 - t) x + t e,  v = e - x,  L_i = sum (u(z, t, h = 0 | y) - v)^2,  loss = mean_i L_i

t ~ sigmoid(N(t_mean, t_std)) (or uniform); labels dropped to the null class at rate label_dropout so that the sampler
can apply classifier-free guidance (FlowMatchingConfig.sample_cfg). No row needs a tangent. The loss runs through the
native target/loss op (no tangent rows, p = 0).

Not to be confused with MeanFlowConfig(flow_matching=True), MeanFlow's own ratio-0 baseline (its t is the max of two
logit-normal draws, and it may carry MeanFlow's training-time guidance).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Objective, ObjectiveConfig, as_rows, check_unit_interval, knob, null_labels
from .meanflow import LOSS_OPS, loss_op

FM_TIME_SAMPLERS = ("logit_normal", "uniform")


@dataclass
class FlowMatchingConfig(ObjectiveConfig):
    """Every knob of the flow-matching objective."""

    objective: str = knob("fm", "training objective: fm | meanflow | imf | scm | alphaflow")
    time_sampler: str = knob("logit_normal", "t sampler: logit_normal (sigmoid of N(t_mean, t_std)) or uniform")
    t_mean: float = knob(-0.4, "logit-normal mean of t")
    t_std: float = knob(1.0, "logit-normal std of t")
    label_dropout: float = knob(0.1, "fraction of labels replaced by the null class (for sampling-time guidance)")
    loss_op: str = knob("auto", "loss implementation: auto (native op when built) | native | torch")
    sample_cfg: float = knob(1.0, "sampling: classifier-free guidance scale of the Euler sampler, "
                                  "v = v_null + s (v_c - v_null) (1: none; otherwise 2 forwards per step)")

    def __post_init__(self):
        self._check_name("fm")
        if self.time_sampler not in FM_TIME_SAMPLERS:
            raise ValueError(f"time_sampler must be one of {FM_TIME_SAMPLERS}; got {self.time_sampler!r}")
        if self.t_std <= 0:
            raise ValueError(f"t_std must be > 0; got {self.t_std}")
        check_unit_interval("label_dropout", self.label_dropout)
        if self.loss_op not in LOSS_OPS:
            raise ValueError(f"loss_op must be one of {LOSS_OPS}; got {self.loss_op!r}")
        if self.sample_cfg < 0:
            raise ValueError(f"sample_cfg must be >= 0; got {self.sample_cfg}")

    @property
    def guided(self) -> bool:
        """Sampling-time guidance needs a class-conditional network (its null class)."""
        return self.sample_cfg != 1.0


def sample_fm_times(batch: int, cfg: FlowMatchingConfig, device, dtype=torch.float32,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    if cfg.time_sampler == "uniform":
        return torch.rand(batch, device=device, dtype=dtype, generator=generator)
    n = torch.randn(batch, device=device, dtype=dtype, generator=generator)
    return torch.sigmoid(n * cfg.t_std + cfg.t_mean)


class FlowMatchingLoss(Objective):
    """loss_fn(model, x, y=None, *, noise=None, t=None, drop=None, generator=None) -> (loss, stats).

    stats: loss = raw_loss = v_loss (mean_i sum (u - v)^2: the three coincide for flow matching), jvp_rows = 0,
    guidance_rows = 0.
    """

    name = "fm"
    config_class = FlowMatchingConfig
    draw_names = ("noise", "drop", "t")

    def guidance_description(self) -> str:
        return f"sampling-time guidance (fm sample_cfg = {self.config.sample_cfg})"

    def draw(self, batch, like, *, conditional, generator=None):
        c = self.config
        out = {"noise": torch.randn(like.shape, device=like.device, dtype=like.dtype, generator=generator)}
        if conditional:
            out["drop"] = torch.rand(batch, device=like.device, generator=generator) < c.label_dropout
        out["t"] = sample_fm_times(batch, c, like.device, generator=generator)
        return out

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor | None = None, *, noise=None, t=None, drop=None,
                 generator: torch.Generator | None = None):
        net = self.network(model)
        batch = self.check_data(net, x, noise)
        conditional = net.num_classes > 0
        draws, drawn = self._draw_missing({"noise": noise, "t": t, "drop": drop}, batch, x, conditional, generator)
        self.check_labels(net, y, draws.get("drop"), batch)
        if not drawn:
            self.check_rows("t", draws["t"], batch, x, 0.0, 1.0)
        noise, t = draws["noise"], draws["t"].to(x.dtype)
        tb = as_rows(t, x)
        z = (1 - tb) * x + tb * noise
        v = noise - x
        u = model(z, t, torch.zeros_like(t), null_labels(net, y, draws.get("drop")))
        acc = torch.promote_types(torch.promote_types(u.dtype, v.dtype), torch.float32)
        ta = t.to(acc)
        no_tangent = u.new_zeros((0,) + u.shape[1:]).to(acc)
        loss, per_sample, _ = loss_op(self.config.loss_op)(u.to(acc), v.to(acc), no_tangent, ta, ta, p=0.0, eps=1.0)
        raw = per_sample.mean()
        return loss, {"loss": loss.detach(), "v_loss": raw, "raw_loss": raw, "jvp_rows": 0, "guidance_rows": 0}


__all__ = ["FlowMatchingConfig", "FlowMatchingLoss", "sample_fm_times"]
