"""Shared pieces of the attention kernels: softmax-scale and mask arguments, the causal / key-tail mask, the user
mask, row statistics, tile helpers (head dims: _pieces.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import acc_dtype

LOG2E = 1.4426950408889634

# attn_mask kinds (the MASK_KIND constexpr of every kernel): bool or additive, and whether the mask varies over the
# query rows (a (.., Nq, Nk) tile is read) or only over the keys (key padding: one BLOCK_N vector a tile, broadcast;
# a 2-D tile of 64-bit pointers costs the forward + JVP kernel ~30 registers a thread: see _configs.py).
NO_MASK, BOOL_MASK, ADDITIVE_MASK, KEY_BOOL_MASK, KEY_ADDITIVE_MASK = 0, 1, 2, 3, 4


def lse_shape(batch: int, heads: int, n_q: int, attn_mask: torch.Tensor | None) -> tuple[int, ...]:
    """The row statistics saved for the backward: the LSE (B, H, Nq), or with an additive mask (m, log2 l) stacked as
    (2, B, H, Nq) (see _store_row_stats)."""
    additive = attn_mask is not None and attn_mask.dtype != torch.bool
    return (2, batch, heads, n_q) if additive else (batch, heads, n_q)


# ============================================================================================== scales and masks
def _scale_args(scale: float, dtype: torch.dtype, device, dummy: torch.Tensor):
    """Kernel arguments (sm_scale, qk_scale, inv_scale, SCALES) and the SCALE_PTR constexpr for a softmax scale c:
    c, c log2 e and 1 / c (additive masks are added in raw-score units, b / c)."""
    qk = float(scale) * LOG2E
    inv = 1.0 / float(scale)
    if dtype == torch.float64:
        # fill_ runs on the device (no host-device sync, unlike torch.tensor(list)); only the fp64 path pays it.
        scales = torch.empty(3, dtype=torch.float64, device=device)
        scales[0].fill_(float(scale))
        scales[1].fill_(qk)
        scales[2].fill_(inv)
        return (float(scale), qk, inv, scales), True
    return (float(scale), qk, inv, dummy), False


def mask_args(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int], dtype: torch.dtype,
              dummy: torch.Tensor):
    """(mask tensor, its 4 strides over (B, H, Nq, Nk), MASK_KIND, NEG_MAX) for the kernels.

    The mask is broadcast as torch's SDPA broadcasts it, by an expand view: broadcast dims get stride 0, so a
    key-padding mask (B, 1, 1, Nk) is read per tile and never materialised. A bool mask is read as uint8 (a free
    view)."""
    if attn_mask is None:
        return dummy, (0, 0, 0, 0), NO_MASK, 0.0
    m = attn_mask.expand(shape)
    per_key = m.stride(2) == 0 or shape[2] == 1  # the same for every query row
    if m.dtype == torch.bool:
        return m.view(torch.uint8), m.stride(), KEY_BOOL_MASK if per_key else BOOL_MASK, 0.0
    return m, m.stride(), KEY_ADDITIVE_MASK if per_key else ADDITIVE_MASK, -torch.finfo(acc_dtype(dtype)).max


# ======================================================================================================= Triton
@triton.jit
def _attends(offs_q, offs_k, k_ok, IS_CAUSAL: tl.constexpr, KEYS_ON_ROWS: tl.constexpr):
    """Where a score tile is live before the user's mask: the causal / key-tail mask of every attention kernel.

    Queries x keys (KEYS_ON_ROWS False: the forward, dQ and tangent dQ loops): keys inside Nk (k_ok) and, when causal,
    key j <= query i (top-left aligned, as torch's SDPA with is_causal). Keys x queries (KEYS_ON_ROWS: the dK/dV
    loops, which keep a key tile resident): the causal condition only, since a key-tail row there is computed but
    never stored and rows do not mix. Callers apply it only on the tiles that need it (MASKED: the key tail and the
    tiles crossing the causal diagonal), so interior tiles pay nothing."""
    if KEYS_ON_ROWS:
        ok = offs_q[None, :] >= offs_k[:, None]
    else:
        ok = k_ok[None, :]
        if IS_CAUSAL:
            ok = ok & (offs_q[:, None] >= offs_k[None, :])
    return ok


@triton.jit
def _key_range(pid_m, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(mid, hi) of query tile pid_m's key loop: keys [0, mid) need no causal / key-tail mask, [mid, hi) do (the key
    tail; under causal masking the tiles crossing the diagonal, and no key after the tile's last query)."""
    if IS_CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
        mid = (tl.minimum(N_K, pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    else:
        hi = N_K
        mid = (N_K // BLOCK_N) * BLOCK_N
    return mid, hi


@triton.jit
def _causal_query_range(pid_n, N_Q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, mid) of key tile pid_n's query loop under causal masking: queries before lo see none of the tile, queries
    [lo, mid) cross the diagonal (masked), queries from mid on see all of it."""
    lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    mid = tl.minimum(tl.cdiv(pid_n * BLOCK_N + BLOCK_N, BLOCK_M) * BLOCK_M, N_Q)
    return lo, mid


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
def _scales(sm_scale, qk_scale, inv_scale, SCALES, SCALE_PTR: tl.constexpr):
    """(c, c log2 e, 1 / c). Float kernel arguments are fp32 (and the interpreter rounds Python floats to fp32 too),
    which is fine for fp32/16-bit math but not for fp64: there all three come exactly from a fp64 device tensor."""
    if SCALE_PTR:
        sm = tl.load(SCALES)
        qk = tl.load(SCALES + 1)
        inv = tl.load(SCALES + 2)
    else:
        sm = sm_scale
        qk = qk_scale
        inv = inv_scale
    return sm, qk, inv


@triton.jit
def _mask_bias(b, sm, inv_sm, NEG_MAX: tl.constexpr):
    """b / c, the raw-unit image of an additive mask value. A finite b is clamped to >= -max c / 2 first, so that b / c
    cannot overflow to -inf: a torch.finfo.min mask stays finite, as in torch, and a row of such entries stays torch's
    uniform average (the raw scores vanish in rounding next to it, as they do in torch) instead of turning into a
    fully masked row; -inf stays -inf."""
    b = tl.where(b == float("-inf"), b, tl.maximum(b, NEG_MAX * 0.5 * sm))
    return b * inv_sm


@triton.jit
def _load_mask(Mh, offs_q, q_ok, offs_k, k_ok, smm, smn, DTYPE: tl.constexpr, MASK_KIND: tl.constexpr):
    """The 2-D mask tile (queries x keys) of a key tile, loaded early (before the dots) so that its 64-bit pointer tile
    is dead by the time the score tiles are live: keep (uint8) for bool masks, b (DTYPE) for additive ones."""
    ptrs = Mh + offs_q[:, None] * smm + offs_k[None, :] * smn
    ok = q_ok[:, None] & k_ok[None, :]
    if MASK_KIND == 1:
        x = tl.load(ptrs, mask=ok, other=0)
    else:
        x = tl.load(ptrs, mask=ok, other=float("-inf")).to(DTYPE)
    return x


@triton.jit
def _apply_mask(s, x, sm, inv_sm, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr):
    if MASK_KIND == 1:
        s = tl.where(x != 0, s, float("-inf"))
    else:
        s = s + _mask_bias(x, sm, inv_sm, NEG_MAX)
    return s


@triton.jit
def _masked_scores(s, Mh, offs_q, q_ok, offs_k, k_ok, smm, smn, sm, inv_sm,
                   MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr, KEYS_ON_ROWS: tl.constexpr):
    """Raw scores s (q . k; queries x keys, or keys x queries with KEYS_ON_ROWS) with the user's attn_mask applied.
    Mh: the mask of this (batch, query head); smm, smn: its strides over queries and keys (0 where broadcast).
    Bool (MASK_KIND 1, 3): -inf where the mask is False. Additive (2, 4): s + b / c (_mask_bias), the raw-unit image
    of c s + b. Kinds 3, 4 (key padding) read one vector of keys and broadcast it. Query- or key-tail elements come
    out -inf, so a tail never yields a huge exp (a tail row rebuilds P from zero statistics in the backward)."""
    if MASK_KIND >= 3:
        if MASK_KIND == 3:
            mk = tl.load(Mh + offs_k * smn, mask=k_ok, other=0) != 0
        else:
            mk = _mask_bias(tl.load(Mh + offs_k * smn, mask=k_ok, other=float("-inf")).to(s.dtype), sm, inv_sm,
                            NEG_MAX)
        if KEYS_ON_ROWS:
            mk = mk[:, None]
            live = q_ok[None, :]
        else:
            mk = mk[None, :]
            live = q_ok[:, None]
        if MASK_KIND == 3:
            s = tl.where(mk & live, s, float("-inf"))
        else:
            s = tl.where(live, s + mk, float("-inf"))
    elif MASK_KIND != 0:
        if KEYS_ON_ROWS:
            ptrs = Mh + offs_k[:, None] * smn + offs_q[None, :] * smm
            ok = k_ok[:, None] & q_ok[None, :]
        else:
            ptrs = Mh + offs_q[:, None] * smm + offs_k[None, :] * smn
            ok = q_ok[:, None] & k_ok[None, :]
        if MASK_KIND == 1:
            s = tl.where(tl.load(ptrs, mask=ok, other=0) != 0, s, float("-inf"))
        else:
            s = s + _mask_bias(tl.load(ptrs, mask=ok, other=float("-inf")).to(s.dtype), sm, inv_sm, NEG_MAX)
    return s


@triton.jit
def _safe_max(m, MASK_KIND: tl.constexpr):
    """The running max to subtract: 0 while a row has seen only masked keys (m = -inf), so that exp2(s - m) is
    exp2(-inf) = 0 rather than NaN. Only a user mask can mask a whole tile of a row (causal rows always see key 0)."""
    if MASK_KIND != 0:
        m = tl.where(m == float("-inf"), 0.0, m)
    return m


@triton.jit
def _store_row_stats(LSEh, offs_m, m_ok, m_i, l_i, qk, STAT_STRIDE, MASK_KIND: tl.constexpr):
    """Save what the backward needs to rebuild P_ij = 2^((s_ij - m_i) qk) / l_i.

    Without an additive mask: one number a row, the LSE in raw units L = m + log2(l) / qk (+inf on a fully masked row,
    so that P = 0 there). With an additive mask (MASK_KIND 2, 4) a row's max can be huge (a finfo.min mask on every key
    of the row: torch's result is then a uniform average), and m + log2(l) / qk would round to m; so two numbers are
    kept: m at LSEh and log2(l) at LSEh + STAT_STRIDE (a (2, B, H, Nq) tensor), P = 2^((s - m) qk - log2 l)."""
    if MASK_KIND == 2 or MASK_KIND == 4:  # additive
        live = l_i > 0
        tl.store(LSEh + offs_m, tl.where(live, m_i, 0.0), mask=m_ok)
        tl.store(LSEh + STAT_STRIDE + offs_m, tl.where(live, tl.log2(tl.where(live, l_i, 1.0)), float("inf")),
                 mask=m_ok)
    elif MASK_KIND != 0:
        live = l_i > 0
        tl.store(LSEh + offs_m, tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)) / qk, float("inf")),
                 mask=m_ok)
    else:
        tl.store(LSEh + offs_m, m_i + tl.log2(l_i) / qk, mask=m_ok)


@triton.jit
def _load_row_stats(LSEh, offs, ok, STAT_STRIDE, MASK_KIND: tl.constexpr):
    """(a, b) of a tile of rows for _probs: (L, 0), or (m, log2 l) with an additive mask (see _store_row_stats).
    Rows outside ok read (0, 0)."""
    a = tl.load(LSEh + offs, mask=ok, other=0.0)
    if MASK_KIND == 2 or MASK_KIND == 4:
        b = tl.load(LSEh + STAT_STRIDE + offs, mask=ok, other=0.0)
    else:
        b = tl.zeros_like(a)
    return a, b


@triton.jit
def _probs(s, a, b, qk, MASK_KIND: tl.constexpr):
    """P rebuilt from raw scores s and broadcast row statistics (a, b) (see _store_row_stats)."""
    if MASK_KIND == 2 or MASK_KIND == 4:
        p = tl.exp2((s - a) * qk - b)
    else:
        p = tl.exp2((s - a) * qk)
    return p


@triton.jit
def _tile_and_head(N_ROWS, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Split a 1-D program id into (row tile, batch*head). 1-D because grid dim 1 is capped at 65535 (B*H can exceed
    it); row tiles of one head stay adjacent (K/V reuse in L2), and the heads keep their order (tangent heads first).
    REVERSE runs a head's row tiles last-to-first: under causal masking the last tiles have the most keys."""
    return _tile_of(tl.program_id(0), N_ROWS, BLOCK, REVERSE)


@triton.jit
def _tile_of(pid, N_ROWS, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """_tile_and_head for tile number pid (a persistent program walks several)."""
    num_tiles = tl.cdiv(N_ROWS, BLOCK)
    bh = pid // num_tiles
    tile = pid % num_tiles
    if REVERSE:
        tile = num_tiles - 1 - tile
    return tile, bh
