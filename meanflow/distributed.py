"""Multi-GPU / multi-node plumbing: process groups from torchrun's variables, DDP / FSDP2 wrapping, a sharded EMA,
collectives for logging and sampling, and the state-dict side of distributed checkpoints.

    ctx = setup("auto")                 # torchrun: NCCL on cuda:LOCAL_RANK (gloo on CPU); plain python: rank 0 of 1
    model = wrap_model(net, "ddp", ctx)  # or "fsdp" (fully_shard per DiT block + root) or "none"
    ...
    cleanup(ctx)                        # destroys the process group only if `setup` created it

Launch with `torchrun --nproc_per_node=8 -m meanflow train ...` (single node) or with `--nnodes N --rdzv-backend c10d
--rdzv-endpoint HOST:PORT` (multi node). `setup` reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which
torchrun sets; with no WORLD_SIZE (or WORLD_SIZE=1) everything runs in one process, exactly as before.

Why the model's own forward carries the tangents (DESIGN.md 3): DDP's gradient hooks and FSDP's all-gathers are tied to
the wrapper's forward. The loss calls `model(z, t, h, y, tangents=...)` on the wrapper, so every backend (autograd's
torch.func.jvp included, which runs INSIDE that forward) gets synchronised gradients. The explicit / fused backends
call each block's `forward_jvp` directly; under FSDP2 that method is registered with `register_fsdp_forward_method`, so
the block's parameters are all-gathered for it just as for `forward`.

EMA under FSDP: the EMA copies are made from the full model before sharding and then sharded exactly like it, so each
rank updates only its own shard (no communication per step) and the checkpoint stores them sharded (DCP reshards on a
world-size change). Sampling grids, evaluation and weight export gather the full EMA weights on rank 0
(`ShardedEMA.gather`, a collective every rank must enter).
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .ema import EMA, decay_key

PARALLEL_MODES = ("ddp", "fsdp", "none")


# ------------------------------------------------------------------------------------------------ process group
@dataclass
class DistContext:
    """Where this process stands: rank of world_size, its device and (when distributed) the collective backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owned: bool = False  # setup() created the process group (so cleanup() destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def _device_for(name: str, local_rank: int, distributed: bool) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name} requested but CUDA is not available; use cpu (or auto)")
        if distributed:  # one GPU per process: torchrun's LOCAL_RANK picks it
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                                   f"launch at most that many processes per node (--nproc_per_node)")
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """The process group of a torchrun launch (NCCL for CUDA, gloo for CPU), or a single-process context.

    Idempotent: when a process group already exists (a test, a notebook, an outer launcher) it is used as is and left
    alone by `cleanup`. `timeout_s` bounds every collective (a rank that died makes the others fail instead of hang).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if "LOCAL_RANK" not in os.environ:
            local_rank = rank % local_world
        dev = _device_for(device, local_rank, world > 1)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local_rank, local_world, dev, dist.get_backend(), owned=False)
    world = env_world_size()
    if world <= 1:
        return DistContext(device=_device_for(device, 0, False))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun (which sets RANK, "
                               f"LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
    dev = _device_for(device, local_rank, True)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dev, backend, owned=True)


def cleanup(ctx: DistContext | None) -> None:
    """Tear down the process group this process created. All ranks meet at a barrier first: a rank that tears down
    while another still works makes the store (served by rank 0) vanish under it, and gloo then aborts that rank
    ("terminate called without an active exception", seen once in CI on the 2-rank CPU test)."""
    if ctx is not None and ctx.owned and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a rank already died: tear down anyway, the launcher reports the failure
            pass
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (picklable objects; a no-op in one process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a float tensor (every rank gets it); NaN / inf anywhere propagate to every rank."""
    if not is_initialized():
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)  # SUM, not AVG: gloo has no AVG
    return out / dist.get_world_size()


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The deterministic reseed of a rank's process RNGs after a world-size change: a function of (seed, step, rank)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(step), int(rank), 0x6D66]).generate_state(1, np.uint32)[0])


# ------------------------------------------------------------------------------------------------- wrapping
def _shard_units(net: nn.Module) -> list[nn.Module]:
    """The modules fully_shard wraps one by one (then the root): a DiT's blocks, an MLPNet's layers."""
    for name in ("blocks", "layers"):
        units = getattr(net, name, None)
        if isinstance(units, nn.ModuleList) and len(units):
            return list(units)
    return []


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
    for unit in _shard_units(net):
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


# ---------------------------------------------------------------------------------------------------- gather
def gather_rows(rows: torch.Tensor, count: int, capacity: int, device: torch.device) -> list[torch.Tensor] | None:
    """Rank 0 gets every rank's first `count` rows of `rows` (padded to `capacity` rows for the collective); the
    others get None. One process: [rows[:count]]."""
    if not is_initialized():
        return [rows[:count]]
    pad = torch.zeros((capacity,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=device)
    pad[:count] = rows[:count].to(device)
    counts = torch.tensor([count], device=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    got_counts = [torch.zeros_like(counts) for _ in range(world)] if rank == 0 else None
    got = [torch.zeros_like(pad) for _ in range(world)] if rank == 0 else None
    dist.gather(counts, got_counts, dst=0)
    dist.gather(pad, got, dst=0)
    if rank != 0:
        return None
    return [g[:int(c)].cpu() for g, c in zip(got, got_counts)]
