"""A small MLP u(z, t, h | y) for low-dimensional toy data (the 2-D toys)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import JVPOps
from .heads import LogVarHead, condition_features, extra_heads
from .layers import Linear
from .network import JVPNetwork


class MLPNet(JVPNetwork):
    """A small MLP u(z, t, h | y) for low-dimensional toy data: [z, t, h] -> (Linear -> SiLU) x depth -> Linear.

    Times enter raw: the average velocity is smooth in (t, h), and high-frequency time features would only make
    du/dt (and so the target's variance) large. A label embedding is added after the first layer.

    For the objectives beyond MeanFlow (meanflow.models.heads): `conditions` enter as extra input columns (omega as
    1 - 1/omega; no tangent); `v_depth` in [1, depth - 1] adds a v head, a branch of `v_depth` layers + its own output
    forking after the first depth - v_depth layers; `logvar` adds a logvar(t) head.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0,
                 backend: str = "explicit", *, v_depth: int = 0, conditions: tuple[str, ...] = (),
                 logvar: bool = False):
        super().__init__(backend)
        if v_depth and not 1 <= v_depth < depth:
            raise ValueError(f"v_depth (layers of the v-branch) must lie in [1, depth - 1 = {depth - 1}]; "
                             f"got {v_depth}")
        self.dim, self.num_classes, self.v_depth = dim, num_classes, v_depth
        self.heads = extra_heads(v_depth, logvar)
        self.conditions = tuple(conditions)
        self.data_shape = (dim,)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        widths = [dim + 2 + len(self.conditions)] + [hidden] * depth
        self.layers = nn.ModuleList(Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = Linear(hidden, dim)
        if v_depth:
            self.v_layers = nn.ModuleList(Linear(hidden, hidden) for _ in range(v_depth))
            self.v_out = Linear(hidden, dim)
        self.logvar = LogVarHead() if logvar else None

    def _inputs(self, z, t, h, conditions):
        cols = [t, h] + [condition_features(name, conditions[name]) for name in self.conditions]
        return torch.cat([z] + [c[:, None].to(z.dtype) for c in cols], dim=-1)

    def _extra_head(self, x_fork, t):
        if self.heads[1] == "logvar":
            return self.logvar(t)
        for layer in self.v_layers:
            x_fork = F.silu(layer(x_fork))
        return self.v_out(x_fork)

    def _forward_plain(self, z, t, h, y, head=None, **conditions):
        if head == "logvar":
            return self.logvar(t)
        x = self._inputs(z, t, h, conditions)
        fork = len(self.layers) - self.v_depth
        x_fork = None
        for i, layer in enumerate(self.layers):
            if i == fork:
                if head == "v":
                    return self._extra_head(x, t)
                x_fork = x
            x = layer(x)
            if i == 0 and self.y_embedder is not None:
                x = x + self.y_embedder(y)
            x = F.silu(x)
        u = self.out(x)
        if len(self.heads) == 1 or head == "u":
            return u
        return u, self._extra_head(x_fork if self.v_depth else None, t)

    def _forward_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, ops: JVPOps, head=None, **conditions):
        x = self._inputs(z, t, h, conditions)
        zeros = [torch.zeros_like(t_dot)] * len(self.conditions)  # the conditions carry no tangent
        x_dot = torch.cat([z_dot] + [c[:, None].to(z.dtype) for c in [t_dot, h_dot] + zeros], dim=-1)
        fork = len(self.layers) - self.v_depth
        x_fork = None
        for i, layer in enumerate(self.layers):
            if i == fork:
                x_fork = x
            x, x_dot = layer.forward_jvp(x, x_dot, ops)
            if i == 0 and self.y_embedder is not None:
                x = x + self.y_embedder(y)
            x, x_dot = ops.silu(x, x_dot)
        out = self.out.forward_jvp(x, x_dot, ops)
        if len(self.heads) == 1 or head == "u":
            return out
        return tuple(out) + (self._extra_head(x_fork, t),)


__all__ = ["MLPNet"]
