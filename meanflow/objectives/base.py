"""The interface every training objective shares.

    objective = IMFLoss(IMFConfig(...), model=net)        # model= checks the network at construction
    loss, stats = objective(model, x, y)                  # draws its own randomness
    loss, stats = objective(model, x, y, **draws)         # or takes every random draw as an argument
    draws = objective.draw(batch, x, conditional=True, generator=g)   # what the objective would draw, by name

- Every random draw (noise, times, omega / interval, label-drop mask, ...) is a per-row tensor that can be passed in,
  so an objective can be checked against an independent implementation, and a distributed trainer can draw them for
  the global batch and hand each rank its rows (meanflow.training.trainer). `draw` makes them in the order the
  objective makes them itself: `objective(model, x, y, generator=g)` == `objective(model, x, y, **draw(..., g))`.
- `network_spec()` says which heads and conditions the objective calls the network with; `check_network(model)`
  raises, naming what is missing, when a network cannot serve (built-in networks get what the spec asks for from
  meanflow.models.build_model).
- Objectives whose loss follows the training step (alpha-Flow's alpha schedule, sCM's tangent warm-up) set
  `uses_step = True`; the trainer then passes `step=` (its checkpointed step count, so a resumed run continues the
  schedule exactly).
- Objectives that train against a teacher (TVM: an EMA of the network) set `teacher_decay`; the trainer then keeps
  that EMA (checkpointed, sharded like the model, updated after every optimizer step) and passes it as `teacher=`.
- `stats` holds detached tensors for `log_keys` ("loss", "v_loss": a velocity monitor, "raw_loss": the unweighted
  loss; each objective's docstring says what they are) plus ints (jvp_rows, guidance_rows).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from mfkernels._checks import check_float, describe, require_values

from ..models.heads import NetworkSpec
from ..models.network import unwrap


def knob(default, help: str) -> Any:
    """A config field with its help line (shown by `meanflow train --help-config` and `meanflow presets -v`)."""
    return dataclasses.field(default=default, metadata={"help": help})


class ObjectiveConfig:
    """Mixin of the objectives' config dataclasses (each has an `objective` field naming its objective)."""

    objective: str

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def _check_name(self, name: str) -> None:
        if self.objective != name:
            raise ValueError(f"{type(self).__name__} is the config of objective {name!r}; got objective="
                             f"{self.objective!r} (pick another objective with its own config: "
                             f"meanflow.objectives.default_config(name))")


def check_unit_interval(name: str, value: float, *, open_low: bool = False) -> None:
    if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in {'(0, 1]' if open_low else '[0, 1]'}; got {value}")


def as_rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row (B,) tensor shaped to broadcast against `like` (B, ...), in like's dtype."""
    return t.reshape((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


# Why an objective needs each head / condition (used in the errors of check_network).
REASONS = {
    "v": "the instantaneous-velocity head iMF trains next to u and takes its tangent and guidance from; the built-in "
         "networks get it with model.v_depth (DiT(..., v_depth=k), MLPNet(..., v_depth=k))",
    "logvar": "the learned loss weighting logvar(t) of sCM; the built-in networks get it with DiT(..., logvar=True) / "
              "MLPNet(..., logvar=True), your own network from meanflow.models.LogVarHead",
    "omega": "iMF conditions the network on its guidance scale and interval",
    "beta": "TVM conditions the network on beta = 1 / cfg, its guidance scale",
}


class Objective:
    """Base class of the objectives (see the module docstring). Subclasses set `name`, `config_class`, `draw_names`
    and implement `draw` and `__call__`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    uses_step: ClassVar[bool] = False
    teacher_decay: float | None = None  # an EMA teacher the trainer keeps and passes as teacher= (None: no teacher)
    log_keys: ClassVar[tuple[str, ...]] = ("loss", "v_loss", "raw_loss")
    draw_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config=None, *, model=None, **overrides):
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}; got {type(config).__name__}")
        self.config = config.replace(**overrides) if overrides else config
        if model is not None:
            self.check_network(model)

    # ------------------------------------------------------------------------------------------------ network
    @property
    def guided(self) -> bool:
        return bool(getattr(self.config, "guided", False))

    def network_spec(self) -> NetworkSpec:
        """Heads and conditions of this objective's network calls; class-conditional when it guides."""
        return NetworkSpec(conditional=self.guided)

    def check_network(self, model) -> None:
        """Raise (naming what is missing) if `model` cannot serve this objective."""
        net = unwrap(model)
        who = type(net).__name__
        if not hasattr(net, "_forward_jvp") or not hasattr(net, "data_shape"):
            raise TypeError(f"the {self.name} objective trains a meanflow JVPNetwork (a forward with tangents, "
                            f"data_shape, num_classes: see meanflow.models.network); got {who}")
        spec = self.network_spec()
        heads = tuple(getattr(net, "heads", ("u",)))
        missing = [h for h in spec.heads if h not in heads]
        if missing:
            why = "; ".join(f"{h!r}: {REASONS.get(h, 'an output head')}" for h in missing)
            raise ValueError(f"the {self.name} objective needs a network with head(s) {missing} (heads = "
                             f"{spec.heads}); {who} has heads {heads}. {why}")
        if heads != spec.heads:
            extra = [h for h in heads if h not in spec.heads]
            raise ValueError(f"the {self.name} objective calls the network with heads {spec.heads}; {who} has heads "
                             f"{heads} (build it without the extra head(s) {extra})")
        conditions = tuple(getattr(net, "conditions", ()))
        if set(conditions) != set(spec.conditions):
            lacking = [c for c in spec.conditions if c not in conditions]
            if lacking:
                why = REASONS.get(lacking[0], "per-row inputs")
                raise ValueError(f"the {self.name} objective passes the condition(s) {list(spec.conditions)}; {who} "
                                 f"lacks {lacking} ({why}; set `conditions` on the network)")
            raise ValueError(f"the {self.name} objective passes the conditions {list(spec.conditions)}; {who} "
                             f"expects {list(conditions)} as well (build it without them)")
        if spec.conditional and getattr(net, "num_classes", 0) <= 0:
            raise ValueError(f"{self.guidance_description()} needs a class-conditional model (num_classes > 0, "
                             f"with the null class for guidance); {who} is unconditional")

    def guidance_description(self) -> str:
        return f"guidance in the {self.name} objective"

    def network(self, model):
        """The network inside DDP / compile / CUDA-graph wrappers, checked (attribute lookups only: no host sync)."""
        net = unwrap(model)
        self.check_network(net)
        return net

    # -------------------------------------------------------------------------------------------------- draws
    def draw(self, batch: int, like: torch.Tensor, *, conditional: bool,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _draw_missing(self, given: dict, batch: int, x: torch.Tensor, conditional: bool,
                      generator) -> tuple[dict, bool]:
        """All draws: the given ones, or (none given) the objective's own. Returns (draws, drawn_here). Partial sets
        are refused: the missing draws could not be made consistently with the given ones."""
        names = [n for n in self.draw_names if n != "drop" or conditional]
        passed = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(passed) - set(self.draw_names))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown draw(s) {unknown}; its draws are "
                            f"{list(self.draw_names)}")
        if not conditional and "drop" in passed:
            raise ValueError("the model is unconditional: drop must be None")
        if not passed:
            return self.draw(batch, x, conditional=conditional, generator=generator), True
        if "noise" in passed and len(passed) == 1:  # noise alone: the rest drawn here (MeanFlowLoss allows the same)
            own = self.draw(batch, x, conditional=conditional, generator=generator)
            own["noise"] = passed["noise"]
            return own, True
        absent = [n for n in names if n not in passed]
        if absent:
            raise ValueError(f"pass all of the draws {names} or none of them (noise alone is allowed); missing "
                             f"{absent}")
        return passed, False

    # ---------------------------------------------------------------------------------------------- checks
    @staticmethod
    def check_data(net, x: torch.Tensor, noise: torch.Tensor | None) -> int:
        check_float("x", x)
        expected = tuple(net.data_shape)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}) for this model; got "
                             f"{describe(x)}")
        if noise is not None and (noise.shape != x.shape or noise.dtype != x.dtype or noise.device != x.device):
            raise ValueError(f"noise must match x ({describe(x)}); got {describe(noise)}")
        return x.shape[0]

    @staticmethod
    def check_labels(net, y, drop, batch: int) -> None:
        """Labels for the network's classes (none for an unconditional one) and the label-drop mask. The value check
        is trace-safe (a device-side assert under torch.compile, see mfkernels._checks.require_values)."""
        conditional = net.num_classes > 0
        if conditional and y is None:
            raise ValueError(f"the model is class-conditional ({net.num_classes} classes): pass labels y")
        if not conditional:
            if y is not None or drop is not None:
                raise ValueError("the model is unconditional: y and drop must be None")
            return
        if y.shape != (batch,) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be an integer tensor of shape ({batch},); got {describe(y)}")
        if drop is not None and (drop.shape != (batch,) or drop.dtype != torch.bool):
            raise ValueError(f"drop must be a bool tensor of shape ({batch},); got {describe(drop)}")
        require_values((y >= 0) & (y < net.num_classes),
                       f"labels y must lie in [0, {net.num_classes - 1}] (the null class {net.null_class} is set by "
                       f"label dropout, not passed in)", lambda: f"; got values in [{int(y.min())}, {int(y.max())}]")

    @staticmethod
    def check_rows(name: str, s: torch.Tensor, batch: int, x: torch.Tensor, low: float | None = None,
                   high: float | None = None) -> None:
        """A per-row float draw: shape (B,), x's device, values in [low, high] (trace-safe; one host sync eagerly
        when bounded)."""
        check_float(name, s)
        if s.shape != (batch,) or s.device != x.device:
            raise ValueError(f"{name} must have shape ({batch},) on {x.device}; got {describe(s)}")
        if low is None and high is None:
            return
        ok = (s >= low) if high is None else (s <= high) if low is None else (s >= low) & (s <= high)
        require_values(ok, f"{name} must lie in [{low}, {high}]",
                       lambda: f"; got values in [{s.min().item():.4g}, {s.max().item():.4g}]")

    @classmethod
    def check_times(cls, t: torch.Tensor, r: torch.Tensor, batch: int, x: torch.Tensor) -> None:
        """Given times of a flow objective: t, r in [0, 1] per row with r <= t (the error names the first bad row)."""
        cls.check_rows("t", t, batch, x, 0.0, 1.0)
        cls.check_rows("r", r, batch, x, 0.0, 1.0)

        def first_bad_row() -> str:
            row = int((r > t).nonzero()[0, 0])
            return f"; row {row} has r = {r[row].item():.4g} > t = {t[row].item():.4g}"

        require_values(r <= t, "r must be <= t in every row", first_bad_row)


def jvp_rows_first(needs_jvp: torch.Tensor, *, count: bool = True,
                   **rows: torch.Tensor | None) -> tuple[int, dict]:
    """Reorder per-row tensors so that the rows needing a tangent come first (the ragged-tangent layout); returns k
    (one host sync) and the reordered tensors (None stays None). Any row order of the inputs gives the same loss.
    count=False returns k = B instead, with no sync: every row gets a tangent (for an objective whose r = t rows
    contribute nothing through their tangent, where a data-dependent k would break a torch.compile trace)."""
    order = torch.argsort((~needs_jvp).to(torch.int8), stable=True)
    k = int(needs_jvp.sum()) if count else needs_jvp.shape[0]
    return k, {name: (v[order] if v is not None else None) for name, v in rows.items()}


def null_labels(net, y: torch.Tensor | None, drop: torch.Tensor | None) -> torch.Tensor | None:
    """The labels the network sees: the null class where the label is dropped."""
    if y is None:
        return None
    return torch.where(drop, torch.full_like(y, net.null_class), y) if drop is not None else y


__all__ = ["Objective", "ObjectiveConfig", "knob", "as_rows", "jvp_rows_first", "null_labels",
           "check_unit_interval"]
