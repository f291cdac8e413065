"""Fused flash attention forward + JVP kernel and its launcher (see the package docstring for the math)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import acc_dtype, cdiv, new_output
from .._triton import compute_dtypes
from ._common import (_apply_mask, _attends, _key_range, _load_mask, _masked_scores, _safe_max, _scale_args,
                      _scales, _store_row_stats, _tile_of, lse_shape, mask_args)
from ._configs import (_FP32_FWD_CONFIGS, _FWD_JVP_CONFIGS, _FWD_JVP_MASKED_CONFIGS, _FWD_PLAIN_CONFIGS,
                       _FWD_PLAIN_MASKED_CONFIGS, _all_configs, _pruner)
from ._levers import forward_levers, persistent_programs
from ._pieces import (_aligned, _dot_nt, _dot_nt_acc, _dot_pieces, _load_desc_pieces, _load_pieces, _make_descs,
                      _scale_rows, _store_pieces, _zeros_pieces, head_dim_args)


@triton.jit
def _kv_tile(ptr, descs, offs_n, n_ok, start_n, s_r, s_c, HEAD: tl.constexpr, PIECES: tl.constexpr,
             MASKED: tl.constexpr, DTYPE: tl.constexpr, USE_TMA: tl.constexpr):
    """The pieces of a key/value tile (BLOCK_N rows from start_n): tensor descriptors (USE_TMA: TMA loads, the copy
    engine zero-fills the key tail) or pointer loads (masked on the tail tiles)."""
    if USE_TMA:
        x = _load_desc_pieces(descs, start_n, PIECES, DTYPE)
    else:
        x = _load_pieces(ptr, offs_n, n_ok, s_r, s_c, HEAD, PIECES, MASKED, DTYPE)
    return x


# ============================================================================================= forward + JVP kernel
@triton.jit
def _fwd_jvp_tiles(acc_o, acc_t, m_i, l_i, mu_i, q, qd, Kh, KDh, Vh, VDh, Mh, KS, KDS, VS, VDS,
                   skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                   offs_m, m_ok, lo, hi, N_K, sm, qk, inv_sm,
                   HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
                   DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr):
    """Key tiles [lo, hi) of the fused recurrence (s = raw scores q . k (+ b / c), m raw, qk = c log2 e):

    m' = max(m, rowmax s); alpha = 2^((m - m') qk); P~ = 2^((s - m') qk); T = P~ * S_dot
    l = alpha l + rowsum P~;  mu = alpha mu + rowsum T;  A_O = alpha A_O + P~ V;  A_T = alpha A_T + T V + P~ V_dot
    S_dot uses the plain scale c (not c log2 e); an additive mask has no tangent. 6 dots a tile: S (1), S_dot =
    Q_dot K^T + Q K_dot^T chained into one accumulator (2, i.e. one dot of inner width 2D), P~ V (1), T V + P~ V_dot
    chained into A_T (2, i.e. one dot of inner width 2 BLOCK_N). MASKED tiles (key tail, causal diagonal) set s = -inf
    and S_dot = 0 there, so they add 0; the user's mask (MASK_KIND) applies to every tile. q, qd, A_O, A_T are tuples
    of head-dim pieces (_pieces.py): the score dots chain over the pieces of D, the value dots run one a piece of Dv.
    KS, KDS, VS, VDS: the tensor descriptors of K, K_dot, V, V_dot with USE_TMA (else unused).
    """
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        if MASK_KIND == 1 or MASK_KIND == 2:  # a 2-D mask tile: loaded first (see _load_mask)
            mtile = _load_mask(Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, ACC, MASK_KIND)
        k = _kv_tile(Kh, KS, offs_n, n_ok, start_n, skn, skd, HEAD_D, D_PIECES, MASKED, DOT, USE_TMA)
        kd = _kv_tile(KDh, KDS, offs_n, n_ok, start_n, skdn, skdd, HEAD_D, D_PIECES, MASKED, DOT, USE_TMA)
        s = _dot_nt(q, k, ACC, PREC)
        sd = _dot_nt(qd, k, ACC, PREC)
        sd = _dot_nt_acc(q, kd, sd, ACC, PREC) * sm
        if MASKED:
            ok = _attends(offs_m, offs_n, n_ok, IS_CAUSAL, False)
            s = tl.where(ok, s, float("-inf"))
            sd = tl.where(ok, sd, 0.0)
        if MASK_KIND == 1 or MASK_KIND == 2:
            s = _apply_mask(s, mtile, sm, inv_sm, MASK_KIND, NEG_MAX)
        else:
            s = _masked_scores(s, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = _safe_max(m_new, MASK_KIND)
        alpha = tl.exp2((m_i - m_sub) * qk)
        p = tl.exp2((s - m_sub[:, None]) * qk)
        t = p * sd
        l_i = l_i * alpha + tl.sum(p, 1)
        mu_i = mu_i * alpha + tl.sum(t, 1)
        v = _kv_tile(Vh, VS, offs_n, n_ok, start_n, svn, svd, HEAD_DV, DV_PIECES, MASKED, DOT, USE_TMA)
        vd = _kv_tile(VDh, VDS, offs_n, n_ok, start_n, svdn, svdd, HEAD_DV, DV_PIECES, MASKED, DOT, USE_TMA)
        p_dot = p.to(DOT)
        acc_o = _dot_pieces(p_dot, v, _scale_rows(acc_o, alpha), ACC, PREC)
        acc_t = _dot_pieces(t.to(DOT), v, _scale_rows(acc_t, alpha), ACC, PREC)
        acc_t = _dot_pieces(p_dot, vd, acc_t, ACC, PREC)
        m_i = m_new
    return acc_o, acc_t, m_i, l_i, mu_i


@triton.jit
def _fwd_tiles(acc_o, m_i, l_i, q, Kh, Vh, Mh, KS, VS, skn, skd, svn, svd, smm, smn,
               offs_m, m_ok, lo, hi, N_K, sm, qk, inv_sm,
               HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
               MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
               DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr):
    """Key tiles [lo, hi) of the plain flash forward (rows without a tangent): the primal half of _fwd_jvp_tiles."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        if MASK_KIND == 1 or MASK_KIND == 2:  # a 2-D mask tile: loaded first (see _load_mask)
            mtile = _load_mask(Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, ACC, MASK_KIND)
        k = _kv_tile(Kh, KS, offs_n, n_ok, start_n, skn, skd, HEAD_D, D_PIECES, MASKED, DOT, USE_TMA)
        s = _dot_nt(q, k, ACC, PREC)
        if MASKED:
            s = tl.where(_attends(offs_m, offs_n, n_ok, IS_CAUSAL, False), s, float("-inf"))
        if MASK_KIND == 1 or MASK_KIND == 2:
            s = _apply_mask(s, mtile, sm, inv_sm, MASK_KIND, NEG_MAX)
        else:
            s = _masked_scores(s, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = _safe_max(m_new, MASK_KIND)
        alpha = tl.exp2((m_i - m_sub) * qk)
        p = tl.exp2((s - m_sub[:, None]) * qk)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _kv_tile(Vh, VS, offs_n, n_ok, start_n, svn, svd, HEAD_DV, DV_PIECES, MASKED, DOT, USE_TMA)
        acc_o = _dot_pieces(p.to(DOT), v, _scale_rows(acc_o, alpha), ACC, PREC)
        m_i = m_new
    return acc_o, m_i, l_i


@triton.jit
def _tangent_out(acc_t, o, inv_l, mu_l):
    """O_dot = A_T / l - (mu / l) O, piece by piece."""
    out = ()
    for i in tl.static_range(len(o)):
        out = out + (acc_t[i] * inv_l[:, None] - mu_l[:, None] * o[i],)
    return out


@triton.jit
def _inv_l(l_i, MASK_KIND: tl.constexpr):
    """1 / l per row; a fully masked row (l = 0, only possible with a user mask) gets 0, so O = O_dot = 0 there, as
    torch's SDPA gives (its row statistics make the backward rebuild P = 0: _store_row_stats)."""
    if MASK_KIND != 0:
        inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    else:
        inv_l = 1.0 / l_i
    return inv_l


@triton.jit
def _fwd_plain_head(q, Kh, Vh, Mh, KS, VS, Oh, LSEh, skn, skd, svn, svd, smm, smn, som, sod,
                    offs_m, m_ok, mid, hi, N_K, sm, qk, inv_sm, STAT_STRIDE,
                    HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
                    DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
                    USE_TMA: tl.constexpr):
    """O = A_O / l and L = m + log2(l) / qk (raw units) for one (row block, head) without tangent."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc_o = _zeros_pieces(BLOCK_M, DV_PIECES, ACC)
    # Tiles below the diagonal / before the key tail need no tail mask; the rest (at most a few tiles) do.
    acc_o, m_i, l_i = _fwd_tiles(acc_o, m_i, l_i, q, Kh, Vh, Mh, KS, VS, skn, skd, svn, svd, smm, smn, offs_m, m_ok,
                                 0, mid, N_K, sm, qk, inv_sm, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                                 BLOCK_N, False, IS_CAUSAL, MASK_KIND, NEG_MAX, DOT, ACC, PREC, USE_TMA)
    acc_o, m_i, l_i = _fwd_tiles(acc_o, m_i, l_i, q, Kh, Vh, Mh, KS, VS, skn, skd, svn, svd, smm, smn, offs_m, m_ok,
                                 mid, hi, N_K, sm, qk, inv_sm, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                                 BLOCK_N, True, IS_CAUSAL, MASK_KIND, NEG_MAX, DOT, ACC, PREC, USE_TMA)
    o = _scale_rows(acc_o, _inv_l(l_i, MASK_KIND))
    _store_pieces(Oh, offs_m, m_ok, som, sod, o, HEAD_DV, DV_PIECES, RNE_BF16)
    _store_row_stats(LSEh, offs_m, m_ok, m_i, l_i, qk, STAT_STRIDE, MASK_KIND)


@triton.jit
def _fwd_program(
    pid, Q, K, V, QD, KD, VD, O, OD, LSE, MU, M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sqdb, sqdh, sqdm, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
    sob, soh, som, sod, sodb, sodh, sodm, sodd, smb, smh, smm, smn,
    H, GROUP, N_Q, N_K, KT, STAT_STRIDE, sm, qk, inv_sm,
    HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_TANGENT: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
    STORE_MU: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of BLOCK_M query rows of one (batch, query head): tile number pid (see _attn_jvp_fwd_kernel)."""
    pid_m, bh = _tile_of(pid, N_Q, BLOCK_M, IS_CAUSAL)
    b = (bh // H).to(tl.int64)  # int64: b * stride can exceed 2^31 for large batches
    h = (bh % H).to(tl.int64)
    hk = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_Q
    mid, hi = _key_range(pid_m, N_K, BLOCK_M, BLOCK_N, IS_CAUSAL)

    Kh = K + b * skb + hk * skh
    Vh = V + b * svb + hk * svh
    Mh = M + b * smb + h * smh
    Oh = O + b * sob + h * soh
    LSEh = LSE + bh.to(tl.int64) * N_Q
    if USE_TMA:  # one descriptor a head-dim piece (the launcher checked the alignment rules: _levers.tma_applies)
        KS = _make_descs(Kh, N_K, skn, HEAD_D, D_PIECES, BLOCK_N)
        VS = _make_descs(Vh, N_K, svn, HEAD_DV, DV_PIECES, BLOCK_N)
    else:
        KS = Kh
        VS = Vh
    q = _load_pieces(Q + b * sqb + h * sqh, offs_m, m_ok, sqm, sqd, HEAD_D, D_PIECES, True, DOT)

    if HAS_TANGENT:
        if b < KT:
            qd = _load_pieces(QD + b * sqdb + h * sqdh, offs_m, m_ok, sqdm, sqdd, HEAD_D, D_PIECES, True, DOT)
            KDh = KD + b * skdb + hk * skdh
            VDh = VD + b * svdb + hk * svdh
            if USE_TMA:
                KDS = _make_descs(KDh, N_K, skdn, HEAD_D, D_PIECES, BLOCK_N)
                VDS = _make_descs(VDh, N_K, svdn, HEAD_DV, DV_PIECES, BLOCK_N)
            else:
                KDS = KDh
                VDS = VDh
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
            l_i = tl.zeros([BLOCK_M], dtype=ACC)
            mu_i = tl.zeros([BLOCK_M], dtype=ACC)
            acc_o = _zeros_pieces(BLOCK_M, DV_PIECES, ACC)
            acc_t = _zeros_pieces(BLOCK_M, DV_PIECES, ACC)
            acc_o, acc_t, m_i, l_i, mu_i = _fwd_jvp_tiles(
                acc_o, acc_t, m_i, l_i, mu_i, q, qd, Kh, KDh, Vh, VDh, Mh, KS, KDS, VS, VDS,
                skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                offs_m, m_ok, 0, mid, N_K, sm, qk, inv_sm, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                BLOCK_N, False, IS_CAUSAL, MASK_KIND, NEG_MAX, DOT, ACC, PREC, USE_TMA)
            acc_o, acc_t, m_i, l_i, mu_i = _fwd_jvp_tiles(
                acc_o, acc_t, m_i, l_i, mu_i, q, qd, Kh, KDh, Vh, VDh, Mh, KS, KDS, VS, VDS,
                skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                offs_m, m_ok, mid, hi, N_K, sm, qk, inv_sm, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                BLOCK_N, True, IS_CAUSAL, MASK_KIND, NEG_MAX, DOT, ACC, PREC, USE_TMA)
            inv_l = _inv_l(l_i, MASK_KIND)
            o = _scale_rows(acc_o, inv_l)
            o_dot = _tangent_out(acc_t, o, inv_l, mu_i * inv_l)
            _store_pieces(Oh, offs_m, m_ok, som, sod, o, HEAD_DV, DV_PIECES, RNE_BF16)
            _store_pieces(OD + b * sodb + h * sodh, offs_m, m_ok, sodm, sodd, o_dot, HEAD_DV, DV_PIECES, RNE_BF16)
            _store_row_stats(LSEh, offs_m, m_ok, m_i, l_i, qk, STAT_STRIDE, MASK_KIND)
            if STORE_MU:
                tl.store(MU + bh.to(tl.int64) * N_Q + offs_m, mu_i * inv_l, mask=m_ok)
        else:
            _fwd_plain_head(q, Kh, Vh, Mh, KS, VS, Oh, LSEh, skn, skd, svn, svd, smm, smn, som, sod,
                            offs_m, m_ok, mid, hi, N_K, sm, qk, inv_sm, STAT_STRIDE,
                            HEAD_D, D_PIECES, HEAD_DV, DV_PIECES, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_KIND, NEG_MAX,
                            DOT, ACC, PREC, RNE_BF16, USE_TMA)
    else:
        _fwd_plain_head(q, Kh, Vh, Mh, KS, VS, Oh, LSEh, skn, skd, svn, svd, smm, smn, som, sod,
                        offs_m, m_ok, mid, hi, N_K, sm, qk, inv_sm, STAT_STRIDE,
                        HEAD_D, D_PIECES, HEAD_DV, DV_PIECES, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_KIND, NEG_MAX,
                        DOT, ACC, PREC, RNE_BF16, USE_TMA)


@triton.autotune(configs=_all_configs(_FWD_JVP_CONFIGS, _FWD_PLAIN_CONFIGS, _FP32_FWD_CONFIGS, _FWD_JVP_MASKED_CONFIGS,
                                      _FWD_PLAIN_MASKED_CONFIGS),
                 key=["N_K", "D_PIECES", "DV_PIECES", "IS_CAUSAL", "HAS_TANGENT", "MASK_KIND", "USE_TMA", "PERSISTENT"],
                 prune_configs_by=_pruner(_FWD_JVP_CONFIGS, _FWD_PLAIN_CONFIGS, _FP32_FWD_CONFIGS,
                                          _FWD_JVP_MASKED_CONFIGS, _FWD_PLAIN_MASKED_CONFIGS))
@triton.jit
def _attn_jvp_fwd_kernel(
    Q, K, V, QD, KD, VD, O, OD, LSE, MU, M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sqdb, sqdh, sqdm, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
    sob, soh, som, sod, sodb, sodh, sodm, sodd, smb, smh, smm, smn,
    H, GROUP, N_Q, N_K, KT, BH, STAT_STRIDE, sm_scale, qk_scale, inv_scale, SCALES,
    HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_TANGENT: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
    STORE_MU: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, STRIDE_ALIGN: tl.constexpr, USE_TMA: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Fused attention forward + JVP for blocks of BLOCK_M query rows of one (batch, query head).

    O = softmax(c Q K^T + mask) V;  O_dot = (A_T / l) - (mu / l) O  with  A_T = sum_j P~_j (S_dot_j V_j + V_dot_j)
    online (see _fwd_jvp_tiles); LSE (raw-score units) L = m + log2(l) / (c log2 e). Query head h reads key/value head
    h // GROUP (GQA / MQA, GROUP = Hq / Hkv; no copies). Batch rows b < KT have a tangent (tangent row b); the others
    run the plain flash forward (_fwd_plain_head) and never touch the tangent tensors. Tiles are numbered 1-D over
    (B*H = BH, row blocks) with the tangent heads first (see _tile_and_head), so the heavier tiles start first; with
    causal masking the row blocks run last-to-first for the same reason. One tile a program, or with PERSISTENT (a
    lever, _levers.py) a grid of about one program per SM, each walking tiles pid, pid + grid, ... in that order.
    USE_TMA (a lever) loads K, V, K_dot, V_dot through tensor descriptors. STRIDE_ALIGN: what every row / head / batch
    stride is a multiple of (_pieces.stride_align: at D = 72 it lets the key loop pipeline). STORE_MU (only when the
    tangent output is differentiable) also saves mu / l = rowsum(P * S_dot) per tangent row for the tangent backward
    (tangent_backward.py).
    """
    sm, qk, inv_sm = _scales(sm_scale, qk_scale, inv_scale, SCALES, SCALE_PTR)
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn = _aligned((sqb, sqh, sqm, skb, skh, skn, svb, svh, svn), STRIDE_ALIGN)
    sqdb, sqdh, sqdm, skdb, skdh, skdn, svdb, svdh, svdn = _aligned(
        (sqdb, sqdh, sqdm, skdb, skdh, skdn, svdb, svdh, svdn), STRIDE_ALIGN)
    sob, soh, som, sodb, sodh, sodm = _aligned((sob, soh, som, sodb, sodh, sodm), STRIDE_ALIGN)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), tl.cdiv(N_Q, BLOCK_M) * BH, tl.num_programs(0)):
            _fwd_program(tile, Q, K, V, QD, KD, VD, O, OD, LSE, MU, M,
                         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                         sqdb, sqdh, sqdm, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
                         sob, soh, som, sod, sodb, sodh, sodm, sodd, smb, smh, smm, smn,
                         H, GROUP, N_Q, N_K, KT, STAT_STRIDE, sm, qk, inv_sm,
                         HEAD_D, D_PIECES, HEAD_DV, DV_PIECES, IS_CAUSAL, HAS_TANGENT, MASK_KIND, NEG_MAX,
                         STORE_MU, ACC, DOT, PREC, RNE_BF16, USE_TMA, BLOCK_M, BLOCK_N)
    else:
        _fwd_program(tl.program_id(0), Q, K, V, QD, KD, VD, O, OD, LSE, MU, M,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sqdb, sqdh, sqdm, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
                     sob, soh, som, sod, sodb, sodh, sodm, sodd, smb, smh, smm, smn,
                     H, GROUP, N_Q, N_K, KT, STAT_STRIDE, sm, qk, inv_sm,
                     HEAD_D, D_PIECES, HEAD_DV, DV_PIECES, IS_CAUSAL, HAS_TANGENT, MASK_KIND, NEG_MAX,
                     STORE_MU, ACC, DOT, PREC, RNE_BF16, USE_TMA, BLOCK_M, BLOCK_N)


def attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, attn_mask: torch.Tensor | None, causal: bool, scale: float,
                      tangent_grad: bool = False):
    """Launch the fused forward + JVP kernel. Inputs are assumed checked (see attention_jvp).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) with Hkv dividing Hq; tangents (kt, ...) likewise;
    attn_mask None, bool or additive, broadcastable to (B, Hq, Nq, Nk). Returns (o (B, Hq, Nq, Dv), o_dot (kt, Hq, Nq,
    Dv), lse: row statistics for the backward, fp32 (fp64 for fp64 inputs): the LSE (B, Hq, Nq) in raw-score units (see
    the package docstring; +inf on fully masked rows), or (2, B, Hq, Nq) with an additive mask (_store_row_stats)),
    mu: rowsum(P * S_dot) (kt, Hq, Nq) in the same dtype when tangent_grad (for the tangent backward), else empty).
    """
    batch, heads, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[3]
    kt = q_dot.shape[0]
    o = new_output((batch, heads, n_q, dv), dtype=q.dtype, device=q.device)
    o_dot = new_output((kt, heads, n_q, dv), dtype=q.dtype, device=q.device)
    lse = new_output(lse_shape(batch, heads, n_q, attn_mask), dtype=acc_dtype(q.dtype), device=q.device)
    mu = new_output((kt if tangent_grad else 0, heads, n_q), dtype=acc_dtype(q.dtype), device=q.device)
    if batch * heads * n_q == 0:
        return o, o_dot, lse, mu
    acc, dot, prec, rne = compute_dtypes(q.dtype)
    has_t = kt > 0
    # Without tangent rows the tangent pointers are never dereferenced (HAS_TANGENT is a constexpr): pass q / o.
    qd, kd, vd, od = (q_dot, k_dot, v_dot, o_dot) if has_t else (q, k, v, o)
    scale_args, scale_ptr = _scale_args(scale, q.dtype, q.device, lse)
    mask, mask_strides, mask_kind, neg_max = mask_args(attn_mask, (batch, heads, n_q, n_k), q.dtype, lse)
    levers = forward_levers((k, v, kd, vd))
    tiles = lambda meta: cdiv(n_q, meta["BLOCK_M"]) * batch * heads  # noqa: E731
    if levers["PERSISTENT"]:
        programs = persistent_programs(q.device)
        grid = lambda meta: (min(tiles(meta), programs),)  # noqa: E731
    else:
        grid = lambda meta: (tiles(meta),)  # noqa: E731
    _attn_jvp_fwd_kernel[grid](
        q, k, v, qd, kd, vd, o, od, lse, mu if (tangent_grad and has_t) else lse, mask,
        *q.stride(), *k.stride(), *v.stride(), *qd.stride(), *kd.stride(), *vd.stride(), *o.stride(), *od.stride(),
        *mask_strides, heads, heads // k.shape[1], n_q, n_k, kt, batch * heads, batch * heads * n_q, *scale_args,
        **head_dim_args(d, dv, q, k, v, qd, kd, vd, o, od), IS_CAUSAL=bool(causal), HAS_TANGENT=has_t,
        MASK_KIND=mask_kind, NEG_MAX=neg_max, STORE_MU=bool(tangent_grad and has_t), ACC=acc, DOT=dot, PREC=prec,
        RNE_BF16=rne, SCALE_PTR=scale_ptr, **levers,
    )
    return o, o_dot, lse, mu
