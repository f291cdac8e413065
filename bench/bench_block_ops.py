"""Benchmark of the DiT block-glue ops: fused forward + JVP (mfkernels) against eager and autograd JVP.

    python bench/bench_block_ops.py --out results.json [--quick]

Ops: LayerNorm + adaLN modulate, GELU(tanh) on the MLP hidden activation, the MLP (Linear-GELU-Linear), the gated
residual; RMSNorm, QK-norm + RoPE of q and k, RoPE and the SwiGLU MLP (cases in bench/modern_cases.py). Providers, all
timed in the same run on the same fresh random inputs (bf16):

* ``fused``:    the mfkernels op (Triton kernels; cuBLAS for the MLP's GEMMs).
* ``eager``:    the pure-torch ``<op>_ref`` from mfkernels.reference (ragged tangents, tangent under no_grad).
* ``autograd``: ``torch.func.jvp`` over the plain primal on the full batch with the tangents zero-padded to B
                 (what peers do: no ragged tangents), fwd + JVP only.

Passes: ``fwd_jvp`` (y and y_dot, no graph) and ``fwd_bwd`` (y and y_dot with a graph, then backward of y; fused
against eager). Rates count only the useful work, the same for every provider:

* memory-bound ops: GB/s = essential bytes / time (each tensor read or written once; formulas in ``_bytes_*``).
* MLP: TFLOP/s with fwd_jvp FLOPs = 2 * rows * C * 4C * 2 (two GEMMs over rows = B*N + kt*N) and fwd_bwd FLOPs = that
  + 2 * B*N * C * 4C * 4 (dg, dW2, dW1, dx).

On CUDA: ``triton.testing.do_bench`` (median, p20, p80; L2 flushed between runs), DiT-B/2 and DiT-XL/2 widths at
256 tokens (B = 64), kt = B/4 and kt = B. Without CUDA the kernels run under the Triton interpreter: tiny shapes and
``time.perf_counter``, a dry run of the script, not a measurement.

Self-contained: needs only torch, triton and this repository (put on sys.path here, nothing installed).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
import sys
from pathlib import Path

import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F  # noqa: E402

from bench.common import time_fn, write_results  # noqa: E402
from bench.modern_cases import CASES as MODERN_CASES  # noqa: E402
from mfkernels import reference as ref  # noqa: E402
from mfkernels.activations import gelu_tanh_jvp  # noqa: E402
from mfkernels.mlp import mlp_jvp  # noqa: E402
from mfkernels.norm import layernorm_modulate_jvp  # noqa: E402
from mfkernels.residual import gated_residual_jvp  # noqa: E402

EPS = 1e-6


# ------------------------------------------------------------------------------------------------------------ timing
# ------------------------------------------------------------------------------------------------------------ cases
def _padded(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A ragged tangent zero-padded to the full batch (for torch.func.jvp, which needs the primal's shape)."""
    if t.shape[0] == batch:
        return t
    return torch.cat([t, t.new_zeros((batch - t.shape[0],) + tuple(t.shape[1:]))])


def _plain_ln_modulate(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale[:, None, :]) + shift[:, None, :]


def _plain_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def _plain_residual(x, gate, f):
    return x + gate[:, None, :] * f


@dataclass
class Case:
    """One op at one shape: inputs, the three providers (each (primals, tangents) -> (y, y_dot)) and the useful work
    (`fwd_bytes`/`bwd_bytes` for memory-bound ops, `fwd_flops`/`bwd_flops` for GEMM-bound ones)."""

    primals: list
    tangents: list
    fused: Callable
    eager: Callable
    autograd: Callable
    fwd_bytes: int = 0
    bwd_bytes: int = 0
    fwd_flops: int = 0
    bwd_flops: int = 0

    def rate(self, kind: str, ms: float) -> tuple[str, float]:
        """("tflops", TFLOP/s) for GEMM-bound cases, else ("gbps", GB/s), of the fwd_jvp or fwd_bwd pass."""
        if self.fwd_flops:
            flops = self.fwd_flops + (self.bwd_flops if kind == "fwd_bwd" else 0)
            return "tflops", flops / (ms * 1e-3) / 1e12
        nbytes = self.fwd_bytes + (self.bwd_bytes if kind == "fwd_bwd" else 0)
        return "gbps", nbytes / (ms * 1e-3) / 1e9


def _ln_modulate(B, N, C, kt, r, e) -> Case:
    M, Mt = B * N, kt * N
    return Case(
        primals=[r(B, N, C), r(B, C), r(B, C, scale=0.5)], tangents=[r(kt, N, C), r(kt, C), r(kt, C)],
        fused=lambda p, t: layernorm_modulate_jvp(*p, *t, eps=EPS),
        eager=lambda p, t: ref.layernorm_modulate_jvp_ref(*p, *t, eps=EPS),
        autograd=lambda p, t: torch.func.jvp(_plain_ln_modulate, tuple(p), tuple(_padded(x, B) for x in t)),
        fwd_bytes=e * (2 * M * C + 2 * B * C + 2 * Mt * C + 2 * kt * C),
        bwd_bytes=8 * M + e * (3 * M * C + 3 * B * C) + 8 * M)  # stats written + (dy, x, dx; scale, dshift, dscale)


def _gelu_tanh(B, N, C, kt, r, e) -> Case:
    M, Mt, H = B * N, kt * N, 4 * C
    return Case(
        primals=[r(B, N, H, scale=2.0)], tangents=[r(kt, N, H)],
        fused=lambda p, t: gelu_tanh_jvp(*p, *t),
        eager=lambda p, t: ref.gelu_tanh_jvp_ref(*p, *t),
        autograd=lambda p, t: torch.func.jvp(lambda a: F.gelu(a, approximate="tanh"), tuple(p), (_padded(t[0], B),)),
        fwd_bytes=e * (2 * M * H + 2 * Mt * H),
        bwd_bytes=e * 3 * M * H)  # a, dy read; da written


def _mlp(B, N, C, kt, r, e) -> Case:
    M, Mt, H = B * N, kt * N, 4 * C

    def autograd(p, t):
        x, *params = p
        return torch.func.jvp(lambda z: _plain_mlp(z, *params), (x,), (_padded(t[0], B),))

    return Case(
        primals=[r(B, N, C), r(H, C, scale=C ** -0.5), r(H, scale=0.1), r(C, H, scale=H ** -0.5), r(C, scale=0.1)],
        tangents=[r(kt, N, C)],
        fused=lambda p, t: mlp_jvp(*p, *t),
        eager=lambda p, t: ref.mlp_jvp_ref(*p, *t),
        autograd=autograd,
        fwd_flops=2 * (M + Mt) * C * H * 2,
        bwd_flops=2 * M * C * H * 4)


def _gated_residual(B, N, C, kt, r, e) -> Case:
    M, Mt = B * N, kt * N
    return Case(
        primals=[r(B, N, C), r(B, C), r(B, N, C)], tangents=[r(kt, N, C), r(kt, C), r(kt, N, C)],
        fused=lambda p, t: gated_residual_jvp(*p, *t),
        eager=lambda p, t: ref.gated_residual_jvp_ref(*p, *t),
        autograd=lambda p, t: torch.func.jvp(_plain_residual, tuple(p), tuple(_padded(x, B) for x in t)),
        fwd_bytes=e * (3 * M * C + B * C + 3 * Mt * C + kt * C),
        bwd_bytes=e * (3 * M * C + 2 * B * C))  # dy, f read, df written (dx = dy: no traffic); gate, dgate


# The benchmarked ops, in table order. A new op: write `_myop(B, N, C, kt, r, e) -> Case` (r(*shape, scale=...)
# draws an input, e is the element size) and add it here; its rows then appear in the JSON and in report.py.
CASES: dict[str, Callable[..., Case]] = {
    "ln_modulate": _ln_modulate,
    "gelu_tanh": _gelu_tanh,
    "mlp": _mlp,
    "gated_residual": _gated_residual,
}
# RMSNorm, QK-norm + RoPE, RoPE, SwiGLU: bench/modern_cases.py gives Case's fields as a dict
CASES.update({op: (lambda build: lambda *a: Case(**build(*a)))(build) for op, build in MODERN_CASES.items()})


def make_case(op: str, B: int, N: int, C: int, kt: int, dtype, device) -> Case:
    """The inputs and providers of `op` (a key of CASES) at B x N x C with kt tangent rows, fresh random inputs."""
    if op not in CASES:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(CASES)}")
    e = torch.tensor([], dtype=dtype).element_size()

    def r(*shape, scale=1.0):
        return torch.randn(*shape, dtype=dtype, device=device) * scale

    return CASES[op](B, N, C, kt, r, e)


def _max_rel_diff(a, b) -> float:
    if isinstance(a, tuple):  # several outputs (q' and k' of the QK op): the worst
        return max(_max_rel_diff(x, y) for x, y in zip(a, b))
    if a.numel() == 0:
        return 0.0
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def run(quick: bool, ops: list[str] | None = None) -> list[dict]:
    """Rows for every op in `ops` (default: all of CASES) at the benchmark shapes."""
    ops = list(CASES) if ops is None else ops
    device = "cuda" if ON_CUDA else "cpu"
    dtype = torch.bfloat16
    if ON_CUDA:
        shapes = [("DiT-B/2", 64, 256, 768), ("DiT-XL/2", 64, 256, 1152)]
        kts = (lambda B: [B // 4]) if quick else (lambda B: [B // 4, B])
        reps = None  # do_bench decides
    else:  # interpreter: a dry run on tiny shapes
        shapes = [("tiny", 4, 8, 48)] if quick else [("tiny", 4, 8, 48), ("tiny-odd", 4, 8, 72)]
        kts = (lambda B: [B // 4]) if quick else (lambda B: [B // 4, B])
        reps = 2 if quick else 5

    def timer(fn, grad_to_none=None):
        r = time_fn(fn, device, warmup=1, reps=reps or 1, grad_to_none=grad_to_none)
        return r["ms"], r["ms_p20"], r["ms_p80"]

    rows = []
    for name, B, N, C in shapes:
        for kt in kts(B):
            for op in ops:
                torch.manual_seed(len(rows))  # fresh inputs for every case, reproducible
                case = make_case(op, B, N, C, kt, dtype, device)
                primals, tangents, fused, eager, autograd = (case.primals, case.tangents, case.fused, case.eager,
                                                             case.autograd)
                # sanity: the timed fused op agrees with the reference (bf16: loose)
                with torch.no_grad():
                    y_f, yd_f = fused(primals, tangents)
                    y_e, yd_e = eager(primals, tangents)
                check = max(_max_rel_diff(y_f, y_e), _max_rel_diff(yd_f, yd_e))
                base = {"bench": "block_ops", "op": op, "dtype": str(dtype).replace("torch.", ""), "shape": name,
                        "B": B, "N": N, "C": C, "kt": kt}

                def record(provider, kind, times, extra=None):
                    ms, p20, p80 = times
                    key, value = case.rate(kind, ms)
                    rows.append({**base, "provider": provider, "pass": kind, "ms": ms, "ms_p20": p20,
                                 "ms_p80": p80, key: value, **(extra or {})})
                    print(f"{name:9s} kt={kt:3d} {op:15s} {kind:8s} {provider:9s} {ms:9.4f} ms  {key} {value:8.2f}",
                          flush=True)

                with torch.no_grad():
                    record("fused", "fwd_jvp", timer(lambda: fused(primals, tangents)), {"max_rel_diff_vs_eager": check})
                    record("eager", "fwd_jvp", timer(lambda: eager(primals, tangents)))
                    record("autograd", "fwd_jvp", timer(lambda: autograd(primals, tangents)))

                leaves = [p.detach().requires_grad_() for p in primals]
                dy = tuple(torch.randn_like(y) for y in y_e) if isinstance(y_e, tuple) else torch.randn_like(y_e)
                for provider, fn in (("fused", fused), ("eager", eager)):
                    def step(fn=fn):
                        y, _ = fn(leaves, tangents)
                        torch.autograd.backward(y, dy)  # y may be a tuple (q', k')

                    record(provider, "fwd_bwd", timer(step, grad_to_none=leaves))
                del primals, tangents, leaves, y_f, yd_f, y_e, yd_e
                if ON_CUDA:
                    torch.cuda.empty_cache()

    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="fewer cases (kt = B/4 only; on CPU one tiny shape)")
    parser.add_argument("--ops", nargs="+", default=None, choices=list(CASES), help="a subset of the ops")
    args = parser.parse_args(argv)
    rows = run(args.quick, args.ops)
    device = "cuda" if ON_CUDA else "cpu"
    note = None if ON_CUDA else "Triton interpreter on CPU: a dry run of the script, not a measurement"
    write_results(args.out, "block_ops", device, rows, note=note)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
