"""Model wrapping for several processes: DDP / FSDP2, a sharded EMA, gradient sync, and the state-dict side of
distributed checkpoints. Process groups and collectives: meanflow.runtime.distributed.

    ctx = setup("auto")                  # meanflow.runtime.distributed
    model = wrap_model(net, "ddp", ctx)  # or "fsdp" (fully_shard per DiT block + root) or "none"

Why the model's own forward carries the tangents (docs/design.md, 'Backends'): DDP's gradient hooks and FSDP's
all-gathers are tied to the wrapper's forward. The loss calls `model(z, t, h, y, tangents=...)` on the wrapper, so
every backend (autograd's torch.func.jvp included, which runs INSIDE that forward) gets synchronised gradients. The
explicit / fused backends call each block's `forward_jvp` directly; under FSDP2 that method is registered with
`register_fsdp_forward_method`, so the block's parameters are all-gathered for it just as for `forward`.

EMA under FSDP: the EMA copies are made from the full model before sharding and then sharded exactly like it, so each
rank updates only its own shard (no communication per step; TVM's teacher is such a copy, also called by the loss) and the checkpoint stores them sharded (DCP reshards on a
world-size change). Sampling grids, evaluation and weight export gather the full EMA weights on rank 0
(`ShardedEMA.gather`, a collective every rank must enter).
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.distributed import DistContext
from .ema import EMA, decay_key

PARALLEL_MODES = ("ddp", "fsdp", "none")


# ------------------------------------------------------------------------------------------------- wrapping
def shard_units(net: nn.Module) -> list[nn.Module]:
    """The modules fully_shard wraps one by one (then the root), and per-block compile compiles: a DiT's blocks (and
    its iMF v-branch), the iMF network's shared / u / v blocks, an MLPNet's layers (and v-branch layers); a network
    with a `shard_units()` method (a wrapped module: meanflow.models.wrapped) names its own."""
    if callable(getattr(net, "shard_units", None)):
        return list(net.shard_units())
    units = []
    for name in ("blocks", "shared_blocks", "u_blocks", "v_blocks", "layers", "v_layers"):
        found = getattr(net, name, None)
        if isinstance(found, nn.ModuleList):
            units += list(found)
    return units


def mixed_precision_policy(precision: str):
    """FSDP2's MixedPrecisionPolicy for a resolved precision ('bf16': bf16 compute copies, fp32 gradient reduction).

    cast_forward_inputs is off: the times t, h must stay fp32 (bf16 would round t to 1/256 steps, and h = t - r is
    often tiny) and the residual stream stays fp32 as under autocast; the trainer's bf16 autocast does the casting.
    """
    if precision != "bf16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def device_mesh(ctx: DistContext):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(ctx.device.type, (ctx.world_size,))


def shard_model(net: nn.Module, mesh, mp_policy=None) -> nn.Module:
    """FSDP2: fully_shard each block (its forward_jvp registered as a forward method) and then the root, in place."""
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for unit in shard_units(net):
        fully_shard(unit, **kwargs)
        if hasattr(unit, "forward_jvp"):
            register_fsdp_forward_method(unit, "forward_jvp")
    fully_shard(net, **kwargs)
    if hasattr(net, "forward_jvp"):
        register_fsdp_forward_method(net, "forward_jvp")
    return net


def _ddp(net: nn.Module, ctx: DistContext) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
    # The only buffers (the DiT's fixed position embedding) are identical on every rank: no per-forward broadcast.
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:  # torch >= 2.13
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    from .cuda_graphs import CUDAGraphModel, graphed_ddp

    if isinstance(net, CUDAGraphModel):  # train.cuda_graphs: DDP built on the graphs' capture stream
        return graphed_ddp(net, **kwargs)
    return DDP(net, **kwargs)


def wrap_model(net: nn.Module, parallel: str, ctx: DistContext, *, precision: str = "fp32", mesh=None) -> nn.Module:
    """DDP(net), or net sharded in place by FSDP2, or net itself (one process, or parallel='none')."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {PARALLEL_MODES}; got {parallel!r}")
    if not ctx.distributed or parallel == "none":
        return net
    if parallel == "ddp":
        return _ddp(net, ctx)
    # FSDP2 warns that the root returns a view (the unpatchified output); the loss never modifies it in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return shard_model(net, mesh if mesh is not None else device_mesh(ctx), mixed_precision_policy(precision))


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on non-final micro-batches of gradient accumulation
    (DDP: no_sync(); FSDP2: set_requires_gradient_sync(False)); gradients then accumulate locally."""
    if enabled:
        yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor as is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def grad_norm_and_clip(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """The global gradient norm (all shards of FSDP gradients together), clipping to max_norm (inf: no clipping)."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):  # FSDP: a partial norm over this rank's shards -> the global one
        total = total.full_tensor()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


# ------------------------------------------------------------------------------------------------- sharded EMA
class ShardedEMA(EMA):
    """EMA copies sharded like an FSDP2 model: each rank averages only its own shard.

    Built from the full (not yet sharded) model; `update(model)` takes the sharded model. `gather(decay)` is a
    collective that returns the full EMA module on rank 0 (None elsewhere), built by `factory` and loaded with the
    gathered weights.
    """

    def __init__(self, model: nn.Module, decays, mesh, factory: Callable[[], nn.Module]):
        super().__init__(model, decays)
        self.factory = factory
        for m in self.models.values():
            shard_model(m, mesh)
            m.requires_grad_(False)
        self._full: nn.Module | None = None

    @property
    def default(self) -> nn.Module:
        raise RuntimeError("the EMA is sharded (FSDP): use ShardedEMA.gather() on every rank for a full module")

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [local(p).detach().float() for p in model.parameters()]
        for d in self.decays:
            ema = self.models[decay_key(d)]
            # A copy that was called (TVM's teacher) may hold its root's parameters unsharded: FSDP2 keeps the root
            # gathered after a forward for the backward, which a no-grad call never runs. Shard them again first.
            for m in ema.modules():
                if is_fsdp(m):
                    m.reshard()
            torch._foreach_lerp_([local(p) for p in ema.parameters()], params, 1.0 - d)

    def state_dict(self):
        raise RuntimeError("a sharded EMA is saved through the distributed checkpoint (ema_state_dicts)")

    def gather(self, decay: float | None = None, device=None) -> nn.Module | None:
        """The full EMA module on rank 0 (eval mode, no grad), None on the other ranks. Every rank must call it."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        key = decay_key(self.decays[0] if decay is None else decay)
        full = get_model_state_dict(self.models[key], options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        if self._full is None:
            self._full = self.factory().float().eval().requires_grad_(False)
        self._full.load_state_dict(full)
        if device is not None:
            self._full.to(device)
        return self._full


# --------------------------------------------------------------------------------------- checkpoint state dicts
def get_train_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts keyed by parameter names, for DCP: sharded DTensors under FSDP, plain tensors
    otherwise (DDP's 'module.' prefix removed). On a fresh optimizer the state is created first (a zero-lr step)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def set_train_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict,
                    *, full: bool = False) -> None:
    """Load what `get_train_state` returned (after dcp.load filled it); full=True: from full (unsharded) state dicts,
    e.g. a single-process checkpoint loaded by a sharded run (each rank keeps its slice)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=full))


def get_module_state(module: nn.Module) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module)


def set_module_state(module: nn.Module, state: dict, *, full: bool = False) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=full))


def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """A plain `optimizer.state_dict()` (parameters numbered in `model.parameters()` order) keyed by parameter names,
    the form `set_train_state(..., full=True)` takes."""
    by_index = dict(enumerate(names))
    return {"state": {by_index[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [by_index[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


