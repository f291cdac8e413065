"""Build a network by name: the one place that maps a run's model config onto a network class.

    net = build_model(cfg.model, data_shape=(4, 32, 32), num_classes=1000, device=torch.device("cuda"))

`cfg` is a meanflow.training.config.ModelConfig (or anything with the same fields: arch, name, hidden, depth, heads,
patch, mlp_ratio, backend).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .dit import DIT_MODELS, DiT
from .imf_dit import build_imf_from_config
from .mlp_net import MLPNet


def build_model(cfg, data_shape: tuple[int, ...], num_classes: int, device: torch.device) -> nn.Module:
    """The network for a data shape: a DiT for (C, H, W), the MLP for (D,)."""
    backend = cfg.backend
    if backend == "auto":
        backend = "fused" if device.type == "cuda" else "explicit"
    if cfg.arch == "mlp":
        if len(data_shape) != 1:
            raise ValueError(f"model.arch=mlp needs vector data (D,); the dataset gives {data_shape}")
        return MLPNet(data_shape[0], cfg.hidden or 256, cfg.depth or 4, num_classes=num_classes, backend=backend)
    if cfg.arch == "imf_dit":  # iMF's network (meanflow.models.imf_dit)
        return build_imf_from_config(cfg, data_shape, num_classes, backend)
    if cfg.arch != "dit":
        raise ValueError(f"model.arch must be 'dit', 'imf_dit' or 'mlp'; got {cfg.arch!r}")
    if len(data_shape) != 3:
        raise ValueError(f"model.arch=dit needs image-like data (C, H, W); the dataset gives {data_shape} "
                         f"(use model.arch=mlp for 2-D toys)")
    if cfg.name not in DIT_MODELS:
        raise ValueError(f"unknown model.name {cfg.name!r}; choose one of {sorted(DIT_MODELS)}")
    base = DIT_MODELS[cfg.name]
    c, h, w = data_shape
    return DiT((h, w), c, cfg.hidden or base.hidden, cfg.depth or base.depth, cfg.heads or base.heads,
               cfg.patch or base.patch, cfg.mlp_ratio, num_classes=num_classes, backend=backend)


__all__ = ["build_model"]
