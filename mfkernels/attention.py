"""Fused flash attention forward + JVP (tangent) in Triton, with a flash backward through the primal.

Per head, with c the softmax scale (default D^-1/2):

    S = c Q K^T,  P = softmax(S),  O = P V
    S_dot = c (Q_dot K^T + Q K_dot^T)
    O_dot = P_dot V + P V_dot = (T V + P~ V_dot) / l - (mu / l) O,   P~ = exp(S - m), l = rowsum P~, T = P~ * S_dot,
                                                                      mu = rowsum T
One pass over the key tiles (DESIGN.md 2) keeps, per query row, the running max m, l, mu and two accumulators
A_O = sum P~ V and A_T = sum (T V + P~ V_dot), rescaled by alpha = exp(m_old - m_new) when the max moves. The
running max needs no tangent. Only O(N) state is kept beyond the outputs: the log-sum-exp of the primal, saved so that
the backward of O is the ordinary flash backward (no tangent recompute, no second forward).

Public API
    attention_jvp(q, k, v, q_dot, k_dot, v_dot, *, causal=False, scale=None) -> (o, o_dot)
        Ragged tangents: q_dot/k_dot/v_dot have kt <= B rows standing for the FIRST kt rows of the batch. o is
        differentiable in q, k, v; o_dot is not (it is a stop-gradient quantity in MeanFlow).
    scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None)
        Drop-in for F.scaled_dot_product_attention (4-D inputs, no mask / dropout / GQA) that works under plain
        autograd, torch.autograd.forward_ad and torch.func.jvp; its forward-mode derivative comes from the fused kernel.

Layers: _attn_jvp_fwd_kernel -> attention_jvp_fwd() (launcher) -> custom op mfkernels::attention_jvp_fwd;
        _attn_bwd_{preprocess,dkdv,dq}_kernel -> attention_bwd() (launcher) -> custom op mfkernels::attention_bwd;
        both ops -> AttentionJVPFunction -> attention_jvp()
                 -> _SDPAFunction (+ _SDPAJVPFunction with jvp) -> scaled_dot_product_attention().
The custom ops make the launchers opaque to torch.func transforms and Dynamo (DESIGN.md 4).

Numerics: the kernels use exp2 and keep the running max m in raw-score units (s = q . k, before any scale), so that
P~ = 2^((s - m) c log2 e): the subtraction of two large logits happens before the multiply, and no rounding of a large
scaled logit reaches the exponent (this keeps q, k scaled by 30 as accurate as torch in fp32). The saved LSE is in the
same raw units: L_i = m_i + log2(l_i) / (c log2 e), P_ij = 2^((s_ij - L_i) c log2 e); the natural log-sum-exp is c L_i.
This needs c > 0 (a scale <= 0 is refused).
"""
from __future__ import annotations

import math
import numbers
import os
import warnings

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from . import reference
from ._checks import describe
from ._runtime import cdiv, interpreter_active, new_output, triton_can_run, warn_fallback
from ._triton_utils import compute_dtypes, round_to

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


# ============================================================================================================ configs
def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# The interpreter gets exactly one config (autotuning there would multiply the test time and measures nothing).
# BLOCK_M != BLOCK_N on purpose: it exercises the causal diagonal logic with unequal tiles.
_INTERP_CONFIG = [_cfg(32, 16, 4, 1)]

# Hopper-oriented lists (DESIGN.md 5), keyed on (N, padded D, causal, tangent or not, dtype) and pruned by D (and, for
# the forward, by whether the kernel has tangent rows). Every entry was compiled offline for sm_90a with Triton 3.6's
# bundled ptxas: all use wgmma, none spills registers for bf16 at D = 64 / 128 (D = 256 works but spills).
# Forward + JVP holds A_O, A_T (BLOCK_M x D fp32) plus S, S_dot (BLOCK_M x BLOCK_N fp32) in registers: BLOCK_M 128 needs
# 8 warps (D = 64, 128 x 64: 241 registers a thread); D = 128 needs BLOCK_N 32 (128 x 64 spills). Shared memory per
# pipeline stage holds K, K_dot, V, V_dot tiles (D = 128, 128 x 32, 3 stages: 160 KB of the 228 KB).
_FWD_JVP_CONFIGS = {
    64: [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3), _cfg(128, 32, 8, 3)],
    128: [_cfg(128, 32, 8, 3), _cfg(128, 32, 8, 2), _cfg(128, 32, 8, 4), _cfg(64, 32, 4, 3), _cfg(64, 32, 4, 4)],
    256: [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2), _cfg(64, 32, 8, 1)],
}
# Plain flash forward (kt = 0): one accumulator, wider key tiles fit.
_FWD_PLAIN_CONFIGS = {
    64: [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 64, 4, 3), _cfg(128, 128, 4, 3)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2)],
}
# Backward: dK/dV keeps a key tile resident and streams query tiles (BLOCK_N resident, BLOCK_M streamed);
# dQ keeps a query tile resident and streams key tiles.
_DKDV_CONFIGS = {
    64: [_cfg(64, 128, 8, 3), _cfg(64, 128, 8, 2), _cfg(64, 64, 4, 3), _cfg(32, 128, 8, 3), _cfg(64, 64, 4, 4)],
    128: [_cfg(32, 128, 8, 3), _cfg(32, 128, 8, 2), _cfg(64, 64, 8, 3), _cfg(32, 64, 4, 3), _cfg(32, 64, 4, 4)],
    256: [_cfg(32, 32, 4, 2), _cfg(32, 64, 8, 2)],
}
_DQ_CONFIGS = {
    64: [_cfg(128, 32, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 5)],
    128: [_cfg(128, 32, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2)],
}
# fp32 inputs (3xTF32 dots, see _triton_utils.compute_dtypes): fp32 tiles take twice the registers and shared memory,
# so small tiles (compiled offline too: a few hundred bytes of spills at most for D <= 64, ~1-3 KB at D = 128).
_FP32_FWD_CONFIGS = {
    64: [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2)],
    # (64, 32, 8, 2) needs 233472 B of shared memory with tangents: 1 KB over Hopper's 232448 (seen on an H200).
    128: [_cfg(64, 32, 8, 1), _cfg(32, 32, 4, 2)],
    256: [_cfg(32, 32, 4, 1), _cfg(32, 16, 4, 1)],
}
_FP32_DKDV_CONFIGS = {
    64: [_cfg(32, 64, 4, 2), _cfg(32, 32, 4, 2)],
    128: [_cfg(32, 32, 4, 2), _cfg(32, 64, 4, 2)],
    256: [_cfg(32, 32, 4, 1), _cfg(16, 32, 4, 1)],
}
_FP32_DQ_CONFIGS = {
    64: [_cfg(64, 32, 4, 2), _cfg(64, 64, 8, 2)],
    128: [_cfg(32, 32, 4, 2), _cfg(64, 32, 4, 2)],
    256: [_cfg(32, 32, 4, 1), _cfg(32, 16, 4, 1)],
}


def _config_group(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def _all_configs(*tables):
    if interpreter_active():
        return list(_INTERP_CONFIG)
    seen, out = set(), []
    for cfgs in (c for table in tables for c in table.values()):
        for c in cfgs:
            key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def _pruner(table, plain_table=None, fp32_table=None):
    """Keep the configs listed for this head dim: the fp32 list for fp32 inputs, else the plain list for a forward
    without tangent rows (HAS_TANGENT False), else the main list. MFKERNELS_AUTOTUNE=0 keeps only the list's first."""
    def prune(configs, named_args, **kwargs):
        if interpreter_active() or len(configs) <= 1:
            return configs
        arg = lambda name: named_args.get(name, kwargs.get(name))  # noqa: E731
        q = arg("Q")
        if fp32_table is not None and q is not None and q.dtype == torch.float32:
            chosen = fp32_table
        elif plain_table is not None and not arg("HAS_TANGENT"):
            chosen = plain_table
        else:
            chosen = table
        group = _config_group(arg("BLOCK_D"))
        wanted = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in chosen[group]}
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        if os.environ.get("MFKERNELS_AUTOTUNE", "1") == "0":
            # Test runs on a GPU: one compile per specialization instead of timing the whole list for every N.
            order = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in chosen[group]]
            kept = sorted(kept, key=lambda c: order.index(
                (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)))[:1]
        return kept or configs[:1]
    return {"early_config_prune": prune}


# ============================================================================================================ helpers
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
def _scales(sm_scale, qk_scale, SCALES, SCALE_PTR: tl.constexpr):
    """(c, c log2 e). Float kernel arguments are fp32 (and the interpreter rounds Python floats to fp32 too), which is
    fine for fp32/16-bit math but not for fp64: there both come exactly from a 2-element fp64 device tensor."""
    if SCALE_PTR:
        sm = tl.load(SCALES)
        qk = tl.load(SCALES + 1)
    else:
        sm = sm_scale
        qk = qk_scale
    return sm, qk


def _scale_args(scale: float, dtype: torch.dtype, device, dummy: torch.Tensor):
    """Kernel arguments (sm_scale, qk_scale, SCALES) and the SCALE_PTR constexpr for a softmax scale."""
    qk = float(scale) * LOG2E
    if dtype == torch.float64:
        # fill_ runs on the device (no host-device sync, unlike torch.tensor(list)); only the fp64 path pays it.
        scales = torch.empty(2, dtype=torch.float64, device=device)
        scales[0].fill_(float(scale))
        scales[1].fill_(qk)
        return (float(scale), qk, scales), True
    return (float(scale), qk, dummy), False


@triton.jit
def _tile_and_head(N_ROWS, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Split a 1-D program id into (row tile, batch*head). 1-D because grid dim 1 is capped at 65535 (B*H can exceed
    it); row tiles of one head stay adjacent (K/V reuse in L2), and the heads keep their order (tangent heads first).
    REVERSE runs a head's row tiles last-to-first: under causal masking the last tiles have the most keys."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(N_ROWS, BLOCK)
    bh = pid // num_tiles
    tile = pid % num_tiles
    if REVERSE:
        tile = num_tiles - 1 - tile
    return tile, bh


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


def _block_d(d: int) -> int:
    # tl.dot needs every dimension >= 16; other head dims are zero-padded (masked) up to a power of two.
    return max(16, triton.next_power_of_2(d))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


# ================================================================================================ argument checks
def _resolve_scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be None or a real number; got {scale!r} ({type(scale).__name__})")
    if not (math.isfinite(float(scale)) and scale > 0):
        raise ValueError(f"scale must be finite and > 0 (the kernels track the row max of unscaled scores); "
                         f"got {scale!r}")
    return float(scale)


def _check_head_dim(q: torch.Tensor, k: torch.Tensor) -> None:
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q has head dim D = {d} ({describe(q)}); supported head dims are 1..{MAX_HEAD_DIM} "
                         f"(tuned for 64 and 128; others are zero-padded to the next power of two >= 16)")
    if k.shape[2] == 0:
        raise ValueError(f"k has no keys ({describe(k)}); attention needs Nk >= 1")


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {causal!r} ({type(causal).__name__})")
    return causal


# ============================================================================ custom ops (for torch.func / compile)
@torch.library.custom_op("mfkernels::attention_jvp_fwd", mutates_args=())
def _attention_jvp_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor,
                          k_dot: torch.Tensor, v_dot: torch.Tensor, causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, o_dot, lse) from the fused kernel; an opaque op, so torch.func transforms and Dynamo never look inside."""
    if not _kernel_can_run(q):
        raise RuntimeError(f"mfkernels::attention_jvp_fwd needs a CUDA fp16/bf16/fp32 tensor "
                           f"(or TRITON_INTERPRET=1 on CPU); "
                           f"got q with {describe(q)}")
    return attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, causal, scale)


@_attention_jvp_fwd_op.register_fake
def _(q, k, v, q_dot, k_dot, v_dot, causal, scale):
    batch, heads, n_q, d = q.shape
    return (q.new_empty(q.shape), q.new_empty((q_dot.shape[0], heads, n_q, d)),
            q.new_empty((batch, heads, n_q), dtype=_lse_dtype(q.dtype)))


@torch.library.custom_op("mfkernels::attention_bwd", mutates_args=())
def _attention_bwd_op(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the flash backward kernels and the saved LSE."""
    if not _kernel_can_run(q):
        raise RuntimeError(f"mfkernels::attention_bwd needs a CUDA fp16/bf16/fp32 tensor "
                           f"(or TRITON_INTERPRET=1 on CPU); "
                           f"got q with {describe(q)}")
    return attention_bwd(grad_o, q, k, v, o, lse, causal, scale)


@_attention_bwd_op.register_fake
def _(grad_o, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _kernel_can_run(q: torch.Tensor) -> bool:
    """Triton can run here, and the dtype is one the compiled kernels support on that device. fp64 runs only under the
    interpreter (exact fp64 tests); Triton 3.6 has no reliable fp64 tl.dot on NVIDIA, so CUDA fp64 uses the
    reference."""
    return triton_can_run(q) and not (q.device.type == "cuda" and q.dtype == torch.float64)


def _fallback(op: str, q: torch.Tensor) -> None:
    if triton_can_run(q):  # only the dtype is the reason
        if op not in _FP64_WARNED:
            _FP64_WARNED.add(op)
            warnings.warn(f"mfkernels.{op}: float64 CUDA tensors use the pure-torch reference (the Triton kernels "
                          f"support fp16, bf16 and fp32 on CUDA)", RuntimeWarning, stacklevel=3)
    else:
        warn_fallback(op, q)


_FP64_WARNED: set[str] = set()


# ====================================================================================== autograd + public API (1)
class AttentionJVPFunction(torch.autograd.Function):
    """(o, o_dot) from one fused launch; o backpropagates through the flash backward, o_dot is non-differentiable and
    the tangent inputs get no gradient. Saves q, k, v, o and the LSE (O(N)); never any tangent.

    The launchers are reached through the custom ops, so Dynamo sees one opaque op instead of tracing the autotuner.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_dot, k_dot, v_dot, causal: bool, scale: float):
        o, o_dot, lse = torch.ops.mfkernels.attention_jvp_fwd(q, k, v, q_dot, k_dot, v_dot, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(o_dot)
        return o, o_dot

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_o, _grad_o_dot):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.mfkernels.attention_bwd(grad_o, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  q_dot: torch.Tensor, k_dot: torch.Tensor, v_dot: torch.Tensor,
                  *, causal: bool = False, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its tangent in one fused pass (per head, c = scale, default D^-1/2):

    S = c Q K^T, P = softmax(S), O = P V;  S_dot = c (Q_dot K^T + Q K_dot^T);
    O_dot = P_dot V + P V_dot, P_dot = P * (S_dot - rowsum(P * S_dot)).
    q: (B, H, Nq, D); k, v: (B, H, Nk, D); tangents: (kt, ...) with kt <= B standing for the first kt batch rows
    (kt = 0: a plain flash forward, o_dot is empty). causal: top-left aligned like SDPA (query i sees keys j <= i).
    Returns (o (B, H, Nq, D), o_dot (kt, H, Nq, D)); o is differentiable in q, k, v, o_dot is not.
    """
    reference._check_attention(q, k, v, q_dot, k_dot, v_dot)
    _check_head_dim(q, k)
    causal = _check_causal(causal)
    c = _resolve_scale(scale, q.shape[-1])
    if not _kernel_can_run(q):
        _fallback("attention_jvp", q)
        return reference.attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot, causal=causal, scale=c)
    return AttentionJVPFunction.apply(q, k, v, q_dot, k_dot, v_dot, causal, c)


# ====================================================================================== autograd + public API (2)
class _SDPAFunction(torch.autograd.Function):
    """Attention through the custom ops with the flash backward; forward returns (o, lse), lse non-differentiable and
    hidden by scaled_dot_product_attention. setup_context style (no ctx in forward) so torch.func transforms accept it.
    No jvp here: Dynamo refuses to trace a Function with a custom jvp (a graph break), so under torch.compile without
    forward mode this one is used and lands in the graph whole."""

    @staticmethod
    def forward(q, k, v, causal, scale):
        o, _, lse = torch.ops.mfkernels.attention_jvp_fwd(q, k, v, q[:0], k[:0], v[:0], causal, scale)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale = inputs
        o, lse = output
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    @once_differentiable  # no double backward; also keeps the op call out of autograd under torch.func.grad
    def backward(ctx, grad_o, _grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.mfkernels.attention_bwd(grad_o, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


class _SDPAJVPFunction(_SDPAFunction):
    """_SDPAFunction plus forward mode: the JVP of O comes from the fused forward + JVP kernel (custom op)."""

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot, _causal_dot, _scale_dot):
        q, k, v = ctx.saved_tensors
        # An input without a tangent has a zero tangent. The fused kernel recomputes O alongside O_dot (the primal
        # forward already ran: forward mode only sees the tangents after it).
        q_dot = torch.zeros_like(q) if q_dot is None else q_dot
        k_dot = torch.zeros_like(k) if k_dot is None else k_dot
        v_dot = torch.zeros_like(v) if v_dot is None else v_dot
        # o_dot is never differentiable (and a custom op call under torch.func.grad must not record anything).
        with torch.no_grad():
            _, o_dot, _ = torch.ops.mfkernels.attention_jvp_fwd(q, k, v, q_dot.to(q.dtype), k_dot.to(k.dtype),
                                                                v_dot.to(v.dtype), ctx.causal, ctx.scale)
        return o_dot, None


def _forward_mode_active() -> bool:
    """True inside torch.func.jvp (or any functorch transform) or a torch.autograd.forward_ad dual level."""
    return torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0


@torch.compiler.disable
def _sdpa_outside_dynamo(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """Eager island for forward mode under torch.compile: Dynamo drops an autograd.Function's custom jvp inside
    torch.func.jvp / forward_ad and returns zero (or no) tangents silently (pytorch #192985). Running the Function
    outside Dynamo costs a graph break but keeps the tangent right."""
    return _SDPAJVPFunction.apply(q, k, v, causal, scale)[0]


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for F.scaled_dot_product_attention on 4-D (B, H, N, D) inputs, differentiable in reverse mode (flash
    backward) and forward mode (torch.autograd.forward_ad, torch.func.jvp: the fused forward + JVP kernel).

    attn_mask, dropout_p > 0 and enable_gqa are not supported and raise. Falls back to F.scaled_dot_product_attention
    (with a warning; in forward mode to the math reference) where the kernels cannot run. Under torch.compile, plain
    autograd traces into the graph (two opaque custom ops); forward mode (torch.func.jvp / forward_ad) graph-breaks
    around this call, because Dynamo would otherwise silently drop the custom jvp (pytorch #192985).
    """
    if attn_mask is not None:
        raise NotImplementedError("mfkernels.scaled_dot_product_attention: attn_mask is not supported "
                                  "(use is_causal=True for a causal mask, or F.scaled_dot_product_attention)")
    if dropout_p != 0.0:
        raise NotImplementedError(f"mfkernels.scaled_dot_product_attention: dropout_p must be 0.0; got {dropout_p}")
    if enable_gqa:
        raise NotImplementedError("mfkernels.scaled_dot_product_attention: enable_gqa is not supported; "
                                  "k and v must have as many heads as q")
    q0 = query[:0]  # zero-row tangents: the checks of attention_jvp without any tangent
    reference._check_attention(query, key, value, q0, key[:0], value[:0])
    _check_head_dim(query, key)
    causal = _check_causal(is_causal)
    c = _resolve_scale(scale, query.shape[-1])
    if not _kernel_can_run(query):
        _fallback("scaled_dot_product_attention", query)
        if _forward_mode_active():  # torch's fused CPU/CUDA SDPA kernels have no forward-mode formula
            return reference.attention_ref(query, key, value, causal=causal, scale=c)
        return F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=c)
    if torch.compiler.is_compiling():
        if _forward_mode_active():
            return _sdpa_outside_dynamo(query, key, value, causal, c)
        return _SDPAFunction.apply(query, key, value, causal, c)[0]
    return _SDPAJVPFunction.apply(query, key, value, causal, c)[0]
