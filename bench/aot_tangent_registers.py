"""Registers, spills and shared memory on sm_90 (compiled ahead of time, no GPU needed) of the tangent-backward kernels
of the norms (LayerNorm + modulation, RMSNorm, QK-norm + RoPE), next to each op's forward and primal backward kernel at
the same width, in bf16 and fp32: what a loss through the tangent (`tangent_grad`, docs/design.md, 'Gradients through
the tangent') adds to a norm's register budget.

    python bench/aot_tangent_registers.py --out bench/results/<folder>/tangent_registers.json

Widths: the residual stream of DiT-B / DiT-XL (C 768, 1152) for LayerNorm and RMSNorm, head dims 64 and 128 for
QK-norm + RoPE (with the learned scales, interleaved pairs). Compile facts, not speed: only a GPU timing says what
they cost.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from tests._sm90_aot import compile_for_sm90  # noqa: E402

BODY = r'''
from mfkernels import norm, rmsnorm, rope


def tagged(op, call, width, fn):
    n0 = len(out)
    fn()
    for rec in out[n0:]:
        rec.update(op=op, call=call, width=width)


B, N, kt = 2, 3, 1
for dtype in (torch.bfloat16, torch.float32):
    for c in (768, 1152):
        x, mod = torch.randn(B, N, c, dtype=dtype), torch.randn(B, c, dtype=dtype)
        stats = torch.zeros(B * N)
        tagged("layernorm_modulate", "fwd", c,
               lambda: norm.layernorm_modulate_jvp_fwd(x, mod, mod, x[:kt], mod[:kt], mod[:kt], 1e-6, True))
        tagged("layernorm_modulate", "bwd", c, lambda: norm.layernorm_modulate_bwd(x, x, mod, stats, stats, True, True))
        tagged("layernorm_modulate", "tangent_bwd", c,
               lambda: norm.layernorm_modulate_tangent_bwd(x, x[:kt], x, x[:kt], mod, mod[:kt], stats, stats, True,
                                                           True, True))
        w, res = torch.randn(c), {}
        tagged("rmsnorm", "fwd", c, lambda: res.update(out=rmsnorm.rmsnorm_jvp_fwd(x, w, x[:kt], 1e-6)))
        y, y_dot, rstd = res["out"]
        tagged("rmsnorm", "bwd", c, lambda: rmsnorm.rmsnorm_bwd(y, x, w, rstd, True, True))
        tagged("rmsnorm", "tangent_bwd", c,
               lambda: rmsnorm.rmsnorm_tangent_bwd(y, y_dot, x, x[:kt], w, rstd, True, True, True))
    for d in (64, 128):
        qkv = torch.randn(B, N, 3, 4, d, dtype=dtype)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        cos, w = torch.randn(N, d // 2), torch.randn(d)
        rstd = torch.zeros(2, q.numel() // d)
        qo, ko = q.contiguous(), k.contiguous()
        tagged("qk_norm_rope", "fwd", d,
               lambda: rope.rope_fwd_launch([q, k], [q[:kt], k[:kt]], [w, w], cos, cos, eps=1e-6, norm=True,
                                            interleaved=True))
        tagged("qk_norm_rope", "bwd", d,
               lambda: rope.rope_bwd_launch([qo, ko], [q, k], [w, w], cos, cos, rstd, norm=True, interleaved=True,
                                            compute_dx=True, compute_dw=True))
        tagged("qk_norm_rope", "tangent_bwd", d,
               lambda: rope.norm_rope_tangent_bwd_launch([qo, ko], [qo[:kt], ko[:kt]], [q, k], [q[:kt], k[:kt]],
                                                         [w, w], cos, cos, rstd, interleaved=True, compute_dx=True,
                                                         compute_dx_dot=True, compute_dw=True))
    for rec in out:
        rec.setdefault("dtype", str(dtype).replace("torch.", ""))
'''


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON file for the rows (a markdown table is printed either way)")
    args = ap.parse_args(argv)
    rows = [{k: rec.get(k) for k in ("op", "call", "width", "dtype", "kernel", "warps", "regs", "spill", "shared")}
            for rec in compile_for_sm90(BODY)]
    print("| op | width | dtype | call | kernel | warps | registers | spill B | shared B |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|")
    order = {"fwd": 0, "bwd": 1, "tangent_bwd": 2}
    for r in sorted(rows, key=lambda r: (r["op"], r["width"], r["dtype"], order[r["call"]])):
        print(f"| {r['op']} | {r['width']} | {r['dtype']} | {r['call']} | {r['kernel']} | {r['warps']} | {r['regs']} | "
              f"{r['spill']} | {r['shared']} |")
    if args.out:
        import triton

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        from bench.common import write_results

        write_results(args.out, "tangent_registers", "cpu", rows, compiled_for="sm_90a (ahead of time, no GPU)",
                      triton=triton.__version__)


if __name__ == "__main__":
    main()
