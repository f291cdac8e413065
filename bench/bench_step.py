"""Training-step benchmark: flow matching vs MeanFlow per JVP backend and per execution mode, in one run.

A step is forward + loss + backward + AdamW update. Every case runs in every requested mode, so every ratio can be
taken like for like:

    eager      the model called directly
    graphed    the training call replayed from CUDA graphs (meanflow.CUDAGraphModel; CUDA only). No-grad calls (the
               guidance forward, the finite-difference forwards) run eagerly, as in training.
    compiled   torch.compile(model) (the network's forward / JVP and, through AOT autograd, its backward; the loss,
               the guidance bookkeeping and AdamW stay eager). Graph breaks and recompiles are counted per row.

Cases per mode: flow matching (ratio 0, no guidance: the baseline), MeanFlow (ratio 0.25) with each backend
(`autograd`, `explicit`, `fused`), guidance off and on (kappa 0.5, omega 1.0: the no-grad guidance forwards), and a
finite-difference baseline (`finite_difference`): the tangent du/dt taken as
    (u(z + eps v_g, t + eps, h + eps) - u(z, t, h)) / eps
from two no-grad forwards over the rows with r != t (the network's own tangent is (v_g, 1, 1)), as implementations
that avoid the JVP do; u for the loss comes from the usual forward with grad. Its step time is in the table; its
tangent error against the exact JVP is measured separately (`tangent_error` rows: bf16 autocast and fp32, several
eps, against torch.func.jvp in float64), beside the error of the exact JVP computed in the same dtype.

A case that fails (out of memory, a capture or compile error) is a row with its error, never a missing row; rows not
reached because the run was cut short say so ("status": "not reached"): every planned row is written at the start.

Timing: CUDA: each step timed with CUDA events, back to back (the host may run ahead as in training), for about
--rep-ms after --warmup-ms of warm-up; rows carry the median, p20, p80, min, max and the number of runs. CPU: the
cases of one model are timed round-robin (--reps runs each after --warmup), so load drifts on a shared machine hit all
of them alike. Ratios (`ratio_to_fm`) divide by the flow-matching step of the same mode, model and batch.

Memory (CUDA): `peak_mem_mb` = the growth of allocated memory during one step over what was allocated before it (the
figure earlier results report as "peak MB": activations and temporaries; parameters, AdamW state and the previous
step's gradients are excluded); for graphed rows plus the graph's private pool (reserved between replays).
`total_peak_mb` = the caching allocator's peak reserved memory during one step, after emptying its cache: parameters,
gradients, AdamW state, inputs, activations, graph pools and fragmentation (everything but the CUDA context).
`state_mb` breaks down the persistent part (parameters, gradients, optimizer state).

    python bench/bench_step.py --out step.json                                   # CUDA: DiT-B/2, DiT-XL/2, batch 64
    python bench/bench_step.py --models DiT-B/2:64 DiT-XL/2:32 --modes eager graphed --out step.json
    python bench/bench_step.py --device cpu --threads 1 --backends autograd explicit --modes eager compiled --out x
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import is_oom, write_results  # noqa: E402
from meanflow import CUDAGraphModel, MeanFlowLoss, build_dit, sample_t_r  # noqa: E402

GUIDANCE = {"off": {}, "on": {"omega": 1.0, "kappa": 0.5}}  # the official DiT-B/2 guidance setting
MODES = ("eager", "graphed", "compiled")
FD = "finite_difference"
# eps of the timed finite-difference rows (the time does not depend on it); the error rows sweep FD_EPS_SWEEP.
FD_EPS = {"bf16": 0.05, "fp32": 1e-3}
FD_EPS_SWEEP = {"bf16": (0.005, 0.02, 0.05, 0.1, 0.2), "fp32": (1e-4, 1e-3, 1e-2)}


# ------------------------------------------------------------------------------------------------ the step
class FiniteDifferenceJVP(nn.Module):
    """A network call with the tangent by forward difference instead of a JVP:
        u = net(z, t, h, y)                                              (with grad, all B rows)
        du/dt ~ (net(z_k + eps z_dot, t_k + eps t_dot, h_k + eps h_dot, y_k) - net(z_k, t_k, h_k, y_k)) / eps
    with both no-grad forwards over the k tangent rows (the first k, as the loss orders them). `module` is what
    meanflow.unwrap follows to the network (labels, data shape)."""

    def __init__(self, module: nn.Module, eps: float):
        super().__init__()
        self.module, self.eps = module, eps

    def forward(self, z, t, h, y=None, tangents=None):
        u = self.module(z, t, h, y)
        if tangents is None:
            return u
        return u, finite_difference_tangent(self.module, z, t, h, y, tangents, self.eps).to(u.dtype)


def finite_difference_tangent(net, z, t, h, y, tangents, eps: float) -> torch.Tensor:
    """(net(x + eps x_dot) - net(x)) / eps over the first k = len(z_dot) rows: two no-grad forwards, the difference
    taken in fp32 (fp64 for fp64 outputs)."""
    z_dot, t_dot, h_dot = tangents
    k = z_dot.shape[0]
    yk = None if y is None else y[:k]
    with torch.no_grad():
        u0 = net(z[:k], t[:k], h[:k], yk)
        u1 = net(z[:k] + eps * z_dot.to(z.dtype), t[:k] + eps * t_dot, h[:k] + eps * h_dot, yk)
    acc = torch.promote_types(u1.dtype, torch.float32)
    return (u1.to(acc) - u0.to(acc)) / eps


def make_step(model, loss_fn, x, y, opt, device, backend, call_model=None):
    """One training step; `call_model` (a CUDAGraphModel, a compiled model, a FiniteDifferenceJVP around either) is
    what the loss calls; `model.backend` is set to `backend` first."""
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


# ------------------------------------------------------------------------------------------------ the cases
def plan_cases(args, cuda: bool) -> list[dict]:
    """(mode, objective, backend, guidance) of every row of one model, in run order: per mode, flow matching first."""
    cases = []
    for mode in args.modes:
        if mode == "graphed" and not cuda:
            continue  # CUDA graphs need CUDA; CPU results have no graphed rows (stated in their notes)
        backends = args.graph_backends if mode == "graphed" and args.graph_backends is not None else args.backends
        cases.append({"mode": mode, "objective": "flow_matching", "backend": "-", "guidance": "off"})
        for guidance in args.guidance:
            for backend in backends:
                cases.append({"mode": mode, "objective": "meanflow", "backend": backend, "guidance": guidance})
            if args.fd and mode in args.fd_modes:
                cases.append({"mode": mode, "objective": "meanflow", "backend": FD, "guidance": guidance})
    return cases


def call_model_for(model, case: dict, args, dtype_name: str):
    """The module the loss calls for this case's mode (and finite-difference wrapper)."""
    inner = model
    if case["mode"] == "graphed":
        inner = CUDAGraphModel(model)
    elif case["mode"] == "compiled":
        inner = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode, fullgraph=args.fullgraph)
    if case["backend"] == FD:
        return FiniteDifferenceJVP(inner, args.fd_eps or FD_EPS[dtype_name])
    return inner


def _dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return {}
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"].get("unique_graphs", 0)}


# ------------------------------------------------------------------------------------------------ measuring
def time_cuda_steps(fn, warmup_ms: float, rep_ms: float, min_reps: int = 5) -> dict:
    """CUDA-event time of each of n back-to-back calls (one sync at the end), n from a warm-up estimate so that the
    runs take about rep_ms (at least min_reps). Median, p20, p80, min, max in ms, and n."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    warm = 0
    while (time.perf_counter() - t0) * 1e3 < warmup_ms or warm < 2:
        fn()
        warm += 1
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) * 1e3 / warm
    n = max(min_reps, int(rep_ms / max(per_call, 1e-3)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in events]
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3], "ms_min": min(times),
            "ms_max": max(times), "runs": n}


def time_round_robin(fns: list, warmup: int, reps: int) -> list:
    """CPU: every rep times each fn once, in turn (warm-up runs first, untimed). Median / p20 / p80 ms per fn, or
    the exception a fn raised (it is then left out of the later rounds)."""
    out: list = [None] * len(fns)
    times: list[list[float]] = [[] for _ in fns]
    for rnd in range(warmup + reps):
        for i, fn in enumerate(fns):
            if isinstance(out[i], BaseException):
                continue
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                out[i] = exc
                continue
            if rnd >= warmup:
                times[i].append((time.perf_counter() - t0) * 1e3)
    for i, ts in enumerate(times):
        if not isinstance(out[i], BaseException):
            q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
            out[i] = {"ms": statistics.median(ts), "ms_p20": q[0], "ms_p80": q[3], "ms_min": min(ts),
                      "ms_max": max(ts)}
    return out


def state_mb(model, opt) -> dict:
    """Persistent memory: parameters, gradients (when present), AdamW state, in MiB."""
    mib = 2 ** 20
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / mib
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None) / mib
    optim = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v)) / mib
    return {"params": round(params, 1), "grads": round(grads, 1), "optimizer": round(optim, 1)}


def cuda_memory(step, graph_pool_mb: float | None) -> dict:
    """Growth (allocated during one step over before it; + the graph pool for graphed rows) and total peak (peak
    reserved during one step after emptying the cache), in MiB. See the module doc."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    growth = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    out = {"peak_mem_mb": growth + (graph_pool_mb or 0.0), "total_peak_mb": torch.cuda.max_memory_reserved() / 2 ** 20,
           "total_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2 ** 20}
    out["peak_mem_method"] = ("growth of allocated memory over one step" if graph_pool_mb is None else
                              "graph pool (reserved) + allocated growth of a replayed step")
    return out


def _error(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:300]}"


# ------------------------------------------------------------------------------------------------ one model
def build(name: str, args, device: str, batch: int):
    torch.manual_seed(0)
    size, channels = (32, 4) if device.startswith("cuda") else (args.cpu_size, args.cpu_channels)
    model = build_dit(name, input_size=size, in_channels=channels, num_classes=args.num_classes).to(device)
    model.check_inputs = False  # no host syncs for range checks inside the timed step
    with torch.no_grad():  # random (not adaLN-zero) weights: realistic magnitudes for every op
        for p in model.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, args.num_classes, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    return model, x, y, opt, (channels, size, size)


def bench_model(name: str, batch: int, args, device: str, rows: list[dict], on_row=lambda: None) -> None:
    """Fill in this model's rows (already in `rows` with status "not reached"); `on_row()` after each."""
    cuda = device.startswith("cuda")
    dtype_name = "bf16" if cuda else "fp32"
    model, x, y, opt, shape = build(name, args, device, batch)
    mine = [r for r in rows if r["model"] == name and r["batch"] == batch and r["bench"] == "step"]
    if cuda:
        torch._dynamo.reset()
    steps = []
    for row in mine:
        row.update(input=list(shape), dtype="bf16-autocast" if cuda else "fp32")
        if row["backend"] == FD:
            row["fd_eps"] = args.fd_eps or FD_EPS[dtype_name]
        objective, backend = row["objective"], row["backend"]
        loss_fn = (MeanFlowLoss(flow_matching=True, label_dropout=0.1) if objective == "flow_matching" else
                   MeanFlowLoss(ratio=args.ratio, label_dropout=0.1, **GUIDANCE[row["guidance"]]))
        model_backend = "explicit" if backend in ("-", FD) else backend  # FM / FD: only plain forwards run
        call_model, step = None, None
        try:
            call_model = call_model_for(model, row, args, dtype_name)
            step = make_step(model, loss_fn, x, y, opt, device, model_backend, call_model)
            if row["mode"] == "compiled":
                before = _dynamo_counters()
                t0 = time.perf_counter()
                for _ in range(3):  # compiles the training call, then the guidance call's static and dynamic shapes
                    step()
                if cuda:
                    torch.cuda.synchronize()
                after = _dynamo_counters()
                row["compile"] = {"backend": args.compile_backend, "mode": args.compile_mode,
                                  "fullgraph": args.fullgraph, "first_3_steps_s": round(time.perf_counter() - t0, 1),
                                  **{k: after.get(k, 0) - before.get(k, 0) for k in after}}
            if not cuda:  # CPU: timed below, round-robin
                steps.append((row, step))
                row["status"] = "timing"
                continue
            pool = None
            if row["mode"] == "graphed":
                # The graph keeps its activations in a private pool that stays RESERVED between replays: its growth
                # over the capture is part of the row's memory.
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                reserved = torch.cuda.memory_reserved()
                step()
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # drops the warm-up's cached blocks; the graph's pool is kept
                pool = (torch.cuda.memory_reserved() - reserved) / 2 ** 20
            row.update(time_cuda_steps(step, args.warmup_ms, args.rep_ms))
            row["samples_per_s"] = batch / row["ms"] * 1e3
            row.update(cuda_memory(step, pool))
            row["state_mb"] = state_mb(model, opt)
            if row["mode"] == "graphed":
                row["graphs_captured"] = call_model.module.captures_made if backend == FD else \
                    call_model.captures_made
            row["status"] = "measured"
        except Exception as exc:  # noqa: BLE001 - one case failing must not lose the others; recorded, not skipped
            row["error"] = _error(exc)
            row["status"] = "failed"
            if not is_oom(exc):
                row["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
            print(f"{name} {row['mode']} {backend} guidance {row['guidance']}: {row['error']}", flush=True)
        finally:
            del call_model, step
            if cuda:
                torch.cuda.empty_cache()
        if cuda or "error" in row:
            on_row()
            print(_show(row), flush=True)
    if steps:
        # On a shared CPU the load drifts over minutes: time the cases round-robin so every case sees the same drift.
        for row, result in zip((r for r, _ in steps), time_round_robin([s for _, s in steps], args.warmup, args.reps)):
            if isinstance(result, BaseException):
                row.update(error=_error(result), status="failed")
            else:
                row.update(result, samples_per_s=batch / result["ms"] * 1e3, runs=args.reps, status="measured")
            print(_show(row), flush=True)
    add_ratios(mine)
    on_row()


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_fm: ms over the flow-matching step of the same mode (like for like); mem ratios likewise; and
    speedup_vs_autograd: the same mode and guidance's autograd ms over this row's."""
    by = {(r["mode"], r["objective"], r["backend"], r["guidance"]): r for r in rows if r.get("ms")}
    for r in rows:
        if not r.get("ms"):
            continue
        fm = by.get((r["mode"], "flow_matching", "-", "off"))
        if fm:
            r["ratio_to_fm"] = r["ms"] / fm["ms"]
            for key in ("peak_mem_mb", "total_peak_mb"):
                if r.get(key) and fm.get(key):
                    r[f"{key}_ratio_to_fm"] = r[key] / fm[key]
        auto = by.get((r["mode"], "meanflow", "autograd", r["guidance"]))
        if auto and r["objective"] == "meanflow":
            r["speedup_vs_autograd"] = auto["ms"] / r["ms"]


def _show(row: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "traceback_tail"}


# ------------------------------------------------------------------------------------------------ tangent error
def tangent_errors(name: str, batch: int, args, device: str) -> list[dict]:
    """Relative error of du/dt against torch.func.jvp in float64 on a MeanFlow draw (ratio 0.25, no guidance): the
    finite difference per dtype and eps, and the exact JVP (each backend) computed in the same dtype."""
    cuda = device.startswith("cuda")
    model, x, y, _, shape = build(name, args, device, batch)
    torch.manual_seed(1)
    t, r = sample_t_r(batch, sampler="logit_normal", ratio=args.ratio, device=device)
    k = int((r != t).sum())
    if k == 0:
        return []
    e = torch.randn_like(x)
    tb = t.view(-1, 1, 1, 1)
    z, v, h = (1 - tb) * x + tb * e, e - x, t - r
    ones = torch.ones(k, device=device)
    tangents = (v[:k], ones, ones)
    ref_model = copy.deepcopy(model).double()
    ref_model.backend = "autograd"
    with torch.no_grad():
        _, exact = ref_model(z.double(), t.double(), h.double(), y, tangents=tuple(a.double() for a in tangents))
    del ref_model

    def rel(approx) -> dict:
        d = approx.double() - exact
        return {"rel_l2": float(d.norm() / exact.norm()), "rel_max": float(d.abs().max() / exact.abs().max())}

    base = {"bench": "tangent_error", "model": name, "batch": batch, "tangent_rows": k, "input": list(shape),
            "reference": "torch.func.jvp in float64 (autograd backend)"}
    dtypes = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast(device.split(":")[0],
                                                                             dtype=torch.bfloat16)}
    out = []
    for dtype_name, ctx in dtypes.items():
        for eps in FD_EPS_SWEEP[dtype_name]:
            with ctx():
                du = finite_difference_tangent(model, z, t, h, y, tangents, eps)
            out.append({**base, "method": FD, "dtype": dtype_name, "fd_eps": eps, **rel(du)})
        backends = [b for b in args.backends if b != "fused" or cuda or args.error_fused]
        for backend in backends:
            model.backend = backend
            try:
                with ctx(), torch.no_grad():
                    _, du = model(z, t, h, y, tangents=tangents)
                out.append({**base, "method": f"jvp ({backend})", "dtype": dtype_name, **rel(du)})
            except Exception as exc:  # noqa: BLE001
                out.append({**base, "method": f"jvp ({backend})", "dtype": dtype_name, "error": _error(exc)})
    for row in out:
        print(_show(row), flush=True)
    return out


# ------------------------------------------------------------------------------------------------ main
def parse_models(specs: list[str], default_batch: int) -> list[tuple[str, int]]:
    """'DiT-B/2' or 'DiT-XL/2:32' (model:batch) -> [(name, batch)]."""
    out = []
    for spec in specs:
        name, _, batch = spec.partition(":")
        out.append((name, int(batch) if batch else default_batch))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=None,
                    help="DiT registry names, each optionally :batch (default: DiT-B/2 DiT-XL/2 on CUDA)")
    ap.add_argument("--modes", nargs="+", default=None, choices=MODES,
                    help="default: eager graphed on CUDA, eager on CPU")
    ap.add_argument("--backends", nargs="+", default=["autograd", "explicit", "fused"])
    ap.add_argument("--graph-backends", nargs="*", default=None,
                    help="backends of the graphed rows (default: the same as --backends)")
    ap.add_argument("--guidance", nargs="+", default=["off", "on"], choices=list(GUIDANCE))
    ap.add_argument("--no-fd", dest="fd", action="store_false", help="no finite-difference rows")
    ap.add_argument("--fd-modes", nargs="+", default=["eager", "graphed"], choices=MODES,
                    help="modes with finite-difference step rows")
    ap.add_argument("--fd-eps", type=float, default=None, help=f"eps of the timed FD rows (default {FD_EPS})")
    ap.add_argument("--no-error", dest="error", action="store_false", help="skip the tangent-error rows")
    ap.add_argument("--error-fused", action="store_true", help="also the fused JVP's error on CPU (interpreter)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True): a graph break fails")
    ap.add_argument("--batch", type=int, default=None, help="default batch (CUDA 64, CPU 32)")
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction of rows with r != t")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--cpu-size", type=int, default=32, help="image side on CPU (default 32: 256 tokens at patch 2)")
    ap.add_argument("--cpu-channels", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads on CPU (1 gives stable ratios on a shared machine: OpenMP regions stall "
                         "whenever another process holds a core)")
    ap.add_argument("--warmup", type=int, default=2, help="CPU: untimed runs per case")
    ap.add_argument("--reps", type=int, default=5, help="CPU: timed runs per case")
    ap.add_argument("--warmup-ms", type=float, default=500, help="CUDA: warm-up per row")
    ap.add_argument("--rep-ms", type=float, default=2000, help="CUDA: timed runs per row take about this long")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (a dry run of the harness)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.modes is None:
        args.modes = ["eager", "graphed"] if cuda else ["eager"]
    default_batch = args.batch or (64 if cuda else 32)
    if args.models is None:
        args.models = ["DiT-B/2", "DiT-XL/2"] if cuda else ["DiT-Tiny/2"]
    if args.quick:
        args.warmup, args.reps, args.warmup_ms, args.rep_ms = 0, 1, 100, 300
        if not cuda:
            args.models, args.cpu_size, default_batch, args.num_classes = ["DiT-Micro/4"], 16, 4, 10
    # Dynamo: one cache entry per backend, grad mode and guidance shape; the default limit of 8 would silently fall
    # back to eager for the later cases.
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)

    models = parse_models(args.models, default_batch)
    rows: list[dict] = []
    for name, batch in models:
        for case in plan_cases(args, cuda):
            rows.append({"bench": "step", "model": name, "batch": batch, **case, "cuda_graph": case["mode"] == "graphed",
                         "ratio": 0.0 if case["objective"] == "flow_matching" else args.ratio, "status": "not reached"})
    save = lambda: write_results(args.out, "step", args.device, rows, args=vars(args))  # noqa: E731
    save()
    for i, (name, batch) in enumerate(models):
        bench_model(name, batch, args, args.device, rows, save)
        save()
        if args.error and i == 0:  # the error depends on the network, not the batch: the first model, before the rest
            rows += tangent_errors(name, min(batch, 16 if cuda else batch), args, args.device)
            save()
    print(f"wrote {args.out}")
    crashed = [r for r in rows if r.get("status") == "failed" and r["mode"] == "eager" and "out of memory"
               not in r.get("error", "").lower()]
    if crashed:
        raise SystemExit(f"{len(crashed)} eager rows failed with an error other than out of memory (see the JSON)")


if __name__ == "__main__":
    main()
