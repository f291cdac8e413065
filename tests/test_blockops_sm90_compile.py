"""Compile every block-op kernel specialisation for the H100 (sm_90) here, without a GPU.

The interpreter accepts code the real compiler rejects (and the reverse), so the CPU tests alone do not prove the
kernels build on the target. This test runs the launchers in a subprocess WITHOUT TRITON_INTERPRET, with
`JITFunction.run` replaced by an ahead-of-time `triton.compile` for GPUTarget("cuda", 90, 32) (nothing is launched),
for DiT widths and every dtype, then asks the bundled ptxas for register use and spills.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, re, subprocess, sys, tempfile
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
    out.append({"kernel": self.fn.__name__, "warps": options.num_warps,
                "dtypes": sorted({v for v in signature.values() if v.startswith("*")}),
                "regs": int(regs.group(1)) if regs else None, "spill": int(spill.group(1)) if spill else None})

JITFunction.run = compile_instead_of_launch

from mfkernels import activations, mlp, norm, residual
from mfkernels._tl_math import ACT_GELU_TANH, ACT_SILU

for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
    for c in (24, 768, 1152):
        B, N, kt = 2, 3, 1
        x = torch.randn(B, N, c, dtype=dtype)
        mod = torch.randn(B, c, dtype=dtype)
        norm.layernorm_modulate_jvp_fwd(x, mod, mod, x[:kt], mod[:kt], mod[:kt], 1e-6, True)
        stats = torch.zeros(B * N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        norm.layernorm_modulate_bwd(x, x, mod, stats, stats, True, True)
        residual.gated_residual_jvp_fwd(x, mod, x, x[:kt], mod[:kt], x[:kt])
        for act in (ACT_GELU_TANH, ACT_SILU):
            activations.act_jvp_fwd(x, x[:kt], act)
            activations.act_bwd(x, x, act, write_da=True, write_g=act == ACT_GELU_TANH)
        w1, w2 = torch.randn(4 * c, c, dtype=dtype), torch.randn(c, 4 * c, dtype=dtype)
        mlp.mlp_jvp_fwd(x, w1, torch.randn(4 * c, dtype=dtype), w2, None, x[:kt], True)
print(json.dumps(out))
'''


def _ptxas() -> str | None:
    try:
        import triton
    except Exception:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(path) if path.exists() else shutil.which("ptxas")


def test_kernels_compile_for_sm90_without_spills():
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("no Triton with a bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ptxas], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_layernorm_modulate_jvp_fwd_kernel", "_layernorm_modulate_bwd_kernel",
                       "_gated_residual_jvp_fwd_kernel",
                       "_act_jvp_fwd_kernel", "_act_bwd_kernel"}
    spilling = [r for r in compiled if r["spill"]]
    assert not spilling, f"register spills on sm_90: {spilling}"
