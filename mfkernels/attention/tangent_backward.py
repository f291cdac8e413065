"""Backward of the fused forward + JVP: exact gradients through the tangent output (reverse-over-forward).

Per head, in torch's units (s = c q . k + mask, the scale c folded into S and S_dot; a mask is a constant):

    P = softmax(S), O = P V;  S_dot = c (Q_dot K^T + Q K_dot^T);  mu = rowsum(P * S_dot);  P_dot = P * (S_dot - mu)
    O_dot = P_dot V + P V_dot

Given G = dL/dO and G' = dL/dO_dot (the upstream gradients of a loss of both outputs), with the row statistics

    delta_i = G_i . O_i,  delta'_i = G'_i . O_i,  delta^_i = G'_i . O_dot_i,  Delta_i = delta_i + delta^_i

and the score-space products dP = G V^T + G' V_dot^T, dP' = G' V^T, the gradients are

    dS_dot = P * (dP' - delta')                                   (gradient of the tangent scores)
    dS     = P * (dP - Delta) + (S_dot - mu) * dS_dot             (gradient of the primal scores)
    dV     = P^T G + P_dot^T G'          dV_dot = P^T G'
    dQ     = c (dS K + dS_dot K_dot)     dK     = c (dS^T Q + dS_dot^T Q_dot)
    dQ_dot = c dS_dot K                  dK_dot = c dS_dot^T Q

Derivation: O_dot_i = sum_j P_ij (S_dot_ij V_j + V_dot_j) - mu_i O_i, so dL/dS_dot_ij = P_ij (G'_i . V_j - G'_i . O_i),
and dL/dP_ij = G_i . V_j + G'_i . (S_dot_ij V_j + V_dot_j) - S_dot_ij delta'_i - mu_i G'_i . V_j; the softmax backward
dS_ij = P_ij (dL/dP_ij - sum_l P_il dL/dP_il) with sum_l P_il dL/dP_il = delta_i + delta^_i - mu_i delta'_i gives dS.
With G' = 0 everything reduces to the flash backward (dS = P * (dO V^T - delta)).

Kernels (flash style, nothing of size N^2 in memory): a preprocess computes Delta and delta' per query row; the dK/dV
kernel keeps a tile of keys of one key/value head resident (k, k_dot, v, v_dot and four accumulators) and streams the
query tiles of every query head of its group (GQA: deterministic sum, no atomics); the dQ kernel keeps a query tile
resident (q, q_dot, G, G' and the row statistics) and streams the key tiles. Both recompute P from the saved row
statistics (the LSE, see _common._store_row_stats) and S_dot from the inputs; mu comes from the forward (saved only
when the tangent output is differentiable: one float per tangent row).
Batch rows b >= kt have no tangent: their programs run the ordinary flash backward tiles of backward.py.

Cost per (query, key) pair of a tangent row, in units of 2 D FLOPs (D = Dv): one pass would need 15 products (S 1,
S_dot 2, dP 2, dP' 1, dV 2, dV_dot 1, dQ 2, dK 2, dQ_dot 1, dK_dot 1), i.e. 30 N^2 D FLOPs a head (the flash backward:
10, the fused forward + JVP: 12). The two-kernel split recomputes S, S_dot, dP, dP' in both: 21 products, 42 N^2 D
FLOPs performed. Memory: inputs and outputs (q, k, v, their tangents, o, o_dot, G, G' and the six gradients), plus
O(N) statistics per row (LSE, mu, Delta, delta'): no N^2 buffer, no tangent recompute of the forward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import cdiv, new_output
from .._triton import compute_dtypes
from ._common import (_attends, _causal_query_range, _key_range, _load_row_stats, _masked_scores, _probs,
                      _scale_args, _scales, _tile_and_head, mask_args)
from ._configs import _FP32_TBWD_DKDV_CONFIGS, _FP32_TBWD_DQ_CONFIGS, _TBWD_DKDV_CONFIGS, _TBWD_DQ_CONFIGS
from ._configs import _all_configs, _pruner
from ._pieces import (_aligned, _dot_nt, _dot_nt_acc, _dot_pieces, _load_pieces, _row_dot, _scale_all,
                      _store_pieces, _zeros_pieces, head_dim_args)
from .backward import _dkdv_group, _dq_rows


# ================================================================================================ row statistics
@triton.jit
def _attn_tbwd_preprocess_kernel(O, OD, GO, GOD, DELTA, DDELTA,
                                 sob, soh, som, sod, sodb, sodh, sodm, sodd, sgb, sgh, sgm, sgd,
                                 sgdb, sgdh, sgdm, sgdd, H, N_Q, KT,
                                 HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
                                 HAS_GO: tl.constexpr, ACC: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
                                 BLOCK_M: tl.constexpr):
    """Delta_i = G_i . O_i + G'_i . O_dot_i and delta'_i = G'_i . O_i for tangent rows (b < KT); Delta_i = G_i . O_i
    for the others. Without G (HAS_GO False: o took no part in the loss) its terms are absent."""
    sob, soh, som, sodb, sodh, sodm = _aligned((sob, soh, som, sodb, sodh, sodm), STRIDE_ALIGN)
    sgb, sgh, sgm, sgdb, sgdh, sgdm = _aligned((sgb, sgh, sgm, sgdb, sgdh, sgdm), STRIDE_ALIGN)
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, False)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_Q
    o = _load_pieces(O + b * sob + h * soh, offs_m, m_ok, som, sod, HEAD_DV, DV_PIECES, True, ACC)
    delta = tl.zeros([BLOCK_M], dtype=ACC)
    if HAS_GO:
        g = _load_pieces(GO + b * sgb + h * sgh, offs_m, m_ok, sgm, sgd, HEAD_DV, DV_PIECES, True, ACC)
        delta += _row_dot(g, o)
    if b < KT:
        gd = _load_pieces(GOD + b * sgdb + h * sgdh, offs_m, m_ok, sgdm, sgdd, HEAD_DV, DV_PIECES, True, ACC)
        od = _load_pieces(OD + b * sodb + h * sodh, offs_m, m_ok, sodm, sodd, HEAD_DV, DV_PIECES, True, ACC)
        delta += _row_dot(gd, od)
        tl.store(DDELTA + bh.to(tl.int64) * N_Q + offs_m, _row_dot(gd, o), mask=m_ok)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=m_ok)


# =========================================================================================================== dK, dV
@triton.jit
def _tbwd_dkdv_tiles(dk, dv, dkd, dvd, k, kd, v, vd, Qh, QDh, GOh, GODh, LSEh, MUh, DELTAh, DDELTAh, Mh,
                     sqm, sqd, sqdm, sqdd, sgm, sgd, sgdm, sgdd, smm, smn,
                     offs_n, n_ok, lo, hi, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                     HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
                     BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                     MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr, HAS_GO: tl.constexpr,
                     DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Query tiles [lo, hi) of one query head against a resident key tile, transposed (keys x queries):

    P^T, S_dot^T = c (K Q_dot^T + K_dot Q^T);  dP'^T = V G'^T;  dP^T = V G^T + V_dot G'^T;
    dS_dot^T = P^T * (dP'^T - delta');  dS^T = P^T * (dP^T - Delta) + (S_dot^T - mu) * dS_dot^T;
    dV += P^T G + (P^T * (S_dot^T - mu)) G';  dV_dot += P^T G';  dK += dS^T Q + dS_dot^T Q_dot;  dK_dot += dS_dot^T Q
    (dK, dK_dot scaled by c at the end). Query-tail rows load zeros (and zero statistics): they add nothing. Tiles over
    D or Dv are tuples of head-dim pieces (_pieces.py).
    """
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q
        q = _load_pieces(Qh, offs_m, m_ok, sqm, sqd, HEAD_D, D_PIECES, True, DOT)
        qd = _load_pieces(QDh, offs_m, m_ok, sqdm, sqdd, HEAD_D, D_PIECES, True, DOT)
        gd = _load_pieces(GODh, offs_m, m_ok, sgdm, sgdd, HEAD_DV, DV_PIECES, True, DOT)
        lse_a, lse_b = _load_row_stats(LSEh, offs_m, m_ok, STAT_STRIDE, MASK_KIND)
        mu = tl.load(MUh + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTAh + offs_m, mask=m_ok, other=0.0)
        ddelta = tl.load(DDELTAh + offs_m, mask=m_ok, other=0.0)
        s_t = _dot_nt(k, q, ACC, PREC)
        s_t = _masked_scores(s_t, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, True)
        p_t = _probs(s_t, lse_a[None, :], lse_b[None, :], qk, MASK_KIND)
        if MASKED:
            p_t = tl.where(_attends(offs_m, offs_n, n_ok, True, True), p_t, 0.0)
        sd_t = _dot_nt(k, qd, ACC, PREC)
        sd_t = _dot_nt_acc(kd, q, sd_t, ACC, PREC) * sm
        dpd_t = _dot_nt(v, gd, ACC, PREC)
        dp_t = _dot_nt(vd, gd, ACC, PREC)
        if HAS_GO:
            g = _load_pieces(GOh, offs_m, m_ok, sgm, sgd, HEAD_DV, DV_PIECES, True, DOT)
            dp_t = _dot_nt_acc(v, g, dp_t, ACC, PREC)
        dsd_t = p_t * (dpd_t - ddelta[None, :])
        sdc_t = sd_t - mu[None, :]
        ds_t = p_t * (dp_t - delta[None, :]) + sdc_t * dsd_t
        p_low = p_t.to(DOT)
        dsd_low = dsd_t.to(DOT)
        dvd = _dot_pieces(p_low, gd, dvd, ACC, PREC)
        dv = _dot_pieces((p_t * sdc_t).to(DOT), gd, dv, ACC, PREC)
        if HAS_GO:
            dv = _dot_pieces(p_low, g, dv, ACC, PREC)
        dk = _dot_pieces(ds_t.to(DOT), q, dk, ACC, PREC)
        dk = _dot_pieces(dsd_low, qd, dk, ACC, PREC)
        dkd = _dot_pieces(dsd_low, q, dkd, ACC, PREC)
    return dk, dv, dkd, dvd


@triton.autotune(configs=_all_configs(_TBWD_DKDV_CONFIGS, _FP32_TBWD_DKDV_CONFIGS),
                 key=["N_Q", "N_K", "D_PIECES", "DV_PIECES", "IS_CAUSAL", "MASK_KIND", "HAS_GO"],
                 prune_configs_by=_pruner(_TBWD_DKDV_CONFIGS, fp32_table=_FP32_TBWD_DKDV_CONFIGS))
@triton.jit
def _attn_tbwd_dkdv_kernel(
    Q, K, V, QD, KD, VD, GO, GOD, LSE, MU, DELTA, DDELTA, DK, DV, DKD, DVD, M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sqdb, sqdh, sqdm, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
    sgb, sgh, sgm, sgd, sgdb, sgdh, sgdm, sgdd,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, sdkdb, sdkdh, sdkdn, sdkdd, sdvdb, sdvdh, sdvdn, sdvdd,
    smb, smh, smm, smn,
    H, GROUP, N_Q, N_K, KT, STAT_STRIDE, sm_scale, qk_scale, inv_scale, SCALES,
    HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr, HAS_GO: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV, dK_dot, dV_dot (module docstring) for one tile of BLOCK_N keys of one (batch, key/value head), summed
    over the GROUP query heads that read it. Batch rows b >= KT: the flash backward's dK, dV (dK_dot, dV_dot have only
    KT rows); without G (HAS_GO False) those rows get zeros."""
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn = _aligned((sqb, sqh, sqm, skb, skh, skn, svb, svh, svn), STRIDE_ALIGN)
    sqdb, sqdh, sqdm, skdb, skdh, skdn, svdb, svdh, svdn = _aligned(
        (sqdb, sqdh, sqdm, skdb, skdh, skdn, svdb, svdh, svdn), STRIDE_ALIGN)
    sgb, sgh, sgm, sgdb, sgdh, sgdm = _aligned((sgb, sgh, sgm, sgdb, sgdh, sgdm), STRIDE_ALIGN)
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn = _aligned((sdkb, sdkh, sdkn, sdvb, sdvh, sdvn), STRIDE_ALIGN)
    sdkdb, sdkdh, sdkdn, sdvdb, sdvdh, sdvdn = _aligned((sdkdb, sdkdh, sdkdn, sdvdb, sdvdh, sdvdn), STRIDE_ALIGN)
    pid_n, bhk = _tile_and_head(N_K, BLOCK_N, False)
    h_kv = H // GROUP
    b = (bhk // h_kv).to(tl.int64)
    hk = (bhk % h_kv).to(tl.int64)
    sm, qk, inv_sm = _scales(sm_scale, qk_scale, inv_scale, SCALES, SCALE_PTR)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_K
    k = _load_pieces(K + b * skb + hk * skh, offs_n, n_ok, skn, skd, HEAD_D, D_PIECES, True, DOT)
    v = _load_pieces(V + b * svb + hk * svh, offs_n, n_ok, svn, svd, HEAD_DV, DV_PIECES, True, DOT)
    dk = _zeros_pieces(BLOCK_N, D_PIECES, ACC)
    dv = _zeros_pieces(BLOCK_N, DV_PIECES, ACC)
    if b < KT:
        kd = _load_pieces(KD + b * skdb + hk * skdh, offs_n, n_ok, skdn, skdd, HEAD_D, D_PIECES, True, DOT)
        vd = _load_pieces(VD + b * svdb + hk * svdh, offs_n, n_ok, svdn, svdd, HEAD_DV, DV_PIECES, True, DOT)
        dkd = _zeros_pieces(BLOCK_N, D_PIECES, ACC)
        dvd = _zeros_pieces(BLOCK_N, DV_PIECES, ACC)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            row = (b * H + h) * N_Q
            Qh = Q + b * sqb + h * sqh
            QDh = QD + b * sqdb + h * sqdh
            GOh = GO + b * sgb + h * sgh
            GODh = GOD + b * sgdb + h * sgdh
            Mh = M + b * smb + h * smh
            if IS_CAUSAL:
                lo, mid = _causal_query_range(pid_n, N_Q, BLOCK_M, BLOCK_N)
                dk, dv, dkd, dvd = _tbwd_dkdv_tiles(
                    dk, dv, dkd, dvd, k, kd, v, vd, Qh, QDh, GOh, GODh, LSE + row, MU + row, DELTA + row,
                    DDELTA + row, Mh, sqm, sqd, sqdm, sqdd, sgm, sgd, sgdm, sgdd, smm, smn,
                    offs_n, n_ok, lo, mid, N_Q, sm, qk, inv_sm, STAT_STRIDE, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                    BLOCK_M, True, MASK_KIND, NEG_MAX, HAS_GO, DOT, ACC, PREC)
                lo = tl.maximum(mid, lo)
            else:
                lo = 0
            dk, dv, dkd, dvd = _tbwd_dkdv_tiles(
                dk, dv, dkd, dvd, k, kd, v, vd, Qh, QDh, GOh, GODh, LSE + row, MU + row, DELTA + row,
                DDELTA + row, Mh, sqm, sqd, sqdm, sqdd, sgm, sgd, sgdm, sgdd, smm, smn,
                offs_n, n_ok, lo, N_Q, N_Q, sm, qk, inv_sm, STAT_STRIDE, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                BLOCK_M, False, MASK_KIND, NEG_MAX, HAS_GO, DOT, ACC, PREC)
        dkd = _scale_all(dkd, sm)
        _store_pieces(DKD + b * sdkdb + hk * sdkdh, offs_n, n_ok, sdkdn, sdkdd, dkd, HEAD_D, D_PIECES, RNE_BF16)
        _store_pieces(DVD + b * sdvdb + hk * sdvdh, offs_n, n_ok, sdvdn, sdvdd, dvd, HEAD_DV, DV_PIECES, RNE_BF16)
    elif HAS_GO:
        dk, dv = _dkdv_group(dk, dv, k, v, Q, GO, LSE, DELTA, M, b, hk, pid_n, offs_n, n_ok,
                             sqb, sqh, sqm, sqd, sgb, sgh, sgm, sgd, smb, smh, smm, smn, H, GROUP, N_Q, sm,
                             qk, inv_sm, STAT_STRIDE, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES, BLOCK_M, BLOCK_N, IS_CAUSAL,
                             MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    dk = _scale_all(dk, sm)
    _store_pieces(DK + b * sdkb + hk * sdkh, offs_n, n_ok, sdkn, sdkd, dk, HEAD_D, D_PIECES, RNE_BF16)
    _store_pieces(DV + b * sdvb + hk * sdvh, offs_n, n_ok, sdvn, sdvd, dv, HEAD_DV, DV_PIECES, RNE_BF16)


# ================================================================================================================ dQ
@triton.jit
def _tbwd_dq_tiles(dq, dqd, q, qd, g, gd, lse_a, lse_b, mu, delta, ddelta, Kh, KDh, Vh, VDh, Mh,
                   skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                   offs_m, m_ok, lo, hi, N_K, sm, qk, inv_sm,
                   HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr, HAS_GO: tl.constexpr,
                   DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Key tiles [lo, hi) against a resident query tile: P, S_dot, dP, dP', dS, dS_dot as in the module docstring;
    dQ += dS K + dS_dot K_dot;  dQ_dot += dS_dot K  (both scaled by c at the end). MASKED tiles (key tail, causal
    diagonal) set s = -inf outside, so P = 0 there."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        k = _load_pieces(Kh, offs_n, n_ok, skn, skd, HEAD_D, D_PIECES, True, DOT)
        kd = _load_pieces(KDh, offs_n, n_ok, skdn, skdd, HEAD_D, D_PIECES, True, DOT)
        v = _load_pieces(Vh, offs_n, n_ok, svn, svd, HEAD_DV, DV_PIECES, True, DOT)
        vd = _load_pieces(VDh, offs_n, n_ok, svdn, svdd, HEAD_DV, DV_PIECES, True, DOT)
        s = _dot_nt(q, k, ACC, PREC)
        s = _masked_scores(s, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, False)
        if MASKED:
            s = tl.where(_attends(offs_m, offs_n, n_ok, IS_CAUSAL, False), s, float("-inf"))
        p = _probs(s, lse_a[:, None], lse_b[:, None], qk, MASK_KIND)
        sd = _dot_nt(qd, k, ACC, PREC)
        sd = _dot_nt_acc(q, kd, sd, ACC, PREC) * sm
        dpd = _dot_nt(gd, v, ACC, PREC)
        dp = _dot_nt(gd, vd, ACC, PREC)
        if HAS_GO:
            dp = _dot_nt_acc(g, v, dp, ACC, PREC)
        dsd = p * (dpd - ddelta[:, None])
        ds = p * (dp - delta[:, None]) + (sd - mu[:, None]) * dsd
        dsd_low = dsd.to(DOT)
        dq = _dot_pieces(ds.to(DOT), k, dq, ACC, PREC)
        dq = _dot_pieces(dsd_low, kd, dq, ACC, PREC)
        dqd = _dot_pieces(dsd_low, k, dqd, ACC, PREC)
    return dq, dqd


@triton.autotune(configs=_all_configs(_TBWD_DQ_CONFIGS, _FP32_TBWD_DQ_CONFIGS),
                 key=["N_Q", "N_K", "D_PIECES", "DV_PIECES", "IS_CAUSAL", "MASK_KIND", "HAS_GO"],
                 prune_configs_by=_pruner(_TBWD_DQ_CONFIGS, fp32_table=_FP32_TBWD_DQ_CONFIGS))
@triton.jit
def _attn_tbwd_dq_kernel(
    Q, K, V, QD, KD, VD, GO, GOD, LSE, MU, DELTA, DDELTA, DQ, DQD, M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sqdb, sqdh, sqdm, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
    sgb, sgh, sgm, sgd, sgdb, sgdh, sgdm, sgdd, sdqb, sdqh, sdqm, sdqd, sdqdb, sdqdh, sdqdm, sdqdd,
    smb, smh, smm, smn,
    H, GROUP, N_Q, N_K, KT, STAT_STRIDE, sm_scale, qk_scale, inv_scale, SCALES,
    HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr, HAS_GO: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ, dQ_dot (module docstring) for one tile of BLOCK_M queries of one (batch, query head); keys and values of
    head h // GROUP. Batch rows b >= KT: the flash backward's dQ (zeros without G)."""
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn = _aligned((sqb, sqh, sqm, skb, skh, skn, svb, svh, svn), STRIDE_ALIGN)
    sqdb, sqdh, sqdm, skdb, skdh, skdn, svdb, svdh, svdn = _aligned(
        (sqdb, sqdh, sqdm, skdb, skdh, skdn, svdb, svdh, svdn), STRIDE_ALIGN)
    sgb, sgh, sgm, sgdb, sgdh, sgdm = _aligned((sgb, sgh, sgm, sgdb, sgdh, sgdm), STRIDE_ALIGN)
    sdqb, sdqh, sdqm, sdqdb, sdqdh, sdqdm = _aligned((sdqb, sdqh, sdqm, sdqdb, sdqdh, sdqdm), STRIDE_ALIGN)
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, IS_CAUSAL)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    sm, qk, inv_sm = _scales(sm_scale, qk_scale, inv_scale, SCALES, SCALE_PTR)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_Q
    row = bh.to(tl.int64) * N_Q
    q = _load_pieces(Q + b * sqb + h * sqh, offs_m, m_ok, sqm, sqd, HEAD_D, D_PIECES, True, DOT)
    lse_a, lse_b = _load_row_stats(LSE + row, offs_m, m_ok, STAT_STRIDE, MASK_KIND)
    delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
    Kh = K + b * skb + hk * skh
    Vh = V + b * svb + hk * svh
    Mh = M + b * smb + h * smh
    dq = _zeros_pieces(BLOCK_M, D_PIECES, ACC)
    if HAS_GO:
        g = _load_pieces(GO + b * sgb + h * sgh, offs_m, m_ok, sgm, sgd, HEAD_DV, DV_PIECES, True, DOT)
    else:
        g = _zeros_pieces(BLOCK_M, DV_PIECES, DOT)
    if b < KT:
        qd = _load_pieces(QD + b * sqdb + h * sqdh, offs_m, m_ok, sqdm, sqdd, HEAD_D, D_PIECES, True, DOT)
        gd = _load_pieces(GOD + b * sgdb + h * sgdh, offs_m, m_ok, sgdm, sgdd, HEAD_DV, DV_PIECES, True, DOT)
        mu = tl.load(MU + row + offs_m, mask=m_ok, other=0.0)
        ddelta = tl.load(DDELTA + row + offs_m, mask=m_ok, other=0.0)
        KDh = KD + b * skdb + hk * skdh
        VDh = VD + b * svdb + hk * svdh
        dqd = _zeros_pieces(BLOCK_M, D_PIECES, ACC)
        mid, hi = _key_range(pid_m, N_K, BLOCK_M, BLOCK_N, IS_CAUSAL)
        dq, dqd = _tbwd_dq_tiles(dq, dqd, q, qd, g, gd, lse_a, lse_b, mu, delta, ddelta, Kh, KDh, Vh, VDh, Mh,
                                 skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                                 offs_m, m_ok, 0, mid, N_K, sm, qk, inv_sm, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                                 BLOCK_N, False, IS_CAUSAL, MASK_KIND, NEG_MAX, HAS_GO, DOT, ACC, PREC)
        dq, dqd = _tbwd_dq_tiles(dq, dqd, q, qd, g, gd, lse_a, lse_b, mu, delta, ddelta, Kh, KDh, Vh, VDh, Mh,
                                 skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                                 offs_m, m_ok, mid, hi, N_K, sm, qk, inv_sm, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                                 BLOCK_N, True, IS_CAUSAL, MASK_KIND, NEG_MAX, HAS_GO, DOT, ACC, PREC)
        dqd = _scale_all(dqd, sm)
        _store_pieces(DQD + b * sdqdb + h * sdqdh, offs_m, m_ok, sdqdm, sdqdd, dqd, HEAD_D, D_PIECES, RNE_BF16)
    elif HAS_GO:
        dq = _dq_rows(dq, q, g, lse_a, lse_b, delta, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
                      pid_m, offs_m, m_ok, N_K, sm, qk, inv_sm, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                      BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    dq = _scale_all(dq, sm)
    _store_pieces(DQ + b * sdqb + h * sdqh, offs_m, m_ok, sdqm, sdqd, dq, HEAD_D, D_PIECES, RNE_BF16)


# ======================================================================================================= launcher
_PRE_BLOCK_M = 64


def attention_jvp_bwd(grad_o: torch.Tensor | None, grad_o_dot: torch.Tensor, q, k, v, q_dot, k_dot, v_dot, o, o_dot,
                      lse, mu, attn_mask: torch.Tensor | None, causal: bool, scale: float):
    """Gradients (dq, dk, dv, dq_dot, dk_dot, dv_dot) of a loss of (o, o_dot) from the fused forward + JVP, given
    grad_o (None: o took no part in the loss) and grad_o_dot, from the saved row statistics lse and mu (see the module
    docstring). Shapes as in forward.attention_jvp_fwd; the tangent gradients have kt rows."""
    batch, heads, n_q, d = q.shape
    n_k, dv_dim = k.shape[2], v.shape[3]
    kt = q_dot.shape[0]
    acc, dot, prec, rne = compute_dtypes(q.dtype)
    grads = [new_output(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, q_dot, k_dot, v_dot)]
    # Padded tiles (one power-of-two piece) at every head dim: split into pieces (_pieces.py) these two kernels spill
    # on sm_90 in bf16 with every config of their lists (D = 72: 56-1628 B, 255 registers) where the padded ones do
    # not (171 / 242 registers), so the tangent backward keeps padded tiles.
    dims = head_dim_args(d, dv_dim, q, k, v, q_dot, k_dot, v_dot, o, o_dot, grad_o_dot,
                         *((grad_o,) if grad_o is not None else ()), *grads, pad=True)
    dq, dk, dv, dqd, dkd, dvd = grads
    if batch * heads == 0:
        return tuple(grads)
    if n_q == 0:  # no query: nothing flows back
        for t in grads:
            t.zero_()
        return tuple(grads)
    has_go = grad_o is not None
    go = grad_o if has_go else grad_o_dot  # never read without HAS_GO (a constexpr)
    delta = new_output((batch, heads, n_q), dtype=lse.dtype, device=q.device)
    ddelta = new_output((max(kt, 1), heads, n_q), dtype=lse.dtype, device=q.device)
    od = o_dot if kt else o
    god = grad_o_dot if kt else go
    _attn_tbwd_preprocess_kernel[(cdiv(n_q, _PRE_BLOCK_M) * batch * heads,)](
        o, od, go, god, delta, ddelta, *o.stride(), *od.stride(), *go.stride(), *god.stride(), heads, n_q, kt,
        HEAD_DV=dims["HEAD_DV"], DV_PIECES=dims["DV_PIECES"], HAS_GO=has_go, ACC=acc,
        STRIDE_ALIGN=dims["STRIDE_ALIGN"],
        BLOCK_M=_PRE_BLOCK_M,
    )
    scales, scale_ptr = _scale_args(scale, q.dtype, q.device, delta)
    mask, mask_strides, mask_kind, neg_max = mask_args(attn_mask, (batch, heads, n_q, n_k), q.dtype, delta)
    group = heads // k.shape[1]
    # Without tangent rows (kt = 0) the tangent pointers are never dereferenced (b < KT is never true): pass primals.
    qd_, kd_, vd_ = (q_dot, k_dot, v_dot) if kt else (q, k, v)
    dqd_, dkd_, dvd_ = (dqd, dkd, dvd) if kt else (dq, dk, dv)
    mu_ = mu if kt else delta
    common = dict(**dims, IS_CAUSAL=bool(causal), MASK_KIND=mask_kind, NEG_MAX=neg_max, HAS_GO=has_go,
                  ACC=acc, DOT=dot, PREC=prec, RNE_BF16=rne, SCALE_PTR=scale_ptr)
    strides = (*q.stride(), *k.stride(), *v.stride(), *qd_.stride(), *kd_.stride(), *vd_.stride(),
               *go.stride(), *god.stride())
    grid = lambda meta: (cdiv(n_k, meta["BLOCK_N"]) * batch * k.shape[1],)  # noqa: E731
    _attn_tbwd_dkdv_kernel[grid](
        q, k, v, qd_, kd_, vd_, go, god, lse, mu_, delta, ddelta, dk, dv, dkd_, dvd_, mask,
        *strides, *dk.stride(), *dv.stride(), *dkd_.stride(), *dvd_.stride(), *mask_strides,
        heads, group, n_q, n_k, kt, batch * heads * n_q, *scales, **common,
    )
    grid = lambda meta: (cdiv(n_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    _attn_tbwd_dq_kernel[grid](
        q, k, v, qd_, kd_, vd_, go, god, lse, mu_, delta, ddelta, dq, dqd_, mask,
        *strides, *dq.stride(), *dqd_.stride(), *mask_strides,
        heads, group, n_q, n_k, kt, batch * heads * n_q, *scales, **common,
    )
    return dq, dk, dv, dqd, dkd, dvd
