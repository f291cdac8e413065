"""Fused flash attention forward + JVP kernel and its launcher (see the package docstring for the math)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import cdiv, new_output
from .._triton_utils import compute_dtypes, round_to
from ._common import (_apply_mask, _load_mask, _load_rows, _lse_dtype, _masked_scores, _safe_max, _scale_args, _scales,
                      _store_row_stats, _tile_and_head, head_dim_args, lse_shape, mask_args)
from ._configs import (_FP32_FWD_CONFIGS, _FWD_JVP_CONFIGS, _FWD_JVP_MASKED_CONFIGS, _FWD_PLAIN_CONFIGS,
                       _FWD_PLAIN_MASKED_CONFIGS, _all_configs, _pruner)


# ============================================================================================= forward + JVP kernel
@triton.jit
def _fwd_jvp_tiles(acc_o, acc_t, m_i, l_i, mu_i, q, qd, Kh, KDh, Vh, VDh, Mh,
                   skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                   offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, lo, hi, N_K, sm, qk, inv_sm,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
                   MASK_DV: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
                   DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Key tiles [lo, hi) of the fused recurrence (s = raw scores q . k (+ b / c), m raw, qk = c log2 e):

    m' = max(m, rowmax s); alpha = 2^((m - m') qk); P~ = 2^((s - m') qk); T = P~ * S_dot
    l = alpha l + rowsum P~;  mu = alpha mu + rowsum T;  A_O = alpha A_O + P~ V;  A_T = alpha A_T + T V + P~ V_dot
    S_dot uses the plain scale c (not c log2 e); an additive mask has no tangent. 6 dots a tile: S (1), S_dot =
    Q_dot K^T + Q K_dot^T chained into one accumulator (2, i.e. one dot of inner width 2D), P~ V (1), T V + P~ V_dot
    chained into A_T (2, i.e. one dot of inner width 2 BLOCK_N). MASKED tiles (key tail, causal diagonal) set s = -inf
    and S_dot = 0 there, so they add 0; the user's mask (MASK_KIND) applies to every tile.
    """
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        if MASK_KIND == 1 or MASK_KIND == 2:  # a 2-D mask tile: loaded first (see _load_mask)
            mtile = _load_mask(Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, ACC, MASK_KIND)
        k = _load_rows(Kh + offs_n[:, None] * skn + offs_d[None, :] * skd, n_ok, d_ok, MASKED, MASK_D).to(DOT)
        kd = _load_rows(KDh + offs_n[:, None] * skdn + offs_d[None, :] * skdd, n_ok, d_ok, MASKED, MASK_D).to(DOT)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC)
        sd = tl.dot(qd, tl.trans(k), out_dtype=ACC, input_precision=PREC)
        sd = tl.dot(q, tl.trans(kd), sd, out_dtype=ACC, input_precision=PREC) * sm
        if MASKED:
            ok = n_ok[None, :]
            if IS_CAUSAL:
                ok = ok & (offs_m[:, None] >= offs_n[None, :])
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
        v = _load_rows(Vh + offs_n[:, None] * svn + offs_dv[None, :] * svd, n_ok, dv_ok, MASKED, MASK_DV).to(DOT)
        vd = _load_rows(VDh + offs_n[:, None] * svdn + offs_dv[None, :] * svdd, n_ok, dv_ok, MASKED,
                        MASK_DV).to(DOT)
        p_dot = p.to(DOT)
        acc_o = tl.dot(p_dot, v, acc_o * alpha[:, None], out_dtype=ACC, input_precision=PREC)
        acc_t = tl.dot(t.to(DOT), v, acc_t * alpha[:, None], out_dtype=ACC, input_precision=PREC)
        acc_t = tl.dot(p_dot, vd, acc_t, out_dtype=ACC, input_precision=PREC)
        m_i = m_new
    return acc_o, acc_t, m_i, l_i, mu_i


@triton.jit
def _fwd_tiles(acc_o, m_i, l_i, q, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn,
               offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, lo, hi, N_K, sm, qk, inv_sm,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
               MASK_DV: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
               DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Key tiles [lo, hi) of the plain flash forward (rows without a tangent): the primal half of _fwd_jvp_tiles."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        if MASK_KIND == 1 or MASK_KIND == 2:  # a 2-D mask tile: loaded first (see _load_mask)
            mtile = _load_mask(Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, ACC, MASK_KIND)
        k = _load_rows(Kh + offs_n[:, None] * skn + offs_d[None, :] * skd, n_ok, d_ok, MASKED, MASK_D).to(DOT)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC)
        if MASKED:
            ok = n_ok[None, :]
            if IS_CAUSAL:
                ok = ok & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(ok, s, float("-inf"))
        if MASK_KIND == 1 or MASK_KIND == 2:
            s = _apply_mask(s, mtile, sm, inv_sm, MASK_KIND, NEG_MAX)
        else:
            s = _masked_scores(s, Mh, offs_m, m_ok, offs_n, n_ok, smm, smn, sm, inv_sm, MASK_KIND, NEG_MAX, False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = _safe_max(m_new, MASK_KIND)
        alpha = tl.exp2((m_i - m_sub) * qk)
        p = tl.exp2((s - m_sub[:, None]) * qk)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(Vh + offs_n[:, None] * svn + offs_dv[None, :] * svd, n_ok, dv_ok, MASKED, MASK_DV).to(DOT)
        acc_o = tl.dot(p.to(DOT), v, acc_o * alpha[:, None], out_dtype=ACC, input_precision=PREC)
        m_i = m_new
    return acc_o, m_i, l_i


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
def _fwd_plain_head(q, Kh, Vh, Mh, Oh, LSEh, skn, skd, svn, svd, smm, smn, som, sod,
                    offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, mid, hi, N_K, sm, qk, inv_sm, STAT_STRIDE,
                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    MASK_D: tl.constexpr, MASK_DV: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
                    DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr):
    """O = A_O / l and L = m + log2(l) / qk (raw units) for one (row block, head) without tangent."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    # Tiles below the diagonal / before the key tail need no tail mask; the rest (at most a few tiles) do.
    acc_o, m_i, l_i = _fwd_tiles(acc_o, m_i, l_i, q, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn, offs_m, m_ok,
                                 offs_d, d_ok, offs_dv, dv_ok, 0, mid, N_K, sm, qk, inv_sm,
                                 BLOCK_N, False, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    acc_o, m_i, l_i = _fwd_tiles(acc_o, m_i, l_i, q, Kh, Vh, Mh, skn, skd, svn, svd, smm, smn, offs_m, m_ok,
                                 offs_d, d_ok, offs_dv, dv_ok, mid, hi, N_K, sm, qk, inv_sm,
                                 BLOCK_N, True, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
    o = acc_o * _inv_l(l_i, MASK_KIND)[:, None]
    tl.store(Oh + offs_m[:, None] * som + offs_dv[None, :] * sod, round_to(o, Oh.dtype.element_ty, RNE_BF16),
             mask=m_ok[:, None] & dv_ok[None, :])
    _store_row_stats(LSEh, offs_m, m_ok, m_i, l_i, qk, STAT_STRIDE, MASK_KIND)


@triton.autotune(configs=_all_configs(_FWD_JVP_CONFIGS, _FWD_PLAIN_CONFIGS, _FP32_FWD_CONFIGS, _FWD_JVP_MASKED_CONFIGS,
                                      _FWD_PLAIN_MASKED_CONFIGS),
                 key=["N_K", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_TANGENT", "MASK_KIND"],
                 prune_configs_by=_pruner(_FWD_JVP_CONFIGS, _FWD_PLAIN_CONFIGS, _FP32_FWD_CONFIGS,
                                          _FWD_JVP_MASKED_CONFIGS, _FWD_PLAIN_MASKED_CONFIGS))
@triton.jit
def _attn_jvp_fwd_kernel(
    Q, K, V, QD, KD, VD, O, OD, LSE, MU, M,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sqdb, sqdh, sqdm, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
    sob, soh, som, sod, sodb, sodh, sodm, sodd, smb, smh, smm, smn,
    H, GROUP, N_Q, N_K, KT, STAT_STRIDE, sm_scale, qk_scale, inv_scale, SCALES,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_TANGENT: tl.constexpr, MASK_KIND: tl.constexpr, NEG_MAX: tl.constexpr,
    STORE_MU: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Fused attention forward + JVP for one block of BLOCK_M query rows of one (batch, query head).

    O = softmax(c Q K^T + mask) V;  O_dot = (A_T / l) - (mu / l) O  with  A_T = sum_j P~_j (S_dot_j V_j + V_dot_j)
    online (see _fwd_jvp_tiles); LSE (raw-score units) L = m + log2(l) / (c log2 e). Query head h reads key/value head
    h // GROUP (GQA / MQA, GROUP = Hq / Hkv; no copies). Batch rows b < KT have a tangent (tangent row b); the others
    run the plain flash forward (_fwd_plain_head) and never touch the tangent tensors. The grid is 1-D over (B*H, row
    blocks) with the tangent heads first (see _tile_and_head), so the heavier programs start first; with causal masking
    the row blocks run last-to-first for the same reason. STORE_MU (only when the tangent output is differentiable)
    also saves mu / l = rowsum(P * S_dot) per tangent row for the tangent backward (tangent_backward.py).
    """
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, IS_CAUSAL)
    b = (bh // H).to(tl.int64)  # int64: b * stride can exceed 2^31 for large batches
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    sm, qk, inv_sm = _scales(sm_scale, qk_scale, inv_scale, SCALES, SCALE_PTR)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV
    # Key range: [0, mid) needs no tail masking, [mid, hi) does (key tail; tiles crossing the causal diagonal).
    if IS_CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
        mid = (tl.minimum(N_K, pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    else:
        hi = N_K
        mid = (N_K // BLOCK_N) * BLOCK_N

    Kh = K + b * skb + hk * skh
    Vh = V + b * svb + hk * svh
    Mh = M + b * smb + h * smh
    Oh = O + b * sob + h * soh
    LSEh = LSE + bh.to(tl.int64) * N_Q
    q = _load_rows(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                   m_ok, d_ok, True, MASK_D).to(DOT)

    if HAS_TANGENT:
        if b < KT:
            qd = _load_rows(QD + b * sqdb + h * sqdh + offs_m[:, None] * sqdm + offs_d[None, :] * sqdd,
                            m_ok, d_ok, True, MASK_D).to(DOT)
            KDh = KD + b * skdb + hk * skdh
            VDh = VD + b * svdb + hk * svdh
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
            l_i = tl.zeros([BLOCK_M], dtype=ACC)
            mu_i = tl.zeros([BLOCK_M], dtype=ACC)
            acc_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
            acc_t = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
            acc_o, acc_t, m_i, l_i, mu_i = _fwd_jvp_tiles(
                acc_o, acc_t, m_i, l_i, mu_i, q, qd, Kh, KDh, Vh, VDh, Mh,
                skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, 0, mid, N_K, sm, qk, inv_sm,
                BLOCK_N, False, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
            acc_o, acc_t, m_i, l_i, mu_i = _fwd_jvp_tiles(
                acc_o, acc_t, m_i, l_i, mu_i, q, qd, Kh, KDh, Vh, VDh, Mh,
                skn, skd, skdn, skdd, svn, svd, svdn, svdd, smm, smn,
                offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, mid, hi, N_K, sm, qk, inv_sm,
                BLOCK_N, True, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX, DOT, ACC, PREC)
            inv_l = _inv_l(l_i, MASK_KIND)
            o = acc_o * inv_l[:, None]
            o_dot = acc_t * inv_l[:, None] - (mu_i * inv_l)[:, None] * o
            mask = m_ok[:, None] & dv_ok[None, :]
            tl.store(Oh + offs_m[:, None] * som + offs_dv[None, :] * sod,
                     round_to(o, Oh.dtype.element_ty, RNE_BF16), mask=mask)
            ODh = OD + b * sodb + h * sodh
            tl.store(ODh + offs_m[:, None] * sodm + offs_dv[None, :] * sodd,
                     round_to(o_dot, ODh.dtype.element_ty, RNE_BF16), mask=mask)
            _store_row_stats(LSEh, offs_m, m_ok, m_i, l_i, qk, STAT_STRIDE, MASK_KIND)
            if STORE_MU:
                tl.store(MU + bh.to(tl.int64) * N_Q + offs_m, mu_i * inv_l, mask=m_ok)
        else:
            _fwd_plain_head(q, Kh, Vh, Mh, Oh, LSEh, skn, skd, svn, svd, smm, smn, som, sod,
                            offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, mid, hi, N_K, sm, qk, inv_sm, STAT_STRIDE,
                            BLOCK_M, BLOCK_DV, BLOCK_N, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX,
                            DOT, ACC, PREC, RNE_BF16)
    else:
        _fwd_plain_head(q, Kh, Vh, Mh, Oh, LSEh, skn, skd, svn, svd, smm, smn, som, sod,
                        offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok, mid, hi, N_K, sm, qk, inv_sm, STAT_STRIDE,
                        BLOCK_M, BLOCK_DV, BLOCK_N, IS_CAUSAL, MASK_D, MASK_DV, MASK_KIND, NEG_MAX,
                        DOT, ACC, PREC, RNE_BF16)


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
    lse = new_output(lse_shape(batch, heads, n_q, attn_mask), dtype=_lse_dtype(q.dtype), device=q.device)
    mu = new_output((kt if tangent_grad else 0, heads, n_q), dtype=_lse_dtype(q.dtype), device=q.device)
    if batch * heads * n_q == 0:
        return o, o_dot, lse, mu
    acc, dot, prec, rne = compute_dtypes(q.dtype)
    has_t = kt > 0
    # Without tangent rows the tangent pointers are never dereferenced (HAS_TANGENT is a constexpr): pass q / o.
    qd, kd, vd, od = (q_dot, k_dot, v_dot, o_dot) if has_t else (q, k, v, o)
    scale_args, scale_ptr = _scale_args(scale, q.dtype, q.device, lse)
    mask, mask_strides, mask_kind, neg_max = mask_args(attn_mask, (batch, heads, n_q, n_k), q.dtype, lse)
    grid = lambda meta: (cdiv(n_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    _attn_jvp_fwd_kernel[grid](
        q, k, v, qd, kd, vd, o, od, lse, mu if (tangent_grad and has_t) else lse, mask,
        *q.stride(), *k.stride(), *v.stride(), *qd.stride(), *kd.stride(), *vd.stride(), *o.stride(), *od.stride(),
        *mask_strides, heads, heads // k.shape[1], n_q, n_k, kt, batch * heads * n_q, *scale_args,
        **head_dim_args(d, dv), IS_CAUSAL=bool(causal), HAS_TANGENT=has_t, MASK_KIND=mask_kind, NEG_MAX=neg_max,
        STORE_MU=bool(tangent_grad and has_t), ACC=acc, DOT=dot, PREC=prec, RNE_BF16=rne, SCALE_PTR=scale_ptr,
    )
    return o, o_dot, lse, mu
