"""Loading the native extension (csrc/): the ops torch.ops.mfkernels.meanflow_loss and meanflow_loss_backward.

Order, tried once per process on first use (never at import):

1. the compiled module ``mfkernels._C`` that ``pip install --no-build-isolation .`` (setup.py) builds;
2. a JIT build of csrc/ with ``torch.utils.cpp_extension.load`` (ninja), cached in ``mfkernels/_build/`` (one
   folder per torch version, Python version and CPU/CUDA flavour; rebuilt when a source changes). The CUDA sources
   are compiled only when ``torch.cuda.is_available()`` and a CUDA toolkit (nvcc + headers) is found; if that build
   fails, a CPU-only build is tried so that CPU tensors still get the native kernel;
3. nothing: ``status().available`` is False and ``status().reason`` says why (callers fall back to the reference).

Environment:
    MFKERNELS_NATIVE       auto (default) | prebuilt (step 1 only) | jit (step 2 only) | off (never load)
    MFKERNELS_BUILD_DIR    where JIT builds go (default: mfkernels/_build next to this file)
    MFKERNELS_JIT_VERBOSE  1: show the compiler output of JIT builds
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import torch

OP = "mfkernels::meanflow_loss"
PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR.parent / "csrc"  # present in a source checkout (the JIT path needs it)
CPU_SOURCES = ("target.cpp",)
CUDA_SOURCES = ("cuda/target.cu",)


@dataclasses.dataclass(frozen=True)
class NativeStatus:
    available: bool            # the ops are registered (at least the CPU kernel)
    source: str | None         # "prebuilt", "jit", "preloaded" (registered by someone else) or None
    cuda: bool                 # the CUDA kernels are registered too
    reason: str = ""           # why the extension (or its CUDA part) is not available; "" when all is there
    path: str | None = None    # the loaded library


_status: NativeStatus | None = None
_lock = threading.Lock()


def op_defined() -> bool:
    """True when torch.ops.mfkernels.meanflow_loss exists in this process (loaded by us or by anyone)."""
    return hasattr(torch.ops.mfkernels, "meanflow_loss")


def _cuda_registered() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")


def status() -> NativeStatus:
    """Load the extension on first call (see the module doc) and say what is there. Thread-safe; cached."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _load()
    return _status


def reset_for_tests() -> None:
    """Forget the cached status (tests only: a loaded library stays loaded, so a second load is 'preloaded')."""
    global _status
    with _lock:
        _status = None


def _load() -> NativeStatus:
    mode = os.environ.get("MFKERNELS_NATIVE", "auto").strip().lower() or "auto"
    if mode not in ("auto", "prebuilt", "jit", "off"):
        return NativeStatus(False, None, False, f"MFKERNELS_NATIVE={mode!r} is not one of auto, prebuilt, jit, off")
    if mode == "off":
        return NativeStatus(False, None, False, "disabled by MFKERNELS_NATIVE=off")
    if op_defined():
        return _loaded("preloaded", None, "")
    reasons = []
    if mode in ("auto", "prebuilt"):
        try:
            module = importlib.import_module("mfkernels._C")
        except ImportError as exc:  # not built, or built against another torch (undefined symbols)
            reasons.append(f"no prebuilt extension mfkernels._C ({exc})")
        else:
            if op_defined():
                return _loaded("prebuilt", getattr(module, "__file__", None), "")
            reasons.append("mfkernels._C imported but registered no mfkernels ops")
    if mode in ("auto", "jit"):
        loaded = _jit(reasons)
        if loaded is not None:
            return loaded
    return NativeStatus(False, None, False, "; ".join(reasons))


def _loaded(source: str, path: str | None, notes: str) -> NativeStatus:
    cuda = _cuda_registered()
    if not cuda and not notes:
        notes = "the extension was built without CUDA kernels"
    return NativeStatus(True, source, cuda, notes, path)


# -------------------------------------------------------------------------------------------------------------- JIT
def find_cuda_home() -> str | None:
    """A CUDA toolkit with nvcc and headers: $CUDA_HOME / $CUDA_PATH, torch's guess, /usr/local/cuda(-*).

    torch's own guess takes dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a wrapper script
    (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local); every candidate here must have bin/nvcc and
    include/cuda_runtime.h.
    """
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


def build_root() -> Path:
    return Path(os.environ.get("MFKERNELS_BUILD_DIR") or PACKAGE_DIR / "_build")


def _build_dir(flavour: str) -> Path:
    tag = f"{flavour}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return build_root() / re.sub(r"[^A-Za-z0-9_.-]", "_", tag)


def _jit(reasons: list[str]) -> NativeStatus | None:
    missing = [s for s in CPU_SOURCES if not (SOURCE_DIR / s).exists()]
    if missing:
        reasons.append(f"JIT build impossible: sources {missing} not found under {SOURCE_DIR} (installed without csrc/)")
        return None
    cuda_note = ""
    if torch.cuda.is_available() and torch.version.cuda:
        home = find_cuda_home()
        if not all((SOURCE_DIR / s).exists() for s in CUDA_SOURCES):
            cuda_note = f"CUDA kernels not built: {list(CUDA_SOURCES)} not found under {SOURCE_DIR}"
        elif home is None:
            cuda_note = "CUDA kernels not built: no CUDA toolkit found (set CUDA_HOME)"
        else:
            try:
                path = _jit_build(with_cuda=True, cuda_home=home)
            except Exception as exc:  # noqa: BLE001 - any build failure falls through to the CPU build
                cuda_note = f"JIT build with CUDA failed ({_short(exc)})"
            else:
                return _loaded("jit", path, "")
    try:
        path = _jit_build(with_cuda=False, cuda_home=None)
    except Exception as exc:  # noqa: BLE001
        reasons.extend([n for n in (cuda_note,) if n] + [f"JIT build failed ({_short(exc)})"])
        return None
    return _loaded("jit", path, cuda_note)


def _jit_build(*, with_cuda: bool, cuda_home: str | None) -> str:
    from torch.utils import cpp_extension

    if with_cuda and cuda_home:
        # torch reads its module-level CUDA_HOME when it builds; point it at the toolkit found above.
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home
    flavour = "cuda" if with_cuda else "cpu"
    name = f"mfkernels_native_{flavour}"
    sources = [str(SOURCE_DIR / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    build_dir = _build_dir(flavour)
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=["-O3"] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("MFKERNELS_JIT_VERBOSE", "0") == "1",
    )
    if not op_defined():
        raise RuntimeError(f"{name} loaded but registered no mfkernels ops")
    return str(build_dir / f"{name}.so")


def _short(exc: BaseException, head: int = 300, tail: int = 3000) -> str:
    """One line; a compiler's output keeps its start and its end (where the errors are)."""
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " | ")
    return text if len(text) <= head + tail else f"{text[:head]} ... {text[-tail:]}"
