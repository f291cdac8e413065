"""The network protocol: what a model must provide so that every objective and backend can use it.

Every network (DiT, MLPNet, your own) subclasses JVPNetwork and shares one call:

    u = model(z, t, h, y)                                                   # plain forward, h = t - r
    u, u_dot = model(z, t, h, y, tangents=(z_dot, t_dot, h_dot), backend="explicit")

The tangent batch k = z_dot.shape[0] may be anything from 0 to B and stands for the FIRST k rows of the primal batch.
u is differentiable; u_dot is detached (MeanFlow's target is stop-gradient, so no tangent graph is ever kept).
Because the tangents are ordinary forward arguments, DDP / FSDP wrap the model as usual and gradient sync stays right.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mfkernels.nn import math_attention

from .validate import check_network_inputs
from .backends import JVPOps, check_backend, ops_for


class JVPNetwork(nn.Module):
    """Base class: dispatches between the plain forward and the three JVP backends, and validates inputs.

    Subclasses implement `_forward_plain(z, t, h, y)` and `_forward_jvp(z, t, h, y, z_dot, t_dot, h_dot, ops)`.
    """

    num_classes: int = 0
    data_shape: tuple[int, ...] = ()

    def __init__(self, backend: str = "explicit"):
        super().__init__()
        self.backend = check_backend(backend)
        self.check_inputs = True  # the range checks of t and h cost one host sync per call; trainers may turn it off

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, z, t, h, y=None, tangents=None, backend: str | None = None):
        backend = check_backend(backend or self.backend)
        kt = check_network_inputs(self, z, t, h, y, tangents, check_values=self.check_inputs)
        if tangents is None:
            # The primal alone (guidance forwards, sampling, flow matching) is the plain forward on every backend:
            # cuBLAS + torch's flash SDPA + eager glue. On an H200 the fused kernels at kt = 0 were host-bound here
            # (DiT-B/2, 80 rows, bf16: 19-21 ms a call against 15.7 ms; bench/results/h200-2026-11-26-b).
            return self._forward_plain(z, t, h, y)
        z_dot, t_dot, h_dot = tangents
        if backend == "autograd":
            return self._forward_autograd_jvp(z, t, h, y, z_dot, t_dot, h_dot, kt)
        u, u_dot = self._forward_jvp(z, t, h, y, z_dot, t_dot, h_dot, ops_for(backend))
        return u, u_dot.detach()

    def _forward_autograd_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, kt):
        """What peers do: torch.func.jvp over the plain forward on the WHOLE batch (tangents zero-padded to B)."""
        pad = z.shape[0] - kt
        tangents = tuple(torch.cat([d, d.new_zeros((pad,) + d.shape[1:])]) for d in (z_dot, t_dot, h_dot))
        # torch's fused SDPA kernels have no forward-mode rule, and its math SDPA breaks under CUDA autocast in forward
        # mode (softmax's tangent comes out fp32 for a bf16 primal): attention runs as the plain math formula here.
        with math_attention():
            u, u_dot = torch.func.jvp(lambda z_, t_, h_: self._forward_plain(z_, t_, h_, y), (z, t, h), tangents)
        return u, u_dot[:kt].detach()

    def _forward_plain(self, z, t, h, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, ops: JVPOps):  # pragma: no cover - abstract
        raise NotImplementedError


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


__all__ = ["JVPNetwork", "count_parameters", "unwrap"]
