"""The network protocol: what a model must provide so that every objective and backend can use it.

Every network (DiT, MLPNet, your own) subclasses JVPNetwork and shares one call:

    u = model(z, t, h, y)                                                   # plain forward, h = t - r
    u, u_dot = model(z, t, h, y, tangents=(z_dot, t_dot, h_dot), backend="explicit")

The tangent batch k = z_dot.shape[0] may be anything from 0 to B and stands for the FIRST k rows of the primal batch.
u is differentiable; u_dot is detached (MeanFlow's target is stop-gradient, so no tangent graph is ever kept), unless
the call asks for `tangent_grad=True` (TVM differentiates through the JVP): then u_dot carries gradient to the
parameters (and to z, t, h and the tangents), on every backend: `autograd` records torch.func.jvp's graph, `explicit` /
`fused` run the network's `_forward_jvp` with the op table whose ops differentiate their tangents
(meanflow.models.backends; a network whose own code cuts the tangent's graph is refused, see _check_tangent_graph).
Because the tangents are ordinary forward arguments, DDP / FSDP wrap the model as usual and gradient sync stays right.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from mfkernels.nn import math_attention

from .validate import check_conditions, check_head, check_network_inputs
from .backends import JVPOps, check_backend, check_tangent_grad, ops_for
from .tangent_grad import differentiable_tangent_ops


class JVPNetwork(nn.Module):
    """Base class of every network: dispatches between the plain forward and the three JVP backends, validates inputs.

    What a network provides (the protocol; `meanflow.models` has DiT and MLPNet, docs/byo_network.md a worked
    example):
    - `data_shape` (the shape of one sample) and `num_classes` (0: unconditional; else labels 0..num_classes-1 and the
      null class num_classes, used for guidance);
    - `_forward_plain(z, t, h, y, **conditions)`: the ordinary forward (what `autograd` differentiates);
    - `_forward_jvp(z, t, h, y, z_dot, t_dot, h_dot, ops, **conditions) -> (u, u_dot)`: the same network with its
      tangent, written with the op table `ops` (mfkernels.ops.JVPOps: linear, attention, layernorm_modulate, ...), so
      that `explicit` (pure torch) and `fused` (Triton) share this one code path.
    Optional:
    - `conditions`: names of extra per-row inputs, each a float tensor (B,) passed as a keyword (e.g. iMF's
      ("omega", "t_min", "t_max")). They carry no tangent. Every call must pass all of them.
    - `heads = ("u", "v")`: a second output head (iMF's instantaneous-velocity head). Then `_forward_plain` takes
      `head=None | "u" | "v"` and returns (u, v), u or v; `_forward_jvp` returns (u, u_dot, v) (only u has a tangent:
      the v-branch runs primal-only) or, with head="u", (u, u_dot).
    """

    num_classes: int = 0
    data_shape: tuple[int, ...] = ()
    heads: tuple[str, ...] = ("u",)
    conditions: tuple[str, ...] = ()

    def __init__(self, backend: str = "explicit"):
        super().__init__()
        self.backend = check_backend(backend)
        self.check_inputs = True  # the range checks of t and h cost one host sync per call; trainers may turn it off

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, z, t, h, y=None, tangents=None, backend: str | None = None, *, head: str | None = None,
                tangent_grad: bool = False, **conditions):
        """u = net(z, t, h, y), or (u, u_dot) with tangents=(z_dot, t_dot, h_dot) (kt <= B rows: the first kt).

        Two-head networks: (u, v) / (u, u_dot, v); head="v" gives v alone (no tangents), head="u" u alone.
        `tangent_grad`: u_dot differentiable (gradients flow through the JVP to the parameters); False: detached.
        `conditions`: the network's extra per-row inputs by name (see the class docstring)."""
        backend = check_backend(backend or self.backend)
        check_tangent_grad(backend, tangent_grad, tangents is not None)
        kt = check_network_inputs(self, z, t, h, y, tangents, check_values=self.check_inputs)
        check_conditions(self, conditions, z.shape[0], z.device)
        extra = dict(conditions)
        if len(self.heads) > 1:
            check_head(self, head, tangents)
            extra["head"] = head
        elif head not in (None, "u"):
            raise ValueError(f"{type(self).__name__} has one output head ('u'); got head={head!r}")
        if tangents is None:
            # The primal alone (guidance forwards, sampling, flow matching) is the plain forward on every backend:
            # cuBLAS + torch's flash SDPA + eager glue. The fused kernels at kt = 0 are host-bound and slower here
            # (bench/results/h200-2026-11-26-b/forward.json; docs/design.md, 'Backends').
            return self._forward_plain(z, t, h, y, **extra)
        z_dot, t_dot, h_dot = tangents
        if backend == "autograd":
            with differentiable_tangent_ops() if tangent_grad else contextlib.nullcontext():
                out = self._forward_autograd_jvp(z, t, h, y, z_dot, t_dot, h_dot, kt, extra)
        else:
            # inputs validated above: the layers call the ops without re-checking what they build from them; the
            # table's tangent_grad is the call's (False: the stop-gradient ops, which save no tangent)
            ops = ops_for(backend, checked=False, tangent_grad=tangent_grad)
            out = self._forward_jvp(z, t, h, y, z_dot, t_dot, h_dot, ops, **extra)
        if not tangent_grad:
            return (out[0], out[1].detach()) + tuple(out[2:])
        self._check_tangent_graph(out[1], backend)
        return tuple(out)

    def _check_tangent_graph(self, u_dot: torch.Tensor, backend: str) -> None:
        """tangent_grad=True promised a differentiable u_dot: refuse one that carries no graph although the network
        has parameters to train (its `_forward_jvp` computed the tangent without grad, or detached it), rather than
        return a gradient that silently misses the tangent's share."""
        if u_dot.requires_grad or u_dot.shape[0] == 0 or not torch.is_grad_enabled():
            return
        if any(p.requires_grad for p in self.parameters()):
            raise RuntimeError(f"{type(self).__name__}: tangent_grad=True on the {backend!r} backend returned a u_dot "
                               f"without a graph: the network's tangent computation cut it (torch.no_grad / .detach() "
                               f"in _forward_jvp, or ops of its own that ignore the table's tangent_grad). Compute the "
                               f"tangent with the op table's ops (JVPOps.tangent_grad_enabled says when to record "
                               f"a computation of your own), or use backend='autograd'")

    def _forward_autograd_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, kt, extra):
        """What peers do: torch.func.jvp over the plain forward on the WHOLE batch (tangents zero-padded to B)."""
        pad = z.shape[0] - kt
        tangents = tuple(torch.cat([d, d.new_zeros((pad,) + d.shape[1:])]) for d in (z_dot, t_dot, h_dot))
        # torch's fused SDPA kernels have no forward-mode rule, and its math SDPA breaks under CUDA autocast in forward
        # mode (softmax's tangent comes out fp32 for a bf16 primal): attention runs as the plain math formula here.
        with math_attention():
            out, out_dot = torch.func.jvp(lambda z_, t_, h_: self._forward_plain(z_, t_, h_, y, **extra), (z, t, h),
                                          tangents)
        if isinstance(out, tuple):  # two heads: (u, v); only u's tangent is returned
            return out[0], out_dot[0][:kt], out[1]
        return out, out_dot[:kt]

    def _forward_plain(self, z, t, h, y, **extra):  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, ops: JVPOps, **extra):  # pragma: no cover - abstract
        raise NotImplementedError


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


__all__ = ["JVPNetwork", "count_parameters", "unwrap"]
