"""Fused flash attention forward + JVP kernel and its launcher (see the package docstring for the math)."""
from __future__ import annotations

import triton
import triton.language as tl

from .._runtime import cdiv, new_output
from .._triton_utils import compute_dtypes, round_to
from ._common import _block_d, _load_rows, _lse_dtype, _scale_args, _scales, _tile_and_head
from ._configs import _FP32_FWD_CONFIGS, _FWD_JVP_CONFIGS, _FWD_PLAIN_CONFIGS, _all_configs, _pruner


# ============================================================================================= forward + JVP kernel
@triton.jit
def _fwd_jvp_tiles(acc_o, acc_t, m_i, l_i, mu_i, q, qd,
                   Kh, KDh, Vh, VDh, skn, skd, skdn, skdd, svn, svd, svdn, svdd,
                   offs_m, offs_d, d_ok, lo, hi, N_K, sm, qk,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
                   DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Key tiles [lo, hi) of the fused recurrence (s = raw scores q . k, m raw, qk = c log2 e):

    m' = max(m, rowmax s); alpha = 2^((m - m') qk); P~ = 2^((s - m') qk); T = P~ * S_dot
    l = alpha l + rowsum P~;  mu = alpha mu + rowsum T;  A_O = alpha A_O + P~ V;  A_T = alpha A_T + T V + P~ V_dot
    S_dot uses the plain scale c (not c log2 e). 6 dots a tile: S (1), S_dot = Q_dot K^T + Q K_dot^T chained into one
    accumulator (2, i.e. one dot of inner width 2D), P~ V (1), T V + P~ V_dot chained into A_T (2, i.e. one dot of
    inner width 2 BLOCK_N). MASKED tiles (key tail, causal diagonal) set s = -inf and S_dot = 0 there, so they add 0.
    """
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
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
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * qk)
        p = tl.exp2((s - m_new[:, None]) * qk)
        t = p * sd
        l_i = l_i * alpha + tl.sum(p, 1)
        mu_i = mu_i * alpha + tl.sum(t, 1)
        v = _load_rows(Vh + offs_n[:, None] * svn + offs_d[None, :] * svd, n_ok, d_ok, MASKED, MASK_D).to(DOT)
        vd = _load_rows(VDh + offs_n[:, None] * svdn + offs_d[None, :] * svdd, n_ok, d_ok, MASKED, MASK_D).to(DOT)
        p_dot = p.to(DOT)
        acc_o = tl.dot(p_dot, v, acc_o * alpha[:, None], out_dtype=ACC, input_precision=PREC)
        acc_t = tl.dot(t.to(DOT), v, acc_t * alpha[:, None], out_dtype=ACC, input_precision=PREC)
        acc_t = tl.dot(p_dot, vd, acc_t, out_dtype=ACC, input_precision=PREC)
        m_i = m_new
    return acc_o, acc_t, m_i, l_i, mu_i


@triton.jit
def _fwd_tiles(acc_o, m_i, l_i, q, Kh, Vh, skn, skd, svn, svd,
               offs_m, offs_d, d_ok, lo, hi, N_K, qk,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
               DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Key tiles [lo, hi) of the plain flash forward (rows without a tangent): the primal half of _fwd_jvp_tiles."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K
        k = _load_rows(Kh + offs_n[:, None] * skn + offs_d[None, :] * skd, n_ok, d_ok, MASKED, MASK_D).to(DOT)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC)
        if MASKED:
            ok = n_ok[None, :]
            if IS_CAUSAL:
                ok = ok & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * qk)
        p = tl.exp2((s - m_new[:, None]) * qk)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(Vh + offs_n[:, None] * svn + offs_d[None, :] * svd, n_ok, d_ok, MASKED, MASK_D).to(DOT)
        acc_o = tl.dot(p.to(DOT), v, acc_o * alpha[:, None], out_dtype=ACC, input_precision=PREC)
        m_i = m_new
    return acc_o, m_i, l_i


@triton.jit
def _fwd_plain_head(q, Kh, Vh, Oh, LSEh, skn, skd, svn, svd, som, sod,
                    offs_m, offs_d, m_ok, d_ok, mid, hi, N_K, qk,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    MASK_D: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    RNE_BF16: tl.constexpr):
    """O = A_O / l and L = m + log2(l) / qk (raw units) for one (row block, head) without tangent."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    # Tiles below the diagonal / before the key tail need no mask; the rest (at most a few tiles) do.
    acc_o, m_i, l_i = _fwd_tiles(acc_o, m_i, l_i, q, Kh, Vh, skn, skd, svn, svd, offs_m, offs_d, d_ok, 0, mid,
                                 N_K, qk, BLOCK_N, False, IS_CAUSAL, MASK_D, DOT, ACC, PREC)
    acc_o, m_i, l_i = _fwd_tiles(acc_o, m_i, l_i, q, Kh, Vh, skn, skd, svn, svd, offs_m, offs_d, d_ok, mid, hi,
                                 N_K, qk, BLOCK_N, True, IS_CAUSAL, MASK_D, DOT, ACC, PREC)
    o = acc_o / l_i[:, None]
    mask = m_ok[:, None] & d_ok[None, :]
    tl.store(Oh + offs_m[:, None] * som + offs_d[None, :] * sod, round_to(o, Oh.dtype.element_ty, RNE_BF16),
             mask=mask)
    tl.store(LSEh + offs_m, m_i + tl.log2(l_i) / qk, mask=m_ok)


@triton.autotune(configs=_all_configs(_FWD_JVP_CONFIGS, _FWD_PLAIN_CONFIGS, _FP32_FWD_CONFIGS),
                 key=["N_K", "BLOCK_D", "IS_CAUSAL", "HAS_TANGENT"],
                 prune_configs_by=_pruner(_FWD_JVP_CONFIGS, _FWD_PLAIN_CONFIGS, _FP32_FWD_CONFIGS))
@triton.jit
def _attn_jvp_fwd_kernel(
    Q, K, V, QD, KD, VD, O, OD, LSE,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sqdb, sqdh, sqdm, sqdd, skdb, skdh, skdn, skdd, svdb, svdh, svdn, svdd,
    sob, soh, som, sod, sodb, sodh, sodm, sodd,
    H, N_Q, N_K, KT, sm_scale, qk_scale, SCALES,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_TANGENT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, RNE_BF16: tl.constexpr,
    SCALE_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Fused attention forward + JVP for one block of BLOCK_M query rows of one (batch, head).

    O = softmax(c Q K^T) V;  O_dot = (A_T / l) - (mu / l) O  with  A_T = sum_j P~_j (S_dot_j V_j + V_dot_j) online
    (see _fwd_jvp_tiles); LSE (raw-score units) L = m + log2(l) / (c log2 e). Batch rows b < KT have a tangent
    (tangent row b); the others run the plain flash forward (_fwd_plain_head) and never touch the tangent tensors.
    The grid is 1-D over (B*H, row blocks) with the tangent heads first (see _tile_and_head), so the heavier programs
    start first; with causal masking the row blocks run last-to-first for the same reason.
    """
    pid_m, bh = _tile_and_head(N_Q, BLOCK_M, IS_CAUSAL)
    b = (bh // H).to(tl.int64)  # int64: b * stride can exceed 2^31 for large batches
    h = (bh % H).to(tl.int64)
    sm, qk = _scales(sm_scale, qk_scale, SCALES, SCALE_PTR)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_D
    # Key range: [0, mid) needs no masking, [mid, hi) does (key tail; tiles crossing the causal diagonal).
    if IS_CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
        mid = (tl.minimum(N_K, pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    else:
        hi = N_K
        mid = (N_K // BLOCK_N) * BLOCK_N

    Kh = K + b * skb + h * skh
    Vh = V + b * svb + h * svh
    Oh = O + b * sob + h * soh
    LSEh = LSE + bh.to(tl.int64) * N_Q
    q = _load_rows(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                   m_ok, d_ok, True, MASK_D).to(DOT)

    if HAS_TANGENT:
        if b < KT:
            qd = _load_rows(QD + b * sqdb + h * sqdh + offs_m[:, None] * sqdm + offs_d[None, :] * sqdd,
                            m_ok, d_ok, True, MASK_D).to(DOT)
            KDh = KD + b * skdb + h * skdh
            VDh = VD + b * svdb + h * svdh
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
            l_i = tl.zeros([BLOCK_M], dtype=ACC)
            mu_i = tl.zeros([BLOCK_M], dtype=ACC)
            acc_o = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
            acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
            acc_o, acc_t, m_i, l_i, mu_i = _fwd_jvp_tiles(
                acc_o, acc_t, m_i, l_i, mu_i, q, qd, Kh, KDh, Vh, VDh, skn, skd, skdn, skdd, svn, svd, svdn, svdd,
                offs_m, offs_d, d_ok, 0, mid, N_K, sm, qk, BLOCK_N, False, IS_CAUSAL, MASK_D, DOT, ACC, PREC)
            acc_o, acc_t, m_i, l_i, mu_i = _fwd_jvp_tiles(
                acc_o, acc_t, m_i, l_i, mu_i, q, qd, Kh, KDh, Vh, VDh, skn, skd, skdn, skdd, svn, svd, svdn, svdd,
                offs_m, offs_d, d_ok, mid, hi, N_K, sm, qk, BLOCK_N, True, IS_CAUSAL, MASK_D, DOT, ACC, PREC)
            inv_l = 1.0 / l_i
            o = acc_o * inv_l[:, None]
            o_dot = acc_t * inv_l[:, None] - (mu_i * inv_l)[:, None] * o
            mask = m_ok[:, None] & d_ok[None, :]
            tl.store(Oh + offs_m[:, None] * som + offs_d[None, :] * sod,
                     round_to(o, Oh.dtype.element_ty, RNE_BF16), mask=mask)
            ODh = OD + b * sodb + h * sodh
            tl.store(ODh + offs_m[:, None] * sodm + offs_d[None, :] * sodd,
                     round_to(o_dot, ODh.dtype.element_ty, RNE_BF16), mask=mask)
            tl.store(LSEh + offs_m, m_i + tl.log2(l_i) / qk, mask=m_ok)
        else:
            _fwd_plain_head(q, Kh, Vh, Oh, LSEh, skn, skd, svn, svd, som, sod, offs_m, offs_d, m_ok, d_ok, mid, hi,
                            N_K, qk, BLOCK_M, BLOCK_D, BLOCK_N, IS_CAUSAL, MASK_D, DOT, ACC, PREC, RNE_BF16)
    else:
        _fwd_plain_head(q, Kh, Vh, Oh, LSEh, skn, skd, svn, svd, som, sod, offs_m, offs_d, m_ok, d_ok, mid, hi,
                        N_K, qk, BLOCK_M, BLOCK_D, BLOCK_N, IS_CAUSAL, MASK_D, DOT, ACC, PREC, RNE_BF16)


def attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, causal: bool, scale: float):
    """Launch the fused forward + JVP kernel. Inputs are assumed checked (see attention_jvp).

    Returns (o (B, H, Nq, D), o_dot (kt, H, Nq, D), lse (B, H, Nq) in raw-score units (see the module docstring),
    fp32 (fp64 for fp64 inputs)).
    """
    batch, heads, n_q, d = q.shape
    n_k = k.shape[2]
    kt = q_dot.shape[0]
    o = new_output(q.shape, dtype=q.dtype, device=q.device)
    o_dot = new_output((kt, heads, n_q, d), dtype=q.dtype, device=q.device)
    lse = new_output((batch, heads, n_q), dtype=_lse_dtype(q.dtype), device=q.device)
    if batch * heads * n_q == 0:
        return o, o_dot, lse
    acc, dot, prec, rne = compute_dtypes(q.dtype)
    block_d = _block_d(d)
    has_t = kt > 0
    # Without tangent rows the tangent pointers are never dereferenced (HAS_TANGENT is a constexpr): pass q / o.
    qd, kd, vd, od = (q_dot, k_dot, v_dot, o_dot) if has_t else (q, k, v, o)
    scale_args, scale_ptr = _scale_args(scale, q.dtype, q.device, lse)
    grid = lambda meta: (cdiv(n_q, meta["BLOCK_M"]) * batch * heads,)  # noqa: E731
    _attn_jvp_fwd_kernel[grid](
        q, k, v, qd, kd, vd, o, od, lse,
        *q.stride(), *k.stride(), *v.stride(), *qd.stride(), *kd.stride(), *vd.stride(), *o.stride(), *od.stride(),
        heads, n_q, n_k, kt, *scale_args,
        HEAD_D=d, BLOCK_D=block_d, MASK_D=block_d != d, IS_CAUSAL=bool(causal), HAS_TANGENT=has_t,
        ACC=acc, DOT=dot, PREC=prec, RNE_BF16=rne, SCALE_PTR=scale_ptr,
    )
    return o, o_dot, lse
