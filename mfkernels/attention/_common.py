"""Shared pieces of the attention kernels: head-dim handling, softmax-scale arguments, LSE dtype, tile helpers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


# ============================================================================================================ helpers
@triton.jit
def _load_rows(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a (rows, D) tile; masks only where a tail can exist (constexpr), zero elsewhere."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _scales(sm_scale, qk_scale, SCALES, SCALE_PTR: tl.constexpr):
    """(c, c log2 e). Float kernel arguments are fp32 (and the interpreter rounds Python floats to fp32 too), which is
    fine for fp32/16-bit math but not for fp64: there both come exactly from a 2-element fp64 device tensor."""
    if SCALE_PTR:
        sm = tl.load(SCALES)
        qk = tl.load(SCALES + 1)
    else:
        sm = sm_scale
        qk = qk_scale
    return sm, qk


def _scale_args(scale: float, dtype: torch.dtype, device, dummy: torch.Tensor):
    """Kernel arguments (sm_scale, qk_scale, SCALES) and the SCALE_PTR constexpr for a softmax scale."""
    qk = float(scale) * LOG2E
    if dtype == torch.float64:
        # fill_ runs on the device (no host-device sync, unlike torch.tensor(list)); only the fp64 path pays it.
        scales = torch.empty(2, dtype=torch.float64, device=device)
        scales[0].fill_(float(scale))
        scales[1].fill_(qk)
        return (float(scale), qk, scales), True
    return (float(scale), qk, dummy), False


@triton.jit
def _tile_and_head(N_ROWS, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Split a 1-D program id into (row tile, batch*head). 1-D because grid dim 1 is capped at 65535 (B*H can exceed
    it); row tiles of one head stay adjacent (K/V reuse in L2), and the heads keep their order (tangent heads first).
    REVERSE runs a head's row tiles last-to-first: under causal masking the last tiles have the most keys."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(N_ROWS, BLOCK)
    bh = pid // num_tiles
    tile = pid % num_tiles
    if REVERSE:
        tile = num_tiles - 1 - tile
    return tile, bh


def _block_d(d: int) -> int:
    # tl.dot needs every dimension >= 16; other head dims are zero-padded (masked) up to a power of two.
    return max(16, triton.next_power_of_2(d))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


