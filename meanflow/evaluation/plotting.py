"""Pictures of a run: image grids (Pillow), toy scatter plots and loss curves (matplotlib, Agg backend).

Images are written with Pillow (no matplotlib needed, exact pixels); latents are shown as their first three channels,
each image min-max normalised (decoding them needs the VAE, which the training stack does not load).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window, never need a display
    import matplotlib.pyplot as plt

    return plt


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def latents_to_images(x: torch.Tensor) -> torch.Tensor:
    """First three latent channels (one channel repeated if fewer), each image scaled to [-1, 1] by its own range."""
    x = x.detach().float()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 image (rows of `nrow` images; default: a near-square grid)."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = imgs[i]
    return grid[..., 0] if c == 1 else grid


def save_image_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    from PIL import Image

    img = Image.fromarray(image_grid(x, nrow))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    path = Path(path)
    img.save(path)
    return path


def save_scatter(points: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None,
                 title: str = "") -> Path:
    """2-D samples (orange) over reference data (grey)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ref = reference.detach().cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.75", label="data")
    pts = points.detach().float().cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=1, c="tab:orange", label="samples")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7, markerscale=5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def save_samples(x: torch.Tensor, path: str | Path, *, kind: str, title: str = "", nrow: int | None = None,
                 reference: torch.Tensor | None = None) -> Path:
    """Samples as a picture by data kind: 'points' -> scatter, 'image' -> grid, 'latent' -> channel grid."""
    if kind == "points":
        return save_scatter(x, path, reference, title)
    if kind == "latent":
        x = latents_to_images(x)
    upscale = max(1, 64 // x.shape[-1])  # small images are unreadable at 1:1 (8x8 digits -> 8x, 32x32 -> 2x)
    return save_image_grid(x, path, nrow, upscale)


def read_metrics(path: str | Path) -> list[dict]:
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def save_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Left: raw loss and v_loss (log scale), the numbers that show learning. Right: the adaptively weighted loss that
    the optimizer sees, which sits just below 1 by construction (L / (L + eps)^p with p = 1) and so shows little."""
    fig = loss_curve_figure(read_metrics(metrics_path))
    fig.savefig(out_path)
    _pyplot().close(fig)
    return Path(out_path)


def loss_curve_figure(rows: list[dict]):
    """The figure of save_loss_curve for metrics rows (a matplotlib Figure with two axes)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    steps = [r["step"] for r in rows]
    for key in ("raw_loss", "v_loss"):
        axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set_title("raw loss and v_loss (sum of squares per sample)", fontsize=9)
    if rows and all(r[k] > 0 for r in rows for k in ("raw_loss", "v_loss")):
        axes[0].set_yscale("log")
    axes[1].plot(steps, [r["loss"] for r in rows], label="loss (weighted)", color="tab:gray")
    axes[1].set_title("weighted loss L / (L + eps)^p (what AdamW sees; ~1 for p = 1)", fontsize=9)
    # it moves in the 4th decimal: a linear axis without offset shows that honestly
    axes[1].ticklabel_format(axis="y", useOffset=False, style="plain")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
