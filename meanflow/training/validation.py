"""The values each run-config field accepts, checked where a value enters: `--set key=value` (apply_overrides) and
the start of a Trainer (check_config), so a bad value fails at once with one line that names the key.

The loss section is the objective's own config (MeanFlowConfig, IMFConfig, ...), which validates itself in
__post_init__; the rules below only add what it leaves open. Fields without a rule take any value of their type, except that floats must be finite.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], "str | None"]  # returns what is wrong, or None

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def each(check: Check, *, nonempty: bool = True) -> Check:
    def run(values) -> str | None:
        if nonempty and not values:
            return "needs at least one value"
        for v in values:
            if (why := check(v)) is not None:
                return f"{why} (each value)"
        return None
    return run


def in_open_unit(v) -> str | None:
    return None if 0.0 < v < 1.0 else "must lie in (0, 1)"


def in_unit_left_closed(v) -> str | None:
    return None if 0.0 <= v < 1.0 else "must lie in [0, 1)"


def device(v) -> str | None:
    return None if DEVICE_RE.match(str(v)) else "must be auto, cpu, cuda or cuda:N"


def _archs() -> tuple[str, ...]:
    """The registered architectures (meanflow.models.registry.ARCHS: dit, mlp, imf_dit and any register_arch)."""
    from ..models.registry import ARCHS

    return tuple(ARCHS)


def _known_arch(v) -> bool:
    from ..models.registry import known_arch

    return known_arch(str(v))


def _datasets() -> tuple[str, ...]:
    from ..data.datasets import DATASETS

    return DATASETS


def _compile_choices() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from .compile import COMPILE_BACKENDS, COMPILE_MODES

    return COMPILE_MODES, COMPILE_BACKENDS


RULES: dict[str, Check] = {
    "model.arch": lambda v: None if _known_arch(v) else one_of(*_archs(), "diffusers:<ClassName>")(v),
    "model.v_depth": at_least(0),
    "model.hidden": at_least(0),
    "model.depth": at_least(0),
    "model.heads": at_least(0),
    "model.patch": at_least(0),
    "model.mlp_ratio": positive,
    "model.time_scale": at_least(0),
    "model.backend": one_of("auto", "autograd", "explicit", "fused"),
    "data.name": lambda v: one_of(*_datasets())(v),
    "data.image_size": at_least(1),
    "data.latent_scale": positive,
    "data.split": one_of("train", "test", "all"),
    "data.toy_scale": positive,
    "data.num_classes": at_least(0),
    "data.workers": at_least(0),
    "loss.p": at_least(0),
    "loss.t_std": positive,
    "loss.r_std": positive,
    "train.steps": at_least(1),
    "train.batch_size": at_least(1),
    "train.grad_accum": at_least(1),
    "train.lr": positive,
    "train.betas": each(in_unit_left_closed),
    "train.weight_decay": at_least(0),
    "train.warmup_steps": at_least(0),
    "train.grad_clip": at_least(0),
    "train.ema_decays": each(in_open_unit),
    "train.seed": at_least(0),
    "train.precision": one_of("auto", "fp32", "bf16"),
    "train.device": device,
    "train.parallel": one_of("ddp", "fsdp"),
    "train.compile_mode": lambda v: one_of(*_compile_choices()[0])(v),
    "train.compile_backend": lambda v: one_of(*_compile_choices()[1])(v),
    "train.threads": at_least(0),
    "train.log_every": at_least(1),
    "train.sample_every": at_least(0),
    "train.ckpt_every": at_least(0),
    "train.ckpt_minutes": at_least(0),
    "train.keep_ckpts": at_least(0),
    "train.grid_size": at_least(0),
    "eval.num_samples": at_least(2),  # the Frechet distances need a covariance
    "eval.steps": each(at_least(1)),
    "eval.batch_size": at_least(1),
    "eval.sw_projections": at_least(1),
    "eval.seed": at_least(0),
}


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    return True


def check_field(key: str, value) -> None:
    """Raise ValueError('KEY must ...; got VALUE') when `value` is not allowed for config key `key`."""
    why = "must be finite" if not _finite(value) else (RULES[key](value) if key in RULES else None)
    if why is not None:
        shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        raise ValueError(f"{key} {why}; got {shown!r}" if isinstance(shown, str) else f"{key} {why}; got {shown}")


def check_config(cfg) -> None:
    """Every field of a RunConfig against its rule (the first violation raises ValueError)."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            for g in dataclasses.fields(section):
                check_field(f"{f.name}.{g.name}", getattr(section, g.name))
