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
from .._triton_utils import compute_dtypes, round_to
from ._common import (_load_row_stats, _load_rows, _masked_scores, _probs, _scale_args, _scales, _tile_and_head,
                      head_dim_args, mask_args)
from ._configs import _FP32_TBWD_DKDV_CONFIGS, _FP32_TBWD_DQ_CONFIGS, _TBWD_DKDV_CONFIGS, _TBWD_DQ_CONFIGS
from ._configs import _all_configs, _pruner
from .backward import _dkdv_group, _dq_rows


# ================================================================================================ row statistics
@triton.jit
def _attn_tbwd_preprocess_kernel(O, OD, GO, GOD, DELTA, DDELTA,
                                 sob, soh, som, sod, sodb, sodh, sodm, sodd, sgb, sgh, sgm, sgd,
                                 sgdb, sgdh, sgdm, sgdd, H, N_Q, KT,
                                 HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_DV: tl.constexpr,
                                 HAS_GO: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta_i = G_i . O_i + G'_i . O_dot_i and delta'_i = G'_i . O_i for tangent rows (b < KT); Delta_i = G_i . O_i
    for the others. Without G (HAS_GO False: o took no part in the loss) its terms are absent."""
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, False)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DV
    o = _load_rows(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                   m_ok, d_ok, True, MASK_DV).to(ACC)
    delta = tl.zeros([BLOCK_M], dtype=ACC)
    if HAS_GO:
        g = _load_rows(GO + b * sgb + h * sgh + offs_m[:, None] * sgm + offs_d[None, :] * sgd,
                       m_ok, d_ok, True, MASK_DV).to(ACC)
        delta += tl.sum(g * o, 1)
    if b < KT:
        gd = _load_rows(GOD + b * sgdb + h * sgdh + offs_m[:, None] * sgdm + offs_d[None, :] * sgdd,
                        m_ok, d_ok, True, MASK_DV).to(ACC)
        od = _load_rows(OD + b * sodb + h * sodh + offs_m[:, None] * sodm + offs_d[None, :] * sodd,
                        m_ok, d_ok, True, MASK_DV).to(ACC)
        delta += tl.sum(gd * od, 1)
        tl.store(DDELTA + bh.to(tl.int64) * N_Q + offs_m, tl.sum(gd * o, 1), mask=m_ok)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=m_ok)


# =========================================================================================================== dK, dV
@triton.jit
def _tbwd_dkdv_tiles(dk, dv, dkd, dvd, k, kd, v, vd, Qh, QDh, GOh, GODh, LSEh, MUh, DELTAh, DDELTAh, Mh,
                     sqm, sqd, sqdm, sqdd, sgm, sgd, sgdm, sgdd, smm, smn,
                     offs_n, n_ok, offs_d, d_ok, offs_dv, dv_ok, lo, hi, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                     BLOCK_M: tl.constexpr, MASKED: tl.constexpr, MASK_D: tl.constexpr, MASK_DV: tl.constexpr,
                     MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr, HAS_GO: tl.constexpr,
                     DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Query tiles [lo, hi) of one query head against a resident key tile, transposed (keys x queries):

    P^T, S_dot^T = c (K Q_dot^T + K_dot Q^T);  dP'^T = V G'^T;  dP^T = V G^T + V_dot G'^T;
    dS_dot^T = P^T * (dP'^T - delta');  dS^T = P^T * (dP^T - Delta) + (S_dot^T - mu) * dS_dot^T;
    dV += P^T G + (P^T * (S_dot^T - mu)) G';  dV_dot += P^T G';  dK += dS^T Q + dS_dot^T Q_dot;  dK_dot += dS_dot^T Q
    (dK, dK_dot scaled by c at the end). Query-tail rows load zeros (and zero statistics): they add nothing.
    """
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q
        q = _load_rows(Qh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, m_ok, d_ok, True, MASK_D).to(DOT)
        qd = _load_rows(QDh + offs_m[:, None] * sqdm + offs_d[None, :] * sqdd, m_ok, d_ok, True, MASK_D).to(DOT)
        gd = _load_rows(GODh + offs_m[:, None] * sgdm + offs_dv[None, :] * sgdd, m_ok, dv_ok, True,
                        MASK_DV).to(DOT)
        lse_a, lse_b = _load_row_stats(LSEh, offs_m, m_ok, STAT_STRIDE, MASK_KIND)
        mu = tl.load(MUh + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTAh + offs_m, mask=m_ok, other=0.0)
        ddelta = tl.load(DDELTAh + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), out_dtype=ACC, input_precision=PREC)
        s_t = _masked_scores(s_t, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, True)
        p_t = _probs(s_t, lse_a[None, :], lse_b[None, :], qk, MASK_KIND)
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        sd_t = tl.dot(k, tl.trans(qd), out_dtype=ACC, input_precision=PREC)
        sd_t = tl.dot(kd, tl.trans(q), sd_t, out_dtype=ACC, input_precision=PREC) * sm
        dpd_t = tl.dot(v, tl.trans(gd), out_dtype=ACC, input_precision=PREC)
        dp_t = tl.dot(vd, tl.trans(gd), out_dtype=ACC, input_precision=PREC)
        if HAS_GO:
            g = _load_rows(GOh + offs_m[:, None] * sgm + offs_dv[None, :] * sgd, m_ok, dv_ok, True, MASK_DV).to(DOT)
            dp_t = tl.dot(v, tl.trans(g), dp_t, out_dtype=ACC, input_precision=PREC)
        dsd_t = p_t * (dpd_t - ddelta[None, :])
        sdc_t = sd_t - mu[None, :]
        ds_t = p_t * (dp_t - delta[None, :]) + sdc_t * dsd_t
        p_low = p_t.to(DOT)
        dsd_low = dsd_t.to(DOT)
        dvd = tl.dot(p_low, gd, dvd, out_dtype=ACC, input_precision=PREC)
        dv = tl.dot((p_t * sdc_t).to(DOT), gd, dv, out_dtype=ACC, input_precision=PREC)
        if HAS_GO:
            dv = tl.dot(p_low, g, dv, out_dtype=ACC, input_precision=PREC)
        dk = tl.dot(ds_t.to(DOT), q, dk, out_dtype=ACC, input_precision=PREC)
        dk = tl.dot(dsd_low, qd, dk, out_dtype=ACC, input_precision=PREC)
        dkd = tl.dot(dsd_low, q, dkd, out_dtype=ACC, input_precision=PREC)
    return dk, dv, dkd, dvd


@triton.autotune(configs=_all_configs(_TBWD_DKDV_CONFIGS, _FP32_TBWD_DKDV_CONFIGS),
                 key=["N_Q", "N_K", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND", "HAS_GO"],
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
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr, HAS_GO: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV, dK_dot, dV_dot (module docstring) for one tile of BLOCK_N keys of one (batch, key/value head), summed
    over the GROUP query heads that read it. Batch rows b >= KT: the flash backward's dK, dV (dK_dot, dV_dot have only
    KT rows); without G (HAS_GO False) those rows get zeros."""
    pid_n, bhk = _tile_and_head(N_K, BLOCK_N, False)
    h_kv = H // GROUP
    b = (bhk // h_kv).to(tl.int64)
    hk = (bhk % h_kv).to(tl.int64)
    sm, qk, inv_sm = _scales(sm_scale, qk_scale, inv_scale, SCALES, SCALE_PTR)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < N_K
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV
    k = _load_rows(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                   n_ok, d_ok, True, MASK_D).to(DOT)
    v = _load_rows(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                   n_ok, dv_ok, True, MASK_DV).to(DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    if b < KT:
        kd = _load_rows(KD + b * skdb + hk * skdh + offs_n[:, None] * skdn + offs_d[None, :] * skdd,
                        n_ok, d_ok, True, MASK_D).to(DOT)
        vd = _load_rows(VD + b * svdb + hk * svdh + offs_n[:, None] * svdn + offs_dv[None, :] * svdd,
                        n_ok, dv_ok, True, MASK_DV).to(DOT)
        dkd = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        dvd = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            row = (b * H + h) * N_Q
            Qh = Q + b * sqb + h * sqh
            QDh = QD + b * sqdb + h * sqdh
            GOh = GO + b * sgb + h * sgh
            GODh = GOD + b * sgdb + h * sgdh
            Mh = M + b * smb + h * smh
            if IS_CAUSAL:
                lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
                mid = tl.minimum(tl.cdiv(pid_n * BLOCK_N + BLOCK_N, BLOCK_M) * BLOCK_M, N_Q)
                dk, dv, dkd, dvd = _tbwd_dkdv_tiles(
                    dk, dv, dkd, dvd, k, kd, v, vd, Qh, QDh, GOh, GODh, LSE + row, MU + row, DELTA + row,
                    DDELTA + row, Mh, sqm, sqd, sqdm, sqdd, sgm, sgd, sgdm, sgdd, smm, smn,
                    offs_n, n_ok, offs_d, d_ok, offs_dv, dv_ok, lo, mid, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                    BLOCK_M, True, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, HAS_GO, DOT, ACC, PREC)
                lo = tl.maximum(mid, lo)
            else:
                lo = 0
            dk, dv, dkd, dvd = _tbwd_dkdv_tiles(
                dk, dv, dkd, dvd, k, kd, v, vd, Qh, QDh, GOh, GODh, LSE + row, MU + row, DELTA + row,
                DDELTA + row, Mh, sqm, sqd, sqdm, sqdd, sgm, sgd, sgdm, sgdd, smm, smn,
                offs_n, n_ok, offs_d, d_ok, offs_dv, dv_ok, lo, N_Q, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                BLOCK_M, False, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, HAS_GO, DOT, ACC, PREC)
        dkd = dkd * sm
        tl.store(DKD + b * sdkdb + hk * sdkdh + offs_n[:, None] * sdkdn + offs_d[None, :] * sdkdd,
                 round_to(dkd, DKD.dtype.element_ty, RNE_BF16), mask=n_ok[:, None] & d_ok[None, :])
        tl.store(DVD + b * sdvdb + hk * sdvdh + offs_n[:, None] * sdvdn + offs_dv[None, :] * sdvdd,
                 round_to(dvd, DVD.dtype.element_ty, RNE_BF16), mask=n_ok[:, None] & dv_ok[None, :])
    elif HAS_GO:
        dk, dv = _dkdv_group(dk, dv, k, v, Q, GO, LSE, DELTA, M, b, hk, pid_n, offs_n, n_ok, offs_d, d_ok, offs_dv,
                             dv_ok, sqb, sqh, sqm, sqd, sgb, sgh, sgm, sgd, smb, smh, smm, smn, H, GROUP, N_Q, sm,
                             qk, inv_sm, STAT_STRIDE, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND,
                             NEG_MAX, DOT, ACC, PREC)
    dk = dk * sm
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             round_to(dk, DK.dtype.element_ty, RNE_BF16), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             round_to(dv, DV.dtype.element_ty, RNE_BF16), mask=n_ok[:, None] & dv_ok[None, :])


# ================================================================================================================ dQ
@triton.jit
def _tbwd_dq_tiles(dq, dqd, q, qd, g, gd, lse_a, lse_b, mu, delta, ddelta, Kh, KDh, Vh, VDh, Mh,
                   skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                   offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, lo, hi, N_K, sm, qk, inv_sm,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
                   MASK_DV: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr, HAS_GO: tl.constexpr,
                   DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Key tiles [lo, hi) against a resident query tile: P, S_dot, dP, dP', dS, dS_dot as in the module docstring;
    dQ += dS K + dS_dot K_dot;  dQ_dot += dS_dot K  (both scaled by c at the end). MASKED tiles (key tail, causal
    diagonal) set s = -inf outside, so P = 0 there."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        k = _load_rows(Kh + offs_n[:, None] * skn + offs_d[None, :] * skd, n_ok, d_ok, True, MASK_D).to(DOT)
        kd = _load_rows(KDh + offs_n[:, None] * skdn + offs_d[None, :] * skdd, n_ok, d_ok, True, MASK_D).to(DOT)
        v = _load_rows(Vh + offs_n[:, None] * svn + offs_dv[None, :] * svd, n_ok, dv_ok, True, MASK_DV).to(DOT)
        vd = _load_rows(VDh + offs_n[:, None] * svdn + offs_dv[None, :] * svdd, n_ok, dv_ok, True,
                        MASK_DV).to(DOT)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC)
        s = _masked_scores(s, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, False)
        if MASKED:
            ok = n_ok[None, :]
            if IS_CAUSAL:
                ok = ok & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(ok, s, float("-inf"))
        p = _probs(s, lse_a[:, None], lse_b[:, None], qk, MASK_KIND)
        sd = tl.dot(qd, tl.trans(k), out_dtype=ACC, input_precision=PREC)
        sd = tl.dot(q, tl.trans(kd), sd, out_dtype=ACC, input_precision=PREC) * sm
        dpd = tl.dot(gd, tl.trans(v), out_dtype=ACC, input_precision=PREC)
        dp = tl.dot(gd, tl.trans(vd), out_dtype=ACC, input_precision=PREC)
        if HAS_GO:
            dp = tl.dot(g, tl.trans(v), dp, out_dtype=ACC, input_precision=PREC)
        dsd = p * (dpd - ddelta[:, None])
        ds = p * (dp - delta[:, None]) + (sd - mu[:, None]) * dsd
        dsd_low = dsd.to(DOT)
        dq = tl.dot(ds.to(DOT), k, dq, out_dtype=ACC, input_precision=PREC)
        dq = tl.dot(dsd_low, kd, dq, out_dtype=ACC, input_precision=PREC)
        dqd = tl.dot(dsd_low, k, dqd, out_dtype=ACC, input_precision=PREC)
    return dq, dqd


@triton.autotune(configs=_all_configs(_TBWD_DQ_CONFIGS, _FP32_TBWD_DQ_CONFIGS),
                 key=["N_Q", "N_K", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND", "HAS_GO"],
                 prune_configs_by=_pruner(_TBWD_DQ_CONFIGS, fp32_table=_FP32_TBWD_DQ_CONFIGS))
@triton.jit
def _attn_tbwd_dq_kernel(
    Q, K, V, QD, KD, VD, GO, GOD, LSE, MU, DELTA, DDELTA, DQ, DQD, M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sqdb, sqdh, sqdm, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
    sgb, sgh, sgm, sgd, sgdb, sgdh, sgdm, sgdd, sdqb, sdqh, sdqm, sdqd, sdqdb, sdqdh, sdqdm, sdqdd,
    smb, smh, smm, smn,
    H, GROUP, N_Q, N_K, KT, STAT_STRIDE, sm_scale, qk_scale, inv_scale, SCALES,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr, HAS_GO: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ, dQ_dot (module docstring) for one tile of BLOCK_M queries of one (batch, query head); keys and values of
    head h // GROUP. Batch rows b >= KT: the flash backward's dQ (zeros without G)."""
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, IS_CAUSAL)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    sm, qk, inv_sm = _scales(sm_scale, qk_scale, inv_scale, SCALES, SCALE_PTR)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV
    row = bh.to(tl.int64) * N_Q
    q = _load_rows(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                   m_ok, d_ok, True, MASK_D).to(DOT)
    lse_a, lse_b = _load_row_stats(LSE + row, offs_m, m_ok, STAT_STRIDE, MASK_KIND)
    delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
    Kh = K + b * skb + hk * skh
    Vh = V + b * svb + hk * svh
    Mh = M + b * smb + h * smh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if HAS_GO:
        g = _load_rows(GO + b * sgb + h * sgh + offs_m[:, None] * sgm + offs_dv[None, :] * sgd,
                       m_ok, dv_ok, True, MASK_DV).to(DOT)
    else:
        g = tl.zeros([BLOCK_M, BLOCK_DV], dtype=DOT)
    if b < KT:
        qd = _load_rows(QD + b * sqdb + h * sqdh + offs_m[:, None] * sqdm + offs_d[None, :] * sqdd,
                        m_ok, d_ok, True, MASK_D).to(DOT)
        gd = _load_rows(GOD + b * sgdb + h * sgdh + offs_m[:, None] * sgdm + offs_dv[None, :] * sgdd,
                        m_ok, dv_ok, True, MASK_DV).to(DOT)
        mu = tl.load(MU + row + offs_m, mask=m_ok, other=0.0)
        ddelta = tl.load(DDELTA + row + offs_m, mask=m_ok, other=0.0)
        KDh = KD + b * skdb + hk * skdh
        VDh = VD + b * svdb + hk * svdh
        dqd = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        if IS_CAUSAL:
            hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
            mid = (tl.minimum(N_K, pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
        else:
            hi = N_K
            mid = (N_K // BLOCK_N) * BLOCK_N
        dq, dqd = _tbwd_dq_tiles(dq, dqd, q, qd, g, gd, lse_a, lse_b, mu, delta, ddelta, Kh, KDh, Vh, VDh, Mh,
                                 skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                                 offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, 0, mid, N_K, sm, qk, inv_sm,
                                 BLOCK_N, False, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, HAS_GO,
                                 DOT, ACC, PREC)
        dq, dqd = _tbwd_dq_tiles(dq, dqd, q, qd, g, gd, lse_a, lse_b, mu, delta, ddelta, Kh, KDh, Vh, VDh, Mh,
                                 skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                                 offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, mid, hi, N_K, sm, qk, inv_sm,
                                 BLOCK_N, True, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, HAS_GO,
                                 DOT, ACC, PREC)
        dqd = dqd * sm
        tl.store(DQD + b * sdqdb + h * sdqdh + offs_m[:, None] * sdqdm + offs_d[None, :] * sdqdd,
                 round_to(dqd, DQD.dtype.element_ty, RNE_BF16), mask=m_ok[:, None] & d_ok[None, :])
    elif HAS_GO:
        dq = _dq_rows(dq, q, g, lse_a, lse_b, delta, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
                      pid_m, offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, N_K, sm, qk, inv_sm,
                      BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    dq = dq * sm
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             round_to(dq, DQ.dtype.element_ty, RNE_BF16), mask=m_ok[:, None] & d_ok[None, :])


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
    dims = head_dim_args(d, dv_dim)
    grads = [new_output(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, q_dot, k_dot, v_dot)]
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
        HEAD_DV=dims["HEAD_DV"], BLOCK_DV=dims["BLOCK_DV"], MASK_DV=dims["MASK_DV"], HAS_GO=has_go, ACC=acc,
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
