"""Process groups from torchrun's variables and the collectives every layer may use (logging, sampling, data).

    ctx = setup("auto")                 # torchrun: NCCL on cuda:LOCAL_RANK (gloo on CPU); plain python: rank 0 of 1
    ...
    cleanup(ctx)                        # destroys the process group only if `setup` created it

Launch with `torchrun --nproc_per_node=8 -m meanflow train ...` (single node) or with `--nnodes N --rdzv-backend c10d
--rdzv-endpoint HOST:PORT` (multi node). `setup` reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which
torchrun sets; with no WORLD_SIZE (or WORLD_SIZE=1) everything runs in one process, exactly as before.
Model wrapping (DDP / FSDP2), the sharded EMA and distributed checkpoint state live in meanflow.training.parallel.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

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


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum over ranks (every rank gets it): a flag raised on any rank is raised on all."""
    if not is_initialized():
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The deterministic reseed of a rank's process RNGs after a world-size change: a function of (seed, step, rank)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(step), int(rank), 0x6D66]).generate_state(1, np.uint32)[0])


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
