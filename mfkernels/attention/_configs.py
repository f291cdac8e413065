"""Autotune tables of the attention kernels and the pruner that picks a list per call (head dim, dtype, tangent).

Hopper-oriented lists (docs/design.md, 'Kernel shapes'), keyed on the head dim group; the interpreter gets exactly one
config.
"""
from __future__ import annotations

import os

import torch
import triton

from .._runtime import interpreter_active

# ============================================================================================================ configs
def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# The interpreter gets exactly one config (autotuning there would multiply the test time and measures nothing).
# BLOCK_M != BLOCK_N on purpose: it exercises the causal diagonal logic with unequal tiles.
_INTERP_CONFIG = [_cfg(32, 16, 4, 1)]

# Hopper-oriented lists (H100 / H200), keyed on (N, padded D, causal, tangent or not, dtype) and pruned by D (and, for
# the forward, by whether the kernel has tangent rows). Every entry was compiled offline for sm_90a with Triton 3.6's
# bundled ptxas: all use wgmma, none spills registers for bf16 at D = 64 / 128 (D = 256 works but spills).
# Forward + JVP holds A_O, A_T (BLOCK_M x D fp32) plus S, S_dot (BLOCK_M x BLOCK_N fp32) in registers: BLOCK_M 128 needs
# 8 warps (D = 64, 128 x 64: 241 registers a thread); D = 128 needs BLOCK_N 32 (128 x 64 spills). Shared memory per
# pipeline stage holds K, K_dot, V, V_dot tiles (D = 128, 128 x 32, 3 stages: 160 KB of the 228 KB).
_FWD_JVP_CONFIGS = {
    64: [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3), _cfg(128, 32, 8, 3)],
    128: [_cfg(128, 32, 8, 3), _cfg(128, 32, 8, 2), _cfg(128, 32, 8, 4), _cfg(64, 32, 4, 3), _cfg(64, 32, 4, 4)],
    256: [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2), _cfg(64, 32, 8, 1)],
}
# Plain flash forward (kt = 0): one accumulator, wider key tiles fit.
_FWD_PLAIN_CONFIGS = {
    64: [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 64, 4, 3), _cfg(128, 128, 4, 3)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2)],
}
# Backward: dK/dV keeps a key tile resident and streams query tiles (BLOCK_N resident, BLOCK_M streamed);
# dQ keeps a query tile resident and streams key tiles.
_DKDV_CONFIGS = {
    64: [_cfg(64, 128, 8, 3), _cfg(64, 128, 8, 2), _cfg(64, 64, 4, 3), _cfg(32, 128, 8, 3), _cfg(64, 64, 4, 4)],
    128: [_cfg(32, 128, 8, 3), _cfg(32, 128, 8, 2), _cfg(64, 64, 8, 3), _cfg(32, 64, 4, 3), _cfg(32, 64, 4, 4)],
    256: [_cfg(32, 32, 4, 2), _cfg(32, 64, 8, 2)],
}
_DQ_CONFIGS = {
    64: [_cfg(128, 32, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 5)],
    128: [_cfg(128, 32, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2)],
}
# Masks cost registers (all lists checked spill-free for bf16 by tests/test_attention_sm90_compile.py). A mask that
# varies over query rows (MASK_KIND 1, 2) is read as a 2-D tile of 64-bit pointers a key tile: the forward + JVP kernel
# at D = 128 then spills with 128 x 32 tiles (144-208 B, even with the mask loaded before the dots), not with 128 x 16;
# an additive key-padding mask (4) spills 8 B there; the dQ kernel at D = 64 spills with 4 warps (56-76 B), not with 8;
# the plain forward spills with 128 x 128 (D = 64, 3.3 KB) and 128 x 64 (D = 128, 28 B). A bool key-padding mask (3:
# one vector a tile, the common case) keeps the main lists.
_FWD_JVP_MASKED_CONFIGS = {
    64: [_cfg(128, 32, 8, 3), _cfg(128, 32, 8, 2), _cfg(64, 32, 4, 3)],
    128: [_cfg(128, 16, 8, 3), _cfg(128, 16, 8, 2), _cfg(64, 16, 4, 3)],
    256: [_cfg(64, 16, 8, 2), _cfg(32, 32, 4, 2)],
}
_FWD_PLAIN_MASKED_CONFIGS = {
    64: [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(128, 64, 8, 4)],
    128: [_cfg(128, 32, 8, 3), _cfg(128, 32, 8, 2), _cfg(64, 64, 4, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)],
}
_DQ_MASKED_CONFIGS = {
    64: [_cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3)],
    128: [_cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)],
}
# Tangent backward (tangent_backward.py): dK/dV keeps four tiles (k, k_dot, v, v_dot) and four fp32 accumulators
# resident, dQ two accumulators plus q, q_dot, G, G'; six BLOCK_M x BLOCK_N fp32 score tiles live at once (S, S_dot,
# dP, dP', dS, dS_dot), so the tiles are smaller than the flash backward's. Compiled ahead of time for sm_90a (bf16,
# with and without G; tests/test_attention_sm90_compile.py): none of these spills at D = 64 / 128 (D = 128: 8 warps
# for 32 x 32, 170 registers a thread; 32 x 64 key tiles spill 360 B, 64 x 64 at D = 64 116 B).
_TBWD_DKDV_CONFIGS = {
    64: [_cfg(64, 32, 8, 2), _cfg(32, 32, 8, 2)],
    128: [_cfg(32, 32, 8, 2), _cfg(32, 16, 4, 2), _cfg(16, 32, 4, 2)],
    256: [_cfg(16, 16, 4, 1), _cfg(16, 32, 4, 1)],
}
_TBWD_DQ_CONFIGS = {
    64: [_cfg(64, 32, 8, 2), _cfg(32, 64, 8, 2), _cfg(32, 32, 8, 2)],
    128: [_cfg(32, 64, 8, 2), _cfg(32, 32, 8, 2), _cfg(16, 64, 4, 2)],
    256: [_cfg(16, 16, 4, 1), _cfg(32, 16, 4, 1)],
}
# fp32 tangent backward: D = 64 spill-free (dK/dV) or within a few bytes (dQ); D = 128 spills ~0.8-1.4 KB whatever the
# tile (as the fp32 flash backward does, below): fp32 attention on a GPU is a correctness path, not a fast one.
_FP32_TBWD_DKDV_CONFIGS = {
    64: [_cfg(32, 16, 8, 1), _cfg(16, 16, 4, 1)],
    128: [_cfg(32, 16, 8, 1), _cfg(16, 16, 4, 1)],
    256: [_cfg(16, 16, 4, 1)],
}
_FP32_TBWD_DQ_CONFIGS = {
    64: [_cfg(16, 32, 8, 1), _cfg(16, 16, 4, 1)],
    128: [_cfg(16, 32, 8, 1), _cfg(16, 16, 4, 1)],
    256: [_cfg(16, 16, 4, 1)],
}
# fp32 inputs (3xTF32 dots, see _triton.compute_dtypes): fp32 tiles take twice the registers and shared memory,
# so small tiles (compiled offline too: a few hundred bytes of spills at most for D <= 64, ~1-3 KB at D = 128).
_FP32_FWD_CONFIGS = {
    64: [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2)],
    # (64, 32, 8, 2) needs 233472 B of shared memory with tangents: 1 KB over Hopper's 232448 (seen on an H200).
    128: [_cfg(64, 32, 8, 1), _cfg(32, 32, 4, 2)],
    256: [_cfg(32, 32, 4, 1), _cfg(32, 16, 4, 1)],
}
_FP32_DKDV_CONFIGS = {
    64: [_cfg(32, 64, 4, 2), _cfg(32, 32, 4, 2)],
    128: [_cfg(32, 32, 4, 2), _cfg(32, 64, 4, 2)],
    256: [_cfg(32, 32, 4, 1), _cfg(16, 32, 4, 1)],
}
_FP32_DQ_CONFIGS = {
    64: [_cfg(64, 32, 4, 2), _cfg(64, 64, 8, 2)],
    128: [_cfg(32, 32, 4, 2), _cfg(64, 32, 4, 2)],
    256: [_cfg(32, 32, 4, 1), _cfg(32, 16, 4, 1)],
}


# Split head dims (_pieces.py: 72 / 80 -> 64 + 16, 96 -> 64 + 32, 112 -> 64 + 32 + 16) run at their width W (80, 96,
# 112 columns) and get lists of their own: for now copies of the D = 128 lists (narrower tiles of the same blocks fit
# wherever 128 does: tests/test_attention_sm90_compile.py checks the first config of each), to be tuned on a GPU.
for _table in (_FWD_JVP_CONFIGS, _FWD_PLAIN_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS, _FWD_JVP_MASKED_CONFIGS,
               _FWD_PLAIN_MASKED_CONFIGS, _DQ_MASKED_CONFIGS, _TBWD_DKDV_CONFIGS, _TBWD_DQ_CONFIGS,
               _FP32_TBWD_DKDV_CONFIGS, _FP32_TBWD_DQ_CONFIGS, _FP32_FWD_CONFIGS, _FP32_DKDV_CONFIGS, _FP32_DQ_CONFIGS):
    for _w in (80, 96, 112):
        _table.setdefault(_w, list(_table[128]))


def _config_group(width: int) -> int:
    """The autotune list for a head dim that runs at `width` columns (the sum of its pieces, _pieces.py)."""
    return 64 if width <= 64 else width


def _width(arg, which: str) -> int:
    """Columns of work of the D or Dv head dim (D_PIECES / DV_PIECES; 0 where a kernel has no such constexpr)."""
    return sum(arg(f"{which}_PIECES") or ())


def _all_configs(*tables):
    if interpreter_active():
        return list(_INTERP_CONFIG)
    seen, out = set(), []
    for cfgs in (c for table in tables for c in table.values()):
        for c in cfgs:
            key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def _pruner(table, plain_table=None, fp32_table=None, masked_table=None, plain_masked_table=None):
    """Keep the configs listed for this head dim: the fp32 list for fp32 inputs, else for a forward without tangent
    rows (HAS_TANGENT False) the plain list (plain_masked_table with a mask), else the masked list for the masks that
    need more registers (MASK_KIND 1, 2, 4: all but a bool key-padding mask), else the main list.
    MFKERNELS_AUTOTUNE=0 keeps only the list's first."""
    def prune(configs, named_args, **kwargs):
        if interpreter_active() or len(configs) <= 1:
            return configs
        arg = lambda name: named_args.get(name, kwargs.get(name))  # noqa: E731
        q = arg("Q")
        if fp32_table is not None and q is not None and q.dtype == torch.float32:
            chosen = fp32_table
        elif plain_table is not None and not arg("HAS_TANGENT"):
            chosen = plain_masked_table if plain_masked_table is not None and arg("MASK_KIND") else plain_table
        elif masked_table is not None and arg("MASK_KIND") in (1, 2, 4):
            chosen = masked_table
        else:
            chosen = table
        group = _config_group(max(_width(arg, "D"), _width(arg, "DV")))  # the wider of the q/k and v tiles
        wanted = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in chosen[group]}
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        if os.environ.get("MFKERNELS_AUTOTUNE", "1") == "0":
            # Test runs on a GPU: one compile per specialization instead of timing the whole list for every N.
            order = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in chosen[group]]
            kept = sorted(kept, key=lambda c: order.index(
                (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)))[:1]
        return kept or configs[:1]
    return {"early_config_prune": prune}

