"""Block benchmark: one DiT block, forward + JVP + backward of the primal, per backend, same inputs in one run.

Providers:
- `primal`:   forward + backward without any tangent (what a flow-matching step pays per block), torch SDPA default.
- `autograd`: torch.func.jvp over the block's plain forward on the whole batch (SDPA forced to math), then backward.
- `explicit`: `forward_jvp` with the pure-torch reference ops (ragged tangents), then backward.
- `fused`:    `forward_jvp` with the mfkernels Triton ops, then backward.
The tangent batch is kt = ratio * B rows (the MeanFlow rows with r != t); `autograd` differentiates all B rows.

    python bench/bench_block.py --out block.json [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import is_oom, peak_memory_mb, time_fn, write_results  # noqa: E402
from bench.modern_cases import BLOCKS as IMF_BLOCKS, TINY_BLOCKS as IMF_TINY  # noqa: E402
from meanflow.models.backends import ops_for  # noqa: E402
from meanflow.models.layers import DiTBlock  # noqa: E402
from mfkernels.nn import math_attention  # noqa: E402

# The benchmarked blocks: name -> (width, heads, factory(width, heads) -> a module with forward(x, c) and
# forward_jvp(x, x_dot, c, c_dot, ops)). A new block type: add a row here ("tiny" is the CPU dry run's).
BLOCKS: dict[str, tuple[int, int, Callable[[int, int], torch.nn.Module]]] = {
    "DiT-B": (768, 12, DiTBlock),
    "DiT-XL": (1152, 16, DiTBlock),
    **IMF_BLOCKS,  # iMF's block (RMSNorm, QK-norm + RoPE attention, SwiGLU): iMF-B 768/12, iMF-XL 1024/16
}
TINY = {"tiny": (48, 2, DiTBlock), **IMF_TINY}


def block_flops(batch: int, kt: int, tokens: int, dim: int, with_jvp: bool) -> float:
    """Useful FLOPs: GEMMs 2*rows*(4 + 8)*dim^2 per token row (qkv 3, proj 1, mlp 8) plus attention 4*N^2*dim per
    sample forward; the tangent adds the same GEMMs on kt rows and 8*N^2*dim of attention per tangent sample
    (12 N^2 d total for forward + JVP). Backward of the primal: 2x the primal forward."""
    gemm = 2 * tokens * 12 * dim * dim
    attn = 4 * tokens * tokens * dim
    fwd = batch * (gemm + attn)
    total = 3 * fwd
    if with_jvp:
        total += kt * (gemm + 2 * attn)
    return float(total)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=list(BLOCKS), help=f"a subset of {', '.join(BLOCKS)}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--providers", nargs="+", default=["primal", "autograd", "explicit", "fused"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    blocks = dict(BLOCKS)
    if args.quick and not cuda:
        blocks, args.models, args.batch, args.tokens = TINY, list(TINY), 4, 12
    # As in training: fp32 parameters, bf16 autocast on CUDA (fp32 on CPU).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    dtype = torch.float32
    rows = []
    for name in args.models:
        dim, heads, factory = blocks[name]
        torch.manual_seed(0)
        block = factory(dim, heads).to(args.device, dtype)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.02)
        b, n = args.batch, args.tokens
        kt = max(1, round(args.ratio * b))
        x = torch.randn(b, n, dim, device=args.device, dtype=dtype, requires_grad=True)
        c = torch.randn(b, dim, device=args.device, dtype=dtype)
        x_dot = torch.randn(kt, n, dim, device=args.device, dtype=dtype)
        c_dot = torch.randn(kt, dim, device=args.device, dtype=dtype)
        dy = torch.randn(b, n, dim, device=args.device, dtype=dtype)
        x_dot_full = torch.cat([x_dot, x_dot.new_zeros(b - kt, n, dim)])
        c_dot_full = torch.cat([c_dot, c_dot.new_zeros(b - kt, dim)])

        def run(provider):
            with autocast:
                y = forward(provider)
            y.backward(dy)
            x.grad = None
            for p in block.parameters():
                p.grad = None

        def forward(provider):
            if provider == "primal":
                return block(x, c)
            if provider == "autograd":
                with math_attention():  # what the model's autograd backend does
                    return torch.func.jvp(block, (x, c), (x_dot_full, c_dot_full))[0]
            return block.forward_jvp(x, x_dot, c, c_dot, ops_for(provider))[0]

        for provider in args.providers:
            row = {"bench": "block", "model": name, "provider": provider, "dtype": "bf16-autocast" if cuda else "fp32",
                   "B": b, "N": n, "C": dim, "heads": heads, "kt": 0 if provider == "primal" else
                   (b if provider == "autograd" else kt)}
            try:
                row.update(time_fn(lambda: run(provider), args.device, warmup=1 if args.quick else 3,
                                   reps=2 if args.quick else 10, cuda_rep_ms=500))
                row["peak_mem_mb"] = peak_memory_mb(lambda: run(provider), args.device)
                row["tflops"] = block_flops(b, kt, n, dim, provider != "primal") / (row["ms"] * 1e-3) / 1e12
            except Exception as exc:  # noqa: BLE001 - one provider failing must not lose the others
                if not (is_oom(exc) or isinstance(exc, (ImportError, NotImplementedError))):
                    raise
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        base = next((r for r in rows if r["model"] == name and r["provider"] == "primal" and "ms" in r), None)
        for r in rows:
            if base and r["model"] == name and "ms" in r:
                r["ratio_to_primal"] = r["ms"] / base["ms"]
        write_results(args.out, "block", args.device, rows, args=vars(args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
