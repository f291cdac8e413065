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


# ------------------------------------------------------------------------------------------ sampling at scale
# `meanflow sample --num 50000 --out samples.npz` (optionally under torchrun): every sample i has its own seeded noise
# and a label fixed by (seed, i), and the work is cut into batches at fixed offsets, so the output is the same for any
# number of ranks (the same batches are computed, by different ranks).

def per_sample_noise(indices, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Noise of samples `indices`, each from its own generator seeded by (seed, index): (len(indices), *shape)."""
    from ..runtime.seeding import seed_of

    out = torch.empty((len(indices),) + tuple(shape))
    for row, i in enumerate(indices):
        out[row] = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed_of(seed, int(i), 1)))
    return out


def sample_labels(num: int, num_classes: int, mode="uniform", seed: int = 0) -> torch.Tensor | None:
    """Class labels of samples 0..num-1: 'uniform' (i.i.d. uniform, seeded: the ADM / DiT FID convention),
    'balanced' (0, 1, ..., K-1, 0, ...), or a list of ints repeated. None for an unconditional model."""
    if num_classes <= 0:
        if mode not in (None, "uniform", "balanced"):
            raise ValueError("the model is unconditional: --labels does not apply")
        return None
    if mode in (None, "uniform"):
        from ..runtime.seeding import seed_of

        return torch.randint(0, num_classes, (num,), generator=torch.Generator().manual_seed(seed_of(seed, 2)))
    if mode == "balanced":
        return torch.arange(num) % num_classes
    values = [int(v) for v in mode]
    bad = [v for v in values if not 0 <= v < num_classes]
    if not values or bad:
        raise ValueError(f"--labels must lie in [0, {num_classes - 1}]; got {bad or values}")
    return torch.tensor(values * (num // len(values) + 1))[:num]


def rank_rounds(num: int, batch_size: int, world_size: int) -> int:
    """Rounds of `world_size` batches that cover `num` samples: in round q, rank j takes samples
    [(q W + j) B, (q W + j + 1) B) (clipped to num)."""
    return -(-num // (batch_size * world_size))


@torch.no_grad()
def generate_uint8(model, num: int, data_shape: Sequence[int], labels: torch.Tensor | None, *, steps: int = 1,
                   midpoint: float | None = None, seed: int = 0, batch_size: int = 250, device="cpu", decode=None,
                   autocast=None, rank: int = 0, world_size: int = 1, log=None, sampler=None):
    """`num` samples as uint8 images (N, H, W, C), spread over the ranks, gathered on rank 0 (the others get None).

    `decode`: latents -> images in [-1, 1] (a VAE decoder) for latent models; images are stored as
    round((x + 1) * 127.5), the convention of meanflow.evaluation.plotting and of the FID code. Under torchrun every rank must call
    this (the gathering is a collective). `sampler`: the objective's (meanflow.evaluation.samplers); default `sample`.
    """
    import contextlib
    import time

    import numpy as np

    from ..runtime.distributed import gather_rows
    from .plotting import to_uint8

    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1; got {num} and {batch_size}")
    images, t0, done = None, time.perf_counter(), 0
    rounds = rank_rounds(num, batch_size, world_size)
    for q in range(rounds):
        start = (q * world_size + rank) * batch_size
        idx = list(range(min(start, num), min(start + batch_size, num)))
        out = torch.zeros((0,), dtype=torch.uint8)
        if idx:
            e = per_sample_noise(idx, data_shape, seed).to(device)
            y = labels[idx[0]:idx[-1] + 1].to(device) if labels is not None else None
            with (autocast() if autocast else contextlib.nullcontext()):
                x = (sampler or sample)(model, e, y, steps=steps, midpoint=midpoint).float()
            if decode is not None:
                x = decode(x)
            out = torch.from_numpy(to_uint8(x))
        if q == 0:  # every rank learns the image shape from rank 0's first batch (rank 0 always has one)
            from ..runtime.distributed import broadcast_object

            shape = broadcast_object(tuple(out.shape[1:]) if rank == 0 else None)
        if out.numel() == 0:
            out = torch.zeros((0,) + tuple(shape), dtype=torch.uint8)
        gathered = gather_rows(torch.cat([out, out.new_zeros((batch_size - len(out),) + tuple(shape))]), len(out),
                               batch_size, _gather_device(device))
        if gathered is not None:
            if images is None:
                images = np.zeros((num,) + tuple(shape), dtype=np.uint8)
            for j, rows in enumerate(gathered):
                s = (q * world_size + j) * batch_size
                images[s:s + len(rows)] = rows.numpy()
                done += len(rows)
            if log and (q == rounds - 1 or q % max(1, rounds // 10) == 0):
                rate = done / max(time.perf_counter() - t0, 1e-9)
                log(f"sample: {done}/{num} images ({rate:.1f} images/s)", flush=True)
    return images


def _gather_device(device) -> torch.device:
    """Collectives run on the process group's device: CUDA tensors for NCCL, CPU for gloo."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device(device)
    return torch.device("cpu")


def save_npz(path, images, labels: torch.Tensor | None = None) -> None:
    """The ADM / guided-diffusion sample-batch convention: arr_0 = uint8 (N, H, W, C), arr_1 = labels (if any).
    Written to a temporary file and renamed, so a partial file never carries the final name."""
    import os
    import tempfile
    from pathlib import Path

    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels.numpy().astype(np.int64)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
