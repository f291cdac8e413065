"""Input validation for the networks: every error names the argument, what it got and what was expected."""
from __future__ import annotations

import torch

from mfkernels._checks import check_float, check_tangent, check_tangent_batches, describe, require_values


def _check_times(name: str, x: torch.Tensor, batch: int, ref: torch.Tensor) -> None:
    check_float(name, x)
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},); got {describe(x)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but z is on {ref.device}")


def check_network_inputs(model, z, t, h, y, tangents, *, check_values: bool = True) -> int:
    """Validate a network call; returns the tangent batch kt (0 without tangents). Shapes, dtypes and devices are
    always checked (host-side only); the values of t, h and y only with check_values (each costs a host sync, which
    also makes the call impossible to record in a CUDA graph; under torch.compile they are device-side asserts:
    mfkernels._checks.require_values)."""
    check_float("z", z)
    expected = tuple(model.data_shape)
    if tuple(z.shape[1:]) != expected:
        raise ValueError(f"z must have shape (B, {', '.join(map(str, expected))}); got {describe(z)}")
    batch = z.shape[0]
    _check_times("t", t, batch, z)
    _check_times("h", h, batch, z)
    if check_values:
        require_values((t >= 0) & (t <= 1), "t must lie in [0, 1]",
                       lambda: f"; got values in [{t.min().item():.4g}, {t.max().item():.4g}]")
        require_values(h >= 0, "h = t - r must be >= 0 (r <= t)", lambda: "; got a negative h, i.e. r > t in some row")
        require_values(h <= t + 1e-6, "h = t - r must be <= t (r >= 0)", lambda: "; got h > t in some row")
    if model.num_classes > 0:
        if y is None:
            raise ValueError(f"the model is class-conditional ({model.num_classes} classes): pass labels y of shape "
                             f"(B,), with index {model.num_classes} for the null class")
        if y.dtype not in (torch.int64, torch.int32) or y.shape != (batch,):
            raise ValueError(f"y must be an integer tensor of shape ({batch},); got {describe(y)}")
        if check_values:
            require_values((y >= 0) & (y <= model.num_classes),
                           f"labels y must lie in [0, {model.num_classes}] ({model.num_classes} is the null class)",
                           lambda: f"; got values in [{int(y.min())}, {int(y.max())}]")
    elif y is not None:
        raise ValueError("the model is unconditional (num_classes = 0): y must be None")
    if tangents is None:
        return 0
    if not isinstance(tangents, (tuple, list)) or len(tangents) != 3:
        raise ValueError("tangents must be a tuple (z_dot, t_dot, h_dot)")
    z_dot, t_dot, h_dot = tangents
    kt = check_tangent("z_dot", z_dot, "z", z)
    check_tangent_batches(z_dot=z_dot, t_dot=t_dot, h_dot=h_dot)
    check_tangent("t_dot", t_dot, "t", t)
    check_tangent("h_dot", h_dot, "h", h)
    return kt


def check_conditions(model, conditions: dict, batch: int, device) -> None:
    """The network's extra per-row inputs (model.conditions): all present, none unknown, each a float (B,) tensor."""
    expected = tuple(getattr(model, "conditions", ()))
    unknown = sorted(set(conditions) - set(expected))
    if unknown:
        have = f"its conditions are {list(expected)}" if expected else "it takes no extra conditions"
        raise TypeError(f"{type(model).__name__} got unexpected keyword argument(s) {unknown}; {have}")
    missing = [name for name in expected if name not in conditions]
    if missing:
        raise TypeError(f"{type(model).__name__} needs the condition(s) {missing} (per-row float tensors of shape "
                        f"(B,)); pass them as keywords, e.g. model(z, t, h, y, {missing[0]}=...)")
    for name in expected:
        c = conditions[name]
        check_float(name, c)
        if c.shape != (batch,):
            raise ValueError(f"{name} must have shape (B,) = ({batch},); got {describe(c)}")
        if c.device != device:
            raise ValueError(f"{name} is on {c.device} but z is on {device}")


def check_head(model, head, tangents) -> None:
    """head selects one output of a multi-head network; only 'u' carries a tangent."""
    heads = tuple(model.heads)
    if head is not None and head not in heads:
        raise ValueError(f"head must be None (all heads) or one of {list(heads)}; got {head!r}")
    if tangents is not None and head not in (None, heads[0]):
        raise ValueError(f"only the {heads[0]!r} head has a tangent: head={head!r} cannot be combined with tangents")
