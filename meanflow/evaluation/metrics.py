"""Distances between sample sets: sliced Wasserstein (toys) and the Fréchet distance (FID and its small cousins).

- Sliced Wasserstein: project both sets onto many random unit directions and average the exact 1-D Wasserstein
  distance, computed by sorting (quantile functions; sets of different sizes are handled exactly).
  SW_p = (mean_theta W_p(theta.x, theta.y)^p)^(1/p).
- Fréchet distance between Gaussians fitted to two feature sets:
  |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2). The matrix square root uses symmetric
  eigen-decompositions in float64 (no scipy): S1^1/2 S2 S1^1/2 is symmetric PSD, so its trace root is the sum of the
  square roots of its eigenvalues; this is stabler than scipy.linalg.sqrtm of the non-symmetric S1 S2.
"""
from __future__ import annotations

import numpy as np
import torch


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Exact W_p^p between the empirical distributions of the rows of a (P, n) and b (P, m): (P,) values."""
    a, b = a.double().sort(dim=-1).values, b.double().sort(dim=-1).values
    n, m = a.shape[-1], b.shape[-1]
    if n == m:
        return (a - b).abs().pow(p).mean(-1)
    # Both quantile functions are step functions; on each interval between consecutive levels i/n and j/m they are
    # constant, so the integral of |Fa^-1(q) - Fb^-1(q)|^p dq is an exact finite sum.
    levels = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                        torch.arange(1, m + 1, dtype=torch.float64) / m]).sort().values
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mids = levels - widths / 2
    ia = (mids * n).floor().long().clamp(0, n - 1)
    ib = (mids * m).floor().long().clamp(0, m - 1)
    return ((a[..., ia] - b[..., ib]).abs().pow(p) * widths).sum(-1)


def random_directions(num: int, dim: int, seed: int = 0) -> torch.Tensor:
    d = torch.randn(num, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, num_projections: int = 1024, p: float = 2.0,
                       seed: int = 0) -> float:
    """SW_p between point sets x (n, d) and y (m, d) over `num_projections` seeded random directions."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be (n, d) and (m, d) with the same d; got {tuple(x.shape)}, {tuple(y.shape)}")
    theta = random_directions(num_projections, x.shape[1], seed)
    px = theta @ x.detach().double().cpu().T
    py = theta @ y.detach().double().cpu().T
    return float(wasserstein_1d(px, py, p).mean() ** (1.0 / p))


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, float64) of features (N, D)."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features,
                                                                                                       np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D); got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_of_features(f1, f2) -> float:
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
