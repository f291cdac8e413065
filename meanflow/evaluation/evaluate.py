"""Evaluation of a trained model, chosen by the data:

- 2-D toys: sliced Wasserstein distance (SW_2) of 1-step and 2-step samples to held-out data, next to the SW of two
  independent data draws of the same size (the floor a perfect model would reach).
- mnist / digits: the project's cached CNN classifier (meanflow.evaluation.classifier): confident share (max prob > 0.9),
  label match (predicted class == conditioning label) and a Fréchet distance on its penultimate features against the
  held-out real digits, next to the same distance between real train and real held-out digits (the floor).
- image folders: FID with a LOCAL Inception feature extractor (TorchScript), skipped with the reason when there is none.
- latents: skipped with the reason (FID needs the images, i.e. decoding with the VAE).

    metrics = evaluate_model(model, cfg.data, cfg.eval, device)      # -> {"1step": {...}, "2step": {...}, ...}
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.datasets import TOYS, Dataset, dataset_from_config
from .metrics import feature_statistics, frechet_distance, frechet_distance_of_features, sliced_wasserstein
from .progress import progress_bar
from .sampling import sample

INCEPTION_ENV = "MEANFLOW_INCEPTION"


# --------------------------------------------------------------------------------------------------- sampling
def _sampling_bar(eval_cfg, enabled: bool):
    steps = ", ".join(map(str, eval_cfg.steps))
    return progress_bar(eval_cfg.num_samples * len(eval_cfg.steps), f"evaluation: sampling ({steps}-step)", enabled)


@torch.no_grad()
def generate(model: nn.Module, num: int, data_shape: tuple[int, ...], num_classes: int, *, steps: int = 1,
             seed: int = 0, batch_size: int = 250, device: str | torch.device = "cpu",
             autocast: Callable | None = None, bar=None, sampler: Callable | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`num` samples (CPU, fp32) with seeded noise; class-conditional models get balanced labels 0, 1, ..., K-1, 0, ...
    `bar`: a progress bar advanced by each batch's size. `sampler`: the objective's
    (meanflow.evaluation.samplers.sampler_for); default MeanFlow's `sample`."""
    sampler = sampler or sample
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((num,) + tuple(data_shape), generator=g)
    labels = torch.arange(num) % num_classes if num_classes > 0 else None
    out = []
    for i in range(0, num, batch_size):
        e = noise[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device) if labels is not None else None
        with (autocast() if autocast else contextlib.nullcontext()):
            out.append(sampler(model, e, y, steps=steps).float().cpu())
        if bar is not None:
            bar.update(len(e))
    return torch.cat(out), labels


# ------------------------------------------------------------------------------------------------ per data kind
def evaluate_toy(model, dataset: Dataset, eval_cfg, device, autocast=None, progress: bool = False,
                 sampler=None) -> dict:
    n = eval_cfg.num_samples
    data = dataset.sample(n, torch.Generator().manual_seed(eval_cfg.seed + 1))[0]
    other = dataset.sample(n, torch.Generator().manual_seed(eval_cfg.seed + 2))[0]

    def sw(a, b):
        return sliced_wasserstein(a, b, num_projections=eval_cfg.sw_projections, seed=eval_cfg.seed)

    out = {"metric": "sliced Wasserstein SW_2 to held-out data (lower is better)", "num_samples": n,
           "reference": {"sw_data_vs_data": sw(other, data)}}
    with _sampling_bar(eval_cfg, progress) as bar:
        for steps in eval_cfg.steps:
            x, _ = generate(model, n, dataset.data_shape, 0, steps=steps, seed=eval_cfg.seed, device=device,
                            batch_size=eval_cfg.batch_size, autocast=autocast, bar=bar,
                            sampler=sampler)
            out[f"{steps}step"] = {"sw": sw(x, data)}
    return out


def evaluate_digits(model, name: str, eval_cfg, device, autocast=None, progress: bool = False,
                    sampler=None) -> dict:
    from .classifier import load_or_train, predict
    from ..data.datasets import build_dataset

    clf, meta = load_or_train(name, progress=progress)
    train, test = build_dataset(name, split="train"), build_dataset(name, split="test")
    _, _, real = predict(clf, test.x)
    _, _, real_train = predict(clf, train.x)
    out = {"metric": "digit classifier on samples: confident = max prob > 0.9, label_match = predicted class is the "
                     "conditioning label, fd = Fréchet distance of classifier features to held-out real digits",
           "num_samples": eval_cfg.num_samples,
           "reference": {"classifier_test_accuracy": meta["test_accuracy"],
                         "fd_real_train_vs_test": frechet_distance_of_features(real_train, real)}}
    with _sampling_bar(eval_cfg, progress) as bar:
        for steps in eval_cfg.steps:
            x, labels = generate(model, eval_cfg.num_samples, test.data_shape, test.num_classes, steps=steps,
                                 seed=eval_cfg.seed, device=device, batch_size=eval_cfg.batch_size, autocast=autocast,
                                 bar=bar, sampler=sampler)
            pred, conf, feats = predict(clf, x.clamp(-1, 1))
            out[f"{steps}step"] = {"confident": float((conf > 0.9).float().mean()),
                                   "label_match": float((pred == labels).float().mean()),
                                   "fd": frechet_distance_of_features(feats, real)}
    return out


def evaluate_images(model, dataset: Dataset, eval_cfg, device, autocast=None, progress: bool = False,
                    sampler=None) -> dict:
    path = eval_cfg.inception or os.environ.get(INCEPTION_ENV, "")
    extractor, reason = load_inception(path)
    if extractor is None:
        print(f"FID skipped: {reason}")
        return {"fid_skipped": reason}
    n = eval_cfg.num_samples
    if eval_cfg.fid_ref:
        with np.load(eval_cfg.fid_ref) as ref:
            mu_ref, sigma_ref = ref["mu"], ref["sigma"]
    else:
        idx = np.random.default_rng(eval_cfg.seed).permutation(len(dataset))[:n]
        real = torch.cat([dataset.get(idx[i:i + eval_cfg.batch_size])[0] for i in range(0, len(idx),
                                                                                          eval_cfg.batch_size)])
        mu_ref, sigma_ref = feature_statistics(extractor.features(real, eval_cfg.batch_size))
    out = {"metric": f"FID with {path} against " + (eval_cfg.fid_ref or f"{n} dataset images"), "num_samples": n}
    with _sampling_bar(eval_cfg, progress) as bar:
        for steps in eval_cfg.steps:
            x, _ = generate(model, n, dataset.data_shape, dataset.num_classes, steps=steps, seed=eval_cfg.seed,
                            device=device, batch_size=eval_cfg.batch_size, autocast=autocast, bar=bar,
                            sampler=sampler)
            mu, sigma = feature_statistics(extractor.features(x, eval_cfg.batch_size))
            out[f"{steps}step"] = {"fid": frechet_distance(mu, sigma, mu_ref, sigma_ref)}
    return out


def evaluate_model(model: nn.Module, data_cfg, eval_cfg, device: str | torch.device = "cpu",
                   autocast: Callable | None = None, progress: bool = False,
                   sampler: Callable | None = None) -> dict:
    """Metrics of `model` for the dataset in `data_cfg` (see the module docstring for what each kind reports).
    `progress`: tqdm bars (stderr) for the sampling and for a first-use classifier training. `sampler`: the
    objective's (meanflow.evaluation.samplers.sampler_for(cfg.loss)); default MeanFlow's."""
    model.eval()
    if data_cfg.name in TOYS:
        return evaluate_toy(model, dataset_from_config(data_cfg), eval_cfg, device, autocast, progress, sampler)
    if data_cfg.name in ("mnist", "digits"):
        return evaluate_digits(model, data_cfg.name, eval_cfg, device, autocast, progress, sampler)
    if data_cfg.name == "latents":
        reason = ("FID on latents needs the decoded images: run `meanflow sample --ckpt RUN --vae VAE --num 50000 --out "
                  "samples.npz` (torchrun spreads it over GPUs), then `meanflow eval --samples samples.npz --fid-ref "
                  "REF.npz`")
        print(f"FID skipped: {reason}")
        return {"fid_skipped": reason}
    return evaluate_images(model, dataset_from_config(data_cfg), eval_cfg, device, autocast, progress, sampler)


# -------------------------------------------------------------------------------------------- Inception (FID)
class InceptionFeatures:
    """A local TorchScript feature extractor: uint8-valued images (N, 3, H, W) -> features (N, D).

    The commonly used `pt_inception-2015-12-05-6726825d.pt` (NVlabs' TorchScript port of the TF FID Inception, which
    resizes to 299 itself) is called as net(images, return_features=True) and gives the 2048-d pool features; any
    TorchScript module whose forward maps such images to (N, D) features works too. Grey images are repeated to RGB.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self.path, self.device = Path(path), torch.device(device)
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, yet the FID weights ship in it
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
        args = [a.name for a in self.net.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in args else {}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
        """images in [-1, 1] (N, C, H, W) -> (N, D) float64 features."""
        out = []
        for chunk in images.split(batch_size):
            x = ((chunk.float().clamp(-1, 1) + 1) * 127.5).round()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = x.to(torch.uint8) if self.kwargs else x
            f = self.net(x.to(self.device), **self.kwargs)
            out.append(f.reshape(f.shape[0], -1).double().cpu())
        return torch.cat(out)


def load_inception(path: str | os.PathLike | None) -> tuple[InceptionFeatures | None, str]:
    """(extractor, "") or (None, the reason) — FID never downloads weights."""
    if not path:
        return None, (f"no Inception weights file given (set eval.inception=PATH or ${INCEPTION_ENV} to a local "
                      f"TorchScript feature extractor such as pt_inception-2015-12-05-6726825d.pt; nothing is "
                      f"downloaded)")
    if not Path(path).is_file():
        return None, f"Inception weights file {path} not found"
    try:
        return InceptionFeatures(path), ""
    except Exception as exc:  # noqa: BLE001 - report why instead of failing the whole run at the end
        return None, f"cannot load Inception weights file {path} as TorchScript ({type(exc).__name__}: {exc})"


# ---------------------------------------------------------------------------------------- FID of sample batches
def load_image_batch(path: str | os.PathLike) -> np.ndarray:
    """uint8 images (N, H, W, C) from an .npz in the ADM convention (key arr_0) or an .npy."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image batch {p} does not exist")
    if p.suffix == ".npy":
        arr = np.load(p, mmap_mode="r")
    else:
        with np.load(p) as z:
            if "arr_0" not in z.files:
                raise ValueError(f"{p} has no 'arr_0' (uint8 images N x H x W x C); it has {z.files}")
            arr = z["arr_0"]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.dtype != np.uint8:
        raise ValueError(f"{p}: expected uint8 images (N, H, W, 1 or 3); got {arr.dtype} {tuple(arr.shape)}")
    return arr


def image_batch_statistics(extractor: InceptionFeatures, images: np.ndarray, batch_size: int = 250,
                           progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the feature extractor over uint8 (N, H, W, C) images, streamed in batches. `progress`: the label
    of a tqdm bar (stderr), None for none."""
    feats = []
    with progress_bar(len(images), progress or "", progress is not None, unit="image") as bar:
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1
            feats.append(extractor.features(x, batch_size))
            bar.update(len(x))
    return feature_statistics(torch.cat(feats))


def reference_statistics(ref: str | os.PathLike, extractor: InceptionFeatures, batch_size: int = 250,
                         progress: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """(mu, sigma, what) from an .npz holding 'mu' and 'sigma' (precomputed statistics, e.g. ADM's reference batches,
    which carry both), or else 'arr_0' reference images whose statistics are computed here."""
    p = Path(ref)
    if not p.is_file():
        raise FileNotFoundError(f"FID reference {p} does not exist (an .npz with mu and sigma, or with arr_0 images)")
    with np.load(p) as z:
        if "mu" in z.files and "sigma" in z.files:
            return z["mu"], z["sigma"], f"statistics in {p}"
    images = load_image_batch(p)
    mu, sigma = image_batch_statistics(extractor, images, batch_size, "FID: reference features" if progress else None)
    return mu, sigma, f"{len(images)} reference images in {p}"


def fid_of_samples(samples: str | os.PathLike, ref: str | os.PathLike | None, inception: str | os.PathLike | None,
                   *, batch_size: int = 250, device: str | torch.device = "cpu",
                   save_stats: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """FID of an image batch (.npz, arr_0 uint8 NHWC, as `meanflow sample --out X.npz` writes) against reference
    statistics, with a LOCAL Inception file (`inception`, else $MEANFLOW_INCEPTION). Without one, FID is skipped and the
    reason is printed and returned. `save_stats` writes the samples' (mu, sigma) as an .npz usable as a reference."""
    path = inception or os.environ.get(INCEPTION_ENV, "")
    extractor, reason = load_inception(path)
    if extractor is None:
        print(f"FID skipped: {reason}")
        return {"fid_skipped": reason}
    extractor = InceptionFeatures(path, device) if torch.device(device).type != "cpu" else extractor
    images = load_image_batch(samples)
    mu, sigma = image_batch_statistics(extractor, images, batch_size, "FID: sample features" if progress else None)
    out = {"samples": str(samples), "num_samples": len(images), "inception": str(path)}
    if save_stats:
        np.savez(save_stats, mu=mu, sigma=sigma)
        out["saved_stats"] = str(save_stats)
    if ref:
        mu_ref, sigma_ref, what = reference_statistics(ref, extractor, batch_size, progress)
        if mu_ref.shape != mu.shape:
            raise ValueError(f"reference statistics have {mu_ref.shape[0]} features but {path} gives {mu.shape[0]}: "
                             f"the reference was made with another feature network")
        out.update(fid=frechet_distance(mu, sigma, mu_ref, sigma_ref), reference=what)
    return out
