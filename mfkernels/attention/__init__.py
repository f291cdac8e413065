"""Fused flash attention forward + JVP (tangent) in Triton, its flash backward, and the backward of the tangent.

Per head, with c the softmax scale (default D^-1/2) and an optional mask (bool: -inf where False; additive: + b):

    S = c Q K^T (+ mask),  P = softmax(S),  O = P V
    S_dot = c (Q_dot K^T + Q K_dot^T)                        (a mask is a constant: no tangent)
    O_dot = P_dot V + P V_dot = (T V + P~ V_dot) / l - (mu / l) O,   P~ = exp(S - m), l = rowsum P~, T = P~ * S_dot,
                                                                      mu = rowsum T
One pass over the key tiles (docs/design.md, 'Attention: forward and tangent') keeps, per query row, the running max
m, l, mu and two accumulators A_O = sum P~ V and A_T = sum (T V + P~ V_dot), rescaled by alpha = exp(m_old - m_new)
when the max moves. The running max needs no tangent. Only O(N) state is kept beyond the outputs: the log-sum-exp of
the primal, saved so that the backward of O is the ordinary flash backward (no tangent recompute, no second forward).
When the tangent output is differentiable (tangent_grad), mu / l is saved too and a loss of O_dot backpropagates
through the tangent backward (tangent_backward.py: its formulas, FLOPs and memory).

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

Files, in the order of every mfkernels op (kernels | launchers | registration | public; docs/kernels.md). The
package is one op split by concern, because one file would run to about 2,000 lines:
    kernel parts   _common.py: scale / mask arguments, the causal / key-tail mask (_attends), the user mask, row
                   statistics, tile helpers; _pieces.py: head dims as power-of-two pieces (tile loads, stores, dots);
                   _configs.py: autotune tables and their pruner; _levers.py: opt-in Hopper levers (A/B switches)
    kernels and    forward.py: the forward + JVP kernel, launcher attention_jvp_fwd(); backward.py: the flash
    launchers      backward, attention_bwd(); tangent_backward.py: the backward of the tangent, attention_jvp_bwd()
    registration   registration.py: the three ops as FusedOps (custom op for tracing, direct eager path), autograd
    public         api.py: attention_jvp, its unchecked twin _attention_jvp (what the op tables hold), the SDPA drop-in

Chain: _attn_jvp_fwd_kernel -> attention_jvp_fwd() -> op mfkernels::attention_jvp_fwd (registration.attention_fwd_op)
-> attention_jvp(); backward _attn_bwd_{preprocess,dkdv,dq}_kernel -> attention_bwd() -> op mfkernels::attention_bwd;
tangent backward _attn_tbwd_{preprocess,dkdv,dq}_kernel -> attention_jvp_bwd() -> op mfkernels::attention_jvp_bwd.
The drop-in calls the forward op directly without forward mode; in forward mode it goes through _SDPAJVPFunction,
whose jvp is the fused op wrapped in _SDPATangentFunction (functorch-compatible autograd). The ops are opaque to
torch.func transforms and Dynamo (docs/design.md, 'Triton interpreter and CPU testing').

Numerics: the kernels use exp2 and keep the running max m in raw-score units (s = q . k, before any scale; an additive
mask enters as b / c), so that P~ = 2^((s - m) c log2 e): the subtraction of two large logits happens before the
multiply, and no rounding of a large scaled logit reaches the exponent (this keeps q, k scaled by 30 as accurate as
torch in fp32). The saved LSE is in the same raw units: L_i = m_i + log2(l_i) / (c log2 e),
P_ij = 2^((s_ij - L_i) c log2 e); the natural log-sum-exp is c L_i (with an additive mask m and log2 l are kept apart:
_common._store_row_stats). This needs c > 0 (a scale <= 0 is refused).
"""
from __future__ import annotations

from .api import attention_jvp, scaled_dot_product_attention

__all__ = ["attention_jvp", "scaled_dot_product_attention"]
