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
from .._triton import compute_dtypes
from ._common import (_attends, _causal_query_range, _key_range, _load_row_stats, _masked_scores, _probs,
                      _scale_args, _scales, _tile_and_head, mask_args)
from ._configs import (_DKDV_CONFIGS, _DQ_CONFIGS, _DQ_MASKED_CONFIGS, _FP32_DKDV_CONFIGS, _FP32_DQ_CONFIGS,
                       _all_configs, _pruner)
from ._pieces import (_aligned, _dot_nt, _dot_pieces, _load_pieces, _row_dot, _scale_all, _store_pieces,
                      _zeros_pieces, head_dim_args)


# ================================================================================================ backward kernels
@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, H, N_Q,
                                HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr, ACC: tl.constexpr,
                                STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the softmax-backward correction, computed once per row."""
    sob, soh, som, sdob, sdoh, sdom = _aligned((sob, soh, som, sdob, sdoh, sdom), STRIDE_ALIGN)
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, False)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_Q
    o = _load_pieces(O + b * sob + h * soh, offs_m, m_ok, som, sod, HEAD_DV, DV_PIECES, True, ACC)
    do = _load_pieces(DO + b * sdob + h * sdoh, offs_m, m_ok, sdom, sdod, HEAD_DV, DV_PIECES, True, ACC)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, _row_dot(o, do), mask=m_ok)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, Mh, sqm, sqd, sdom, sdod, smm, smn,
                    offs_n, n_ok, lo, hi, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                    HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
                    DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Query tiles [lo, hi) against one resident key tile, in transposed form (no transposes of big tiles):

    P^T = 2^((K Q^T (+ mask) - L) c log2 e);  dV += P^T dO;  dP^T = V dO^T;  dS^T = P^T * (dP^T - delta);
    dK += dS^T Q  (dK is scaled by c once at the end). MASKED: causal diagonal, P = 0 where key > query. Query-tail
    rows load q = dO = 0 (and delta = 0), so they add nothing without a compute mask. k, q, dK (D) and v, dO, dV (Dv)
    are tuples of head-dim pieces (_pieces.py).
    """
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q
        q = _load_pieces(Qh, offs_m, m_ok, sqm, sqd, HEAD_D, D_PIECES, True, DOT)
        do = _load_pieces(DOh, offs_m, m_ok, sdom, sdod, HEAD_DV, DV_PIECES, True, DOT)
        lse_a, lse_b = _load_row_stats(LSEh, offs_m, m_ok, STAT_STRIDE, MASK_KIND)
        delta = tl.load(DELTAh + offs_m, mask=m_ok, other=0.0)
        s_t = _dot_nt(k, q, ACC, PREC)
        s_t = _masked_scores(s_t, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, True)
        p_t = _probs(s_t, lse_a[None, :], lse_b[None, :], qk, MASK_KIND)
        if MASKED:
            p_t = tl.where(_attends(offs_m, offs_n, n_ok, True, True), p_t, 0.0)
        dv = _dot_pieces(p_t.to(DOT), do, dv, ACC, PREC)
        dp_t = _dot_nt(v, do, ACC, PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot_pieces(ds_t.to(DOT), q, dk, ACC, PREC)
    return dk, dv


@triton.jit
def _dkdv_group(dk, dv, k, v, Q, DO, LSE, DELTA, M, b, hk, pid_n, offs_n, n_ok,
                sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, smb, smh, smm, smn,
                H, GROUP, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
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
            lo, mid = _causal_query_range(pid_n, N_Q, BLOCK_M, BLOCK_N)
            dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, Mh, sqm, sqd, sdom, sdod, smm, smn,
                                     offs_n, n_ok, lo, mid, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                                     HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                                     BLOCK_M, True, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
            lo = tl.maximum(mid, lo)
        else:
            lo = 0
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, Mh, sqm, sqd, sdom, sdod, smm, smn,
                                 offs_n, n_ok, lo, N_Q, N_Q, sm, qk, inv_sm, STAT_STRIDE,
                                 HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                                 BLOCK_M, False, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    return dk, dv


@triton.autotune(configs=_all_configs(_DKDV_CONFIGS, _FP32_DKDV_CONFIGS),
                 key=["N_Q", "N_K", "D_PIECES", "DV_PIECES", "IS_CAUSAL", "MASK_KIND"],
                 prune_configs_by=_pruner(_DKDV_CONFIGS, fp32_table=_FP32_DKDV_CONFIGS))
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smh, smm, smn,
    H, GROUP, N_Q, N_K, STAT_STRIDE, sm_scale, qk_scale, inv_scale, SCALES,
    HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK = c sum_{h in group} sum_i dS_i^T Q_i and dV = sum_{h in group} sum_i P_i^T dO_i for one tile of BLOCK_N keys
    of one (batch, key/value head).

    P is rebuilt from the saved LSE (raw units): P_ij = 2^((q_i . k_j (+ b_ij / c) - L_i) c log2 e);
    dS = P * (dO V^T - delta). Each program owns its output rows, so no atomics and a deterministic result.
    """
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn = _aligned((sqb, sqh, sqm, skb, skh, skn, svb, svh, svn), STRIDE_ALIGN)
    sdob, sdoh, sdom, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn = _aligned(
        (sdob, sdoh, sdom, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn), STRIDE_ALIGN)
    pid_n, bhk = _tile_and_head(N_K, BLOCK_N, False)  # causal: the first key tiles have the most queries already
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
    dk, dv = _dkdv_group(dk, dv, k, v, Q, DO, LSE, DELTA, M, b, hk, pid_n, offs_n, n_ok,
                         sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, smb, smh, smm, smn, H, GROUP, N_Q, sm, qk, inv_sm,
                         STAT_STRIDE, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_KIND,
                         NEG_MAX, DOT, ACC, PREC)
    dk = _scale_all(dk, sm)
    _store_pieces(DK + b * sdkb + hk * sdkh, offs_n, n_ok, sdkn, sdkd, dk, HEAD_D, D_PIECES, RNE_BF16)
    _store_pieces(DV + b * sdvb + hk * sdvh, offs_n, n_ok, sdvn, sdvd, dv, HEAD_DV, DV_PIECES, RNE_BF16)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse_a, lse_b, delta, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
                  offs_m, m_ok, lo, hi, N_K, sm, qk, inv_sm,
                  HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
                  DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Key tiles [lo, hi) against one resident query tile:

    P = 2^((Q K^T (+ mask) - L) c log2 e);  dP = dO V^T;  dS = P * (dP - delta);  dQ += dS K  (scaled by c at the end).
    MASKED tiles (key tail, causal diagonal) set s = -inf outside, so P = 0 there: a key-tail row loads k = 0, but its P
    would not even be finite for a row of very negative scores (2^(-L qk) overflows), and inf * 0 would poison dQ.
    """
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        k = _load_pieces(Kh, offs_n, n_ok, skn, skd, HEAD_D, D_PIECES, True, DOT)
        v = _load_pieces(Vh, offs_n, n_ok, svn, svd, HEAD_DV, DV_PIECES, True, DOT)
        s = _dot_nt(q, k, ACC, PREC)
        s = _masked_scores(s, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, False)
        if MASKED:
            s = tl.where(_attends(offs_m, offs_n, n_ok, IS_CAUSAL, False), s, float("-inf"))
        p = _probs(s, lse_a[:, None], lse_b[:, None], qk, MASK_KIND)
        dp = _dot_nt(do, v, ACC, PREC)
        ds = p * (dp - delta[:, None])
        dq = _dot_pieces(ds.to(DOT), k, dq, ACC, PREC)
    return dq


@triton.jit
def _dq_rows(dq, q, do, lse_a, lse_b, delta, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
             pid_m, offs_m, m_ok, N_K, sm, qk, inv_sm,
             HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
             MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
             DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dQ (unscaled) of one query tile over all its keys. Causal: keys after the tile are skipped, the tiles crossing
    the diagonal masked; the key tail is masked."""
    mid, hi = _key_range(pid_m, N_K, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _bwd_dq_tiles(dq, q, do, lse_a, lse_b, delta, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
                       offs_m, m_ok, 0, mid, N_K, sm, qk, inv_sm, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                       BLOCK_N, False, IS_CAUSAL, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    dq = _bwd_dq_tiles(dq, q, do, lse_a, lse_b, delta, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
                       offs_m, m_ok, mid, hi, N_K, sm, qk, inv_sm, HEAD_D, D_PIECES, HEAD_DV, DV_PIECES,
                       BLOCK_N, True, IS_CAUSAL, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    return dq


@triton.autotune(configs=_all_configs(_DQ_CONFIGS, _FP32_DQ_CONFIGS, _DQ_MASKED_CONFIGS),
                 key=["N_Q", "N_K", "D_PIECES", "DV_PIECES", "IS_CAUSAL", "MASK_KIND"],
                 prune_configs_by=_pruner(_DQ_CONFIGS, fp32_table=_FP32_DQ_CONFIGS, masked_table=_DQ_MASKED_CONFIGS))
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd, smb, smh, smm, smn,
    H, GROUP, N_Q, N_K, STAT_STRIDE, sm_scale, qk_scale, inv_scale, SCALES,
    HEAD_D: tl.constexpr, D_PIECES: tl.constexpr, HEAD_DV: tl.constexpr, DV_PIECES: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ = c sum_j dS_j K_j for one tile of BLOCK_M queries of one (batch, query head), dS = P * (dO V^T - delta),
    P from the saved LSE; keys and values of head h // GROUP."""
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn = _aligned((sqb, sqh, sqm, skb, skh, skn, svb, svh, svn), STRIDE_ALIGN)
    sdob, sdoh, sdom, sdqb, sdqh, sdqm = _aligned((sdob, sdoh, sdom, sdqb, sdqh, sdqm), STRIDE_ALIGN)
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, IS_CAUSAL)  # causal: heaviest row blocks first
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    sm, qk, inv_sm = _scales(sm_scale, qk_scale, inv_scale, SCALES, SCALE_PTR)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_Q
    q = _load_pieces(Q + b * sqb + h * sqh, offs_m, m_ok, sqm, sqd, HEAD_D, D_PIECES, True, DOT)
    do = _load_pieces(DO + b * sdob + h * sdoh, offs_m, m_ok, sdom, sdod, HEAD_DV, DV_PIECES, True, DOT)
    lse_a, lse_b = _load_row_stats(LSE + bh.to(tl.int64) * N_Q, offs_m, m_ok, STAT_STRIDE, MASK_KIND)
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=0.0)
    dq = _zeros_pieces(BLOCK_M, D_PIECES, ACC)
    dq = _dq_rows(dq, q, do, lse_a, lse_b, delta, K + b * skb + hk * skh, V + b * svb + hk * svh, M + b * smb + h * smh,
                  skn, skd, svn, svd, smm, smn, pid_m, offs_m, m_ok, N_K, sm, qk, inv_sm,
                  HEAD_D, D_PIECES, HEAD_DV, DV_PIECES, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    dq = _scale_all(dq, sm)
    _store_pieces(DQ + b * sdqb + h * sdqh, offs_m, m_ok, sdqm, sdqd, dq, HEAD_D, D_PIECES, RNE_BF16)


_PRE_BLOCK_M = 64


def attention_bwd(do, q, k, v, o, lse, attn_mask: torch.Tensor | None, causal: bool, scale: float, *,
                  need_dq: bool = True, need_dkdv: bool = True):
    """Flash backward through the primal O from the saved LSE: returns (dq, dk, dv) (None where not needed).
    Shapes as in attention_jvp_fwd (GQA: dk, dv have k's and v's Hkv heads, summed over each group)."""
    batch, heads, n_q, d = q.shape
    n_k, dv_dim = k.shape[2], v.shape[3]
    acc, dot, prec, rne = compute_dtypes(q.dtype)
    dq = new_output(q.shape, dtype=q.dtype, device=q.device) if need_dq else None
    dk = new_output(k.shape, dtype=k.dtype, device=k.device) if need_dkdv else None
    dv = new_output(v.shape, dtype=v.dtype, device=v.device) if need_dkdv else None
    dims = head_dim_args(d, dv_dim, *(t for t in (q, k, v, do, o, dq, dk, dv) if t is not None))
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
        HEAD_DV=dims["HEAD_DV"], DV_PIECES=dims["DV_PIECES"], ACC=acc, STRIDE_ALIGN=dims["STRIDE_ALIGN"],
        BLOCK_M=_PRE_BLOCK_M,
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
