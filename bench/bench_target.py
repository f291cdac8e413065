"""Benchmark: the native MeanFlow target/loss op against the eager torch chain (meanflow_loss_ref).

    python bench/bench_target.py --out results.json [--quick] [--device cpu|cuda] [--threads N]

Both providers run in the same process on the same fresh random inputs, forward + backward ("fwd+bwd": the loss,
then loss.backward() into u) and forward only under no_grad ("fwd"). Rows report the median time and the effective
bandwidth of one byte count, the same for both providers (`traffic`, from what csrc/cuda/target.cu reads and writes):

    bytes           the traffic the op cannot avoid: every input read once, every output written once
                    fwd:      read u, v_g (B rows), du_dt (kt rows), t, r;  write per_sample, weight, loss
                    fwd+bwd:  the same, plus grad_loss read and grad_u written
    bytes_accessed  every load and store the kernels issue: bytes plus the residual d = u - u_tgt that the forward
                    writes (B rows, u's dtype) and the backward reads back, plus the per-chunk partial sums

GB/s and the fractions of the references use `bytes`. The residual is an intermediate: written and read back within
one fwd+bwd, it can stay in the 50 MB L2 at these sizes, so counting it (as this benchmark did before 2026-11-30)
credits the op with traffic that never reaches HBM: that is how fwd+bwd rows reached 102-114% of a copy "of the same
bytes". With `bytes` the op moves at least what its reference moves, so it cannot beat a reference of that size
except through the read/write mix: the forward only reads, and a read-only stream is faster than a copy (half reads,
half writes). Two references, each moving `bytes`: "copy" (torch clone of bytes / 2: read and write) and "read" (a sum
over a buffer of `bytes`: read only); native rows carry frac_of_copy and frac_of_read.

Timing: CUDA uses triton.testing.do_bench (median; its warm-up excluded), which times call by call and so includes
the host's launch cost whenever that exceeds the kernel (it does at these sizes: device_ms below says by how much). CUDA
rows therefore also carry device_ms: the op replayed from a CUDA graph over a rotating set of input copies (together
> 256 MB, several times the L2, so every call streams from HBM), the same for the copy; device_gbps and
device_frac_of_copy / device_frac_of_read are computed from those. CPU repeats time.perf_counter around one
call (median of `reps`, after `warmup` untimed calls), with the providers interleaved call by call so that load
from other processes on a shared machine hits both alike; CPU rows also carry ms_min (the fastest call), which
other processes disturb least. On a loaded 2-core host, 2 OpenMP threads stall whenever the other core is taken:
--threads 1 gives the steadier numbers there.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import device_name, write_results  # noqa: E402
from mfkernels import target as mt  # noqa: E402
from mfkernels.reference import meanflow_loss_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (B, C, H, W), tangent rows kt = B / 4 (MeanFlow's default: 75% of the rows have r = t)
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


def traffic(shape, dtype, mode, acc_bytes: int = 4) -> dict[str, int]:
    """Bytes of the op at (B, ...) = shape with kt = B / 4 tangent rows (module doc): {"bytes": inputs read once +
    outputs written once, "bytes_accessed": every load and store of the kernels}. t and r are fp32 (make_inputs);
    per_sample, weight and loss are in the accumulation dtype (acc_bytes: 4, or 8 for fp64 inputs)."""
    batch, n = shape[0], 1
    for s in shape[1:]:
        n *= s
    es = torch.tensor([], dtype=dtype).element_size()
    kt = batch // 4
    reads = (2 * batch + kt) * n * es + 2 * batch * 4          # u, v_g, du_dt; t, r
    writes = (2 * batch + 1) * acc_bytes                         # per_sample, weight, loss
    chunks = -(-n // (256 * (16 // es) * 4))                     # target.cu: kThreads * vec_size * kUnroll per chunk
    partials = 2 * batch * chunks * acc_bytes                    # written by the main pass, read by the finalize
    if mode == "fwd":
        return {"bytes": reads + writes, "bytes_accessed": reads + writes + partials}
    grad = acc_bytes + batch * n * es                            # grad_loss read, grad_u written
    residual = 2 * batch * n * es + batch * acc_bytes           # d written then read back; weight read again
    return {"bytes": reads + writes + grad, "bytes_accessed": reads + writes + partials + grad + residual}


def compulsory_bytes(tensors_read, tensors_written) -> int:
    """What a copy of the same tensors moves: each read once and each written once (the floor of any byte model)."""
    return sum(t.numel() * t.element_size() for t in (*tensors_read, *tensors_written))


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


def _reference_calls(provider: str, nbytes: int, sets: int, device: str) -> list:
    """One call per buffer set of a reference moving nbytes: 'copy' clones nbytes / 2 (reads and writes them),
    'read' sums nbytes of fp32 (reads only; the 4-byte result is negligible)."""
    if provider == "copy":
        srcs = [torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device) for _ in range(sets)]
        dsts = [torch.empty_like(x) for x in srcs]
        return [lambda i=i: dsts[i].copy_(srcs[i]) for i in range(sets)]
    srcs = [torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device) for _ in range(sets)]
    return [lambda i=i: srcs[i].sum() for i in range(sets)]


def device_ms(shape, dtype, mode, provider: str, nbytes: int, reps: int = 20) -> float | None:
    """Per-call ms of `provider` ('native', 'torch', 'copy' or 'read') replayed from one CUDA graph that cycles
    through input sets (or reference buffers) totalling > 256 MB, so no call finds its inputs in L2. None if the
    capture fails."""
    sets = max(2, min(64, -(-(256 << 20) // max(1, nbytes))))
    if provider in REFERENCES:
        calls = _reference_calls(provider, nbytes, sets, "cuda")
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


REFERENCES = ("copy", "read")


def time_reference(provider: str, nbytes: int, device: str, warmup: int, reps: int) -> float:
    """Call-by-call ms of a reference moving nbytes (see _reference_calls), timed like the providers."""
    call = _reference_calls(provider, nbytes, 1, device)[0]
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(call, warmup=warmup, rep=reps, return_mode="median")
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


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
    extra = {"native_source": status.source, "malloc_env": {k: v for k, v in os.environ.items()
                                                            if k.startswith("MALLOC_")},
             "byte_model": "bytes = inputs read once + outputs written once (residual round trip excluded); "
                           "bytes_accessed = every load and store of the kernels"}
    print(f"device: {device_name(device)}  torch {torch.__version__}  native: {status.source}")
    print(f"{'shape':>18} {'dtype':>5} {'mode':>8} {'provider':>8} {'ms':>9} {'GB/s':>8}  notes")
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            u, v_g, du_dt, t, r = make_inputs(shape, dtype, device)
            for mode in ("fwd+bwd", "fwd"):
                counts = traffic(shape, dtype, mode)
                nbytes = counts["bytes"]
                times = timer(providers(u, v_g, du_dt, t, r, mode), mode, u, warmup, reps)
                ref_ms = {ref: time_reference(ref, nbytes, device, warmup, reps) for ref in REFERENCES}
                ref_gbps = {ref: nbytes / ms / 1e6 for ref, ms in ref_ms.items()}
                common = {"bench": "target", "dtype": dtype_name, "shape": list(shape), "kt": shape[0] // 4,
                          "mode": mode, **counts, "byte_model": "v2", "device": device}
                if device == "cpu":
                    common["threads"] = torch.get_num_threads()
                dev = {}
                if device == "cuda":
                    dev = {name: device_ms(shape, dtype, mode, name, nbytes) for name in ("native", "torch", *REFERENCES)}
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
                        for ref in REFERENCES:
                            row[f"frac_of_{ref}"] = round(row["gbps"] / ref_gbps[ref], 3)
                            if dev.get("native") and dev.get(ref):
                                row[f"device_frac_of_{ref}"] = round(dev[ref] / dev["native"], 3)
                        if dev.get("native") and dev.get("torch"):
                            row["device_speedup_vs_torch"] = round(dev["torch"] / dev["native"], 2)
                    rows.append(row)
                for ref in REFERENCES:
                    ref_row = {**common, "provider": ref, "ms": round(ref_ms[ref], 4), "gbps": round(ref_gbps[ref], 2)}
                    if dev.get(ref):
                        ref_row.update(device_ms=round(dev[ref], 5), device_gbps=round(nbytes / dev[ref] / 1e6, 2))
                    rows.append(ref_row)
                for row in rows[-4:]:
                    notes = ""
                    if row["provider"] == "native":
                        notes = (f"{row['speedup_vs_torch']}x vs torch, {row['frac_of_copy']:.0%} of copy, "
                                 f"{row['frac_of_read']:.0%} of read")
                        if "device_frac_of_copy" in row:
                            notes += (f"; device (graph): {row['device_ms'] * 1e3:.1f} us, "
                                      f"{row['device_frac_of_copy']:.0%} of copy")
                        if "speedup_vs_torch_min" in row:
                            notes += f" (fastest runs: {row['speedup_vs_torch_min']}x)"
                    print(f"{str(tuple(shape)):>18} {dtype_name:>5} {mode:>8} {row['provider']:>8} "
                          f"{row['ms']:9.3f} {row['gbps']:8.1f}  {notes}", flush=True)
            if args.out:
                write_results(args.out, "target", device, rows, **extra)
    if args.out:
        write_results(args.out, "target", device, rows, **extra)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
