"""Ahead-of-time compilation of the Triton kernels for the H100/H200 (sm_90) on a machine without a GPU.

The interpreter accepts code the real compiler rejects (and the reverse), and it knows nothing of registers or shared
memory, so the CPU tests alone do not prove that the kernels build and fit on the target. `compile_for_sm90(body)` runs
`body` in a subprocess WITHOUT TRITON_INTERPRET, with `JITFunction.run` replaced by an ahead-of-time `triton.compile`
for GPUTarget("cuda", 90, 32) (nothing is launched), and returns one record per distinct kernel specialisation:
kernel name, warps, pointer dtypes, constexprs, registers and spill bytes (from the bundled ptxas), shared memory and
a digest of the PTX.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOPPER_SHARED_MEMORY = 232448  # bytes a block may use on sm_90 (227 KB)

PRELUDE = r'''
import hashlib, json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
PTXAS = sys.argv[1]
seen, out = set(), []

def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    bound, spec, opts = create_function_from_signature(self.signature, self.params, BACKEND)(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound, spec, opts)
    key = (self.fn.__name__, str(signature), str(sorted((str(k), str(v)) for k, v in constexprs.items())),
           options.num_warps)
    if key in seen:
        return
    seen.add(key)
    kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    info = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", info.stderr)
    spill = re.search(r"(\d+) bytes spill stores", info.stderr)
    out.append({"kernel": self.fn.__name__, "warps": options.num_warps, "shared": kernel.metadata.shared,
                "constexprs": {str(k): str(v) for k, v in constexprs.items()},
                "dtypes": sorted({v for v in signature.values() if v.startswith("*")}),
                "regs": int(regs.group(1)) if regs else None, "spill": int(spill.group(1)) if spill else None,
                "ptx_sha256": hashlib.sha256(kernel.asm["ptx"].encode()).hexdigest()})

JITFunction.run = compile_instead_of_launch
'''


def _ptxas() -> str | None:
    try:
        import triton
    except Exception:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(path) if path.exists() else shutil.which("ptxas")


def compile_for_sm90(body: str, **env_overrides: str) -> list[dict]:
    """Run `body` (Python that calls kernel launchers on CPU tensors; it may append to `out`) and return the records."""
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("no Triton with a bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(env_overrides)
    script = PRELUDE + "\n" + body + "\nprint(json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", script, ptxas], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
