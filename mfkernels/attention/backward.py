"""Flash backward through the primal O (from the saved LSE): preprocess, dK/dV and dQ kernels and their launcher."""
from __future__ import annotations

import triton
import triton.language as tl

from .._runtime import cdiv, new_output
from .._triton_utils import compute_dtypes, round_to
from ._common import _block_d, _load_rows, _scale_args, _scales, _tile_and_head
from ._configs import _DKDV_CONFIGS, _DQ_CONFIGS, _FP32_DKDV_CONFIGS, _FP32_DQ_CONFIGS, _all_configs, _pruner


# ================================================================================================ backward kernels
@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, H, N_Q,
                                HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
                                ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the softmax-backward correction, computed once per row."""
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, False)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_D
    o = _load_rows(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                   m_ok, d_ok, True, MASK_D).to(ACC)
    do = _load_rows(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                    m_ok, d_ok, True, MASK_D).to(ACC)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqm, sqd, sdom, sdod,
                    offs_n, offs_d, d_ok, lo, hi, N_Q, qk,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, MASK_D: tl.constexpr,
                    DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Query tiles [lo, hi) against one resident key tile, in transposed form (no transposes of big tiles):

    P^T = 2^((K Q^T - L) c log2 e);  dV += P^T dO;  dP^T = V dO^T;  dS^T = P^T * (dP^T - delta);  dK += dS^T Q
    (dK is scaled by c once at the end). MASKED: causal diagonal, P = 0 where key > query. Query-tail rows load
    q = dO = 0, so they add nothing without a compute mask.
    """
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q
        q = _load_rows(Qh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, m_ok, d_ok, True, MASK_D).to(DOT)
        do = _load_rows(DOh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, m_ok, d_ok, True, MASK_D).to(DOT)
        lse = tl.load(LSEh + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTAh + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), out_dtype=ACC, input_precision=PREC)
        p_t = tl.exp2((s_t - lse[None, :]) * qk)
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(DOT), do, dv, out_dtype=ACC, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), out_dtype=ACC, input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(DOT), q, dk, out_dtype=ACC, input_precision=PREC)
    return dk, dv


@triton.autotune(configs=_all_configs(_DKDV_CONFIGS, _FP32_DKDV_CONFIGS), key=["N_Q", "N_K", "BLOCK_D", "IS_CAUSAL"],
                 prune_configs_by=_pruner(_DKDV_CONFIGS, fp32_table=_FP32_DKDV_CONFIGS))
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, N_Q, N_K, sm_scale, qk_scale, SCALES,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK = c sum_i dS_i^T Q_i and dV = sum_i P_i^T dO_i for one tile of BLOCK_N keys of one (batch, head).

    P is rebuilt from the saved LSE (raw units): P_ij = 2^((q_i . k_j - L_i) c log2 e); dS = P * (dO V^T - delta).
    Each program owns its output rows, so no atomics and a deterministic result. Causal: queries before the key tile
    are skipped, the tiles crossing the diagonal are masked, the rest are not.
    """
    pid_n, bh = _tile_and_head(N_K, BLOCK_N, False)  # causal: the first key tiles have the most queries already
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    sm, qk = _scales(sm_scale, qk_scale, SCALES, SCALE_PTR)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N_K
    d_ok = offs_d < HEAD_D
    k = _load_rows(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                   n_ok, d_ok, True, MASK_D).to(DOT)
    v = _load_rows(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                   n_ok, d_ok, True, MASK_D).to(DOT)
    Qh = Q + b * sqb + h * sqh
    DOh = DO + b * sdob + h * sdoh
    LSEh = LSE + bh.to(tl.int64) * N_Q
    DELTAh = DELTA + bh.to(tl.int64) * N_Q
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    if IS_CAUSAL:
        lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M  # queries i < first key of the tile see none of it
        mid = tl.minimum(tl.cdiv(pid_n * BLOCK_N + BLOCK_N, BLOCK_M) * BLOCK_M, N_Q)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqm, sqd, sdom, sdod, offs_n, offs_d, d_ok,
                                 lo, mid, N_Q, qk, BLOCK_M, True, MASK_D, DOT, ACC, PREC)
        lo = tl.maximum(mid, lo)
    else:
        lo = 0
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqm, sqd, sdom, sdod, offs_n, offs_d, d_ok,
                             lo, N_Q, N_Q, qk, BLOCK_M, False, MASK_D, DOT, ACC, PREC)
    dk = dk * sm
    mask = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             round_to(dk, DK.dtype.element_ty, RNE_BF16), mask=mask)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             round_to(dv, DV.dtype.element_ty, RNE_BF16), mask=mask)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, Kh, Vh, skn, skd, svn, svd,
                  offs_m, offs_d, d_ok, lo, hi, N_K, qk,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, MASK_D: tl.constexpr,
                  DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Key tiles [lo, hi) against one resident query tile:

    P = 2^((Q K^T - L) c log2 e);  dP = dO V^T;  dS = P * (dP - delta);  dQ += dS K   (scaled by c at the end).
    Key-tail rows load k = v = 0, so their dS multiplies a zero row of K: no compute mask is needed for them.
    """
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        k = _load_rows(Kh + offs_n[:, None] * skn + offs_d[None, :] * skd, n_ok, d_ok, True, MASK_D).to(DOT)
        v = _load_rows(Vh + offs_n[:, None] * svn + offs_d[None, :] * svd, n_ok, d_ok, True, MASK_D).to(DOT)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC)
        p = tl.exp2((s - lse[:, None]) * qk)
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT), k, dq, out_dtype=ACC, input_precision=PREC)
    return dq


@triton.autotune(configs=_all_configs(_DQ_CONFIGS, _FP32_DQ_CONFIGS), key=["N_Q", "N_K", "BLOCK_D", "IS_CAUSAL"],
                 prune_configs_by=_pruner(_DQ_CONFIGS, fp32_table=_FP32_DQ_CONFIGS))
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, N_Q, N_K, sm_scale, qk_scale, SCALES,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ = c sum_j dS_j K_j for one tile of BLOCK_M queries of one (batch, head), dS = P * (dO V^T - delta),
    P from the saved LSE. Causal: keys after the tile are skipped, tiles crossing the diagonal are masked."""
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, IS_CAUSAL)  # causal: heaviest row blocks first
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    sm, qk = _scales(sm_scale, qk_scale, SCALES, SCALE_PTR)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_D
    q = _load_rows(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                   m_ok, d_ok, True, MASK_D).to(DOT)
    do = _load_rows(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                    m_ok, d_ok, True, MASK_D).to(DOT)
    lse = tl.load(LSE + bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=0.0)
    Kh = K + b * skb + h * skh
    Vh = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if IS_CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
        mid = (tl.minimum(N_K, pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, Kh, Vh, skn, skd, svn, svd, offs_m, offs_d, d_ok, 0, mid, N_K, qk,
                           BLOCK_N, False, MASK_D, DOT, ACC, PREC)
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, Kh, Vh, skn, skd, svn, svd, offs_m, offs_d, d_ok, mid, hi, N_K, qk,
                           BLOCK_N, True, MASK_D, DOT, ACC, PREC)
    else:
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, Kh, Vh, skn, skd, svn, svd, offs_m, offs_d, d_ok, 0, N_K, N_K, qk,
                           BLOCK_N, False, MASK_D, DOT, ACC, PREC)
    dq = dq * sm
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             round_to(dq, DQ.dtype.element_ty, RNE_BF16), mask=m_ok[:, None] & d_ok[None, :])


_PRE_BLOCK_M = 64


def attention_bwd(do, q, k, v, o, lse, causal: bool, scale: float, *, need_dq: bool = True, need_dkdv: bool = True):
    """Flash backward through the primal O from the saved LSE: returns (dq, dk, dv) (None where not needed)."""
    batch, heads, n_q, d = q.shape
    n_k = k.shape[2]
    acc, dot, prec, rne = compute_dtypes(q.dtype)
    block_d = _block_d(d)
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
    delta = new_output((batch, heads, n_q), dtype=lse.dtype, device=q.device)
    _attn_bwd_preprocess_kernel[(cdiv(n_q, _PRE_BLOCK_M) * batch * heads,)](
        o, do, delta, *o.stride(), *do.stride(), heads, n_q,
        HEAD_D=d, BLOCK_D=block_d, MASK_D=block_d != d, ACC=acc, BLOCK_M=_PRE_BLOCK_M,
    )
    scales, scale_ptr = _scale_args(scale, q.dtype, q.device, delta)
    common = dict(HEAD_D=d, BLOCK_D=block_d, MASK_D=block_d != d, IS_CAUSAL=bool(causal),
                  ACC=acc, DOT=dot, PREC=prec, RNE_BF16=rne, SCALE_PTR=scale_ptr)
    if need_dkdv:
        grid = lambda meta: (cdiv(n_k, meta["BLOCK_N"]) * batch * heads,)  # noqa: E731
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            heads, n_q, n_k, *scales, **common,
        )
    if need_dq:
        grid = lambda meta: (cdiv(n_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
        _attn_bwd_dq_kernel[grid](
            q, k, v, do, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            heads, n_q, n_k, *scales, **common,
        )
    return dq, dk, dv
