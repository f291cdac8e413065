"""A small CNN digit classifier, trained by the project on the real digits and cached, for judging generated digits.

It gives three numbers for samples: the share classified with confidence > 0.9 (do they look like any digit?), the
share whose predicted class is the conditioning label (do they look like the RIGHT digit?), and a Fréchet distance
between its penultimate features of samples and of held-out real digits (a small-scale FID).

Cache: `$MEANFLOW_CACHE` or `~/.cache/meanflow/`, one file per dataset and shape, written atomically. Training takes
seconds to about half a minute on CPU, once.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CACHE_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("MEANFLOW_CACHE") or Path.home() / ".cache" / "meanflow")


class DigitClassifier(nn.Module):
    """conv-ReLU-pool blocks (16, 32, 64 channels) down to <= 4x4, then Linear -> `feature_dim` features -> classes."""

    def __init__(self, in_channels: int, size: int, num_classes: int = 10, feature_dim: int = 64):
        super().__init__()
        layers, c, s, width = [], in_channels, size, 16
        while s > 4:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, s, width = width, s // 2, width * 2
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]  # one more conv, no pooling, for tiny inputs
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * s * s, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to max_shift pixels (one offset per batch: cheap, and enough for robustness)."""
    if max_shift == 0:
        return x
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=g).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, *, epochs: int = 6, min_steps: int = 400,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     progress: bool = False) -> DigitClassifier:
    """Adam with a one-cycle schedule; small datasets get more epochs so that at least `min_steps` steps run.
    `progress`: a tqdm bar over the steps (stderr)."""
    torch_state = torch.get_rng_state()  # leave the caller's RNG as it was
    torch.manual_seed(seed)
    model = DigitClassifier(train_x.shape[1], train_x.shape[-1], int(train_y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    max_shift = 2 if train_x.shape[-1] >= 16 else 1
    per_epoch = (len(train_x) + batch_size - 1) // batch_size
    epochs = max(epochs, -(-min_steps // per_epoch))
    total = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total)
    model.train()
    from .progress import progress_bar

    with progress_bar(total, "digit classifier (trained once, then cached)", progress, unit="step") as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(train_x), generator=g)
            for i in range(0, len(perm), batch_size):
                idx = perm[i:i + batch_size]
                loss = F.cross_entropy(model(_shift(train_x[idx], g, max_shift)), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
    torch.set_rng_state(torch_state)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x)[0] == y).float().mean())


@torch.no_grad()
def predict(model: DigitClassifier, x: torch.Tensor, batch_size: int = 500):
    """(predicted class, max softmax probability, penultimate features) for images x."""
    preds, confs, feats = [], [], []
    for chunk in x.split(batch_size):
        f = model.features(chunk.float())
        prob = model.head(f).softmax(-1)
        conf, pred = prob.max(-1)
        preds.append(pred)
        confs.append(conf)
        feats.append(f)
    return torch.cat(preds), torch.cat(confs), torch.cat(feats)


def load_or_train(name: str, *, verbose: bool = True, progress: bool = False) -> tuple[DigitClassifier, dict]:
    """The cached classifier of dataset `name` ('mnist' or 'digits'), trained on its train split on first use.

    Returns (model, meta) with meta['test_accuracy'] measured on the held-out split and meta['trained'] telling
    whether this call trained it.
    """
    from ..runtime import files
    from ..data.datasets import build_dataset

    if name not in ("mnist", "digits"):
        raise ValueError(f"the digit classifier exists for 'mnist' and 'digits'; not {name!r}")
    train = build_dataset(name, split="train")
    c, h, w = train.data_shape
    path = cache_dir() / f"classifier-{name}-{c}x{h}x{w}-v{CACHE_VERSION}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = DigitClassifier(c, h, train.num_classes)
            model.load_state_dict(blob["state_dict"])
            return model.eval(), {**blob["meta"], "trained": False, "path": str(path)}
        except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
            if verbose:
                print(f"classifier cache {path} is unreadable ({exc}); retraining")
    if verbose:
        print(f"training the {name} digit classifier (once; cached at {path})", flush=True)
    model = train_classifier(train.x, train.y, progress=progress)
    test = build_dataset(name, split="test")
    meta = {"dataset": name, "test_accuracy": accuracy(model, test.x, test.y), "train_size": len(train),
            "test_size": len(test)}
    path.parent.mkdir(parents=True, exist_ok=True)
    files.save_atomic({"state_dict": model.state_dict(), "meta": meta}, path)
    return model, {**meta, "trained": True, "path": str(path)}
