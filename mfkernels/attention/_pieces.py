"""Head dims as power-of-two pieces: how a head dim D maps onto kernel tiles, and the Triton helpers that load, multiply
and store tiles split that way.

tl.dot and tl.arange need power-of-two tile widths >= 16. Padding every other head dim to the next power of two would
run D = 72 as 128 columns (44% of the tensor-core work on zeros). Instead a head dim is covered by a few power-of-two
pieces (largest first), and every product that involves it is split along them:

    D = 72  -> (64, 16)        80 columns of work instead of 128 (the last 8 of the 16-wide piece masked)
    D = 80  -> (64, 16)        80 instead of 128
    D = 96  -> (64, 32)        96 instead of 128
    D = 112 -> (64, 32, 16)    112 instead of 128
    D = 40  -> (32, 16)        48 instead of 64
    D in {16, 32, 64, 128, 256}, D <= 16, or D in 17..32: one piece, exactly the padded tile (the pieces reduce to it).

The rule: round D up to a multiple of 16 (the smallest tl.dot width), W; if W is a power of two, or W > 128, one
piece of next_power_of_2(D) (padded: D in (128, 256) runs as 256, whose tiles already run at the register
limit; no DiT uses such heads); otherwise the binary digits of W (at most three pieces below 128).

How a split enters the products (the q/k head dim D and the value head dim Dv split independently):
  - a reduction over the head dim (S = Q K^T, S_dot, dP = dO V^T) is a chain of dots into ONE accumulator, one dot a
    piece: exactly the padded dot's result, without the zero columns;
  - a product whose OUTPUT runs over the head dim (P V, dS K, dS^T Q, P^T dO, ...) keeps one accumulator a piece
    (a tuple of tiles), so registers hold W columns of fp32 instead of next_power_of_2(D).
Only the last piece can run past D; its load masks those columns (zeros) and its store skips them.

Which kernels split: the forward + JVP, the plain forward and the flash backward (dK/dV, dQ, its preprocess). The
tangent backward (tangent_backward.py) keeps padded tiles: split, its two kernels spilled registers in the sm_90
ahead-of-time compiles in bf16 (every config of their lists at D = 72), the padded ones do not.

MFKERNELS_ATTN_PAD_D=1 restores the padded tiles (one piece of next_power_of_2(D)): the A/B switch bench_attention
flips to time a split head dim against padding.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .._triton import round_to
from ._common import _load_rows

MIN_PIECE = 16  # tl.dot's smallest operand width


def pad_forced() -> bool:
    """MFKERNELS_ATTN_PAD_D=1: run every head dim padded to a power of two (the pre-split tiles), for A/B timing."""
    return os.environ.get("MFKERNELS_ATTN_PAD_D", "0") == "1"


def head_pieces(d: int, pad: bool | None = None) -> tuple[int, ...]:
    """The power-of-two tile widths (>= 16, largest first) that cover head dim d (see the module docstring)."""
    if pad is None:
        pad = pad_forced()
    full = max(MIN_PIECE, triton.next_power_of_2(d))
    width = MIN_PIECE * -(-d // MIN_PIECE)
    if pad or width == full or width > 128:
        return (full,)
    return tuple(1 << bit for bit in range(width.bit_length() - 1, 3, -1) if width & (1 << bit))


def stride_align(*tensors) -> int:
    """The largest power of two <= 16 that divides every stride but the last of every tensor (0 strides count as any).

    Triton marks an integer argument "divisible by 16" when it is, and nothing otherwise. A head dim of 72 makes row
    strides of 72 elements (144 bytes: 16-byte aligned, but 72 % 16 = 8), so without a hint the compiler cannot prove
    that a tile's rows start on 16 bytes: its loads are not vectorised, cannot become cp.async copies, and the key loop
    is not pipelined (seen on sm_90: no async copies, 255 registers and spills at D = 72 against D = 80's 195 and no
    spill). Kernels tell the compiler (_aligned) when it is 2..8."""
    align = 16
    for t in tensors:
        for s in t.stride()[:-1]:
            while s % align:
                align //= 2
    return align


def head_dim_args(d: int, dv: int, *tensors, pad: bool | None = None) -> dict:
    """The head-dim constexprs of every attention kernel: q/k head dim D and value head dim Dv with their pieces, and
    the stride alignment (in elements) of the tensors whose rows the kernel loads (stride_align)."""
    return dict(HEAD_D=d, D_PIECES=head_pieces(d, pad), HEAD_DV=dv, DV_PIECES=head_pieces(dv, pad),
                STRIDE_ALIGN=stride_align(*tensors))


# ======================================================================================================= Triton
@triton.jit
def _aligned(strides, ALIGN: tl.constexpr):
    """The strides (a tuple), rewritten as (s // ALIGN) * ALIGN when ALIGN is 2..8: the same values (the launcher
    checked that ALIGN divides them: stride_align), but now the compiler's alignment analysis knows it. (tl.multiple_of
    cannot say it: on a kernel argument it sets no attribute, Triton 3.6.) With ALIGN 16 Triton's own argument
    specialisation already knows, and the kernels keep exactly the code they had."""
    out = ()
    for i in tl.static_range(len(strides)):
        if ALIGN > 1 and ALIGN < 16:
            out = out + ((strides[i] // ALIGN) * ALIGN,)
        else:
            out = out + (strides[i],)
    return out


# A "pieces" value is a tuple of tiles, one a piece of the head dim, all with the same rows. The loops below are
# unrolled at compile time (tl.static_range over a constexpr tuple), so a one-piece split is exactly a single tile.
@triton.jit
def _load_pieces(base, offs_r, r_ok, s_r, s_c, HEAD: tl.constexpr, PIECES: tl.constexpr, MASK_ROWS: tl.constexpr,
                 DTYPE: tl.constexpr):
    """(rows x piece) tiles of the (rows x HEAD) block at base (row stride s_r, column stride s_c), cast to DTYPE.
    Rows outside r_ok (when MASK_ROWS) and columns >= HEAD (only the last piece can have them) read 0."""
    out = ()
    start = 0
    for i in tl.static_range(len(PIECES)):
        offs_c = start + tl.arange(0, PIECES[i])
        x = _load_rows(base + offs_r[:, None] * s_r + offs_c[None, :] * s_c, r_ok, offs_c < HEAD, MASK_ROWS,
                       start + PIECES[i] > HEAD)
        out = out + (x.to(DTYPE),)
        start += PIECES[i]
    return out


@triton.jit
def _store_pieces(base, offs_r, r_ok, s_r, s_c, x, HEAD: tl.constexpr, PIECES: tl.constexpr, RNE_BF16: tl.constexpr):
    """Store the pieces x (rows x piece, fp32/fp64) into the (rows x HEAD) block at base, rounded to its dtype; rows
    outside r_ok and columns >= HEAD are skipped."""
    start = 0
    for i in tl.static_range(len(PIECES)):
        offs_c = start + tl.arange(0, PIECES[i])
        tl.store(base + offs_r[:, None] * s_r + offs_c[None, :] * s_c, round_to(x[i], base.dtype.element_ty, RNE_BF16),
                 mask=r_ok[:, None] & (offs_c < HEAD)[None, :])
        start += PIECES[i]


@triton.jit
def _zeros_pieces(ROWS: tl.constexpr, PIECES: tl.constexpr, DTYPE: tl.constexpr):
    """Zero accumulators (ROWS x piece) for every piece."""
    out = ()
    for i in tl.static_range(len(PIECES)):
        out = out + (tl.zeros([ROWS, tl.constexpr(PIECES[i])], dtype=DTYPE),)
    return out


@triton.jit
def _dot_nt(a, b, ACC: tl.constexpr, PREC: tl.constexpr):
    """sum_i a_i b_i^T: a product that reduces over the head dim, one chained dot a piece (= the unsplit a b^T)."""
    acc = tl.dot(a[0], tl.trans(b[0]), out_dtype=ACC, input_precision=PREC)
    for i in tl.static_range(1, len(a)):
        acc = tl.dot(a[i], tl.trans(b[i]), acc, out_dtype=ACC, input_precision=PREC)
    return acc


@triton.jit
def _dot_nt_acc(a, b, acc, ACC: tl.constexpr, PREC: tl.constexpr):
    """acc + sum_i a_i b_i^T (chained onto an existing accumulator)."""
    for i in tl.static_range(len(a)):
        acc = tl.dot(a[i], tl.trans(b[i]), acc, out_dtype=ACC, input_precision=PREC)
    return acc


@triton.jit
def _dot_pieces(p, b, acc, ACC: tl.constexpr, PREC: tl.constexpr):
    """(acc_i + p b_i)_i: a product whose output runs over the head dim, one accumulator a piece."""
    out = ()
    for i in tl.static_range(len(b)):
        out = out + (tl.dot(p, b[i], acc[i], out_dtype=ACC, input_precision=PREC),)
    return out


@triton.jit
def _scale_rows(x, r):
    """(x_i * r[:, None])_i: a per-row factor on every piece (rescaling by alpha, 1 / l, c)."""
    out = ()
    for i in tl.static_range(len(x)):
        out = out + (x[i] * r[:, None],)
    return out


@triton.jit
def _scale_all(x, c):
    """(x_i * c)_i for a scalar c."""
    out = ()
    for i in tl.static_range(len(x)):
        out = out + (x[i] * c,)
    return out


@triton.jit
def _row_dot(a, b):
    """Per-row dot products over the head dim: sum_i rowsum(a_i * b_i)."""
    acc = tl.sum(a[0] * b[0], 1)
    for i in tl.static_range(1, len(a)):
        acc += tl.sum(a[i] * b[i], 1)
    return acc


@triton.jit
def _make_descs(base, ROWS, s_r, HEAD: tl.constexpr, PIECES: tl.constexpr, BLOCK_R: tl.constexpr):
    """Tensor descriptors (TMA on sm_90) of the (ROWS x HEAD) block at base (row stride s_r, columns contiguous), one a
    piece (block BLOCK_R x piece). Rows >= ROWS and columns >= HEAD read 0 (the copy engine's bounds check)."""
    out = ()
    for i in tl.static_range(len(PIECES)):
        out = out + (tl.make_tensor_descriptor(base, shape=[ROWS, HEAD], strides=[s_r, 1],
                                               block_shape=[BLOCK_R, tl.constexpr(PIECES[i])]),)
    return out


@triton.jit
def _load_desc_pieces(descs, row0, PIECES: tl.constexpr, DTYPE: tl.constexpr):
    """The pieces of rows [row0, row0 + BLOCK_R) through the descriptors of _make_descs, cast to DTYPE."""
    out = ()
    start = 0
    for i in tl.static_range(len(PIECES)):
        out = out + (descs[i].load([row0, start]).to(DTYPE),)
        start += PIECES[i]
    return out
