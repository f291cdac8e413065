"""Benchmark: the native MeanFlow target/loss op against the eager torch chain (meanflow_loss_ref).

    python bench/bench_target.py --out results.json [--quick] [--device cpu|cuda] [--threads N]

Both providers run in the same process on the same fresh random inputs, forward + backward ("fwd+bwd": the loss,
then loss.backward() into u) and forward only under no_grad ("fwd"). Rows report the median time and the effective
bandwidth of the op's minimal traffic (the same byte count for both providers):

    fwd:      read u, v_g, du_dt (kt rows), t, r;  write per_sample, weight, loss (+ the residual when grad is on)
    bwd:      read the residual and weight;  write grad_u

A "copy" row times torch's clone of a buffer of half that byte count (it reads and writes it: the same bytes moved),
the bandwidth any memory-bound op can hope for on that device; native rows carry frac_of_copy = their GB/s over it.

Timing: CUDA uses triton.testing.do_bench (median; its warm-up excluded), which times call by call and so includes
the host's launch cost whenever that exceeds the kernel (it does at these sizes: an op of ~5 us of GPU work). CUDA
rows therefore also carry device_ms: the op replayed from a CUDA graph over a rotating set of input copies (together
> 256 MB, several times the L2, so every call streams from HBM), the same for the copy; device_gbps and
device_frac_of_copy are computed from those. CPU repeats time.perf_counter around one
call (median of `reps`, after `warmup` untimed calls), with the providers interleaved call by call so that load
from other processes on a shared machine hits both alike; CPU rows also carry ms_min (the fastest call), which
other processes disturb least. On a loaded 2-core host, 2 OpenMP threads stall whenever the other core is taken:
--threads 1 gives the steadier numbers there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mfkernels import target as mt  # noqa: E402
from mfkernels.reference import meanflow_loss_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (B, C, H, W), tangent rows kt = B / 4 (DESIGN.md: 75% of the rows have r = t)
SHAPES = {"latent32": (256, 4, 32, 32), "latent64": (128, 4, 64, 64), "latent64x256": (256, 4, 64, 64)}


def make_inputs(shape, dtype, device):
    batch, kt = shape[0], shape[0] // 4
    u = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    v_g = torch.randn(shape, dtype=dtype, device=device)
    du_dt = torch.randn((kt, *shape[1:]), dtype=dtype, device=device)
    t = torch.rand(batch, device=device)
    r = t * torch.rand(batch, device=device)
    r[kt:] = t[kt:]
    return u, v_g, du_dt, t, r


def traffic(shape, dtype, mode):
    """Bytes the op must move at least (see the module doc)."""
    batch, n = shape[0], 1
    for s in shape[1:]:
        n *= s
    es = torch.tensor([], dtype=dtype).element_size()
    kt = batch // 4
    fwd = (2 * batch + kt) * n * es + 2 * batch * 4 + (2 * batch + 1) * 4
    if mode == "fwd":
        return fwd
    return fwd + batch * n * es + 2 * batch * n * es + batch * 4  # + residual write, residual read, grad write


def providers(u, v_g, du_dt, t, r, mode):
    def native():
        loss, _, _ = mt.meanflow_loss(u, v_g, du_dt, t, r, backend="native")
        if mode == "fwd+bwd":
            loss.backward()

    def eager():
        loss, _, _ = meanflow_loss_ref(u, v_g, du_dt, t, r)
        if mode == "fwd+bwd":
            loss.backward()

    return {"native": native, "torch": eager}


def run_fn(fn, mode, u):
    if mode == "fwd+bwd":
        u.grad = None
        fn()
    else:
        with torch.no_grad():
            fn()


def time_cpu(fns: dict, mode, u, warmup, reps):
    """Median ms per provider; providers interleaved call by call."""
    for _ in range(warmup):
        for fn in fns.values():
            run_fn(fn, mode, u)
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            run_fn(fn, mode, u)
            samples[name].append((time.perf_counter() - start) * 1e3)
    _minimum.update({name: min(s) for name, s in samples.items()})
    return {name: statistics.median(s) for name, s in samples.items()}


_minimum: dict = {}  # fastest CPU sample per provider of the last time_cpu call (robust to other load on the host)


def time_cuda(fns: dict, mode, u, warmup, reps):
    from triton.testing import do_bench

    out = {}
    for name, fn in fns.items():
        if mode == "fwd+bwd":
            out[name] = do_bench(fn, warmup=warmup, rep=reps, grad_to_none=[u], return_mode="median")
        else:
            def nograd(fn=fn):
                with torch.no_grad():
                    fn()
            out[name] = do_bench(nograd, warmup=warmup, rep=reps, return_mode="median")
    return out


def device_ms(shape, dtype, mode, provider: str, nbytes: int, reps: int = 20) -> float | None:
    """Per-call ms of `provider` ('native', 'torch' or 'copy') replayed from one CUDA graph that cycles through
    input sets (or copy buffers) totalling > 256 MB, so no call finds its inputs in L2. None if capture fails."""
    sets = max(2, min(64, -(-(256 << 20) // max(1, nbytes))))
    if provider == "copy":
        srcs = [torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device="cuda") for _ in range(sets)]
        dsts = [torch.empty_like(x) for x in srcs]
        calls = [lambda i=i: dsts[i].copy_(srcs[i]) for i in range(sets)]
    else:
        inputs = [make_inputs(shape, dtype, "cuda") for _ in range(sets)]
        calls = [lambda i=i: run_fn(providers(*inputs[i], mode)[provider], mode, inputs[i][0]) for i in range(sets)]
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for call in calls:  # warm-up outside the graph (allocator pools, lazy loads)
                call()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / sets)
        return statistics.median(times)
    except RuntimeError as exc:  # e.g. an op that syncs with the host cannot be captured
        print(f"device_ms: {provider} {mode} not captured: {str(exc).splitlines()[0][:120]}", flush=True)
        return None
    finally:
        torch.cuda.empty_cache()


def time_copy(nbytes, device, warmup, reps):
    """ms of torch clone of nbytes / 2 bytes (reads and writes them: nbytes moved)."""
    buf = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(lambda: buf.clone(), warmup=warmup, rep=reps, return_mode="median")
    for _ in range(warmup):
        buf.clone()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        buf.clone()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--quick", action="store_true", help="one shape, fp32 only, few repetitions")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default fp32,bf16)")
    parser.add_argument("--shapes", default=None, help=f"comma list of {','.join(SHAPES)}")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if not mt.native_available(device):
        raise SystemExit(f"native op unavailable for {device}: {mt.native_status().reason}")
    dtypes = (args.dtypes or ("fp32" if args.quick else "fp32,bf16")).split(",")
    shapes = (args.shapes or ("latent32" if args.quick else ",".join(SHAPES))).split(",")
    if device == "cuda":  # do_bench takes milliseconds of warm-up and of measurement
        warmup, reps, timer = 25, (100 if args.quick else 500), time_cuda
    else:  # calls
        warmup, reps, timer = (2, 7, time_cpu) if args.quick else (3, 31, time_cpu)

    rows = []
    status = mt.native_status()
    print(f"device: {device_name(device)}  torch {torch.__version__}  native: {status.source}")
    print(f"{'shape':>18} {'dtype':>5} {'mode':>8} {'provider':>8} {'ms':>9} {'GB/s':>8}  notes")
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            u, v_g, du_dt, t, r = make_inputs(shape, dtype, device)
            for mode in ("fwd+bwd", "fwd"):
                nbytes = traffic(shape, dtype, mode)
                times = timer(providers(u, v_g, du_dt, t, r, mode), mode, u, warmup, reps)
                copy_ms = time_copy(nbytes, device, warmup, reps)
                copy_gbps = nbytes / copy_ms / 1e6
                common = {"bench": "target", "dtype": dtype_name, "shape": list(shape), "kt": shape[0] // 4,
                          "mode": mode, "bytes": nbytes, "device": device}
                if device == "cpu":
                    common["threads"] = torch.get_num_threads()
                dev = {}
                if device == "cuda":
                    dev = {name: device_ms(shape, dtype, mode, name, nbytes) for name in ("native", "torch", "copy")}
                for provider in ("native", "torch"):
                    ms = times[provider]
                    row = {**common, "provider": provider, "ms": round(ms, 4), "gbps": round(nbytes / ms / 1e6, 2)}
                    if dev.get(provider):
                        row["device_ms"] = round(dev[provider], 5)
                        row["device_gbps"] = round(nbytes / dev[provider] / 1e6, 2)
                    if device == "cpu":
                        row["ms_min"] = round(_minimum[provider], 4)
                    if provider == "native":
                        row["speedup_vs_torch"] = round(times["torch"] / ms, 2)
                        if device == "cpu":
                            row["speedup_vs_torch_min"] = round(_minimum["torch"] / _minimum["native"], 2)
                        row["frac_of_copy"] = round(row["gbps"] / copy_gbps, 3)
                        if dev.get("native") and dev.get("copy"):
                            row["device_frac_of_copy"] = round(dev["copy"] / dev["native"], 3)
                            if dev.get("torch"):
                                row["device_speedup_vs_torch"] = round(dev["torch"] / dev["native"], 2)
                    rows.append(row)
                copy_row = {**common, "provider": "copy", "ms": round(copy_ms, 4), "gbps": round(copy_gbps, 2)}
                if dev.get("copy"):
                    copy_row.update(device_ms=round(dev["copy"], 5), device_gbps=round(nbytes / dev["copy"] / 1e6, 2))
                rows.append(copy_row)
                for row in rows[-3:]:
                    notes = ""
                    if row["provider"] == "native":
                        notes = f"{row['speedup_vs_torch']}x vs torch, {row['frac_of_copy']:.0%} of copy"
                        if "device_frac_of_copy" in row:
                            notes += (f"; device (graph): {row['device_ms'] * 1e3:.1f} us, "
                                      f"{row['device_frac_of_copy']:.0%} of copy")
                        if "speedup_vs_torch_min" in row:
                            notes += f" (fastest runs: {row['speedup_vs_torch_min']}x)"
                    print(f"{str(tuple(shape)):>18} {dtype_name:>5} {mode:>8} {row['provider']:>8} "
                          f"{row['ms']:9.3f} {row['gbps']:8.1f}  {notes}", flush=True)
    result = {"device": device_name(device), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "native_source": status.source, "python": platform.python_version(),
              "host_load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
              "command": " ".join(sys.argv), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
