"""Fused flash attention forward + JVP (tangent) in Triton, its flash backward, and the backward of the tangent.

Per head, with c the softmax scale (default D^-1/2) and an optional mask (bool: -inf where False; additive: + b):

    S = c Q K^T (+ mask),  P = softmax(S),  O = P V
    S_dot = c (Q_dot K^T + Q K_dot^T)                        (a mask is a constant: no tangent)
    O_dot = P_dot V + P V_dot = (T V + P~ V_dot) / l - (mu / l) O,   P~ = exp(S - m), l = rowsum P~, T = P~ * S_dot,
                                                                      mu = rowsum T
One pass over the key tiles (DESIGN.md 2) keeps, per query row, the running max m, l, mu and two accumulators
A_O = sum P~ V and A_T = sum (T V + P~ V_dot), rescaled by alpha = exp(m_old - m_new) when the max moves. The
running max needs no tangent. Only O(N) state is kept beyond the outputs: the log-sum-exp of the primal, saved so that
the backward of O is the ordinary flash backward (no tangent recompute, no second forward). When the tangent output
is differentiable (tangent_grad), mu / l is saved too and a loss of O_dot backpropagates through the tangent backward
(tangent_backward.py: its formulas, FLOPs and memory).

Shapes: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): GQA / MQA (query head h reads key/value head
h // (Hq / Hkv), in place) and Dv != D everywhere; attn_mask broadcastable to (B, Hq, Nq, Nk), read per tile through
its strides (0 on broadcast dims: a key-padding mask is never expanded in memory). Fully masked rows give 0 (torch).

Public API
    attention_jvp(q, k, v, q_dot, k_dot, v_dot, *, attn_mask=None, causal=False, scale=None, enable_gqa=False,
                  tangent_grad=None) -> (o, o_dot)
        Ragged tangents: q_dot/k_dot/v_dot have kt <= B rows standing for the FIRST kt rows of the batch. o is
        differentiable in q, k, v; o_dot only with tangent_grad (by default: when a tangent requires grad), else it is
        the op contract's detached tangent (MeanFlow's stop-gradient path, unchanged cost).
    scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False)
        Drop-in for F.scaled_dot_product_attention (4-D inputs; no dropout) under plain autograd,
        torch.autograd.forward_ad and torch.func.jvp (its forward-mode derivative from the fused kernel, differentiable
        again: reverse-over-forward) and torch.compile.

Files (one concern each): _common.py (head dims, scale / mask arguments, tile helpers), _configs.py (autotune tables),
forward.py (forward + JVP kernel and launcher), backward.py (flash backward kernels and launcher), tangent_backward.py
(backward of the tangent: kernels and launcher), custom_ops.py (the torch.library ops and their autograd), api.py
(attention_jvp and the SDPA drop-in).

Layers (the op pattern, DESIGN.md 7): _attn_jvp_fwd_kernel -> attention_jvp_fwd() (launcher) -> custom op
        mfkernels::attention_jvp_fwd; _attn_bwd_{preprocess,dkdv,dq}_kernel -> attention_bwd() -> custom op
        mfkernels::attention_bwd; _attn_tbwd_{preprocess,dkdv,dq}_kernel -> attention_jvp_bwd() -> custom op
        mfkernels::attention_jvp_bwd; torch.library.register_autograd ties them (custom_ops.py) -> attention_jvp()
        and, without forward mode, scaled_dot_product_attention(); in forward mode the drop-in goes through
        _SDPAJVPFunction, whose jvp is the fused op wrapped in _SDPATangentFunction (functorch-compatible autograd).
The custom ops make the launchers opaque to torch.func transforms and Dynamo (DESIGN.md 4).

Numerics: the kernels use exp2 and keep the running max m in raw-score units (s = q . k, before any scale; an additive
mask enters as b / c), so that P~ = 2^((s - m) c log2 e): the subtraction of two large logits happens before the
multiply, and no rounding of a large scaled logit reaches the exponent (this keeps q, k scaled by 30 as accurate as
torch in fp32). The saved LSE is in the same raw units: L_i = m_i + log2(l_i) / (c log2 e),
P_ij = 2^((s_ij - L_i) c log2 e); the natural log-sum-exp is c L_i (with an additive mask m and log2 l are kept apart:
_common._store_row_stats). This needs c > 0 (a scale <= 0 is refused).
"""
from __future__ import annotations

# Re-exports: the public API, plus what tests and benchmarks reach for (kernels, config tables).
from . import _common, _configs, _levers, _pieces  # noqa: F401
from ._common import LOG2E, MAX_HEAD_DIM
from ._configs import (_DKDV_CONFIGS, _DQ_CONFIGS, _FP32_DKDV_CONFIGS, _FP32_DQ_CONFIGS,  # noqa: F401
                       _FP32_FWD_CONFIGS, _FP32_TBWD_DKDV_CONFIGS, _FP32_TBWD_DQ_CONFIGS, _FWD_JVP_CONFIGS,
                       _FWD_PLAIN_CONFIGS, _TBWD_DKDV_CONFIGS, _TBWD_DQ_CONFIGS, _all_configs, _pruner,
                       _DQ_MASKED_CONFIGS, _FWD_JVP_MASKED_CONFIGS, _FWD_PLAIN_MASKED_CONFIGS)
from .api import _SDPAJVPFunction, _SDPATangentFunction  # noqa: F401
from .api import attention_jvp, scaled_dot_product_attention
from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, attention_bwd  # noqa: F401
from .custom_ops import _kernel_can_run  # noqa: F401
from .forward import _attn_jvp_fwd_kernel, attention_jvp_fwd  # noqa: F401
from .tangent_backward import _attn_tbwd_dkdv_kernel, _attn_tbwd_dq_kernel, attention_jvp_bwd  # noqa: F401

__all__ = ["attention_jvp", "scaled_dot_product_attention", "attention_jvp_fwd", "attention_bwd", "attention_jvp_bwd",
           "LOG2E", "MAX_HEAD_DIM"]
