"""Sampling (t, r) for MeanFlow training (docs/design.md, 'Time samplers').

- "logit_normal" (the paper's v0): t, r ~ sigmoid(N(mean, std)) independently, (t, r) = (max, min).
- "logit_normal_v1": t ~ sigmoid(N(t_mean, t_std)), r ~ sigmoid(N(r_mean, r_std)); r = min(t, r) after the mask.
- "uniform": t, r ~ U(0, 1), (t, r) = (max, min).
Then a fraction (1 - ratio) of the rows, int(B * (1 - ratio)) of them as in the official code, get r = t.

The rows are returned already ordered: the r != t rows come FIRST. That is the layout the ragged tangent batch wants
(tangent rows = the first k rows), so the loss needs no permutation and no host sync to find k.
"""
from __future__ import annotations

import torch

TIME_SAMPLERS = ("logit_normal", "logit_normal_v1", "uniform")


def num_jvp_rows(batch: int, ratio: float) -> int:
    """How many of `batch` rows get r != t (and so need a tangent)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio (the fraction of rows with r != t) must lie in [0, 1]; got {ratio}")
    return batch - int(batch * (1.0 - ratio))


def sample_t_r(batch: int, *, sampler: str = "logit_normal", ratio: float = 0.25, t_mean: float = -0.4,
               t_std: float = 1.0, r_mean: float = -0.4, r_std: float = 1.0, device="cpu",
               dtype=torch.float32, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (t, r), each (batch,), with r <= t; rows [0, k) have r != t, rows [k, batch) have r = t."""
    if sampler not in TIME_SAMPLERS:
        raise ValueError(f"time sampler must be one of {TIME_SAMPLERS}; got {sampler!r}")
    k = num_jvp_rows(batch, ratio)
    shape = (2, batch)
    if sampler == "uniform":
        a = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    else:
        n = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        means = [t_mean, t_mean] if sampler == "logit_normal" else [t_mean, r_mean]
        stds = [t_std, t_std] if sampler == "logit_normal" else [t_std, r_std]
        a = torch.sigmoid(n * torch.tensor(stds, device=device, dtype=dtype)[:, None]
                          + torch.tensor(means, device=device, dtype=dtype)[:, None])
    if sampler == "logit_normal_v1":
        t, r = a[0], a[1]
    else:
        t, r = torch.maximum(a[0], a[1]), torch.minimum(a[0], a[1])
    r = torch.cat([r[:k], t[k:]])
    return t, torch.minimum(t, r)
