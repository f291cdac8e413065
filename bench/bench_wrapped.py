"""A wrapped diffusers DiT (meanflow.models.wrap) against the engine's own DiT of the same size, and against
torch.func.jvp with torch's math attention (what peers run): MeanFlow step time and peak memory, the tangent call under
torch.compile, and the error of the finite-difference tangent.

Cases of the step table (MeanFlow, ratio 0.25, no guidance; forward + loss + backward + AdamW, the same draws every
repetition):
    flow matching            the wrapped module's plain call only (no tangent): the baseline of the ratios
    wrapped, fused           torch.func.jvp over the first k rows under mfkernels.jvp_attention() (fused attention)
    wrapped, fused, separate the same with tangent_pass="separate" (no-grad tangent pass + a primal pass with grad)
    wrapped, math            the same jvp with torch's math attention (backend "explicit")
    wrapped, autograd        torch.func.jvp over the WHOLE batch, math attention (backend "autograd"; the peers' way)
    wrapped, fd              tangent="fd": one no-grad forward at x + eps x_dot over the k rows
    engine DiT, explicit / fused   meanflow.models.DiT with the same hidden, depth, heads, patch (its own forward_jvp)
On CPU the Triton kernels do not run (the fused rows use the pure-torch references) and peak memory is not measured
(bench.common.peak_memory_mb: CUDA only); the cases are timed round-robin.

The tangent-call table times one tangent call (no grad) eagerly and under torch.compile: the routed jvp (Dynamo runs it
eagerly: it cannot trace the routing inside the transform) and torch.func.jvp with math attention (which Dynamo
traces whole). The error table compares the finite difference (per dtype and eps) and the exact jvp in the same dtype
with torch.func.jvp in float64.

    python bench/bench_wrapped.py --out bench/results/cpu/wrapped.json --threads 1        # CPU, small size
    python bench/bench_wrapped.py --device cuda --out wrapped_h100.json                   # GPU (bench/NOTES.md)
    python bench/bench_wrapped.py --dry-run                                               # tiny, under a minute
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import peak_memory_mb, time_fn, time_interleaved, write_results  # noqa: E402
from meanflow.models import DiT, count_parameters, wrap  # noqa: E402
from meanflow.objectives import FlowMatchingLoss, MeanFlowLoss, sample_t_r  # noqa: E402

FD_EPS = {"fp32": (1e-4, 1e-3, 1e-2, 5e-3), "bf16": (5e-3, 0.02, 0.05, 0.1)}


# ------------------------------------------------------------------------------------------------ the models
def diffusers_dit(args, device):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=args.heads, attention_head_dim=args.hidden // args.heads,
                                 in_channels=args.channels, num_layers=args.depth, sample_size=args.size,
                                 patch_size=args.patch, num_embeds_ada_norm=args.num_classes).to(device)


def randomized(net, seed=0):
    """Random weights (not the zero inits): realistic magnitudes for every op and tangent."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    net.check_inputs = False
    return net


def build_cases(args, device):
    """(case name, network, backend, objective)."""
    base = randomized(wrap(diffusers_dit(args, device), time_scale=args.time_scale))
    engine = randomized(DiT(args.size, args.channels, args.hidden, args.depth, args.heads, args.patch,
                            num_classes=args.num_classes).to(device))
    mf = MeanFlowLoss(ratio=args.ratio, label_dropout=0.1)
    fm = FlowMatchingLoss()

    def variant(**changes):
        net = copy.deepcopy(base)
        for k, v in changes.items():
            setattr(net, k, v)
        return net

    return [
        ("flow matching", variant(), "-", fm),
        ("wrapped, fused", variant(), "fused", mf),
        ("wrapped, fused, separate", variant(tangent_pass="separate"), "fused", mf),
        ("wrapped, math", variant(), "explicit", mf),
        ("wrapped, autograd", variant(), "autograd", mf),
        ("wrapped, fd", variant(tangent="fd", fd_eps=args.fd_eps), "fused", mf),
        ("engine DiT, explicit", engine, "explicit", mf),
        ("engine DiT, fused", copy.deepcopy(engine), "fused", mf),
    ]


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


def make_step(net, objective, x, y, backend, device):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95))
    if backend != "-":
        net.backend = backend

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss, stats = objective(net, x, y, generator=torch.Generator(device).manual_seed(0))
        loss.backward()
        opt.step()
        return stats

    return step


def step_table(args, device, x, y) -> list[dict]:
    rows, steps = [], []
    for name, net, backend, objective in build_cases(args, device):
        step = make_step(net, objective, x, y, backend, device)
        stats = step()
        row = {"bench": "wrapped_step", "case": name, "backend": backend, "params": count_parameters(net),
               "batch": x.shape[0], "tangent_rows": int(stats.get("jvp_rows", 0)),
               "dtype": "bf16-autocast" if device.startswith("cuda") else "fp32"}
        if device.startswith("cuda"):
            row.update(time_fn(step, device, warmup=args.warmup, reps=args.reps, cuda_warmup_ms=500,
                               cuda_rep_ms=2000))
            row["peak_mem_mb"] = peak_memory_mb(step, device)
        else:
            steps.append(step)
        rows.append(row)
    if steps:
        for row, result in zip(rows, time_interleaved(steps, warmup=args.warmup, reps=args.reps)):
            row.update(result, peak_mem_mb=None)
    base = next(r for r in rows if r["case"] == "flow matching")
    for r in rows:
        r["ratio_to_fm"] = r["ms"] / base["ms"]
        r["samples_per_s"] = r["batch"] / r["ms"] * 1e3
    return rows


# ---------------------------------------------------------------------------------------- tangent call, compile
def draws(args, x, device):
    torch.manual_seed(1)
    t, r = sample_t_r(x.shape[0], sampler="logit_normal", ratio=args.ratio, device=device)
    k = max(1, int((r != t).sum()))
    e = torch.randn_like(x)
    tb = t.view(-1, 1, 1, 1)
    z, v = (1 - tb) * x + tb * e, e - x
    return z[:k], t[:k], (t - r)[:k], v[:k], k


def tangent_call_table(args, device, x, y) -> list[dict]:
    """One tangent call (no grad) of the diffusers DiT itself (module(z, timestep=1000 t, class_labels=y), the tangent
    along (v, 1)), eager and compiled: routed to the fused attention, and torch.func.jvp with math attention."""
    import torch._dynamo
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mfkernels import jvp_attention

    module = randomized(diffusers_dit(args, device)).eval()
    z, t, _, v, k = draws(args, x, device)
    yk, ones = y[:k], torch.ones(k, device=device)

    def call(z, t):
        return module(z, timestep=args.time_scale * t, class_labels=yk, return_dict=False)[0]

    def routed():
        with jvp_attention():
            return torch.func.jvp(call, (z, t), (v, ones))

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(call, (z, t), (v, ones))

    rows = []
    for name, fn, compiled in (("routed jvp (fused attention)", routed, False),
                               ("routed jvp (fused attention)", routed, True),
                               ("torch.func.jvp, math attention", math, False),
                               ("torch.func.jvp, math attention", math, True)):
        torch._dynamo.reset()
        run = torch.compile(fn, backend=args.compile_backend) if compiled else fn
        row = {"bench": "wrapped_tangent_call", "case": name, "compiled": compiled, "tangent_rows": k,
               "compile_backend": args.compile_backend if compiled else None}
        try:
            with torch.no_grad(), autocast(device), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if compiled:
                    eager_out = fn()[1].float()
                    out = run()[1].float()                       # compiles (not timed)
                    row["max_rel_diff_to_eager"] = float((out - eager_out).abs().max() / eager_out.abs().max())
                    torch._dynamo.reset()
                    row["dynamo_graphs"] = torch._dynamo.explain(fn)().graph_count
                    torch._dynamo.reset()
                    run = torch.compile(fn, backend=args.compile_backend)
                    run()
                row.update(time_fn(lambda: run(), device, warmup=args.warmup, reps=args.reps))
        except Exception as exc:  # noqa: BLE001 - a failure is a result here
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
        print(_show(row), flush=True)
    torch._dynamo.reset()
    return rows


# ------------------------------------------------------------------------------------------------ FD error
def error_table(args, device, x, y) -> list[dict]:
    """Relative error of du/dt against torch.func.jvp in float64: the finite difference per dtype and eps, and the
    exact (routed) jvp in the same dtype; for each timestep scale (the curvature of u in t grows with it)."""
    rows = []
    for time_scale in args.fd_time_scales:
        rows += _errors(args, device, x, y, time_scale)
    return rows


def _errors(args, device, x, y, time_scale: float) -> list[dict]:
    net = randomized(wrap(diffusers_dit(args, device), time_scale=time_scale))
    z, t, h, v, k = draws(args, x, device)
    yk, ones = y[:k], torch.ones(k, device=device)
    ref = copy.deepcopy(net).double()
    ref.backend = "explicit"
    with torch.no_grad():
        _, exact = ref(z.double(), t.double(), h.double(), yk, tangents=(v.double(), ones.double(), ones.double()))

    def rel(approx) -> dict:
        d = approx.double() - exact
        return {"rel_l2": float(d.norm() / exact.norm()), "rel_max": float(d.abs().max() / exact.abs().max())}

    dtypes = {"fp32": contextlib.nullcontext}
    if device.startswith("cuda"):
        dtypes["bf16"] = lambda: autocast(device)
    rows = []
    base = {"bench": "wrapped_tangent_error", "tangent_rows": k, "time_scale": net.adapter.time_scale,
            "reference": "torch.func.jvp in float64 (math attention)"}
    for dtype, ctx in dtypes.items():
        for eps in FD_EPS[dtype]:
            fd = copy.deepcopy(net)
            fd.tangent, fd.fd_eps = "fd", eps
            with ctx(), torch.no_grad():
                _, du = fd(z, t, h, yk, tangents=(v, ones, ones))
            rows.append({**base, "method": "finite difference", "dtype": dtype, "fd_eps": eps, **rel(du)})
        with ctx(), torch.no_grad():
            _, du = net(z, t, h, yk, tangents=(v, ones, ones))
        rows.append({**base, "method": "jvp (fused attention)", "dtype": dtype, **rel(du)})
    for row in rows:
        print(_show(row), flush=True)
    return rows


def _show(row: dict) -> dict:
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=None, help="image side (default 32 on CPU, 32 latents on CUDA)")
    ap.add_argument("--channels", type=int, default=None, help="default 1 on CPU, 4 on CUDA")
    ap.add_argument("--hidden", type=int, default=None, help="default 96 on CPU (DiT-Tiny), 768 on CUDA (DiT-B)")
    ap.add_argument("--depth", type=int, default=None, help="default 4 on CPU, 12 on CUDA")
    ap.add_argument("--heads", type=int, default=None, help="default 4 on CPU, 12 on CUDA")
    ap.add_argument("--patch", type=int, default=None, help="default 4 on CPU, 2 on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 128 on CUDA")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=0.25, help="MeanFlow's fraction of tangent rows")
    ap.add_argument("--time-scale", type=float, default=1000.0, help="the module's timestep = time_scale * t")
    ap.add_argument("--fd-eps", type=float, default=1e-3, help="eps of the timed finite-difference case")
    ap.add_argument("--fd-time-scales", type=float, nargs="+", default=[1000.0, 1.0],
                    help="timestep scales of the error table")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tables", nargs="+", default=["step", "tangent_call", "error"],
                    choices=["step", "tangent_call", "error"])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, 1 rep, eager compile backend: the harness")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = {"size": 32, "channels": 4 if cuda else 1, "hidden": 768 if cuda else 96, "depth": 12 if cuda else 4,
                "heads": 12 if cuda else 4, "patch": 2 if cuda else 4, "batch": 128 if cuda else 32}
    if args.dry_run:
        defaults = {"size": 8, "channels": 1, "hidden": 16, "depth": 1, "heads": 2, "patch": 4, "batch": 4}
        args.warmup, args.reps, args.num_classes, args.compile_backend = 0, 1, 10, "eager"
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    warnings.filterwarnings("ignore", message=".*falling back to the pure-torch reference.*")
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=args.device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=args.device)
    rows = []
    if "step" in args.tables:
        step_rows = step_table(args, args.device, x, y)
        for row in step_rows:
            print(_show(row), flush=True)
        rows += step_rows
    if "tangent_call" in args.tables:
        rows += tangent_call_table(args, args.device, x, y)
    if "error" in args.tables:
        rows += error_table(args, args.device, x, y)
    if args.out:
        write_results(args.out, "wrapped", args.device, rows, args=vars(args))
    return rows


if __name__ == "__main__":
    main()
