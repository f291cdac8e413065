"""Training-step benchmark: flow matching vs MeanFlow with each JVP backend, in one run on the same inputs.

A step is forward + loss + backward + AdamW update. Flow matching (ratio 0, no guidance, plain forward with torch's
default SDPA) is the baseline; MeanFlow runs at ratio 0.25 with guidance off and on (kappa > 0 needs the no-grad
guidance forwards). Rows report ms, samples/s, the ratio to flow matching and, on CUDA, peak memory.
On CUDA, rows with cuda_graph = true run the training call through meanflow.CUDAGraphModel (flow matching too, so
the baseline gets the same help); their peak memory counts the graph's private memory pool (reserved memory).

    python bench/bench_step.py --out bench/results/step_cpu.json            # CPU-sized DiT
    python bench/bench_step.py --device cuda --out step_h100.json            # DiT-B/2 and DiT-XL/2, bf16
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import is_oom, peak_memory_mb, time_fn, time_interleaved, write_results  # noqa: E402
from meanflow import MeanFlowLoss, build_dit  # noqa: E402
from meanflow.training.cuda_graphs import CUDAGraphModel  # noqa: E402

GUIDANCE = {"off": {}, "on": {"omega": 1.0, "kappa": 0.5}}  # the official DiT-B/2 guidance setting


def make_step(model, loss_fn, x, y, opt, device, backend, call_model=None):
    """One training step; `call_model` (e.g. a CUDAGraphModel around model) is what the loss calls."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    call_model = call_model if call_model is not None else model

    def step():
        model.backend = backend
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = loss_fn(call_model, x, y)
        loss.backward()
        opt.step()

    return step


def bench_model(name: str, args, device: str, on_row=lambda rows: None) -> list[dict]:
    """The rows of one model; `on_row(rows)` after each timed row (the caller writes them: a run cut short keeps
    what it measured)."""
    torch.manual_seed(0)
    size, channels = (32, 4)
    if not device.startswith("cuda"):
        size, channels = args.cpu_size, args.cpu_channels
    model = build_dit(name, input_size=size, in_channels=channels, num_classes=args.num_classes).to(device)
    model.check_inputs = False  # no host syncs for range checks inside the timed step
    with torch.no_grad():  # random (not adaLN-zero) weights: realistic magnitudes for every op
        for p in model.parameters():
            p.normal_(0, 0.02)
    batch = args.batch or (64 if "XL" in name else 128) if device.startswith("cuda") else (args.batch or 32)
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, args.num_classes, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    fm = MeanFlowLoss(flow_matching=True, label_dropout=0.1)
    cases = [("flow_matching", "explicit", "off", fm, False)]
    for guidance in args.guidance:
        for backend in args.backends:
            cases.append(("meanflow", backend, guidance,
                          MeanFlowLoss(ratio=args.ratio, label_dropout=0.1, **GUIDANCE[guidance]), False))
    if device.startswith("cuda") and args.graph_backends:
        cases.append(("flow_matching", "explicit", "off", fm, True))
        for guidance in args.guidance:
            for backend in args.graph_backends:
                cases.append(("meanflow", backend, guidance,
                              MeanFlowLoss(ratio=args.ratio, label_dropout=0.1, **GUIDANCE[guidance]), True))
    rows, steps = [], []
    for objective, backend, guidance, loss_fn, graphed in cases:
        model.backend = backend
        row = {"bench": "step", "model": name, "objective": objective, "backend": backend, "guidance": guidance,
               "cuda_graph": graphed, "batch": batch, "input": [channels, size, size],
               "ratio": 0.0 if objective == "flow_matching" else args.ratio,
               "dtype": "bf16-autocast" if device.startswith("cuda") else "fp32"}
        call_model = CUDAGraphModel(model) if graphed else None
        step = make_step(model, loss_fn, x, y, opt, device, backend, call_model)
        if not device.startswith("cuda"):  # CPU: timed below, interleaved
            rows.append(row)
            steps.append(step)
            continue
        try:
            base = None
            if graphed:
                # Capture first. The graph keeps its activations in a private pool that stays RESERVED between
                # replays (its blocks count as free, not allocated, once the captured backward has run), so the
                # footprint is the pool's reserved growth plus the allocated peak of a replayed step.
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_reserved()
                step()
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # drops the warm-up's cached blocks; the graph's pool is kept
                row["peak_mem_method"] = "graph pool (reserved) + allocated peak of a replay"
            # A step takes 40-500 ms: give do_bench seconds, not its default 100 ms, so the median is over many runs.
            row.update(time_fn(step, device, warmup=args.warmup, reps=args.reps, cuda_warmup_ms=500,
                               cuda_rep_ms=2000))
            row["samples_per_s"] = batch / row["ms"] * 1e3
            row["peak_mem_mb"] = peak_memory_mb(step, device)
            if base is not None:
                torch.cuda.empty_cache()  # only the graph's pool stays reserved, not the eager optimizer's cache
                row["peak_mem_mb"] += (torch.cuda.memory_reserved() - base) / 2**20
                row["graphs_captured"] = call_model.captures_made
        except Exception as exc:  # noqa: BLE001 - a provider failing must not lose the other rows
            if not (is_oom(exc) or isinstance(exc, ImportError) or graphed):
                raise
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
        del call_model, step
        torch.cuda.empty_cache()
        rows.append(row)
        on_row(rows)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    if steps:
        # On a shared CPU the load drifts over minutes: time the cases round-robin so every case sees the same drift.
        for row, result in zip(rows, time_interleaved(steps, warmup=args.warmup, reps=args.reps)):
            row.update(result, samples_per_s=batch / result["ms"] * 1e3, peak_mem_mb=None)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    # Ratios against the eager flow-matching step (the baseline a user has today); graphed rows also get the ratio
    # to the graphed flow-matching step.
    base = next(r for r in rows if r["objective"] == "flow_matching" and not r["cuda_graph"])
    base_graph = next((r for r in rows if r["objective"] == "flow_matching" and r["cuda_graph"] and "ms" in r), None)
    for r in rows:
        if "ms" in r and "ms" in base:
            r["ratio_to_fm"] = r["ms"] / base["ms"]
            if r.get("peak_mem_mb") and base.get("peak_mem_mb"):
                r["mem_ratio_to_fm"] = r["peak_mem_mb"] / base["peak_mem_mb"]
        if r["cuda_graph"] and "ms" in r and base_graph is not None:
            r["ratio_to_fm_graph"] = r["ms"] / base_graph["ms"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=None, help="DiT registry names (default: by device)")
    ap.add_argument("--backends", nargs="+", default=["autograd", "explicit", "fused"])
    ap.add_argument("--guidance", nargs="+", default=["off", "on"], choices=list(GUIDANCE))
    ap.add_argument("--graph-backends", nargs="*", default=["fused"],
                    help="backends also timed through CUDAGraphModel on CUDA (none: --graph-backends)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction of rows with r != t")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--cpu-size", type=int, default=32, help="image side on CPU (default 32: 256 tokens at patch 2)")
    ap.add_argument("--cpu-channels", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads on CPU (1 gives stable ratios on a shared machine: OpenMP regions stall "
                         "whenever another process holds a core)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a dry run of the harness)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.models is None:
        args.models = ["DiT-B/2", "DiT-XL/2"] if cuda else ["DiT-Tiny/2"]
    if args.quick:
        args.warmup, args.reps = 1, 2
        if not cuda:
            args.models, args.cpu_size, args.batch, args.num_classes = ["DiT-Micro/4"], 16, 4, 10
    rows = []
    for name in args.models:
        save = lambda model_rows: write_results(args.out, "step", args.device, rows + model_rows,  # noqa: E731
                                                args=vars(args))
        rows += bench_model(name, args, args.device, save)
        write_results(args.out, "step", args.device, rows, args=vars(args))  # with the ratios
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
