"""Registers, spills and shared memory of the attention kernels compiled ahead of time for sm_90 (no GPU needed):
each head dim split into power-of-two pieces (the default, mfkernels/attention/_pieces.py) against padded to a power
of two (MFKERNELS_ATTN_PAD_D=1, the tiles every head dim ran as before the split); bf16, no mask (or causal with
--causal: the diagonal tiles' masking), the first config of each autotune list (what MFKERNELS_AUTOTUNE=0 runs).

    python bench/aot_attention_registers.py --dims 72 --out bench/results/<folder>/attention_registers.json
    python bench/aot_attention_registers.py --dims 64,72,128 --causal both --layouts split   # non-causal and causal

Compile facts, not speed: fewer registers and less shared memory allow more tiles in flight, but only a GPU timing
(bench/bench_attention.py --variants default,padded) says what they are worth.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from tests._sm90_aot import compile_for_sm90  # noqa: E402

BODY = r'''
from triton.runtime.autotuner import Autotuner

from mfkernels.attention.backward import attention_bwd
from mfkernels.attention.forward import attention_jvp_fwd
from mfkernels.attention.tangent_backward import attention_jvp_bwd


def first_config_run(self, *args, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs)[:1]:
        seen.clear()
        n = len(out)
        self.fn.run(*args, **kwargs, **config.all_kwargs())
        for rec in out[n:]:
            rec["config"] = [config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages]
            rec["pieces"] = str(kwargs.get("D_PIECES"))


Autotuner.run = first_config_run
b, h, n, kt = 2, 2, 40, 2
q, k, v, o = (torch.randn(b, h, n, D, dtype=torch.bfloat16) for _ in range(4))
tangents = (q[:kt], k[:kt], v[:kt])
lse, mu = torch.zeros(b, h, n), torch.zeros(kt, h, n)
for call, fn in (("fwd_jvp", lambda: attention_jvp_fwd(q, k, v, *tangents, None, CAUSAL, D ** -0.5)),
                 ("fwd", lambda: attention_jvp_fwd(q, k, v, q[:0], k[:0], v[:0], None, CAUSAL, D ** -0.5)),
                 ("bwd", lambda: attention_bwd(o, q, k, v, o, lse, None, CAUSAL, D ** -0.5)),
                 ("tangent_bwd", lambda: attention_jvp_bwd(o, o[:kt], q, k, v, *tangents, o, o[:kt], lse, mu, None,
                                                           CAUSAL, D ** -0.5))):
    n0 = len(out)
    fn()
    for rec in out[n0:]:
        rec["call"] = call
'''


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="72", help="comma-separated head dims")
    ap.add_argument("--out", default=None, help="JSON file for the rows (a markdown table is printed either way)")
    ap.add_argument("--causal", choices=("no", "yes", "both"), default="no")
    ap.add_argument("--layouts", default="split,padded", help="comma-separated: split, padded")
    args = ap.parse_args(argv)
    rows = []
    causal_modes = {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]
    layouts = [(name, {"split": "0", "padded": "1"}[name]) for name in args.layouts.split(",")]
    for d in (int(x) for x in args.dims.split(",")):
        for causal in causal_modes:
            for layout, pad in layouts:
                for rec in compile_for_sm90(f"D = {d}\nCAUSAL = {causal}\n" + BODY, MFKERNELS_AUTOTUNE="0",
                                            MFKERNELS_ATTN_PAD_D=pad):
                    rows.append({"D": d, "causal": causal, "layout": layout, "call": rec["call"],
                                 "kernel": rec["kernel"], "pieces": rec.get("pieces"), "config": rec.get("config"),
                                 "regs": rec["regs"], "spill": rec["spill"], "shared": rec["shared"]})
    print("| D | causal | call | kernel | layout | pieces | config (M, N, warps, stages) | registers | spill B | "
          "shared B |")
    print("|---|---|---|---|---|---|---|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["D"], r["causal"], r["call"], r["kernel"], r["layout"] != "split")):
        print(f"| {r['D']} | {r['causal']} | {r['call']} | {r['kernel']} | {r['layout']} | {r['pieces']} | "
              f"{r['config']} | {r['regs']} | {r['spill']} | {r['shared']} |")
    if args.out:
        import triton

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        from bench.common import write_results

        write_results(args.out, "attention_registers", "cpu", rows, compiled_for="sm_90a (ahead of time, no GPU)",
                      triton=triton.__version__, dtype="bf16", mask=None)


if __name__ == "__main__":
    main()
