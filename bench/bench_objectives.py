"""Step cost of every objective against flow matching, on the same DiT, data and batch.

A step is forward + loss + backward + AdamW update, with the objective's network (meanflow.objectives.network_spec:
iMF's DiT has a v-branch of v_depth more blocks and the condition embedders; sCM's a logvar head). Every step uses
the same draws (a fixed generator seed), so the guidance and tangent row counts do not vary between repetitions.
Flow matching (the `fm` objective, no tangent, no guidance) is the baseline of the ratios. On CPU the cases are
timed round-robin (a shared machine's load drifts hit all of them alike).

    python bench/bench_objectives.py --out bench/results/cpu/objectives.json --threads 1      # CPU, explicit
    python bench/bench_objectives.py --device cuda --backends fused --out objectives_h100.json  # GPU, fused, bf16
    python bench/bench_objectives.py --backends autograd --cases meanflow tvm --threads 1 \
        --out bench/results/cpu/objectives_autograd.json                                        # TVM (autograd)

    python bench/bench_objectives.py --backends explicit autograd --cases tvm --threads 1 \
        --out bench/results/cpu/objectives_tvm.json                                             # TVM, CPU
    python bench/bench_objectives.py --device cuda --backends fused autograd --cases tvm --compile both \
        --out $OUT/tvm_step.json                                                                # TVM, GPU (NOTES.md)

Every row also reports `saved_mb`, the tensors autograd keeps for the backward (a CPU-measurable memory cost; CUDA
rows add the allocator's peak, `peak_mem_mb`). TVM's gradient through the JVP runs on every backend
(meanflow.models.backends.TANGENT_GRAD_BACKENDS); a backend outside it would be skipped, not faked. --compile on / both
adds rows with the network compiled as train.compile does (meanflow.training.compile.compile_model: inductor on CUDA,
aot_eager on CPU, where inductor's C++ build would dominate), case names ending in " compiled".
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import peak_memory_mb, time_fn, time_interleaved, write_results  # noqa: E402
from meanflow.models import DIT_MODELS, DiT, count_parameters  # noqa: E402
from meanflow.models.backends import TANGENT_GRAD_BACKENDS  # noqa: E402
from meanflow.objectives import build_objective, default_config, network_spec  # noqa: E402
from meanflow.training.compile import compile_model  # noqa: E402

# (row name, objective, config changes, extra call keywords)
CASES = [
    ("fm", "fm", {}, {}),
    ("meanflow", "meanflow", {"ratio": 0.25}, {}),
    ("meanflow +guidance", "meanflow", {"ratio": 0.25, "omega": 1.0, "kappa": 0.5}, {}),
    ("imf", "imf", {"omega_max": 1.0, "sample_omega": 1.0}, {}),
    ("imf +guidance", "imf", {}, {}),
    ("scm", "scm", {}, {"step": 10_000}),
    ("alphaflow alpha=1", "alphaflow", {}, {"alpha": 1.0}),
    ("alphaflow alpha=0.5", "alphaflow", {}, {"alpha": 0.5}),
    ("alphaflow alpha=0", "alphaflow", {}, {"alpha": 0.0}),
    ("alphaflow alpha=0.5 +guidance", "alphaflow", {"omega": 1.0, "kappa": 0.5}, {"alpha": 0.5}),
    # TVM: gradients through the JVP (tangent_grad: the autograd backend only, for now), its EMA teacher's no-grad
    # call (here the network itself, the teacher of step 0: the same cost), and the official detach_jvp variant
    ("tvm", "tvm", {"cfg": 1.0, "sample_cfg": 1.0}, {}),
    ("tvm +guidance", "tvm", {}, {}),
    ("tvm detach_jvp +guidance", "tvm", {"detach_jvp": True}, {}),
]


def build_net(name: str, spec, args, device):
    cfg = DIT_MODELS[name]
    extra = {"v_depth": min(8, max(1, cfg.depth // 2)) if "v" in spec.heads else 0, "logvar": "logvar" in spec.heads,
             "conditions": spec.conditions}
    net = DiT(args.size, args.channels, cfg.hidden, cfg.depth, cfg.heads, cfg.patch, num_classes=args.num_classes,
              **extra).to(device)
    net.check_inputs = False
    torch.manual_seed(0)
    with torch.no_grad():  # random (not adaLN-zero) weights: realistic magnitudes for every op
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net


def saved_activation_mb(step, params) -> float:
    """MiB of the distinct tensors autograd saves for the backward during one step, the parameters left out: the
    memory a step's graph holds at its peak, measurable on CPU too (on CUDA the rows also carry the allocator's peak).
    Tensors inside torch.func.jvp are unwrapped to the storage they live in; the few without a readable storage there
    (transposed views of the weights, scalars) are left out."""
    from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor

    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        base = t
        while is_functorch_wrapped_tensor(base):
            base = get_unwrapped(base)
        try:
            storage = base.untyped_storage()
            ptr = storage.data_ptr()
        except RuntimeError:  # no readable storage: inside torch.func, the parameters' transposed views
            return t
        if ptr not in skip:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2**20


def make_step(net, objective, x, y, opt, backend, call_kw, device):
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()

    def step():
        net.backend = backend
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, stats = objective(net, x, y, generator=torch.Generator(device).manual_seed(0), **call_kw)
        loss.backward()
        opt.step()
        return stats

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="DiT registry name (default: DiT-Tiny/2 on CPU, DiT-B/2 on CUDA)")
    ap.add_argument("--backends", nargs="+", default=None, help="default: explicit on CPU, fused on CUDA")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="image side (default 32)")
    ap.add_argument("--channels", type=int, default=None, help="channels (default 1 on CPU, 4 on CUDA)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 warm-up, 2 reps (a dry run of the harness)")
    ap.add_argument("--cases", nargs="+", default=None, metavar="PREFIX",
                    help="only the cases whose name starts with one of these (fm, the baseline, always runs)")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off",
                    help="the network eager (off), compiled as train.compile does (on), or both rows")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or ("DiT-B/2" if cuda else "DiT-Tiny/2")
    args.backends = args.backends or (["fused"] if cuda else ["explicit"])
    args.size = args.size or 32
    args.channels = args.channels or (4 if cuda else 1)
    batch = args.batch or (128 if cuda else 32)
    if args.quick:
        args.model, args.size, batch, args.num_classes, args.warmup, args.reps = "DiT-Micro/4", 16, 4, 10, 1, 2
    x = torch.randn(batch, args.channels, args.size, args.size, device=args.device)
    y = torch.randint(0, args.num_classes, (batch,), device=args.device)
    rows, steps = [], []
    compiled_modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    if args.compile != "off":  # one compiled frame per network instance (and per call kind): room for every row
        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
    plan = [(backend, case, compiled) for backend in args.backends for case in CASES for compiled in compiled_modes]
    for backend, (name, objective, changes, call_kw), compiled in plan:
        if objective == "fm" and (backend != args.backends[0] or compiled != compiled_modes[0]):
            continue  # flow matching has no tangent: one baseline row
        if objective != "fm" and args.cases and not any(name.startswith(c) for c in args.cases):
            continue
        if objective == "tvm" and not changes.get("detach_jvp") and backend not in TANGENT_GRAD_BACKENDS:
            print(f"skipped {name!r} on {backend!r}: its ops do not differentiate the tangent yet", flush=True)
            continue
        try:
            row, step = _row(args, backend, name, objective, changes, call_kw, compiled, x, y, batch, cuda)
        except Exception as e:  # noqa: BLE001 - a failing row (an OOM, a compile error) is recorded, the run goes on
            print(f"{name!r} on {backend!r} (compiled={compiled}) failed: {type(e).__name__}: {e}", flush=True)
            rows.append({"bench": "objectives", "model": args.model, "case": name + (" compiled" if compiled else ""),
                         "objective": objective, "compiled": compiled, "backend": backend, "batch": batch,
                         "ms": None, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            if cuda:
                torch.cuda.empty_cache()
            continue
        if step is not None:
            steps.append(step)
        rows.append(row)
    if steps:
        timed = [r for r in rows if r.get("ms", 0) is not None and "error" not in r]
        for row, result in zip(timed, time_interleaved(steps, warmup=args.warmup, reps=args.reps)):
            row.update(result, samples_per_s=batch / result["ms"] * 1e3)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "config"},
                  flush=True)
    base = next(r for r in rows if r["objective"] == "fm")
    for r in rows:
        r["ratio_to_fm"] = r["ms"] / base["ms"] if r.get("ms") is not None and base.get("ms") else None
    write_out(args, rows)


def _row(args, backend, name, objective, changes, call_kw, compiled, x, y, batch, cuda):
    """(row, the step to time on CPU, or None: CUDA rows are timed here)."""
    cfg = default_config(objective).replace(label_dropout=0.1, **changes)
    spec = network_spec(cfg)
    net = build_net(args.model, spec, args, args.device)
    obj = build_objective(cfg, model=net, total_steps=1)
    if compiled:
        net.backend = backend
        compile_model(net, backend="inductor" if cuda else "aot_eager")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    step = make_step(net, obj, x, y, opt, backend, call_kw, args.device)
    stats = step()  # the row counts of this (fixed) draw
    row = {"bench": "objectives", "model": args.model, "case": name + (" compiled" if compiled else ""),
           "objective": objective, "compiled": compiled,
           "backend": "-" if objective == "fm" else backend, "batch": batch,
           "input": [args.channels, args.size, args.size], "params": count_parameters(net),
           "heads": list(spec.heads), "jvp_rows": int(stats.get("jvp_rows", 0)),
           "guidance_rows": int(stats.get("guidance_rows", 0)), "extra_rows": int(stats.get("extra_rows", 0)),
           "dtype": "bf16-autocast" if cuda else "fp32", "config": {k: v for k, v in changes.items()},
           "call": {k: v for k, v in call_kw.items()}}
    row["saved_mb"] = saved_activation_mb(step, list(net.parameters()))
    if cuda:
        row.update(time_fn(step, args.device, warmup=args.warmup, reps=args.reps, cuda_warmup_ms=500,
                           cuda_rep_ms=2000))
        row["peak_mem_mb"] = peak_memory_mb(step, args.device)
        row["samples_per_s"] = batch / row["ms"] * 1e3
        print({k: v for k, v in row.items() if k != "config"}, flush=True)
        return row, None
    return row, step


def write_out(args, rows):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        commit = "unknown"
    write_results(args.out, "objectives", args.device, rows, args=vars(args), commit=commit,
                  command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
    print(f"wrote {args.out}")
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    peak = any(r.get("peak_mem_mb") is not None for r in rows)
    lines = ["| case | backend | params | tangent rows | guidance rows | extra rows | ms / step | vs flow matching | "
             "saved for backward" + (" | peak memory |" if peak else " |"),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if peak else "")]
    for r in rows:
        if r.get("ms") is None:
            lines.append(f"| {r['case']} | {r['backend']} | failed: {r.get('error', '?')} |")
            continue
        mem = f" {r['peak_mem_mb']:.0f} MiB |" if peak and r.get("peak_mem_mb") is not None else (" - |" if peak else "")
        saved = f"{r['saved_mb']:.1f} MiB" if r.get("saved_mb") is not None else "-"
        lines.append(f"| {r['case']} | {r['backend']} | {r['params'] / 1e6:.2f}M | {r['jvp_rows']} | "
                     f"{r['guidance_rows']} | {r['extra_rows']} | {r['ms']:.1f} | {r['ratio_to_fm']:.2f}x | "
                     f"{saved} |{mem}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
