"""Objectives by name: the one table that maps `loss.objective` onto an objective class and its config.

    cfg = default_config("imf")                       # IMFConfig()
    objective = build_objective(cfg, model=net)        # IMFLoss(cfg), the network checked
    spec = network_spec(cfg)                           # what build_model must give the network
"""
from __future__ import annotations

from .alphaflow import AlphaFlowConfig, AlphaFlowLoss
from .base import Objective
from .flow_matching import FlowMatchingConfig, FlowMatchingLoss
from .imf import IMFConfig, IMFLoss
from .meanflow import MeanFlowConfig, MeanFlowLoss
from .scm import SCMConfig, SCMLoss
from .tvm import TVMConfig, TVMLoss
from ..models.heads import NetworkSpec

OBJECTIVES: dict[str, type[Objective]] = {
    "fm": FlowMatchingLoss,
    "meanflow": MeanFlowLoss,
    "imf": IMFLoss,
    "scm": SCMLoss,
    "alphaflow": AlphaFlowLoss,
    "tvm": TVMLoss,
}
CONFIGS: dict[str, type] = {name: cls.config_class for name, cls in OBJECTIVES.items()}
ObjectiveConfigs = FlowMatchingConfig | MeanFlowConfig | IMFConfig | SCMConfig | AlphaFlowConfig | TVMConfig


def check_name(name: str) -> str:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return name


def default_config(name: str):
    """The default config of an objective (its official settings)."""
    return CONFIGS[check_name(name)]()


def config_from_dict(d: dict):
    """A loss config from its dict (checkpoints, JSON); no 'objective' key: MeanFlow (configs before objectives)."""
    import dataclasses

    name = check_name(d.get("objective", "meanflow"))
    cls = CONFIGS[name]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown keys {unknown} for objective {name!r}; valid: {sorted(names)}")
    return cls(**d)


def build_objective(config, *, model=None, total_steps: int | None = None) -> Objective:
    """The objective of a loss config; `model` is checked (a clear error if it lacks what the objective needs)."""
    cls = OBJECTIVES[check_name(getattr(config, "objective", "meanflow"))]
    if cls is AlphaFlowLoss:
        return cls(config, model=model, total_steps=total_steps)
    return cls(config, model=model)


def network_spec(config) -> NetworkSpec:
    """The heads and conditions the objective of `config` calls the network with."""
    return build_objective(config).network_spec()


__all__ = ["OBJECTIVES", "CONFIGS", "ObjectiveConfigs", "default_config", "config_from_dict", "build_objective",
           "network_spec", "check_name"]
