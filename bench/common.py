"""Shared benchmark plumbing: provenance of a run, timing, and result files.

Timing: on CUDA `triton.testing.do_bench` (median with 20/80% quantiles; it flushes L2 between runs); on CPU a
repeated perf_counter timer (median of `reps` runs after `warmup` runs). Warm-up is always excluded.

Result files: one JSON per run, {"bench": name, "meta": run_metadata(...), "rows": [...]}, written by
`write_results`. The metadata says what was measured and where, so that a reader can refuse to compare rows that do
not belong together (bench/report.py does):

    commit, dirty, dirty_files   the checkout (git), or MF_SOURCE_COMMIT when the tree was copied without .git
    source_digest                a hash of the source files as they were run (see `source_digest`): equal to the
                                 digest of the commit's tree exactly when the run used that commit unmodified
    torch, triton, cuda, cudnn, python, interpreter (TRITON_INTERPRET), threads, env (the knobs that change results)
    device, gpu (name, capability, SMs, memory; nvidia-smi: driver, clocks now / max, power, temperature)
    command (the exact command line), date (UTC), host

Files a benchmark writes in its own format can be given the same metadata afterwards, from the same checkout:
`python -m bench.common stamp FILE...` (gpu_suite.sh does it after every stage).
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]

# Environment variables that change what a benchmark measures: recorded with every result file.
RESULT_ENV = ("TRITON_INTERPRET", "MFKERNELS_AUTOTUNE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
              "TORCHINDUCTOR_MAX_AUTOTUNE", "TORCH_CUDNN_V8_API_DISABLED", "PYTORCH_CUDA_ALLOC_CONF",
              "CUBLAS_WORKSPACE_CONFIG", "MALLOC_ARENA_MAX", "SUITE_BUDGET", "SUITE_COMMAND",
              "MF_SOURCE_COMMIT")

# What source_digest covers: the code that runs in a benchmark (not results, notes or build outputs).
SOURCE_DIRS = ("mfkernels", "meanflow", "csrc", "bench", "tests", "scripts", "tools")
SOURCE_FILES = ("setup.py", "pyproject.toml")
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h", ".sh", ".toml")
SKIP_PARTS = ("__pycache__", "_build", "results", ".pytest_cache")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------ provenance
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _is_source(path: str) -> bool:
    parts = path.split("/")
    if any(p in SKIP_PARTS for p in parts):
        return False
    if len(parts) == 1:
        return path in SOURCE_FILES
    return parts[0] in SOURCE_DIRS and path.endswith(SOURCE_SUFFIXES)


def blob_sha1(data: bytes) -> str:
    """git's object id of a file's content (so a digest of files on disk equals one computed from a commit's tree)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _digest(entries: dict[str, str]) -> str:
    h = hashlib.sha256()
    for path in sorted(entries):
        h.update(f"{path} {entries[path]}\n".encode())
    return h.hexdigest()[:16]


def source_digest(root: Path = REPO) -> str:
    """sha256 over (path, git blob id) of the source files under `root` (SOURCE_DIRS / SOURCE_FILES with
    SOURCE_SUFFIXES, build outputs and results left out). Works without git: the GPU machine gets a copy of the
    working tree, not the repository."""
    entries = {}
    for top in (*SOURCE_DIRS, *SOURCE_FILES):
        base = root / top
        paths = [base] if base.is_file() else (sorted(base.rglob("*")) if base.is_dir() else [])
        for p in paths:
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not p.is_symlink() and _is_source(rel):
                entries[rel] = blob_sha1(p.read_bytes())
    return _digest(entries)


def commit_digest(commit: str) -> str | None:
    """source_digest of a commit's tree, from git (None when this checkout does not have the commit)."""
    out = _git("ls-tree", "-r", "--full-tree", commit)
    if out is None:
        return None
    entries = {}
    for line in out.splitlines():
        info, path = line.split("\t", 1)
        mode, kind, sha = info.split()
        if kind == "blob" and mode != "120000" and _is_source(path):
            entries[path] = sha
    return _digest(entries)


@functools.lru_cache(maxsize=1)
def source_info() -> dict:
    """commit (None if unknown), dirty (tracked files modified; None if unknown), dirty_files, source_digest, and
    how the commit was found (git, or MF_SOURCE_COMMIT for a tree copied without .git)."""
    info: dict = {"source_digest": source_digest()}
    head = _git("rev-parse", "HEAD")
    if head:
        status = _git("status", "--porcelain", "--untracked-files=no") or ""
        files = [line[3:] for line in status.splitlines() if line.strip()]
        info.update(commit=head.strip(), dirty=bool(files), dirty_files=files[:50], commit_source="git")
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch:
            info["branch"] = branch.strip()
        return info
    env = os.environ.get("MF_SOURCE_COMMIT")
    if env:
        # No repository here (a copied tree): the commit is what the sender says; the digest is the check.
        info.update(commit=env, dirty=None, dirty_files=[], commit_source="MF_SOURCE_COMMIT (no .git: compare "
                    "source_digest with `python -m bench.common digest --commit <commit>`)")
    else:
        info.update(commit=None, dirty=None, dirty_files=[], commit_source="unknown: no git repository and no "
                    "MF_SOURCE_COMMIT")
    return info


def _nvidia_smi() -> dict | None:
    """Clocks, power and driver of GPU 0 as nvidia-smi reports them now (None without nvidia-smi)."""
    fields = ["name", "driver_version", "pci.bus_id", "pstate", "clocks.sm", "clocks.mem", "clocks.max.sm",
              "clocks.max.mem", "clocks.applications.graphics", "clocks.applications.memory", "power.draw",
              "power.limit", "temperature.gpu", "compute_mode", "mig.mode.current"]
    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    for query in (fields, fields[:9]):  # older drivers reject some fields: then the basic ones
        try:
            out = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(query)}",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0 and out.stdout.strip():
            values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
            return dict(zip(query, values))
    return None


def gpu_info(device: str) -> dict | None:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1)}
    smi = _nvidia_smi()
    if smi is not None:
        info["nvidia_smi"] = smi
    return info


def run_metadata(device: str, argv: list[str] | None = None) -> dict:
    """Everything a reader needs to decide whether two result files can share a table (see the module doc)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is a core dependency
        triton_version = None
    argv = sys.argv if argv is None else argv
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    meta = {
        "device": device_name(device),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        **source_info(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "python": platform.python_version(),
        "gpu": gpu_info(device),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "env": {k: os.environ[k] for k in RESULT_ENV if k in os.environ},
        "command": shlex.join([Path(sys.executable).name, *argv]),
        "cwd": os.getcwd(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return meta


def env_info(device: str) -> dict:
    """Kept for callers of the older name: the same as run_metadata."""
    return run_metadata(device)


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
    """Write {"bench", "meta": run_metadata(device) + extra, "rows"} atomically (a run cut short keeps what it
    wrote). Every benchmark writes through this, so every file carries its provenance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"bench": bench, "meta": {**run_metadata(device), **extra}, "rows": rows}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
    return path


def stamp(path: str | os.PathLike, device: str | None = None) -> bool:
    """Give a result file written in another format the metadata of this checkout and machine, under "meta", if
    it has no commit yet. Marked as stamped (not written by the benchmark itself). Returns whether it changed."""
    path = Path(path)
    data = json.loads(path.read_text())
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else \
        {k: v for k, v in data.items() if k not in ("rows", "summary", "bench") and not isinstance(v, (list, dict))}
    if meta.get("commit") or meta.get("source_digest"):
        return False
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    stamped = run_metadata(device, argv=[])
    stamped.pop("command")
    stamped["stamped"] = "metadata added after the run by `python -m bench.common stamp` on the same machine"
    data["meta"] = {**stamped, **meta}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return True


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="provenance helpers for result files")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stamp", help="add this checkout's metadata to result files that have none")
    st.add_argument("files", nargs="+", type=Path)
    dg = sub.add_parser("digest", help="print the source digest of this tree, or of a commit's tree")
    dg.add_argument("--commit", default=None)
    sub.add_parser("meta", help="print this machine's run metadata as JSON")
    args = ap.parse_args(argv)
    if args.cmd == "stamp":
        for f in args.files:
            if f.exists() and f.suffix == ".json":
                print(f"{f}: {'stamped' if stamp(f) else 'has metadata already'}")
    elif args.cmd == "digest":
        print(commit_digest(args.commit) if args.commit else source_digest())
    else:
        print(json.dumps(run_metadata("cuda" if torch.cuda.is_available() else "cpu"), indent=1, default=str))


if __name__ == "__main__":
    main()
