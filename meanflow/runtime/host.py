"""The machine a process runs on: which device, how many CPU threads."""
from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available; use train.device=cpu (or auto)")
    return device


def set_threads(threads: int, share: int = 1) -> int:
    """CPU threads for torch. 0 = auto: the cores not busy with other processes (1-minute load average), >= 1,
    divided among `share` processes (torchrun's LOCAL_WORLD_SIZE: the ranks of one node share its cores).

    Why auto: on a shared machine, OpenMP threads that wait for a descheduled sibling at every parallel region make 2
    threads several times SLOWER than 1 (measured 3.7 s vs 0.6 s per step on 2 busy cores).
    """
    if threads <= 0:
        cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
        threads = max(1, min(cores, round(cores - busy)) // max(1, share))
    torch.set_num_threads(threads)
    return threads
