"""Benchmark: fused attention forward + JVP and its backward against torch's attention paths.

    python bench/bench_attention.py --out results.json [--quick] [--causal off|on|both]

On CUDA every provider is timed with triton.testing.do_bench (median, 20th and 80th percentiles) on the same fresh
random inputs, in one run:
    fused_fwd_jvp    mfkernels attention_jvp with a tangent on every row (kt = B)         FLOPs 12 N^2 D a head
    fused_fwd        mfkernels attention_jvp with kt = 0 (plain flash forward)             4 N^2 D
    math_jvp         torch.func.jvp over F.scaled_dot_product_attention, MATH backend      12 N^2 D (OOM recorded)
    reference_jvp    mfkernels.reference.attention_jvp_ref (pure torch closed form)        12 N^2 D (OOM recorded)
    sdpa_default_fwd F.scaled_dot_product_attention, default backend (cuDNN on torch 2.11 H100)  4 N^2 D
    sdpa_flash_fwd   the same forced to SDPBackend.FLASH_ATTENTION (FlashAttention-2)      4 N^2 D
    sdpa_flash_bwd   backward of the flash forward                                         10 N^2 D (2.5 x forward)
    fused_bwd        mfkernels flash backward (from the saved LSE)                         10 N^2 D
Causal counts half of each. Every row also has the peak memory the call adds (peak_mem_mb, CUDA only); fused_fwd_jvp
rows add max_abs_diff_vs_math (o_dot against math_jvp, a sanity check). A "summary" lists the issue's ratios: fused
forward + JVP over SDPA flash forward (target <= 2.0), math jvp over fused (target >= 10 at N = 2048), fused backward
over flash backward (target <= 1.2).

Without CUDA it runs the Triton interpreter on tiny shapes, timed with time.perf_counter over a few reps (a dry run of
the GPU suite; the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench.common import is_oom, peak_memory_mb, time_fn  # noqa: E402
from mfkernels import reference  # noqa: E402
from mfkernels.attention import attention_jvp  # noqa: E402

CUDA = torch.cuda.is_available()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FLOPS_PER_HEAD = {  # in units of N^2 D (non-causal; causal counts half)
    "fused_fwd_jvp": 12, "math_jvp": 12, "reference_jvp": 12,
    "fused_fwd": 4, "sdpa_default_fwd": 4, "sdpa_flash_fwd": 4,
    "sdpa_flash_bwd": 10, "fused_bwd": 10,
}


# ------------------------------------------------------------------------------------------------------ timing
def _time(fn, grad_to_none=None):
    r = time_fn(fn, "cuda" if CUDA else "cpu", warmup=1, reps=3, grad_to_none=grad_to_none)
    return r["ms"], r["ms_p20"], r["ms_p80"]


def _peak_mb(fn):
    """Peak memory a call adds on top of what is allocated before it (CUDA only)."""
    return peak_memory_mb(fn, "cuda" if CUDA else "cpu")


# --------------------------------------------------------------------------------------------------- providers
def _providers(q, k, v, q_dot, k_dot, v_dot, causal):
    """name -> (callable, grad_to_none). Forward-only providers run under no_grad; backward ones prepare a graph."""
    empty = [t[:0] for t in (q, k, v)]

    def math_jvp():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal),
                                  (q, k, v), (q_dot, k_dot, v_dot))

    def flash_fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    fwd = {
        "fused_fwd_jvp": lambda: attention_jvp(q, k, v, q_dot, k_dot, v_dot, causal=causal),
        "fused_fwd": lambda: attention_jvp(q, k, v, *empty, causal=causal),
        "math_jvp": math_jvp,
        "reference_jvp": lambda: reference.attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot, causal=causal),
        "sdpa_default_fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "sdpa_flash_fwd": flash_fwd,
    }
    return fwd


def _backward_provider(name, q, k, v, causal):
    """(run once, leaves): the forward graph is built once, the timed call is the backward alone."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if name == "sdpa_flash_bwd":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(*leaves, is_causal=causal)
    else:
        o, _ = attention_jvp(*leaves, *[t[:0] for t in leaves], causal=causal)
    grad_o = torch.randn_like(o)
    return (lambda: o.backward(grad_o, retain_graph=True)), leaves


# ----------------------------------------------------------------------------------------------------- driver
def _shapes(quick: bool, dtypes=None, ns=None, dims=None):
    if not CUDA:
        return ["bf16"], [32, 64], [32, 64], (lambda n, d: (1, 2))
    dtypes = dtypes or (["bf16"] if quick else ["bf16", "fp16"])
    ns = ns or ([1024, 2048] if quick else [1024, 2048, 4096, 8192])
    # 16k tokens per batch and a model width of 2048 (the FlashAttention papers' setting).
    return dtypes, dims or [64, 128], ns, (lambda n, d: (max(1, 16384 // n), 2048 // d))


def run(quick: bool, causal_modes, only=None, log=print, dtypes=None, ns=None, dims=None, on_shape_done=None):
    dtypes, dims, ns, bh = _shapes(quick, dtypes, ns, dims)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for d in dims:
            for n in ns:
                b, h = bh(n, d)
                device = "cuda" if CUDA else "cpu"
                gen = torch.Generator(device=device).manual_seed(1000 + n + d)
                q, k, v, q_dot, k_dot, v_dot = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)
                                                for _ in range(6))
                for causal in causal_modes:
                    base = {"bench": "attention", "dtype": dname, "B": b, "H": h, "N": n, "D": d, "causal": causal}
                    flops_unit = b * h * n * n * d * (0.5 if causal else 1.0)
                    outputs = {}
                    names = list(FLOPS_PER_HEAD)
                    for name in names:
                        if only and name not in only:
                            continue
                        row = dict(base, provider=name)
                        try:
                            if name.endswith("_bwd"):
                                fn, leaves = _backward_provider(name, q, k, v, causal)
                                ms, p20, p80 = _time(fn, grad_to_none=leaves)
                                row["peak_mem_mb"] = _peak_mb(fn)
                                del fn, leaves
                            else:
                                fn = _providers(q, k, v, q_dot, k_dot, v_dot, causal)[name]
                                with torch.no_grad():  # forward mode does not need grad mode
                                    ms, p20, p80 = _time(fn)
                                    row["peak_mem_mb"] = _peak_mb(fn)
                                    if name in ("fused_fwd_jvp", "math_jvp"):
                                        outputs[name] = fn()[1].float()
                            row.update(ms=ms, ms_p20=p20, ms_p80=p80,
                                       tflops=FLOPS_PER_HEAD[name] * flops_unit / (ms * 1e-3) / 1e12)
                        except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
                            row.update(ms=None, ms_p20=None, ms_p80=None, tflops=None,
                                       error="OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:200]}")
                            if CUDA:
                                torch.cuda.empty_cache()
                        rows.append(row)
                        log(_fmt(row))
                    if "fused_fwd_jvp" in outputs and "math_jvp" in outputs:
                        diff = (outputs["fused_fwd_jvp"] - outputs["math_jvp"]).abs().max().item()
                        for row in rows:
                            if row["provider"] == "fused_fwd_jvp" and all(row[kk] == vv for kk, vv in base.items()):
                                row["max_abs_diff_vs_math"] = diff
                    outputs.clear()
                    if on_shape_done is not None:
                        on_shape_done(rows)  # partial results survive a time limit
                del q, k, v, q_dot, k_dot, v_dot
                if CUDA:
                    torch.cuda.empty_cache()
    return rows


def summarize(rows):
    """The issue's targets, one entry per (dtype, D, N, causal) where both sides ran."""
    by = {}
    for r in rows:
        if r.get("ms") is not None:
            by[(r["dtype"], r["D"], r["N"], r["causal"], r["provider"])] = r["ms"]
    out = []
    for key in sorted({k[:4] for k in by}):
        get = lambda p: by.get(key + (p,))  # noqa: E731
        entry = dict(zip(("dtype", "D", "N", "causal"), key))
        if get("fused_fwd_jvp") and get("sdpa_flash_fwd"):
            entry["fused_fwd_jvp_over_flash_fwd"] = get("fused_fwd_jvp") / get("sdpa_flash_fwd")  # target <= 2.0
        if get("fused_fwd_jvp") and get("math_jvp"):
            entry["math_jvp_over_fused_fwd_jvp"] = get("math_jvp") / get("fused_fwd_jvp")  # target >= 10 (N 2048)
        if get("fused_bwd") and get("sdpa_flash_bwd"):
            entry["fused_bwd_over_flash_bwd"] = get("fused_bwd") / get("sdpa_flash_bwd")  # target <= 1.2
        if len(entry) > 4:
            out.append(entry)
    return out


def _fmt(r):
    if r.get("ms") is None:
        return (f"{r['provider']:>17} {r['dtype']} B{r['B']} H{r['H']} N{r['N']:<5} D{r['D']:<3} "
                f"causal={int(r['causal'])}  {r.get('error')}")
    mem = f"{r['peak_mem_mb']:9.1f} MB" if r.get("peak_mem_mb") is not None else ""
    return (f"{r['provider']:>17} {r['dtype']} B{r['B']} H{r['H']} N{r['N']:<5} D{r['D']:<3} causal={int(r['causal'])}"
            f"  {r['ms']:9.3f} ms  {r['tflops']:8.2f} TFLOP/s {mem}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="where to write the JSON results")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (always on without CUDA)")
    ap.add_argument("--causal", choices=("off", "on", "both"), default=None,
                    help="causal variants (default: both, or off with --quick / without CUDA)")
    ap.add_argument("--providers", default=None, help="comma-separated subset of: " + ",".join(FLOPS_PER_HEAD))
    ap.add_argument("--dtypes", default=None, help="comma-separated subset of bf16,fp16 (CUDA)")
    ap.add_argument("--dims", default=None, help="comma-separated head dims (CUDA), default 64,128")
    ap.add_argument("--ns", default=None, help="comma-separated sequence lengths (CUDA), e.g. 1024,2048,4096,8192")
    args = ap.parse_args(argv)
    mode = args.causal or ("off" if (args.quick or not CUDA) else "both")
    causal_modes = {"off": [False], "on": [True], "both": [False, True]}[mode]
    only = set(args.providers.split(",")) if args.providers else None
    t0 = time.time()
    dtypes = args.dtypes.split(",") if args.dtypes else None
    ns = [int(n) for n in args.ns.split(",")] if args.ns else None
    dims = [int(d) for d in args.dims.split(",")] if args.dims else None
    rows = run(args.quick or not CUDA, causal_modes, only, dtypes=dtypes, ns=ns, dims=dims,
               on_shape_done=lambda partial: _write(args.out, partial, t0, final=False))
    result = _write(args.out, rows, t0, final=True)
    for s in result["summary"]:
        print(s)
    print(f"wrote {len(rows)} rows to {args.out} in {result['wall_s']} s")


def _write(path, rows, t0, final):
    result = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "wall_s": round(time.time() - t0, 1),
        "complete": final,
        "rows": rows,
        "summary": summarize(rows),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return result


if __name__ == "__main__":
    main()
