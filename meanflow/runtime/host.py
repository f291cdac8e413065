"""The machine a process runs on: which device, how many CPU threads."""
from __future__ import annotations

import os

import torch


def check_device(name: str) -> None:
    """ValueError (bad input) unless `name` is auto, cpu, cuda or cuda:N and usable on this machine."""
    if name in ("auto", "cpu"):
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N") from None
    if device.type != "cuda":
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name} requested but CUDA is not available on this machine; use cpu (or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name} requested but only {torch.cuda.device_count()} GPU(s) are visible")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    return torch.device(name)


def auto_threads(share: int = 1) -> int:
    """The automatic thread count: the cores not busy with other processes (1-minute load average), >= 1, divided
    among `share` processes."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, round(cores - busy)) // max(1, share))


def set_threads(threads: int, share: int = 1) -> int:
    """CPU threads for torch. 0 = auto: the cores not busy with other processes (1-minute load average), >= 1,
    divided among `share` processes (torchrun's LOCAL_WORLD_SIZE: the ranks of one node share its cores).

    Why auto: on a shared machine, OpenMP threads that wait for a descheduled sibling at every parallel region make 2
    threads several times SLOWER than 1 (docs/design.md, 'Host threads on CPU'). The automatic choice
    follows the machine's load, so it can differ between a run and its resume: `meanflow train --resume` reuses the
    count the checkpoint recorded (CPU results are bit-exact only at the same count).
    """
    if threads <= 0:
        threads = auto_threads(share)
    torch.set_num_threads(threads)
    return threads
