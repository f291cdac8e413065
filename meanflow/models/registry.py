"""Build a network by name: the one place that maps a run's model config onto a network class.

    net = build_model(cfg.model, data_shape=(4, 32, 32), num_classes=1000, device=torch.device("cuda"))
    net = build_model(cfg.model, ..., spec=NetworkSpec(heads=("u", "v"), conditions=IMF_CONDITIONS))   # for iMF

`cfg` is a meanflow.training.config.ModelConfig (or anything with the same fields: arch, name, hidden, depth, heads,
patch, mlp_ratio, v_depth, backend). `spec` (meanflow.models.heads.NetworkSpec) says which heads and conditions the
objective calls the network with; meanflow.objectives gives it (`network_spec(cfg.loss)`).

`model.arch=diffusers:<ClassName>` builds a diffusers transformer (ClassName in
meanflow.models.diffusers_adapters.ADAPTERS) from `cfg.config` (a JSON file or inline JSON object) and wraps it
(meanflow.models.wrapped.wrap: the tangent by torch.func.jvp with the fused attention).

Architectures are a table, `ARCHS`: arch name -> builder(cfg, data_shape, num_classes, backend, spec) -> JVPNetwork
(spec None: the architecture's default). Add one with `register_arch("my_arch", builder)`; a builder that cannot give
what `spec` asks for should raise a ValueError saying so (the objective checks the built network again and names what
is missing).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .dit import DIT_MODELS, DiT
from .heads import NetworkSpec
from .imf_dit import build_imf_from_config
from .mlp_net import MLPNet

Builder = Callable[..., nn.Module]


def _extra_options(cfg, spec: NetworkSpec, depth: int, *, default_v_depth: int) -> dict:
    """Keyword arguments of DiT / MLPNet for the heads and conditions in `spec`."""
    v_depth = (getattr(cfg, "v_depth", 0) or default_v_depth) if "v" in spec.heads else 0
    unknown = [h for h in spec.heads if h not in ("u", "v", "logvar")]
    if unknown:
        raise ValueError(f"model.arch={cfg.arch} has no head(s) {unknown}")
    return {"v_depth": v_depth, "logvar": "logvar" in spec.heads, "conditions": tuple(spec.conditions)}


def _build_mlp(cfg, data_shape, num_classes: int, backend: str, spec: NetworkSpec | None) -> nn.Module:
    spec = spec or NetworkSpec()
    if len(data_shape) != 1:
        raise ValueError(f"model.arch=mlp needs vector data (D,); the dataset gives {data_shape}")
    depth = cfg.depth or 4
    extra = _extra_options(cfg, spec, depth, default_v_depth=max(1, depth // 2))
    return MLPNet(data_shape[0], cfg.hidden or 256, depth, num_classes=num_classes, backend=backend, **extra)


def _build_dit(cfg, data_shape, num_classes: int, backend: str, spec: NetworkSpec | None) -> nn.Module:
    spec = spec or NetworkSpec()
    if len(data_shape) != 3:
        raise ValueError(f"model.arch=dit needs image-like data (C, H, W); the dataset gives {data_shape} "
                         f"(use model.arch=mlp for 2-D toys)")
    if cfg.name not in DIT_MODELS:
        raise ValueError(f"unknown model.name {cfg.name!r}; choose one of {sorted(DIT_MODELS)}")
    base = DIT_MODELS[cfg.name]
    depth = cfg.depth or base.depth
    # iMF's official split (B/2: 4 shared + 8 + 8) keeps at most 8 blocks per branch; half the depth for small DiTs
    extra = _extra_options(cfg, spec, depth, default_v_depth=min(8, max(1, depth // 2)))
    c, h, w = data_shape
    return DiT((h, w), c, cfg.hidden or base.hidden, depth, cfg.heads or base.heads, cfg.patch or base.patch,
               cfg.mlp_ratio, num_classes=num_classes, backend=backend, **extra)


# imf_dit: iMF's own network (meanflow.models.imf_dit: in-context conditioning, RMSNorm / SwiGLU / QK-norm + RoPE)
ARCHS: dict[str, Builder] = {"dit": _build_dit, "mlp": _build_mlp, "imf_dit": build_imf_from_config}


def _build_diffusers(class_name: str, cfg, data_shape, num_classes: int, backend: str,
                     spec: NetworkSpec | None) -> nn.Module:
    from .diffusers_adapters import build_diffusers, load_config, size_overrides
    from .wrapped import wrap

    config = load_config(getattr(cfg, "config", ""))
    sizes = size_overrides(class_name, hidden=cfg.hidden, depth=cfg.depth, heads=cfg.heads, patch=cfg.patch,
                           config=config)
    module = build_diffusers(class_name, config, data_shape=data_shape, num_classes=num_classes, overrides=sizes)
    time_scale = getattr(cfg, "time_scale", 0.0) or None
    return wrap(module, data_shape=data_shape, num_classes=num_classes, spec=spec, backend=backend,
                time_scale=time_scale)


# model.arch=PREFIX:NAME: builder(NAME, cfg, data_shape, num_classes, backend, spec)
ARCH_PREFIXES: dict[str, Callable[..., nn.Module]] = {"diffusers": _build_diffusers}


def known_arch(arch: str) -> bool:
    """A registered architecture, or PREFIX:NAME with a known prefix (e.g. diffusers:DiTTransformer2DModel)."""
    prefix, _, name = arch.partition(":")
    return arch in ARCHS or (bool(name) and prefix in ARCH_PREFIXES)


def register_arch(name: str, builder: Builder) -> None:
    """Make `model.arch=name` build networks with `builder(cfg, data_shape, num_classes, backend, spec)`."""
    ARCHS[name] = builder


def build_model(cfg, data_shape: tuple[int, ...], num_classes: int, device: torch.device,
                spec: NetworkSpec | None = None) -> nn.Module:
    """The network of `cfg.arch` for a data shape (a DiT for (C, H, W), the MLP for (D,)), with what `spec` asks for."""
    backend = cfg.backend
    if backend == "auto":
        backend = "fused" if device.type == "cuda" else "explicit"
    if not known_arch(cfg.arch):
        raise ValueError(f"model.arch must be one of {sorted(ARCHS)} or diffusers:<ClassName>; got {cfg.arch!r}")
    if cfg.arch not in ARCHS:
        prefix, _, name = cfg.arch.partition(":")
        return ARCH_PREFIXES[prefix](name, cfg, tuple(data_shape), num_classes, backend, spec)
    # spec None: the architecture's own default (DiT / MLP: one head; iMF's network: both heads and its conditions)
    return ARCHS[cfg.arch](cfg, tuple(data_shape), num_classes, backend, spec)


__all__ = ["ARCHS", "ARCH_PREFIXES", "build_model", "register_arch", "known_arch"]
