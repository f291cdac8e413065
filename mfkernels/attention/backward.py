"""Flash backward through the primal O (from the saved LSE): preprocess, dK/dV and dQ kernels and their launcher.

GQA / MQA: a dK/dV program owns one tile of keys of one key/value head and loops over the GROUP = Hq / Hkv query heads
that read it, so dK and dV sum over the group in a fixed order (deterministic, no atomics). A user mask is applied to
the rebuilt scores exactly as in the forward; fully masked rows have LSE = +inf, so P = 0 there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import cdiv, new_output
from .._triton_utils import compute_dtypes, round_to
from ._common import (_load_row_stats, _load_rows, _masked_scores, _probs, _scale_args, _scales, _tile_and_head,
                      head_dim_args, mask_args)
from ._configs import (_DKDV_CONFIGS, _DQ_CONFIGS, _DQ_MASKED_CONFIGS, _FP32_DKDV_CONFIGS, _FP32_DQ_CONFIGS,
                       _all_configs, _pruner)


# ================================================================================================ backward kernels
@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, H, N_Q,
                                HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_DV: tl.constexpr,
                                ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the softmax-backward correction, computed once per row."""
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, False)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DV
    o = _load_rows(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                   m_ok, d_ok, True, MASK_DV).to(ACC)
    do = _load_rows(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                    m_ok, d_ok, True, MASK_DV).to(ACC)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, Mh, sqm, sqd, sdom, sdod, smm, smn,
                    offs_n, n_ok, offs_d, d_ok, offs_dv, dv_ok, lo, hi, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, MASK_D: tl.constexpr, MASK_DV: tl.constexpr,
                    MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
                    DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Query tiles [lo, hi) against one resident key tile, in transposed form (no transposes of big tiles):

    P^T = 2^((K Q^T (+ mask) - L) c log2 e);  dV += P^T dO;  dP^T = V dO^T;  dS^T = P^T * (dP^T - delta);
    dK += dS^T Q  (dK is scaled by c once at the end). MASKED: causal diagonal, P = 0 where key > query. Query-tail
    rows load q = dO = 0 (and delta = 0), so they add nothing without a compute mask.
    """
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q
        q = _load_rows(Qh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, m_ok, d_ok, True, MASK_D).to(DOT)
        do = _load_rows(DOh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod, m_ok, dv_ok, True,
                        MASK_DV).to(DOT)
        lse_a, lse_b = _load_row_stats(LSEh, offs_m, m_ok, STAT_STRIDE, MASK_KIND)
        delta = tl.load(DELTAh + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), out_dtype=ACC, input_precision=PREC)
        s_t = _masked_scores(s_t, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, True)
        p_t = _probs(s_t, lse_a[None, :], lse_b[None, :], qk, MASK_KIND)
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(DOT), do, dv, out_dtype=ACC, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), out_dtype=ACC, input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(DOT), q, dk, out_dtype=ACC, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_group(dk, dv, k, v, Q, DO, LSE, DELTA, M, b, hk, pid_n, offs_n, n_ok, offs_d, d_ok, offs_dv, dv_ok,
                sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, smb, smh, smm, smn,
                H, GROUP, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
                MASK_DV: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
                DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dK, dV of one key tile of key/value head hk of batch row b, summed over the GROUP query heads that read it (in
    order: deterministic). Causal: queries before the key tile are skipped, the tiles crossing the diagonal masked."""
    for g in range(0, GROUP):
        h = hk * GROUP + g
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdob + h * sdoh
        LSEh = LSE + (b * H + h) * N_Q
        DELTAh = DELTA + (b * H + h) * N_Q
        Mh = M + b * smb + h * smh
        if IS_CAUSAL:
            lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M  # queries i < first key of the tile see none of it
            mid = tl.minimum(tl.cdiv(pid_n * BLOCK_N + BLOCK_N, BLOCK_M) * BLOCK_M, N_Q)
            dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, Mh, sqm, sqd, sdom, sdod, smm, smn,
                                     offs_n, n_ok, offs_d, d_ok, offs_dv, dv_ok, lo, mid, N_Q, sm, qk, inv_sm,
                                     STAT_STRIDE, BLOCK_M, True, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
            lo = tl.maximum(mid, lo)
        else:
            lo = 0
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, Mh, sqm, sqd, sdom, sdod, smm, smn,
                                 offs_n, n_ok, offs_d, d_ok, offs_dv, dv_ok, lo, N_Q, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                                 BLOCK_M, False, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    return dk, dv


@triton.autotune(configs=_all_configs(_DKDV_CONFIGS, _FP32_DKDV_CONFIGS),
                 key=["N_Q", "N_K", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND"],
                 prune_configs_by=_pruner(_DKDV_CONFIGS, fp32_table=_FP32_DKDV_CONFIGS))
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smh, smm, smn,
    H, GROUP, N_Q, N_K, STAT_STRIDE, sm_scale, qk_scale, inv_scale, SCALES,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK = c sum_{h in group} sum_i dS_i^T Q_i and dV = sum_{h in group} sum_i P_i^T dO_i for one tile of BLOCK_N keys
    of one (batch, key/value head).

    P is rebuilt from the saved LSE (raw units): P_ij = 2^((q_i . k_j (+ b_ij / c) - L_i) c log2 e);
    dS = P * (dO V^T - delta). Each program owns its output rows, so no atomics and a deterministic result.
    """
    pid_n, bhk = _tile_and_head(N_K, BLOCK_N, False)  # causal: the first key tiles have the most queries already
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
    dk, dv = _dkdv_group(dk, dv, k, v, Q, DO, LSE, DELTA, M, b, hk, pid_n, offs_n, n_ok, offs_d, d_ok, offs_dv, dv_ok,
                         sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, smb, smh, smm, smn, H, GROUP, N_Q, sm, qk, inv_sm,
                         STAT_STRIDE, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    dk = dk * sm
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             round_to(dk, DK.dtype.element_ty, RNE_BF16), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             round_to(dv, DV.dtype.element_ty, RNE_BF16), mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse_a, lse_b, delta, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
                  offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, lo, hi, N_K, sm, qk, inv_sm,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
                  MASK_DV: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
                  DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Key tiles [lo, hi) against one resident query tile:

    P = 2^((Q K^T (+ mask) - L) c log2 e);  dP = dO V^T;  dS = P * (dP - delta);  dQ += dS K  (scaled by c at the end).
    MASKED tiles (key tail, causal diagonal) set s = -inf outside, so P = 0 there: a key-tail row loads k = 0, but its P
    would not even be finite for a row of very negative scores (2^(-L qk) overflows), and inf * 0 would poison dQ.
    """
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        k = _load_rows(Kh + offs_n[:, None] * skn + offs_d[None, :] * skd, n_ok, d_ok, True, MASK_D).to(DOT)
        v = _load_rows(Vh + offs_n[:, None] * svn + offs_dv[None, :] * svd, n_ok, dv_ok, True, MASK_DV).to(DOT)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC)
        s = _masked_scores(s, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, False)
        if MASKED:
            ok = n_ok[None, :]
            if IS_CAUSAL:
                ok = ok & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(ok, s, float("-inf"))
        p = _probs(s, lse_a[:, None], lse_b[:, None], qk, MASK_KIND)
        dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT), k, dq, out_dtype=ACC, input_precision=PREC)
    return dq


@triton.jit
def _dq_rows(dq, q, do, lse_a, lse_b, delta, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
             pid_m, offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, N_K, sm, qk, inv_sm,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
             MASK_DV: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
             DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dQ (unscaled) of one query tile over all its keys. Causal: keys after the tile are skipped, the tiles crossing
    the diagonal masked; the key tail is masked."""
    # Key range: [0, mid) needs no masking, [mid, hi) does (key tail; tiles crossing the causal diagonal).
    if IS_CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
        mid = (tl.minimum(N_K, pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    else:
        hi = N_K
        mid = (N_K // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_tiles(dq, q, do, lse_a, lse_b, delta, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
                       offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, 0, mid, N_K, sm, qk, inv_sm,
                       BLOCK_N, False, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    dq = _bwd_dq_tiles(dq, q, do, lse_a, lse_b, delta, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
                       offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, mid, hi, N_K, sm, qk, inv_sm,
                       BLOCK_N, True, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    return dq


@triton.autotune(configs=_all_configs(_DQ_CONFIGS, _FP32_DQ_CONFIGS, _DQ_MASKED_CONFIGS),
                 key=["N_Q", "N_K", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND"],
                 prune_configs_by=_pruner(_DQ_CONFIGS, fp32_table=_FP32_DQ_CONFIGS, masked_table=_DQ_MASKED_CONFIGS))
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd, smb, smh, smm, smn,
    H, GROUP, N_Q, N_K, STAT_STRIDE, sm_scale, qk_scale, inv_scale, SCALES,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ = c sum_j dS_j K_j for one tile of BLOCK_M queries of one (batch, query head), dS = P * (dO V^T - delta),
    P from the saved LSE; keys and values of head h // GROUP."""
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, IS_CAUSAL)  # causal: heaviest row blocks first
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
    q = _load_rows(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                   m_ok, d_ok, True, MASK_D).to(DOT)
    do = _load_rows(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                    m_ok, dv_ok, True, MASK_DV).to(DOT)
    lse_a, lse_b = _load_row_stats(LSE + bh.to(tl.int64) * N_Q, offs_m, m_ok, STAT_STRIDE, MASK_KIND)
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    dq = _dq_rows(dq, q, do, lse_a, lse_b, delta, K + b * skb + hk * skh, V + b * svb + hk * svh, M + b * smb + h * smh,
                  skn, skd, svn, svd, smm, smn, pid_m, offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, N_K, sm, qk, inv_sm,
                  BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    dq = dq * sm
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             round_to(dq, DQ.dtype.element_ty, RNE_BF16), mask=m_ok[:, None] & d_ok[None, :])


_PRE_BLOCK_M = 64


def attention_bwd(do, q, k, v, o, lse, attn_mask: torch.Tensor | None, causal: bool, scale: float, *,
                  need_dq: bool = True, need_dkdv: bool = True):
    """Flash backward through the primal O from the saved LSE: returns (dq, dk, dv) (None where not needed).
    Shapes as in attention_jvp_fwd (GQA: dk, dv have k's and v's Hkv heads, summed over each group)."""
    batch, heads, n_q, d = q.shape
    n_k, dv_dim = k.shape[2], v.shape[3]
    acc, dot, prec, rne = compute_dtypes(q.dtype)
    dims = head_dim_args(d, dv_dim)
    dq = new_output(q.shape, dtype=q.dtype, device=q.device) if need_dq else None
    dk = new_output(k.shape, dtype=k.dtype, device=k.device) if need_dkdv else None
    dv = new_output(v.shape, dtype=v.dtype, device=v.device) if need_dkdv else None
    if batch * heads == 0 or not (need_dq or need_dkdv):
        return dq, dk, dv
    if n_q == 0:  # no query: nothing flows back
        for t in (dq, dk, dv):
            if t is not None:
                t.zero_()
        return dq, dk, dv
    delta = new_output((batch, heads, n_q), dtype=lse.dtype, device=q.device)  # lse: see forward.attention_jvp_fwd
    _attn_bwd_preprocess_kernel[(cdiv(n_q, _PRE_BLOCK_M) * batch * heads,)](
        o, do, delta, *o.stride(), *do.stride(), heads, n_q,
        HEAD_DV=dims["HEAD_DV"], BLOCK_DV=dims["BLOCK_DV"], MASK_DV=dims["MASK_DV"], ACC=acc, BLOCK_M=_PRE_BLOCK_M,
    )
    scales, scale_ptr = _scale_args(scale, q.dtype, q.device, delta)
    mask, mask_strides, mask_kind, neg_max = mask_args(attn_mask, (batch, heads, n_q, n_k), q.dtype, delta)
    group = heads // k.shape[1]
    common = dict(**dims, IS_CAUSAL=bool(causal), MASK_KIND=mask_kind, NEG_MAX=neg_max,
                  ACC=acc, DOT=dot, PREC=prec, RNE_BF16=rne, SCALE_PTR=scale_ptr)
    if need_dkdv:
        grid = lambda meta: (cdiv(n_k, meta["BLOCK_N"]) * batch * k.shape[1],)  # noqa: E731
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv, mask,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *mask_strides,
            heads, group, n_q, n_k, batch * heads * n_q, *scales, **common,
        )
    if need_dq:
        grid = lambda meta: (cdiv(n_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
        _attn_bwd_dq_kernel[grid](
            q, k, v, do, lse, delta, dq, mask,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *mask_strides,
            heads, group, n_q, n_k, batch * heads * n_q, *scales, **common,
        )
    return dq, dk, dv
