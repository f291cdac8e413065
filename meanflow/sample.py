"""Samplers. MeanFlow jumps along the flow with the average velocity: z_r = z_t - (t - r) u(z_t, r, t).

1-NFE: x = e - u(e, r = 0, t = 1). k-NFE: any decreasing schedule 1 = t_0 > t_1 > ... > t_k = 0. Guidance is baked
into training, so class-conditional sampling is a single conditional evaluation per step (no CFG at sampling).
`euler_sample` is the flow-matching baseline: z <- z - dt v(z, t) with v = u(z, t, t) (h = 0).
"""
from __future__ import annotations

from typing import Sequence

import torch


def make_schedule(steps: int = 1, midpoint: float | None = None) -> list[float]:
    """1 step: [1, 0]; 2 steps: [1, midpoint (default 0.5), 0]; n steps: uniform."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if midpoint is not None:
        if steps != 2:
            raise ValueError("midpoint only applies to 2-step sampling")
        if not 0.0 < midpoint < 1.0:
            raise ValueError(f"midpoint must lie in (0, 1); got {midpoint}")
        return [1.0, float(midpoint), 0.0]
    return [1.0 - i / steps for i in range(steps)] + [0.0]


def _check_schedule(schedule: Sequence[float]) -> list[float]:
    s = [float(v) for v in schedule]
    if len(s) < 2 or s[0] != 1.0 or s[-1] != 0.0 or any(a <= b for a, b in zip(s[:-1], s[1:])):
        raise ValueError(f"schedule must decrease strictly from 1.0 to 0.0; got {s}")
    return s


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 1,
           schedule: Sequence[float] | None = None, midpoint: float | None = None,
           backend: str | None = None) -> torch.Tensor:
    """MeanFlow sampling from noise e (B, ...): z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u(z_{t_i}, t_{i+1}, t_i)."""
    s = _check_schedule(schedule if schedule is not None else make_schedule(steps, midpoint))
    z = noise
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    for t, r in zip(s[:-1], s[1:]):
        u = model(z, t * ones, (t - r) * ones, y, backend=backend)
        z = z - (t - r) * u.to(z.dtype)
    return z


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 1,
                 backend: str | None = None) -> torch.Tensor:
    """Flow-matching baseline: Euler steps with the instantaneous velocity v(z, t) = u(z, t, h = 0)."""
    s = make_schedule(steps)
    z = noise
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    for t, r in zip(s[:-1], s[1:]):
        z = z - (t - r) * model(z, t * ones, 0 * ones, y, backend=backend).to(z.dtype)
    return z


def draw_noise(num: int, shape: Sequence[int], *, seed: int = 0, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Deterministic noise for reproducible sample grids (drawn on CPU, so the same seed gives the same grid anywhere)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num,) + tuple(shape), generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
