"""The rank side's common frame for the multi-process tests (tests/_*dist_worker.py): 2 gloo ranks on CPU, one torch
thread each, a traceback file per failing rank (mp.spawn reports only that a rank died), a barrier before leaving."""
from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@contextmanager
def gloo_rank(rank: int, world: int, port: int, out: str) -> Iterator[Path]:
    """Join the process group as `rank` of `world` and yield the output folder; on failure the rank's traceback is
    written to OUT/rank<rank>.error.txt (the parent test prints it) and re-raised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    out_dir = Path(out)
    try:
        yield out_dir
        dist.barrier()
    except BaseException:
        (out_dir / f"rank{rank}.error.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
