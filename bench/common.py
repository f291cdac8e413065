"""Shared benchmark plumbing: environment facts, timing, and result files.

Timing: on CUDA `triton.testing.do_bench` (median with 20/80% quantiles; it flushes L2 between runs); on CPU a
repeated perf_counter timer (median of `reps` runs after `warmup` runs). Warm-up is always excluded.
Result files: one JSON per run, {"meta": {device, torch, triton, date, host}, "rows": [...]}.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def env_info(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "threads": torch.get_num_threads(),
    }


def _summary(times: list[float]) -> dict:
    """Median with 20th / 80th percentiles of a list of ms."""
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3]}


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 2, reps: int = 5,
            cuda_warmup_ms: int = 25, cuda_rep_ms: int = 100, grad_to_none=None) -> dict:
    """Median time of fn() in ms, with p20/p80. `grad_to_none`: tensors whose .grad is reset before every run."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=cuda_warmup_ms, rep=cuda_rep_ms, quantiles=[0.5, 0.2, 0.8],
                                 grad_to_none=grad_to_none)
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def time_interleaved(fns: list[Callable[[], object]], *, warmup: int = 2, reps: int = 5) -> list[dict]:
    """CPU timing of several functions round-robin (each rep times every fn once): slow drifts in machine load hit all
    of them alike, so their ratios stay meaningful on a shared machine. Median ms with p20/p80 per fn."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [_summary(ts) for ts in times]


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak allocated CUDA memory of one call of fn, in MiB (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def write_results(path: str | os.PathLike, bench: str, device: str, rows: list[dict], **extra) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"bench": bench, "meta": {**env_info(device), **extra}, "rows": rows}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path
