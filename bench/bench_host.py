"""Host work of a training step: kernel launches per DiT block, host time per fused op, host time per step.

Three parts, each written as it finishes (CPU and CUDA; on CPU the Triton kernels run in the interpreter or are stubbed):

  launches   launches per DiT block: (depth-4 model - depth-2 model) / 2, counted below autograd.       -> rows
             Counted: every aten op that reaches a TorchDispatchMode except views and pure allocations (on CUDA
             each is one kernel launch or one cuBLAS call; allocation-only ops launch nothing), plus every Triton
             launch (JITFunction.run / the interpreter's run). A custom op reached through the dispatcher (the fused
             ops' eager path does not go through it; the attention's does) is not a launch; the aten ops inside its
             body are not seen (the attention's: allocations only). Paths: fused forward+JVP and its backward (the
             MeanFlow main call, kt = B/4), plain forward and backward (flow matching, guidance), explicit
             forward+JVP and backward. Counts do not depend on sizes, so the model is tiny.
  op_host    host microseconds per call of every fused op at a tiny shape (so the device work is negligible): the
             eager path (mfkernels._library.FusedOp: an autograd.Function over the op's functions), the same call
             forced through the registered torch.library op, and the plain torch counterpart. On CPU the Triton
             launch itself is stubbed out (--stub-triton, default on CPU): the interpreter's cost would swamp
             everything, and the GPU launch cost (Triton 3.6's JIT launcher; GPU rows:
             bench/results/h200-2026-11-26-b/overhead.json) cannot be measured without a GPU. So CPU rows say what the
             Python around a launch costs, not what a GPU call costs.
  step_host  one training step (forward + loss + backward + AdamW) of a DiT at a tiny batch, where the device work is
             negligible and the step time is host time: MeanFlow fused (guidance off / on) and flow matching, each
             eager, on CUDA graphed (CUDAGraphModel), and compiled (train.compile's whole-model compile; on CUDA only
             with --step-compiled: minutes of Inductor compiling).
  fsdp       (not by default) FSDP2 with world size 1: step times of flow matching and MeanFlow fused at DiT-B/2
             batch 64, each block compiled then sharded (train.compile under FSDP2), ratios to flow matching.

    python bench/bench_host.py --threads 1 --out bench/results/cpu/host.json         # CPU: stubbed Triton
    python bench/bench_host.py --device cuda --model DiT-B/2 --out OUT/host.json     # GPU: real launches
    python bench/bench_host.py --quick ...                                           # a dry run (the GPU suite on CPU)
    python bench/bench_host.py --parts fsdp --device cuda --out OUT/fsdp.json        # FSDP2 world size 1, compiled


What the CPU numbers predict for a GPU: launch counts carry over exactly (same code path, device independent). Host
time per op and per step on CPU excludes the launches themselves and runs on a slower, shared CPU than a GPU server's:
read ratios (fused vs torch, eager path vs custom-op dispatch, before vs after), not absolute microseconds.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402

# aten ops that only allocate or relabel memory: no kernel launch on CUDA
NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
             "aten.new_empty.default", "aten.new_empty_strided.default", "aten.lift_fresh.default",
             "aten.set_.source_Storage_storage_offset", "aten.set_.source_Storage", "aten.resize_.default",
             "aten._local_scalar_dense.default",
             "aten._unsafe_view.default",  # a view that does not share view metadata: no data moves
             "aten.promote_types.default"}  # a dtype computation (host only)


# ------------------------------------------------------------------------------------------------ launch counting
class LaunchCounter(TorchDispatchMode):
    """Counts the aten ops below autograd (minus views and allocations) and the Triton launches in its context.

    mfkernels_observer: the fused ops keep their eager path under this mode (see mfkernels._library._plain_eager).
    stub_triton: Triton launches return at once instead of running (host-time measurements on CPU)."""

    mfkernels_observer = True

    def __init__(self, stub_triton: bool = False):
        super().__init__()
        self.aten: collections.Counter = collections.Counter()
        self.triton: collections.Counter = collections.Counter()
        self.custom_ops: collections.Counter = collections.Counter()
        self.scalar_reads = 0   # .item() / bool(tensor): a host sync on CUDA when the tensor lives there
        self.nonzero = 0        # data-dependent shapes (the guidance rows): a host sync on CUDA
        self._patch = triton_launches(self.triton, stub=stub_triton)

    def __enter__(self):
        self._patch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._patch.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == "aten._local_scalar_dense.default":
            self.scalar_reads += 1
        elif not name.startswith("aten."):
            # a custom op reached through the dispatcher (e.g. torch.ops.mfkernels.attention_jvp_fwd): not a kernel
            # itself; its Triton launches are counted by triton_launches, its inner aten ops are not seen here
            self.custom_ops[name] += 1
        elif not func.is_view and name not in NO_KERNEL:
            self.aten[name] += 1
            if name.startswith("aten.nonzero"):
                self.nonzero += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())


@contextlib.contextmanager
def triton_launches(counter: collections.Counter | None = None, stub: bool = False):
    """Count (and optionally stub out) every Triton kernel launch: JITFunction.run on a GPU, the interpreter's run on
    CPU. Autotuned kernels count their real launches (autotuning runs once, before any timed call)."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:  # pragma: no cover
        yield
        return
    classes = [jit.JITFunction, interpreter.InterpretedFunction]
    originals = {cls: cls.run for cls in classes}

    def make(orig):
        def run(self, *args, **kwargs):
            if counter is not None:
                counter[getattr(self, "__name__", None) or self.fn.__name__] += 1
            if stub and not kwargs.get("warmup", False):
                return None
            return orig(self, *args, **kwargs)
        return run

    for cls in classes:
        cls.run = make(originals[cls])
    try:
        yield
    finally:
        for cls, orig in originals.items():
            cls.run = orig


def tiny_dit(depth: int, backend: str, device: str, num_classes: int = 10):
    from meanflow import DiT

    torch.manual_seed(0)
    net = DiT(input_size=8, in_channels=2, hidden=32, depth=depth, heads=2, patch=2, num_classes=num_classes,
              backend=backend).to(device)
    net.check_inputs = False
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net


def count_call(net, device: str, *, tangents: bool, backend: str, stub: bool):
    """(forward counter, backward counter) of one model call with batch 4 (kt = 1 with tangents)."""
    batch, kt = 4, 1
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(batch, *net.data_shape, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    h = t * 0.5
    y = torch.randint(0, net.num_classes, (batch,), generator=g).to(device)
    ones = torch.ones(kt, device=device)
    fwd, bwd = LaunchCounter(stub), LaunchCounter(stub)
    with fwd:
        if tangents:
            u, _ = net(z, t, h, y, tangents=(z[:kt], ones, ones), backend=backend)
        else:
            u = net(z, t, h, y, backend=backend)
    seed = torch.ones_like(u)
    with bwd:
        u.backward(seed)
    return fwd, bwd


def part_launches(device: str, stub: bool) -> list[dict]:
    """Launches per DiT block, by path: (count at depth 4 - count at depth 2) / 2, and the whole-model counts."""
    rows = []
    for path, backend, tangents in (("fused_fwd_jvp", "fused", True), ("plain_fwd", "fused", False),
                                    ("explicit_fwd_jvp", "explicit", True)):
        per_depth = {}
        for depth in (2, 4):
            per_depth[depth] = count_call(tiny_dit(depth, backend, device), device, tangents=tangents,
                                          backend=backend, stub=stub)
        for i, phase in enumerate(("forward", "backward")):
            c2, c4 = per_depth[2][i], per_depth[4][i]
            aten = (sum(c4.aten.values()) - sum(c2.aten.values())) / 2
            tri = (sum(c4.triton.values()) - sum(c2.triton.values())) / 2
            per_block_ops = {k: (c4.aten[k] - c2.aten[k]) / 2 for k in c4.aten if c4.aten[k] != c2.aten[k]}
            per_block_ops.update({f"triton:{k}": (c4.triton[k] - c2.triton[k]) / 2 for k in c4.triton
                                  if c4.triton[k] != c2.triton[k]})
            name = path if phase == "forward" else path.replace("_fwd_jvp", "_bwd").replace("_fwd", "_bwd")
            row = {"part": "launches", "path": name, "per_block": aten + tri, "aten": aten, "triton": tri,
                   "model_depth2": c2.total, "ops": per_block_ops}
            rows.append(row)
            print({k: v for k, v in row.items() if k != "ops"}, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ host time per op
def _host_us(fn, device: str, calls: int, repeats: int = 5) -> float:
    """Best of `repeats` means over `calls` back-to-back calls, in microseconds (one sync per mean on CUDA)."""
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def part_op_host(device: str, calls: int, stub: bool) -> list[dict]:
    import torch.nn.functional as F

    from mfkernels.ops import ops_table

    try:
        from mfkernels import _library  # FusedOp's eager path (older trees have none: no via-custom-op column)
    except ImportError:
        _library = None

    fused = ops_table("fused")
    b, n, c, heads, kt = 2, 16, 64, 2, 1
    dh = c // heads
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    x, xd, m, md = mk(b, n, c), mk(kt, n, c), mk(b, c), mk(kt, c)
    w1, b1, w2, b2 = mk(4 * c, c), mk(4 * c), mk(c, 4 * c), mk(c)
    q, qd = mk(b, heads, n, dh), mk(kt, heads, n, dh)  # attention / per-head ops: (B, H, N, Dh)
    w13, b13, w2h, wh = mk(4 * c, c), mk(4 * c), mk(c, 2 * c), mk(dh)  # SwiGLU hidden 2c
    angles = torch.arange(n, device=device, dtype=dtype)[:, None] * torch.linspace(0.1, 1.0, dh // 2, device=device,
                                                                                     dtype=dtype)
    cos, sin = angles.cos(), angles.sin()

    def rope_plain(t):
        t1, t2 = t[..., 0::2], t[..., 1::2]
        return torch.stack([t1 * cos - t2 * sin, t1 * sin + t2 * cos], -1).flatten(-2)

    def swiglu_plain():
        a, g = F.linear(x, w13, b13).chunk(2, -1)
        return F.linear(F.silu(a) * g, w2h, b2)
    cases = {
        "layernorm_modulate": (lambda: fused.layernorm_modulate(x, m, m, xd, md, md),
                               lambda: F.layer_norm(x, (c,)) * (1 + m[:, None]) + m[:, None]),
        "gated_residual": (lambda: fused.gated_residual(x, m, x, xd, md, xd), lambda: x + m[:, None] * x),
        "linear": (lambda: fused.linear(x, w1, b1, xd), lambda: F.linear(x, w1, b1)),
        "mlp": (lambda: fused.mlp(x, w1, b1, w2, b2, xd),
                lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)),
        "gelu_tanh": (lambda: fused.gelu_tanh(x, xd), lambda: F.gelu(x, approximate="tanh")),
        "silu": (lambda: fused.silu(m, md), lambda: F.silu(m)),
        "attention": (lambda: fused.attention(q, q, q, qd, qd, qd), lambda: F.scaled_dot_product_attention(q, q, q)),
        "rmsnorm": (lambda: fused.rmsnorm(q, wh, qd), lambda: F.rms_norm(q, (dh,), wh, 1e-6)),
        "swiglu": (lambda: fused.swiglu(x, w13, b13, w2h, b2, xd), swiglu_plain),
        "rope": (lambda: fused.rope(q, cos, sin, qd), lambda: rope_plain(q)),
        "qk_norm_rope": (lambda: fused.qk_norm_rope(q, q, wh, wh, cos, sin, qd, qd),
                         lambda: (rope_plain(F.rms_norm(q, (dh,), wh, 1e-6)), rope_plain(F.rms_norm(q, (dh,), wh,
                                                                                                      1e-6)))),
    }
    params = (x, m, w1, b1, w2, b2, q, w13, b13, w2h, wh)  # what requires grad in the grad rows (angles never do)
    rows = []
    plain_eager = _library._plain_eager if _library is not None else None
    with triton_launches(stub=stub):
        for name, (jvp, plain) in cases.items():
            for grad in (False, True):
                for t in params:
                    t.requires_grad_(grad)
                row = {"part": "op_host", "op": name, "requires_grad": grad, "shape": [b, n, c], "kt": kt,
                       "triton_stubbed": stub}
                variants = {"fused_us": jvp, "torch_plain_us": plain}
                if _library is not None:
                    def via_op(jvp=jvp):
                        _library._plain_eager = lambda args: False  # every FusedOp through torch.ops.mfkernels.*
                        try:
                            jvp()
                        finally:
                            _library._plain_eager = plain_eager

                    variants["fused_via_custom_op_us"] = via_op
                # interleaved: each round times every variant in turn (load drifts hit all alike); min over rounds
                best = {k: float("inf") for k in variants}
                for fn in variants.values():
                    fn()
                for _ in range(5):
                    for key, fn in variants.items():
                        best[key] = min(best[key], _host_us(fn, device, calls, repeats=1))
                row.update(best)
                rows.append(row)
                print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- host time per step
def part_step_host(args, device: str, stub: bool) -> list[dict]:
    """Step time at a tiny batch (host-bound by construction), eager / graphed / compiled, MeanFlow vs FM.

    Every case is built and warmed up first (compiling, capturing), then all are timed round-robin: each round runs
    --steps steps of every case in turn (a sync around each), so load drifts on a shared machine hit every case alike.
    Rows: median and min over the rounds of the mean step time."""
    import statistics

    from meanflow import MeanFlowLoss, build_dit
    from meanflow.training.compile import compile_model
    from meanflow.training.cuda_graphs import CUDAGraphModel

    size, channels = (32, 4) if device == "cuda" else (8, 2)
    name = args.model if device == "cuda" else args.cpu_model
    batch = args.step_batch
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext())
    modes = ["eager"] + (["graphed"] if device == "cuda" else []) + (["compiled"] if args.step_compiled else [])
    configs = {"flow_matching": dict(flow_matching=True), "meanflow": dict(ratio=0.25),
               "meanflow_guided": dict(ratio=0.25, omega=1.0, kappa=0.5)}
    torch._dynamo.reset()
    for knob in ("cache_size_limit", "recompile_limit"):  # all compiled cases share the forward's code object
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    rows, steps = [], []

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with triton_launches(stub=stub):
        for mode in modes:
            for objective, overrides in configs.items():
                torch.manual_seed(0)
                net = build_dit(name, input_size=size, in_channels=channels, num_classes=10,
                                backend="fused").to(device)
                net.check_inputs = False
                call = net
                if mode == "compiled":
                    compile_model(net, backend=args.compile_backend)
                elif mode == "graphed":
                    call = CUDAGraphModel(net)
                opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
                loss_fn = MeanFlowLoss(loss_op="auto", **overrides)
                x = torch.randn(batch, channels, size, size, device=device)
                y = torch.randint(0, 10, (batch,), device=device)
                g = torch.Generator(device=device).manual_seed(0)

                def step(opt=opt, loss_fn=loss_fn, call=call, x=x, y=y, g=g):
                    opt.zero_grad(set_to_none=True)
                    with autocast:
                        loss, _ = loss_fn(call, x, y, generator=g)
                    loss.backward()
                    opt.step()

                row = {"part": "step_host", "mode": mode, "objective": objective, "model": name, "batch": batch,
                       "triton_stubbed": stub, "compile_backend": args.compile_backend if mode == "compiled" else None}
                try:
                    t0 = time.perf_counter()
                    for _ in range(args.warmup_steps):  # compiles (compiled), captures (graphed)
                        step()
                    sync()
                    row["warmup_s"] = time.perf_counter() - t0
                    if mode == "eager":
                        counter = LaunchCounter(stub)
                        with counter:
                            step()
                        row["launches_per_step"] = counter.total
                        row["triton_launches_per_step"] = sum(counter.triton.values())
                        # nonzero: a host sync on CUDA (the guidance rows; on CPU also the target op's t >= r
                        # check); scalar reads: AdamW's step counters, CPU tensors (no device sync on CUDA)
                        row["nonzero_per_step"] = counter.nonzero
                        row["scalar_reads_per_step"] = counter.scalar_reads
                    steps.append((row, step))
                except Exception as exc:  # noqa: BLE001 - a failed case is a row, not the end of the benchmark
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
        times: dict[int, list[float]] = {id(r): [] for r, _ in steps}
        for _ in range(args.rounds):
            for row, step in steps:
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync()
                times[id(row)].append((time.perf_counter() - t0) / args.steps * 1e3)
    for row, _ in steps:
        row["step_ms"] = statistics.median(times[id(row)])
        row["step_ms_min"] = min(times[id(row)])
        row["rounds"] = args.rounds
    for row in rows:
        fm = next((r for r in rows if r["mode"] == row["mode"] and r["objective"] == "flow_matching"
                   and "step_ms" in r), None)
        if fm is not None and "step_ms" in row:
            row["ratio_to_fm"] = row["step_ms"] / fm["step_ms"]
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- FSDP2, world size 1
def part_fsdp(args, device: str) -> list[dict]:
    """FSDP2 with one process on the card: each block fully_shard-ed (compiled first with --fsdp-compiled, as
    train.compile does), flow matching vs MeanFlow fused (guidance off / on); one step = forward + loss + backward +
    AdamW, timed like bench_step (CUDA events back to back; CPU round-robin)."""
    import torch.distributed as dist

    from meanflow import MeanFlowLoss, build_dit
    from meanflow.training import parallel
    from meanflow.training.compile import compile_blocks
    from tests.utils import free_port

    cuda = device == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device, (1,))
    size, channels = (32, 4) if cuda else (8, 2)
    name, batch = (args.fsdp_model, args.fsdp_batch) if cuda else (args.cpu_model, 4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    rows = []
    objectives = {"flow_matching": dict(flow_matching=True), "meanflow_fused": dict(ratio=0.25),
                  "meanflow_fused_guided": dict(ratio=0.25, omega=1.0, kappa=0.5)}
    for mode in args.fsdp_modes:
        fm_ms = None
        for objective, overrides in objectives.items():
            torch.manual_seed(0)
            torch._dynamo.reset()
            net = build_dit(name, input_size=size, in_channels=channels, num_classes=10, backend="fused").to(device)
            net.check_inputs = False
            if mode == "compiled":
                compile_blocks(net, parallel.shard_units(net), backend=args.compile_backend)
            parallel.shard_model(net, mesh, parallel.mixed_precision_policy("bf16" if cuda else "fp32"))
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            loss_fn = MeanFlowLoss(loss_op="auto", **overrides)
            x = torch.randn(batch, channels, size, size, device=device)
            y = torch.randint(0, 10, (batch,), device=device)

            def step():
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss, _ = loss_fn(net, x, y)
                loss.backward()
                opt.step()

            row = {"part": "fsdp", "world_size": 1, "mode": mode, "objective": objective, "model": name,
                   "batch": batch, "compile_backend": args.compile_backend if mode == "compiled" else None}
            try:
                t0 = time.perf_counter()
                for _ in range(args.warmup_steps):
                    step()
                if cuda:
                    torch.cuda.synchronize()
                    row["warmup_s"] = time.perf_counter() - t0
                    from bench.bench_step import time_cuda_steps

                    row.update(time_cuda_steps(step, args.fsdp_warmup_ms, args.fsdp_rep_ms))
                else:
                    row["warmup_s"] = time.perf_counter() - t0
                    row["ms"] = _host_us(step, device, args.steps, repeats=3) / 1e3
                if objective == "flow_matching":
                    fm_ms = row["ms"]
                elif fm_ms:
                    row["ratio_to_fm"] = row["ms"] / fm_ms
            except Exception as exc:  # noqa: BLE001 - a failed case is a row
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            del net, opt
    dist.destroy_process_group()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", default="launches,op_host,step_host",
                   help="comma-separated: launches, op_host, step_host, fsdp (FSDP2 world size 1 step times)")
    p.add_argument("--step-compiled", action="store_true",
                   help="step_host: also the compiled model (on CPU always; on CUDA it adds minutes of compiling)")
    p.add_argument("--fsdp-model", default="DiT-B/2")
    p.add_argument("--fsdp-batch", type=int, default=64)
    p.add_argument("--fsdp-modes", nargs="+", default=["compiled"], choices=("eager", "compiled"))
    p.add_argument("--fsdp-warmup-ms", type=float, default=500)
    p.add_argument("--fsdp-rep-ms", type=float, default=3000)
    p.add_argument("--model", default="DiT-B/2", help="the step_host model on CUDA")
    p.add_argument("--cpu-model", default="DiT-Micro/2", help="the step_host model on CPU")
    p.add_argument("--step-batch", type=int, default=4, help="step_host batch: tiny, so that the step is host-bound")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mean (step_host)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7, help="step_host: round-robin rounds over the cases")
    p.add_argument("--calls", type=int, default=200, help="calls per mean (op_host)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--stub-triton", choices=("auto", "on", "off"), default="auto",
                   help="auto: stubbed on CPU (host time without the interpreter), real launches on CUDA")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (the committed CPU results: 1)")
    p.add_argument("--note", default=None, help="a line stored in the result file's meta (e.g. which code was run)")
    p.add_argument("--quick", action="store_true", help="dry run: fewer calls and steps")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    stub = args.stub_triton == "on" or (args.stub_triton == "auto" and device == "cpu")
    if stub and device == "cpu":
        torch.set_flush_denormal(True)  # stubbed kernels leave outputs unwritten: denormals would slow CPU GEMMs
    if args.quick:
        args.calls, args.steps, args.warmup_steps, args.rounds = 10, 2, 1, 2
        args.compile_backend = "aot_eager" if device == "cpu" else args.compile_backend
    parts = args.parts.split(",")
    if device == "cpu":
        args.step_compiled = True  # cheap at CPU sizes
    rows: list[dict] = []
    meta = {"stub_triton": stub, "args": vars(args), "note": args.note}
    if "launches" in parts:
        rows += part_launches(device, stub)
        write_results(args.out, "host", device, rows, **meta)
    if "op_host" in parts:
        rows += part_op_host(device, args.calls, stub)
        write_results(args.out, "host", device, rows, **meta)
    if "step_host" in parts:
        rows += part_step_host(args, device, stub)
        write_results(args.out, "host", device, rows, **meta)
    if "fsdp" in parts:
        with triton_launches(stub=stub):
            rows += part_fsdp(args, device)
        write_results(args.out, "host", device, rows, **meta)


if __name__ == "__main__":
    main()
