"""Where does a fused MeanFlow step spend its time? Host overhead per op, forward passes, and a torch.profiler table.

Three parts, each written as it finishes:
  overhead   host time of one call of every fused op and its torch counterpart at a tiny shape (the GPU work is
             negligible there, so the time per call is what Python + the launch cost)       -> OUT/overhead.json
  forward    DiT forward passes under no_grad (bf16 autocast on CUDA): the plain forward vs the fused forward with
             kt = 0 (the guidance call) and kt = B/4 (the main call); device ms and host ms  -> OUT/forward.json
  profile    torch.profiler over MeanFlow steps per backend (guidance on): the top ops by device and by host time
                                                                                            -> OUT/profile_<backend>.txt

    python bench/profile_step.py --out OUTDIR [--model DiT-B/2 --batch 64] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_step import GUIDANCE, make_step  # noqa: E402
from bench.common import time_fn, write_results  # noqa: E402
from meanflow import MeanFlowLoss, build_dit  # noqa: E402
from mfkernels.ops import ops_table  # noqa: E402


def _host_us(fn, device: str, calls: int) -> float:
    """Mean wall time of one call in microseconds over `calls` back-to-back calls (one sync at the end)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def part_overhead(device: str, calls: int) -> list[dict]:
    fused, ref = ops_table("fused"), ops_table("reference")
    b, n, c, heads, kt = 2, 16, 64, 2, 1
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    x, xd, m, md = mk(b, n, c), mk(kt, n, c), mk(b, c), mk(kt, c)
    w1, b1, w2, b2 = mk(4 * c, c), mk(4 * c), mk(c, 4 * c), mk(c)
    q, qd = mk(b, heads, n, c // heads), mk(kt, heads, n, c // heads)
    cases = {
        "layernorm_modulate": (lambda o: o.layernorm_modulate(x, m, m, xd, md, md),
                               lambda: F.layer_norm(x, (c,)) * (1 + m[:, None]) + m[:, None]),
        "gated_residual": (lambda o: o.gated_residual(x, m, x, xd, md, xd), lambda: x + m[:, None] * x),
        "linear": (lambda o: o.linear(x, w1, b1, xd), lambda: F.linear(x, w1, b1)),
        "mlp": (lambda o: o.mlp(x, w1, b1, w2, b2, xd),
                lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)),
        "silu": (lambda o: o.silu(m, md), lambda: F.silu(m)),
        "attention": (lambda o: o.attention(q, q, q, qd, qd, qd), lambda: F.scaled_dot_product_attention(q, q, q)),
    }
    rows = []
    for name, (jvp, plain) in cases.items():
        for grad in (False, True):
            for t in (x, m, w1, b1, w2, b2, q):
                t.requires_grad_(grad)
            row = {"part": "overhead", "op": name, "requires_grad": grad, "shape": [b, n, c], "kt": kt}
            row["fused_us"] = _host_us(lambda: jvp(fused), device, calls)
            row["reference_us"] = _host_us(lambda: jvp(ref), device, calls)
            row["torch_plain_us"] = _host_us(plain, device, calls)
            rows.append(row)
            print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def _model(name: str, device: str, quick: bool):
    size, channels = (32, 4) if device == "cuda" else (16, 1)
    model = build_dit(name, input_size=size, in_channels=channels, num_classes=1000 if not quick else 10).to(device)
    model.check_inputs = False
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model, size, channels


def part_forward(name: str, batch: int, device: str, quick: bool) -> list[dict]:
    model, size, channels = _model(name, device, quick)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    rows = []
    for rows_in, kt in ((batch + batch // 4, 0), (batch, batch // 4)):
        z = torch.randn(rows_in, channels, size, size, device=device)
        t = torch.rand(rows_in, device=device)
        y = torch.randint(0, model.num_classes, (rows_in,), device=device)
        tang = (z[:kt], torch.ones(kt, device=device), torch.ones(kt, device=device))
        calls = {"plain": lambda: model(z, t, t * 0, y, backend="explicit")}
        for backend in ("explicit", "fused"):
            calls[backend] = (lambda b=backend: model(z, t, t * 0, y, tangents=tang, backend=b)) if kt else (
                lambda b=backend: model(z, t, t * 0, y, backend=b))
            if kt == 0 and backend == "explicit":
                del calls[backend]  # explicit without tangents IS the plain forward
        if kt == 0:  # the fused kernels run the primal alone (kt = 0) when forced through forward_jvp
            ops = ops_table("fused")
            calls["fused_kt0_kernels"] = lambda: model._forward_jvp(z, t, t * 0, y, z[:0], t[:0], t[:0], ops)
        for label, fn in calls.items():
            with torch.no_grad(), autocast:
                dev = time_fn(fn, device, warmup=1, reps=3, cuda_rep_ms=300)
                host = []
                for _ in range(5):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    host.append((time.perf_counter() - t0) * 1e3)
                if device == "cuda":
                    torch.cuda.synchronize()
            row = {"part": "forward", "model": name, "rows": rows_in, "kt": kt, "call": label, **dev,
                   "host_ms": statistics.median(host)}
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def part_profile(name: str, batch: int, device: str, out: Path, quick: bool, backends) -> None:
    from torch.profiler import ProfilerActivity, profile

    model, size, channels = _model(name, device, quick)
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for backend in backends:
        loss_fn = MeanFlowLoss(ratio=0.25, label_dropout=0.1, **GUIDANCE["on"])
        step = make_step(model, loss_fn, x, y, opt, device, backend)
        for _ in range(2):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(2):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
        sort_dev = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table
        text = (f"# {name}, batch {batch}, MeanFlow ratio 0.25 guidance on, backend {backend}, 2 steps\n\n"
                f"## by self device time\n{table(sort_by=sort_dev, row_limit=45, max_name_column_width=70)}\n\n"
                f"## by total host time\n{table(sort_by='cpu_time_total', row_limit=45, max_name_column_width=70)}\n")
        (out / f"profile_{backend}.txt").write_text(text)
        print(f"wrote {out / f'profile_{backend}.txt'}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="DiT-B/2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--parts", nargs="+", default=["overhead", "forward", "profile"])
    ap.add_argument("--backends", nargs="+", default=["explicit", "fused"])
    ap.add_argument("--quick", action="store_true", help="tiny model and batch (a dry run of the harness)")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calls = 200
    if args.quick or args.device != "cuda":
        args.model, args.batch, calls = "DiT-Micro/4", 4, 3
    if "overhead" in args.parts:
        write_results(out / "overhead.json", "overhead", args.device, part_overhead(args.device, calls))
    if "forward" in args.parts:
        write_results(out / "forward.json", "forward", args.device,
                      part_forward(args.model, args.batch, args.device, args.quick))
    if "profile" in args.parts:
        part_profile(args.model, args.batch, args.device, out, args.quick, args.backends)


if __name__ == "__main__":
    main()
