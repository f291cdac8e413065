"""Host time per fused op call, this checkout against another one, measured in ONE process (A/B without the drift of a
shared machine between two runs).

The other checkout's mfkernels is copied to a temporary package `mfkbase` whose ops are registered under the
`mfkbase::` namespace (so both sets of custom ops coexist); every op of both fused op tables is then called at
bench_host's tiny shapes, the two trees in turn within each round, Triton launches stubbed (the Python around a
launch is what is timed). Rows: per op and grad mode, the best mean over the rounds for each tree (checked table, what
a user's call runs) and, where the tree has one, for its unchecked table (what a network's layers run).
--parts step adds an eager MeanFlow training step of bench_host's tiny DiT (forward + JVP, loss, backward, AdamW) with
each tree's ops: meanflow's network takes the other tree's op table while its step runs (everything else, meanflow
and the target op, is shared).

    python bench/host_ab.py --base /path/to/other/checkout --threads 1 --out bench/results/cpu/host_ab.json
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors count as Triton-capable; launches are stubbed anyway

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_host import triton_launches  # noqa: E402
from bench.common import write_results  # noqa: E402

OPS = ("layernorm_modulate", "gated_residual", "linear", "mlp", "gelu_tanh", "silu", "attention", "rmsnorm", "swiglu",
       "rope", "qk_norm_rope")


def import_as_base(checkout: Path):
    """The checkout's mfkernels as package `mfkbase`, its ops in the `mfkbase` namespace."""
    root = Path(tempfile.mkdtemp(prefix="mfkbase_"))
    shutil.copytree(checkout / "mfkernels", root / "mfkbase", ignore=shutil.ignore_patterns("*.so", "_build"))
    for path in (root / "mfkbase").rglob("*.py"):
        text = path.read_text()
        text = text.replace("mfkernels::", "mfkbase::").replace("torch.ops.mfkernels.", "torch.ops.mfkbase.")
        text = re.sub(r'NAMESPACE = "mfkernels"', 'NAMESPACE = "mfkbase"', text)
        path.write_text(text)
    sys.path.insert(0, str(root))
    import mfkbase.ops

    return mfkbase.ops


def cases(table, device: str, dtype: torch.dtype):
    """bench_host's op_host shapes: (B 2, N 16, C 64, kt 1); per-head ops on (B, 2 heads, N, 32)."""
    b, n, c, heads, kt = 2, 16, 64, 2, 1
    dh = c // heads
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x, xd, m, md = mk(b, n, c), mk(kt, n, c), mk(b, c), mk(kt, c)
    w1, b1, w2, b2 = mk(4 * c, c), mk(4 * c), mk(c, 4 * c), mk(c)
    q, qd = mk(b, heads, n, dh), mk(kt, heads, n, dh)
    w13, b13, w2h, wh = mk(4 * c, c), mk(4 * c), mk(c, 2 * c), mk(dh)
    cos, sin = mk(n, dh // 2), mk(n, dh // 2)
    calls = {
        "layernorm_modulate": lambda: table.layernorm_modulate(x, m, m, xd, md, md),
        "gated_residual": lambda: table.gated_residual(x, m, x, xd, md, xd),
        "linear": lambda: table.linear(x, w1, b1, xd),
        "mlp": lambda: table.mlp(x, w1, b1, w2, b2, xd),
        "gelu_tanh": lambda: table.gelu_tanh(x, xd),
        "silu": lambda: table.silu(m, md),
        "attention": lambda: table.attention(q, q, q, qd, qd, qd),
        "rmsnorm": lambda: table.rmsnorm(q, wh, qd),
        "swiglu": lambda: table.swiglu(x, w13, b13, w2h, b2, xd),
        "rope": lambda: table.rope(q, cos, sin, qd),
        "qk_norm_rope": lambda: table.qk_norm_rope(q, q, wh, wh, cos, sin, qd, qd),
    }
    return calls, (x, m, w1, b1, w2, b2, q, w13, b13, w2h, wh)


def mean_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def step_rows(base_ops, steps: int, rounds: int) -> list[dict]:
    """Eager MeanFlow step (ratio 0.25; and with guidance) of DiT-Micro/2 at batch 4: base tree's ops vs this tree's."""
    import statistics

    import meanflow.models.network as network
    from meanflow import MeanFlowLoss, build_dit

    own_ops_for = network.ops_for

    def base_ops_for(backend, checked=True):  # the base tree's table (it has only checked ops)
        return base_ops.ops_table({"fused": "fused", "explicit": "reference"}[backend])

    cases = {}
    for objective, overrides in (("meanflow", dict(ratio=0.25)), ("meanflow_guided", dict(ratio=0.25, omega=1.0,
                                                                                          kappa=0.5))):
        for tree, ops_for in (("base", base_ops_for), ("this", own_ops_for)):
            torch.manual_seed(0)
            net = build_dit("DiT-Micro/2", input_size=8, in_channels=2, num_classes=10, backend="fused")
            net.check_inputs = False
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            loss_fn = MeanFlowLoss(loss_op="auto", **overrides)
            x, y = torch.randn(4, 2, 8, 8), torch.randint(0, 10, (4,))
            g = torch.Generator().manual_seed(0)

            def step(net=net, opt=opt, loss_fn=loss_fn, x=x, y=y, g=g, ops_for=ops_for):
                network.ops_for = ops_for
                try:
                    opt.zero_grad(set_to_none=True)
                    loss, _ = loss_fn(net, x, y, generator=g)
                    loss.backward()
                    opt.step()
                finally:
                    network.ops_for = own_ops_for

            cases[(objective, tree)] = step
    for step in cases.values():  # warm up
        for _ in range(3):
            step()
    times = {key: [] for key in cases}
    for _ in range(rounds):
        for key, step in cases.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[key].append((time.perf_counter() - t0) / steps * 1e3)
    rows = []
    for objective in ("meanflow", "meanflow_guided"):
        row = {"part": "host_ab_step", "objective": objective, "model": "DiT-Micro/2", "batch": 4, "mode": "eager"}
        for tree in ("base", "this"):
            row[f"{tree}_step_ms"] = statistics.median(times[(objective, tree)])
            row[f"{tree}_step_ms_min"] = min(times[(objective, tree)])
        row["this_over_base"] = row["this_step_ms"] / row["base_step_ms"]
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the other checkout (its mfkernels/ is copied)")
    p.add_argument("--out", required=True)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--note", default=None)
    p.add_argument("--parts", default="ops", help="comma-separated: ops, step")
    p.add_argument("--steps", type=int, default=5, help="steps per timed mean (step)")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # stubbed kernels leave outputs unwritten
    base_ops = import_as_base(Path(args.base).resolve())
    from mfkernels import ops as this_ops

    tables = {"base": base_ops.ops_table("fused"), "this": this_ops.ops_table("fused")}
    try:
        tables["this_unchecked"] = this_ops.ops_table("fused", checked=False)
    except TypeError:  # a tree without unchecked tables
        pass
    rows = []
    with triton_launches(stub=True):
        for grad in ((False, True) if "ops" in parts else ()):
            built = {name: cases(table, "cpu", torch.float32) for name, table in tables.items()}
            for _, params in built.values():
                for t in params:
                    t.requires_grad_(grad)
            for op in OPS:
                fns = {name: calls[op] for name, (calls, _) in built.items()}
                for fn in fns.values():  # warm up (first-call setup)
                    fn()
                best = {name: float("inf") for name in fns}
                for _ in range(args.rounds):  # round-robin: load drifts hit every tree alike
                    for name, fn in fns.items():
                        best[name] = min(best[name], mean_us(fn, args.calls))
                row = {"part": "host_ab", "op": op, "requires_grad": grad, "triton_stubbed": True,
                       **{f"{name}_us": v for name, v in best.items()}, "this_over_base": best["this"] / best["base"]}
                rows.append(row)
                print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        if "step" in parts:
            rows += step_rows(base_ops, args.steps, args.rounds)
    write_results(args.out, "host_ab", "cpu", rows, base=str(args.base), note=args.note, calls=args.calls,
                  rounds=args.rounds)


if __name__ == "__main__":
    main()
