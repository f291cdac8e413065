"""A sampler per objective: how a network trained by each objective turns noise into samples.

    sampler = sampler_for(cfg.loss)                      # from a run's loss config
    x = sampler(model, noise, y, steps=1)

- meanflow, alphaflow: average-velocity jumps z_r = z_t - (t - r) u(z_t, t, t - r) (sampling.sample);
- fm: Euler steps with v = u(z, t, 0), classifier-free guided when FlowMatchingConfig.sample_cfg != 1;
- imf: average-velocity jumps with the network conditioned on (omega, t_min, t_max) = the config's sample_*;
- scm: TrigFlow consistency steps: x0 = f(sigma_d e, t_max); a second step re-noises to sample_t_mid and applies f;
- tvm: jumps z_r = z_t - (t - r) a F(z_t, t, t - r | y, beta = 1 / sample_cfg), a = sample_cfg when the network was
  trained with scale_param (the official generator_fn's scaling), else 1.

Every sampler takes the same call; `steps` is the number of network evaluations per sample (x2 for guided Euler).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Sequence

import torch

from .sampling import _check_schedule, euler_sample, make_schedule, sample


@torch.no_grad()
def fm_sample(model, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 1, cfg_scale: float = 1.0,
              backend: str | None = None) -> torch.Tensor:
    """Euler steps z <- z - dt v with v = v_null + s (v_c - v_null) (s = cfg_scale; s = 1: the plain v(z, t | y))."""
    if cfg_scale == 1.0 or y is None:
        if cfg_scale != 1.0:
            raise ValueError("classifier-free guidance (sample_cfg != 1) needs a class-conditional model and labels")
        return euler_sample(model, noise, y, steps=steps, backend=backend)
    s = make_schedule(steps)
    z, n = noise, noise.shape[0]
    ones = torch.ones(2 * n, device=noise.device, dtype=noise.dtype)
    labels = torch.cat([y, torch.full_like(y, model.num_classes)])
    for t, r in zip(s[:-1], s[1:]):
        out = model(torch.cat([z, z]), t * ones, 0 * ones, labels, backend=backend).to(z.dtype)
        v_c, v_null = out[:n], out[n:]
        z = z - (t - r) * (v_null + cfg_scale * (v_c - v_null))
    return z


@torch.no_grad()
def imf_sample(model, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 1, omega: float = 1.0,
               t_min: float = 0.0, t_max: float = 1.0, schedule: Sequence[float] | None = None,
               midpoint: float | None = None, backend: str | None = None) -> torch.Tensor:
    """iMF: z_r = z_t - (t - r) u(z_t, t, t - r | y, omega, t_min, t_max) (the official sample_one_step)."""
    if omega != 1.0 and getattr(model, "num_classes", 0) <= 0:
        raise ValueError(f"iMF sampling with guidance omega = {omega} needs a class-conditional model "
                         f"(set loss.sample_omega=1 for an unconditional one)")
    s = _check_schedule(schedule if schedule is not None else make_schedule(steps, midpoint))
    z = noise
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    cond = dict(omega=omega * ones, t_min=t_min * ones, t_max=t_max * ones)
    for t, r in zip(s[:-1], s[1:]):
        u = model(z, t * ones, (t - r) * ones, y, backend=backend, head="u", **cond)
        z = z - (t - r) * u.to(z.dtype)
    return z


@torch.no_grad()
def scm_sample(model, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 1, config=None,
               times: Sequence[float] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """sCM: x0 = f(sigma_d e, t_0) with f(x_t, t) = cos t x_t - sin t sigma_d F(x_t, t); each further step re-noises,
    x_t = cos t x0 + sin t sigma_d e', and applies f again. Times: [t_max] (1 step), [t_max, sample_t_mid] (2 steps),
    t_max then `steps - 1` times evenly spaced down to sample_t_mid (more), or `times`. `generator` draws the
    re-noising e' (on the CPU, so results do not depend on the device); by default it is seeded from the noise itself,
    so the samples are a function of the noise and batches of different noise get different e'."""
    from ..objectives.scm import SCMConfig, consistency_fn

    cfg = config or SCMConfig()
    if times is None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        mids = [cfg.sample_t_mid] if steps == 2 else torch.linspace(cfg.t_max, cfg.sample_t_mid, steps)[1:].tolist()
        times = [cfg.t_max] + (mids if steps > 1 else [])
    times = [float(v) for v in times]
    if any(not 0 < v < math.pi / 2 + 1e-9 for v in times) or any(a <= b for a, b in zip(times[:-1], times[1:])):
        raise ValueError(f"sCM sampling times must decrease within (0, pi/2]; got {times}")
    if generator is None and len(times) > 1:
        key = (noise.detach().flatten()[:256].double().cpu() * 2**20).round().abs().sum().item()
        generator = torch.Generator().manual_seed(int(key) % 2**62)
    sd, par = cfg.sigma_data, cfg.parametrization
    x = None
    for i, tau in enumerate(times):
        t = torch.full((noise.shape[0],), min(tau, math.pi / 2 - 1e-6), device=noise.device, dtype=noise.dtype)
        if i == 0:
            x_t = sd * noise
        else:
            e = torch.randn(noise.shape, generator=generator, dtype=torch.float32).to(noise.device, noise.dtype)
            x_t = math.cos(tau) * x + math.sin(tau) * sd * e
        x = consistency_fn(model, x_t, t, y, sd, par)
    return x


@torch.no_grad()
def tvm_sample(model, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 1, cfg_scale: float = 1.0,
               scale_param: bool = True, schedule: Sequence[float] | None = None, midpoint: float | None = None,
               backend: str | None = None) -> torch.Tensor:
    """TVM: z_r = z_t - (t - r) a F(z_t, t, t - r | y, beta = 1 / cfg_scale), a = cfg_scale with scale_param, else 1.
    Guidance is a condition of the network: one evaluation per step."""
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (beta = 1 / cfg_scale in (0, 1]); got {cfg_scale}")
    if cfg_scale != 1.0 and getattr(model, "num_classes", 0) <= 0:
        raise ValueError(f"TVM sampling with guidance cfg = {cfg_scale} needs a class-conditional model (set "
                         f"loss.sample_cfg=1 for an unconditional one)")
    s = _check_schedule(schedule if schedule is not None else make_schedule(steps, midpoint))
    z = noise
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    scale = cfg_scale if scale_param else 1.0
    for t, r in zip(s[:-1], s[1:]):
        F = model(z, t * ones, (t - r) * ones, y, backend=backend, beta=ones / cfg_scale)
        z = z - (t - r) * scale * F.to(z.dtype)
    return z


@dataclass(frozen=True)
class Sampler:
    """`sampler(model, noise, y, steps=1)` for one objective; `nfe(steps)`: network evaluations per sample."""

    objective: str
    fn: Callable
    evals_per_step: int = 1

    def __call__(self, model, noise, y=None, *, steps: int = 1, midpoint: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        kwargs = {}
        if midpoint is not None:
            if self.objective in ("fm", "scm"):
                raise ValueError(f"--midpoint applies to average-velocity samplers, not to {self.objective}")
            kwargs["midpoint"] = midpoint
        if generator is not None and self.objective == "scm":
            kwargs["generator"] = generator
        return self.fn(model, noise, y, steps=steps, **kwargs)

    def nfe(self, steps: int) -> int:
        return steps * self.evals_per_step


def sampler_for(loss_cfg=None) -> Sampler:
    """The sampler of a run's loss config (None or a config without `objective`: MeanFlow)."""
    name = getattr(loss_cfg, "objective", "meanflow") if loss_cfg is not None else "meanflow"
    if name in ("meanflow", "alphaflow"):
        return Sampler(name, sample)
    if name == "fm":
        s = loss_cfg.sample_cfg
        return Sampler(name, lambda m, e, y, steps=1: fm_sample(m, e, y, steps=steps, cfg_scale=s),
                       1 if s == 1.0 else 2)
    if name == "imf":
        c = loss_cfg
        return Sampler(name, lambda m, e, y, steps=1, midpoint=None: imf_sample(
            m, e, y, steps=steps, omega=c.sample_omega, t_min=c.sample_t_min, t_max=c.sample_t_max, midpoint=midpoint))
    if name == "scm":
        return Sampler(name, lambda m, e, y, steps=1, generator=None: scm_sample(m, e, y, steps=steps,
                                                                                 config=loss_cfg, generator=generator))
    if name == "tvm":
        c = loss_cfg
        return Sampler(name, lambda m, e, y, steps=1, midpoint=None: tvm_sample(
            m, e, y, steps=steps, cfg_scale=c.sample_cfg, scale_param=c.scale_param, midpoint=midpoint))
    raise ValueError(f"no sampler for objective {name!r}")


__all__ = ["Sampler", "sampler_for", "fm_sample", "imf_sample", "scm_sample", "tvm_sample"]
