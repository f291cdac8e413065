"""Any nn.Module as a network every objective trains: the plain call is the module itself, the tangent call is
torch.func.jvp over it with the fused attention (docs/any_network.md).

    net = wrap(diffusers_dit)                                     # a diffusers transformer: its adapter is found
    net = wrap(my_module, call=my_call, data_shape=(4, 32, 32))   # anything else: say how (z, t, h, y) enter
    loss, stats = MeanFlowLoss(model=net)(net, x, y)

The network (a JVPNetwork) computes, for the protocol's call u(z, t, h | y) with tangents over the first kt rows:
- plain:   u = call(module, z, t, h, y, **conditions);
- tangent: (u[:kt], u_dot) = torch.func.jvp(call, (z[:kt], t[:kt], h[:kt]), (z_dot, t_dot, h_dot)) inside
  mfkernels.jvp_attention() (every SDPA call with a tangent runs the fused forward + JVP kernel), u[kt:] the plain call
  on the other rows; u_dot detached (the objectives' targets are stop-gradient), or with `tangent_grad=True`
  differentiable (TVM): torch.func.jvp under grad mode records the tangent's graph, the fused attention's tangent output
  backpropagates through its tangent backward, and the layer norms run as their plain formula
  (meanflow/models/tangent_grad.py: torch's forward-mode layer_norm is not twice differentiable correctly; batch /
  instance norm are refused). tangent="fd" refuses tangent_grad (a finite difference is not the JVP's gradient).

Backends (JVPNetwork.backend): "fused" as above; "explicit" the same jvp with torch's math attention (the reference);
"autograd" torch.func.jvp over the whole batch (tangents zero-padded) with math attention, what peers run.

Options beyond the protocol:
- tangent="fd": a forward difference instead, u_dot = (u(x + eps x_dot) - u(x)) / eps over the kt rows with one
  extra no-grad forward (fd_eps, default 1e-3: float32; see bench/results/cpu/wrapped.md for the error it costs);
- tangent_pass="separate": the tangent rows' jvp runs without grad and the primal is one plain call over all rows with
  grad. It costs one more forward over the kt rows, keeps any hook of a wrapper (FSDP2, DDP) out of the functorch
  transform and records no reverse graph for the tangent (docs/any_network.md, "DDP and FSDP2").
- heads: ("u", "logvar") adds sCM's LogVarHead (zero-initialised, evaluated inside forward like the built-in
  networks'); ("u", "v") gives iMF a v head that is the network itself at h = 0 (u(z, t, t) = v(z, t)), one more
  forward. conditions (iMF's omega, t_min, t_max) and h enter through `time_embedders`: modules whose output is the
  time embedding get h's and the conditions' embeddings added (zero-initialised, so the wrapped module starts as the
  original); the diffusers adapters name them, a `call` may take h itself instead.

The module must treat batch rows independently (no BatchNorm in training mode, no cross-row attention) and draw no
randomness of its own during training (dropout makes the plain and tangent calls see different masks; the diffusers
adapters switch the label dropout of DiT / PixArt off, the objectives drop labels themselves).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .heads import ConditionEmbedders, LogVarHead, NetworkSpec
from .layers import TimestepEmbedder
from .network import JVPNetwork
from .tangent_grad import differentiable_tangent_ops

Call = Callable[..., torch.Tensor]   # call(module, z, t, h, y, **conditions) -> u (z's shape)
TANGENTS = ("exact", "fd")
TANGENT_PASSES = ("joint", "separate")
SHARD_NAMES = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")
COMPILE_REFUSAL = ("the tangent call of a wrapped network (torch.func.jvp over the module) is not compiled: Dynamo "
                   "cannot trace the attention routing inside the transform and runs it eagerly (or fails with "
                   "fullgraph=True), and where it does trace a custom jvp it drops it silently (pytorch #192985). "
                   "Compile the module's plain call yourself if you need it; train with train.compile off "
                   "(measurement: bench/results/cpu/wrapped.md)")


class WrappedNetwork(JVPNetwork):
    """An nn.Module behind the JVPNetwork protocol (module docstring). Build it with `wrap`."""

    def __init__(self, module: nn.Module, call: Call, *, data_shape: Sequence[int], num_classes: int = 0,
                 spec: NetworkSpec | None = None, time_embedders: Sequence[nn.Module] = (),
                 backend: str = "fused", tangent: str = "exact", fd_eps: float = 1e-3,
                 tangent_pass: str = "joint"):
        super().__init__(backend)
        spec = spec or NetworkSpec()
        unknown = [h for h in spec.heads if h not in ("u", "v", "logvar")]
        if spec.heads[:1] != ("u",) or unknown or len(spec.heads) > 2:
            raise ValueError(f"a wrapped network has the heads ('u',), ('u', 'v') or ('u', 'logvar'); got "
                             f"{spec.heads}")
        if tangent not in TANGENTS:
            raise ValueError(f"tangent must be one of {TANGENTS}; got {tangent!r}")
        if not (isinstance(fd_eps, float) and fd_eps > 0):
            raise ValueError(f"fd_eps must be a float > 0; got {fd_eps!r}")
        if tangent_pass not in TANGENT_PASSES:
            raise ValueError(f"tangent_pass must be one of {TANGENT_PASSES}; got {tangent_pass!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0; got {num_classes}")
        self.model = module
        # an adapter module is registered (its parameters train and checkpoint with the network); a function is not
        self.adapter = call if isinstance(call, nn.Module) else None
        self._call_fn = None if isinstance(call, nn.Module) else call
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = int(num_classes)
        self.heads, self.conditions = tuple(spec.heads), tuple(spec.conditions)
        self.tangent, self.fd_eps, self.tangent_pass = tangent, fd_eps, tangent_pass
        self.logvar = LogVarHead() if "logvar" in self.heads else None
        self._injection: dict | None = None   # h and the conditions of the call in progress, for the hooks
        self._install_time_injection(time_embedders)

    # ------------------------------------------------------------------------------------- h and the conditions
    def _install_time_injection(self, targets: Sequence[nn.Module]) -> None:
        """One zero-initialised embedder of h (and of each condition) per embedding width, added to the output of
        every target module by a forward hook."""
        targets = list(targets)
        if not targets and self.conditions:
            raise ValueError(f"the conditions {list(self.conditions)} enter through time_embedders (modules whose "
                             f"output is the time embedding); name them, or take the conditions in `call`")
        widths = sorted({_output_width(m) for m in targets})
        self.h_embedder = nn.ModuleDict({str(w): _zero_output(TimestepEmbedder(w)) for w in widths})
        self.cond_embedder = (nn.ModuleDict({str(w): _zero_output(ConditionEmbedders(w, self.conditions))
                                             for w in widths}) if self.conditions else None)
        for m in targets:
            m.register_forward_hook(self._add_time_injection)

    def _add_time_injection(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        state = self._injection
        if state is None:                     # the module called on its own, outside this network
            return output
        width = output.shape[-1]
        if width not in state["cache"]:       # once per call and width, however many modules are hooked
            key = str(width)
            extra = self.h_embedder[key](state["h"])
            if self.cond_embedder is not None:
                extra = extra + self.cond_embedder[key](state["conditions"])
            state["cache"][width] = extra
        extra = state["cache"][width].to(output.dtype)
        return output + extra.reshape(extra.shape[:1] + (1,) * (output.dim() - 2) + extra.shape[1:])

    @contextlib.contextmanager
    def _injecting(self, h: torch.Tensor, conditions: dict):
        previous = self._injection
        self._injection = {"h": h, "conditions": conditions, "cache": {}}
        try:
            yield
        finally:
            self._injection = previous

    # ------------------------------------------------------------------------------------------- the calls
    def _u(self, z, t, h, y, conditions: dict) -> torch.Tensor:
        with self._injecting(h, conditions):
            u = (self.adapter or self._call_fn)(self.model, z, t, h, y, **conditions)
        if not isinstance(u, torch.Tensor) or u.shape != z.shape:
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"the wrapped call must return one tensor shaped like z {tuple(z.shape)}; got {got}")
        return u

    def _extra_head(self, z, t, y, conditions):
        """The second head (primal, with grad): logvar(t), or v = u at h = 0."""
        if self.heads[1] == "logvar":
            return self.logvar(t)
        return self._u(z, t, torch.zeros_like(t), y, conditions)

    def _forward_plain(self, z, t, h, y, head=None, **conditions):
        if head == "logvar":
            return self.logvar(t)
        if head == "v":
            return self._u(z, t, torch.zeros_like(t), y, conditions)
        u = self._u(z, t, h, y, conditions)
        if len(self.heads) == 1 or head == "u":
            return u
        return u, self._extra_head(z, t, y, conditions)

    def _forward_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, ops, head=None, **conditions):
        attention = "fused" if ops.name == "fused" else "math"
        if ops.tangent_grad:
            if self.tangent == "fd":
                raise NotImplementedError("tangent_grad=True: a wrapped network with tangent='fd' has a "
                                          "finite-difference tangent, whose gradient is not the JVP's; use "
                                          "tangent='exact'")
            with differentiable_tangent_ops():
                u, u_dot = self._tangent_call(z, t, h, y, conditions, (z_dot, t_dot, h_dot), attention, True)
        else:
            u, u_dot = self._tangent_call(z, t, h, y, conditions, (z_dot, t_dot, h_dot), attention)
        if len(self.heads) == 1 or head == "u":
            return u, u_dot
        return u, u_dot, self._extra_head(z, t, y, conditions)

    def _forward_autograd_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, kt, extra):
        """torch.func.jvp over the whole batch (tangents zero-padded to B) with torch's math attention."""
        head = extra.pop("head", None)
        pad = z.shape[0] - kt
        tangents = tuple(torch.cat([d, d.new_zeros((pad,) + d.shape[1:])]) for d in (z_dot, t_dot, h_dot))
        u, u_dot = self._jvp(z, t, h, y, extra, tangents, "math")
        if len(self.heads) == 1 or head == "u":
            return u, u_dot[:kt]
        return u, u_dot[:kt], self._extra_head(z, t, y, extra)

    def _jvp(self, z, t, h, y, conditions: dict, tangents, attention: str):
        from mfkernels.jvp_routing import jvp_attention

        if torch.compiler.is_compiling():
            raise NotImplementedError(COMPILE_REFUSAL)
        with jvp_attention(attention):
            return torch.func.jvp(lambda z_, t_, h_: self._u(z_, t_, h_, y, conditions), (z, t, h), tangents)

    def _tangent_call(self, z, t, h, y, conditions, tangents, attention, tangent_grad: bool = False):
        """(u over all B rows, with grad; u_dot over the first kt rows, recorded by autograd if tangent_grad)."""
        kt, batch = tangents[0].shape[0], z.shape[0]
        head = _rows(slice(0, kt), z, t, h, y, conditions)
        if self.tangent == "fd" or self.tangent_pass == "separate" or kt == 0:
            u = self._u(z, t, h, y, conditions)
            if kt == 0:
                return u, u[:0].detach()
            with torch.set_grad_enabled(tangent_grad and torch.is_grad_enabled()):
                if self.tangent == "fd":
                    return u, self._finite_difference(u[:kt].detach(), *head, tangents)
                return u, self._jvp(*head, tangents, attention)[1]
        u_head, u_dot = self._jvp(*head, tangents, attention)
        if kt == batch:
            return u_head, u_dot
        u_tail = self._u(*_rows(slice(kt, batch), z, t, h, y, conditions))
        return torch.cat([u_head, u_tail]), u_dot

    def _finite_difference(self, u0, z, t, h, y, conditions, tangents) -> torch.Tensor:
        """(u(x + eps x_dot) - u(x)) / eps, the difference in float32 or wider."""
        eps = self.fd_eps
        z_dot, t_dot, h_dot = tangents
        u1 = self._u(z + eps * z_dot.to(z.dtype), t + eps * t_dot, h + eps * h_dot, y, conditions)
        acc = torch.promote_types(u1.dtype, torch.float32)
        return ((u1.to(acc) - u0.to(acc)) / eps).to(u0.dtype)

    compile_refusal = COMPILE_REFUSAL   # meanflow.training.compile refuses this network with this reason

    # ------------------------------------------------------------------------------------------- parallel
    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP2 shards one by one (meanflow.training.parallel): the adapter's choice, else every module of
        the wrapped module's block lists (SHARD_NAMES). A block must run its parameters only inside its own forward
        (FSDP2 gathers them there)."""
        if self.adapter is not None and hasattr(self.adapter, "shard_units"):
            return self.adapter.shard_units(self.model)
        units = []
        for name in SHARD_NAMES:
            found = getattr(self.model, name, None)
            if isinstance(found, nn.ModuleList):
                units += list(found)
        return units


def _rows(rows: slice, z, t, h, y, conditions: dict):
    return z[rows], t[rows], h[rows], (None if y is None else y[rows]), {k: v[rows] for k, v in conditions.items()}


def _output_width(module: nn.Module) -> int:
    """The width of a time-embedding module's output: its last Linear's out_features."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"time_embedders: {type(module).__name__} has no nn.Linear whose out_features give the "
                         f"embedding width")
    return linears[-1].out_features


def _zero_output(module: nn.Module) -> nn.Module:
    """Zero every output Linear of a TimestepEmbedder (or of each in ConditionEmbedders): it adds 0 at first."""
    for m in module.modules():
        if isinstance(m, TimestepEmbedder):
            nn.init.zeros_(m.fc2.weight)
            nn.init.zeros_(m.fc2.bias)
    return module


def wrap(module: nn.Module, *, call: Call | None = None, data_shape: Sequence[int] | None = None,
         num_classes: int | None = None, spec: NetworkSpec | None = None,
         time_embedders: Sequence[nn.Module] | None = None, backend: str = "fused", tangent: str = "exact",
         fd_eps: float = 1e-3, tangent_pass: str = "joint", **adapter_options) -> WrappedNetwork:
    """`module` as a meanflow network (a WrappedNetwork; module docstring of meanflow.models.wrapped).

    call: how the protocol's (z, t, h, y, **conditions) enter the module, `call(module, z, t, h, y, **conditions)
    -> u` shaped like z (t, h in [0, 1], t = 1 is noise; y the labels with num_classes as the null class, or None).
    None: the module must be a diffusers transformer with an adapter (meanflow.models.diffusers_adapters.ADAPTERS),
    which also gives data_shape, num_classes and time_embedders by default; adapter_options go to it (time_scale,
    text_tokens).
    spec: the heads and conditions the objective calls with (objective.network_spec(); default: u alone).
    time_embedders: modules whose output gets h's (and the conditions') embeddings added (see the module docstring).
    backend, tangent, fd_eps, tangent_pass: see the module docstring.
    """
    if call is None:
        from .diffusers_adapters import adapter_for

        adapter = adapter_for(module, data_shape=data_shape, num_classes=num_classes, **adapter_options)
        call = adapter
        data_shape = adapter.data_shape
        num_classes = adapter.num_classes
        time_embedders = adapter.time_embedders(module) if time_embedders is None else time_embedders
    elif adapter_options:
        raise TypeError(f"wrap: {sorted(adapter_options)} are options of the diffusers adapters; with call= set, "
                        f"handle them in the call")
    if data_shape is None:
        raise ValueError("wrap(module, call=...): pass data_shape, the shape of one sample (e.g. (4, 32, 32))")
    return WrappedNetwork(module, call, data_shape=data_shape, num_classes=num_classes or 0, spec=spec,
                          time_embedders=time_embedders or (), backend=backend, tangent=tangent, fd_eps=fd_eps,
                          tangent_pass=tangent_pass)


__all__ = ["WrappedNetwork", "wrap", "TANGENTS", "TANGENT_PASSES"]
