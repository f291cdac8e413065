"""The latent pipeline: encode an ImageNet-layout image folder with a local diffusers AutoencoderKL into the latent
shards that `data.name=latents` trains on, and decode sampled latents back to images.

    meanflow prepare-latents --images /data/imagenet/train --vae /models/sd-vae-ft-mse --out /data/in256-latents --flip
    torchrun --nproc_per_node=8 -m meanflow prepare-latents ...          # each rank encodes its share of the shards

Conventions (the same as DiT / MeanFlow's PyTorch pipelines, with the scale factor applied at READ time):
- images: RGB, the short side resized to --image-size (bicubic), center-cropped to a square, scaled to [-1, 1]
  (meanflow.data.ImageFolder); classes are the sorted sub-folder names (labels 0..K-1).
- latents: a sample of the VAE's posterior, mean + std * eps (--posterior mean stores the mean), UNSCALED. The
  official recipe trains on posterior samples times 0.18215; here the shards keep the raw latents and
  `data.latent_scale` (0.18215, recorded in the manifest as the VAE's `scaling_factor`) multiplies them when read, so
  one set of shards serves any scale. Decoding divides by the same `data.latent_scale` before the VAE decoder.
- eps is seeded per (seed, image index, copy), so the shards do not depend on the batch size or the number of ranks.
- --flip adds a horizontally mirrored copy of every image (its own posterior draw): twice the rows.

Output: shard_<s>.npy + shard_<s>.labels.npy (default: memory-mapped by the trainer, so the ranks of a node share the
page cache), or shard_<s>.safetensors / .npz with `latents` and `labels`; and manifest.json (shards, count, shape,
classes, VAE path, scaling factor, settings). Shard s holds images [s * shard_size, (s + 1) * shard_size) in folder
order, then (with --flip) their mirror images in the same order. Shards are written atomically and a rerun skips the
finished ones, so an interrupted run continues where it stopped.

Nothing is downloaded: the VAE loads with local_files_only from a folder holding config.json and the weights (as written
by `save_pretrained`; a pipeline folder with a vae/ sub-folder works too).
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

LATENT_FORMATS = ("npy", "safetensors", "npz")
MANIFEST_FORMAT = "meanflow-latents-v1"


class VAEError(ValueError):
    """A VAE path that cannot be used: missing, not a diffusers AutoencoderKL, or diffusers not installed."""


# ------------------------------------------------------------------------------------------------------ the VAE
def _vae_folder(path: Path) -> tuple[Path, str | None]:
    if (path / "config.json").is_file():
        return path, None
    if (path / "vae" / "config.json").is_file():  # a whole diffusers pipeline folder
        return path, "vae"
    raise VAEError(f"VAE path {path} is not a diffusers model folder (no config.json in it or in {path}/vae); "
                   f"expected a local AutoencoderKL folder such as one written by save_pretrained")


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers AutoencoderKL from a LOCAL folder, in eval mode on `device`; clear errors instead of downloads."""
    if not path:
        raise VAEError("no VAE given: pass --vae PATH (a local diffusers AutoencoderKL folder) or set data.vae")
    p = Path(path)
    if not p.exists():
        raise VAEError(f"VAE path {p} does not exist (expected a local diffusers AutoencoderKL folder with "
                       f"config.json and diffusion_pytorch_model.safetensors; nothing is downloaded)")
    folder, subfolder = _vae_folder(p)
    config_path = folder / (subfolder or "") / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise VAEError(f"VAE config {config_path} is unreadable: {exc}") from exc
    cls = config.get("_class_name", "")
    if cls != "AutoencoderKL":
        raise VAEError(f"{config_path} describes a diffusers {cls or 'model without _class_name'}, not an "
                       f"AutoencoderKL")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach for the hub
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as diffusers_logging
    except ImportError as exc:
        raise VAEError(f"the latent pipeline needs diffusers (pip install 'meanflow-engine[scale]'): {exc}") from exc
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # e.g. the 'accelerate not installed' notice
    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype, **kwargs)
    except Exception as exc:  # diffusers raises OSError / EnvironmentError / ValueError for missing or bad weights
        raise VAEError(f"cannot load the AutoencoderKL in {p}: {type(exc).__name__}: "
                       f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return vae.to(device).eval().requires_grad_(False)


def vae_scale_factor(vae) -> float:
    """The VAE's latent scaling factor (0.18215 for SD-VAE): what data.latent_scale should be for its latents."""
    return float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)


def vae_downsampling(vae) -> int:
    """Image pixels per latent pixel along a side (8 for SD-VAE: 4 blocks, 3 downsamplings)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, *, posterior: str = "sample", eps=None) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) -> UNSCALED latents (N, C, H/f, W/f), fp32: the posterior mean, or
    mean + std * eps; eps: a tensor, a function of the latent shape (N, C, h, w) returning one, or None (drawn from
    torch's global generator)."""
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' or 'mean'; got {posterior!r}")
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    mean = dist.mean.float()
    if posterior == "mean":
        return mean
    if eps is None:
        eps = torch.randn_like(mean)
    elif callable(eps):
        eps = eps(tuple(mean.shape))
    return mean + dist.std.float() * eps.to(mean.device, mean.dtype)


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, scale: float, batch_size: int = 64) -> torch.Tensor:
    """Latents in the model's (scaled) space -> images in [-1, 1] (N, 3, 8h, 8w), fp32, on z's device."""
    if len(z) == 0:
        f = vae_downsampling(vae)
        return z.new_zeros((0, vae.config.out_channels, z.shape[2] * f, z.shape[3] * f))
    out = []
    for chunk in z.split(batch_size):
        x = vae.decode((chunk.float() / scale).to(vae.device, vae.dtype)).sample
        out.append(x.float().clamp(-1, 1).to(z.device))
    return torch.cat(out)


def _eps(shape: tuple[int, ...], seed: int, index: int, copy: int) -> torch.Tensor:
    from ..runtime.seeding import seed_of

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed_of(seed, index, copy)))


# ------------------------------------------------------------------------------------------------------ shards
def _shard_files(out: Path, s: int, fmt: str) -> list[Path]:
    stem = out / f"shard_{s:05d}"
    if fmt == "npy":
        return [stem.with_name(stem.name + ".labels.npy"), stem.with_name(stem.name + ".npy")]
    return [stem.with_name(stem.name + f".{fmt}")]


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _write_shard(out: Path, s: int, fmt: str, latents: np.ndarray, labels: np.ndarray) -> None:
    from ..runtime.files import write_bytes_atomic

    files = _shard_files(out, s, fmt)
    if fmt == "npy":  # labels first: a finished latents file means a finished shard
        write_bytes_atomic(files[0], _npy_bytes(labels))
        write_bytes_atomic(files[1], _npy_bytes(latents))
    elif fmt == "npz":
        buf = io.BytesIO()
        np.savez(buf, latents=latents, labels=labels)
        write_bytes_atomic(files[0], buf.getvalue())
    else:
        from safetensors.numpy import save

        write_bytes_atomic(files[0], save({"latents": latents, "labels": labels}))


def manifest_scale_factor(path: str | os.PathLike) -> float | None:
    """The VAE scaling factor recorded by prepare-latents in a latents folder's manifest (None if there is none)."""
    p = Path(path)
    manifest = p if p.suffix == ".json" else p / "manifest.json"
    try:
        value = json.loads(manifest.read_text()).get("scale_factor")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if value is not None else None


def prepare_latents(images: str | os.PathLike, vae_path: str | os.PathLike, out: str | os.PathLike, *,
                    image_size: int = 256, flip: bool = False, batch_size: int = 64, shard_size: int = 10_000,
                    posterior: str = "sample", seed: int = 0, fmt: str = "npy", dtype: str = "float32",
                    workers: int = 4, device: str = "auto", log=print) -> dict:
    """Encode `images` (root/<class>/<image>) into latent shards + manifest.json under `out`.

    Under torchrun every rank encodes the shards s with s % world_size == rank and rank 0 writes the manifest; in
    one process it does everything. Returns the manifest (on every rank).
    """
    from ..runtime import distributed
    from ..runtime.files import write_bytes_atomic
    from .datasets import ImageFolder

    if fmt not in LATENT_FORMATS:
        raise ValueError(f"--format must be one of {LATENT_FORMATS}; got {fmt!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16; got {dtype!r}")
    if posterior not in ("sample", "mean"):
        raise ValueError(f"--posterior must be 'sample' or 'mean'; got {posterior!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("--batch-size and --shard-size must be >= 1")
    ctx = distributed.setup(device)
    try:
        vae = load_vae(vae_path, ctx.device)
        if image_size % vae_downsampling(vae):
            raise ValueError(f"--image-size must be a multiple of {vae_downsampling(vae)} (the VAE's downsampling); "
                             f"got {image_size}")
        folder = ImageFolder(images, image_size, workers)
        out = Path(out)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        n = len(folder)
        num_shards = -(-n // shard_size)
        mine = [s for s in range(num_shards) if s % ctx.world_size == ctx.rank]
        t0, done_images, shape = time.perf_counter(), 0, None
        for s in mine:
            if all(f.is_file() for f in _shard_files(out, s, fmt)):
                continue  # finished by an earlier, interrupted run
            lo, hi = s * shard_size, min((s + 1) * shard_size, n)
            copies = (0, 1) if flip else (0,)
            parts: dict[int, list[np.ndarray]] = {c: [] for c in copies}
            for b in range(lo, hi, batch_size):
                idx = np.arange(b, min(b + batch_size, hi))
                x, _ = folder.get(idx)
                batch = torch.cat([x] + ([x.flip(-1)] if flip else []))
                def eps(shape, idx=idx, copies=copies):  # seeded per (image, copy): independent of batches and ranks
                    return torch.stack([_eps(shape[1:], seed, int(i), c) for c in copies for i in idx])

                z = encode_images(vae, batch, posterior=posterior, eps=eps).cpu().numpy().astype(dtype)
                shape = z.shape[1:]
                for j, c in enumerate(copies):
                    parts[c].append(z[j * len(idx):(j + 1) * len(idx)])
            latents = np.concatenate([np.concatenate(parts[c]) for c in copies])
            labels = np.tile(folder.labels[lo:hi].numpy().astype(np.int64), len(copies))
            _write_shard(out, s, fmt, latents, labels)
            done_images += hi - lo
            if ctx.is_main:
                rate = done_images / max(time.perf_counter() - t0, 1e-9)
                log(f"prepare-latents: shard {s + 1}/{num_shards} ({hi - lo} images, {len(latents)} rows) written; "
                    f"rank 0 at {rate:.1f} images/s" + (f" x {ctx.world_size} ranks" if ctx.distributed else ""),
                    flush=True)
        distributed.barrier()
        shards = [f for s in range(num_shards) for f in _shard_files(out, s, fmt)[-1:]]
        missing = [str(f) for s in range(num_shards) for f in _shard_files(out, s, fmt) if not f.is_file()]
        if missing:
            raise RuntimeError(f"prepare-latents: shards missing after all ranks finished: {missing[:5]}")
        first = _first_shape(shards[0], fmt) if shape is None else tuple(shape)
        manifest = {"format": MANIFEST_FORMAT, "shards": [f.name for f in shards], "count": n * (2 if flip else 1),
                    "images": n, "shape": list(first), "num_classes": folder.num_classes, "classes": folder.classes,
                    "vae": str(Path(vae_path).resolve()), "scale_factor": vae_scale_factor(vae), "scaled": False,
                    "posterior": posterior, "flip": flip, "image_size": image_size, "seed": seed,
                    "shard_size": shard_size, "dtype": dtype, "source": str(Path(images).resolve())}
        if ctx.is_main:
            write_bytes_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
            log(f"prepare-latents: {manifest['count']} latents {tuple(first)} of {n} images in {num_shards} shard(s) "
                f"-> {out} ({time.perf_counter() - t0:.1f} s); train with --set data.name=latents "
                f"--set data.path={out} --set data.latent_scale={manifest['scale_factor']}", flush=True)
        distributed.barrier()
        return manifest
    finally:
        distributed.cleanup(ctx)


def _first_shape(path: Path, fmt: str) -> tuple[int, ...]:
    """The latent shape of a shard this rank did not write (a rank with no shard of its own, or a rerun)."""
    from .datasets import _read_shard

    return tuple(_read_shard(path)[0].shape[1:])
