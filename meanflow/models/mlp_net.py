"""A small MLP u(z, t, h | y) for low-dimensional toy data (the 2-D toys)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import JVPOps
from .layers import Linear
from .network import JVPNetwork

class MLPNet(JVPNetwork):
    """A small MLP u(z, t, h | y) for low-dimensional toy data: [z, t, h] -> (Linear -> SiLU) x depth -> Linear.

    Times enter raw: the average velocity is smooth in (t, h), and high-frequency time features would only make
    du/dt (and so the target's variance) large. A label embedding is added after the first layer.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0,
                 backend: str = "explicit"):
        super().__init__(backend)
        self.dim, self.num_classes = dim, num_classes
        self.data_shape = (dim,)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        widths = [dim + 2] + [hidden] * depth
        self.layers = nn.ModuleList(Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = Linear(hidden, dim)

    def _forward_plain(self, z, t, h, y):
        x = torch.cat([z, t[:, None].to(z.dtype), h[:, None].to(z.dtype)], dim=-1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0 and self.y_embedder is not None:
                x = x + self.y_embedder(y)
            x = F.silu(x)
        return self.out(x)

    def _forward_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, ops: JVPOps):
        x = torch.cat([z, t[:, None].to(z.dtype), h[:, None].to(z.dtype)], dim=-1)
        x_dot = torch.cat([z_dot, t_dot[:, None].to(z.dtype), h_dot[:, None].to(z.dtype)], dim=-1)
        for i, layer in enumerate(self.layers):
            x, x_dot = layer.forward_jvp(x, x_dot, ops)
            if i == 0 and self.y_embedder is not None:
                x = x + self.y_embedder(y)
            x, x_dot = ops.silu(x, x_dot)
        return self.out.forward_jvp(x, x_dot, ops)


__all__ = ["MLPNet"]
