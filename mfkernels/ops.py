"""Op tables: the set of forward+JVP ops a model's `forward_jvp` calls, in two implementations.

- "reference": the pure-torch ops of `mfkernels.reference` (run anywhere; the readable statement of the rules).
- "fused": the Triton / native ops (CUDA, or CPU under TRITON_INTERPRET=1; each falls back to its reference with one
  warning where Triton cannot run).

A model written against `JVPOps` switches implementation by switching tables; nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

IMPLEMENTATIONS = ("reference", "fused")


@dataclass(frozen=True)
class JVPOps:
    """The layer ops a network's forward_jvp may call; all follow the contract of mfkernels.reference."""

    name: str
    linear: Callable
    silu: Callable
    gelu_tanh: Callable
    mlp: Callable
    layernorm_modulate: Callable
    gated_residual: Callable
    attention: Callable
    # modern-transformer ops (RMSNorm, SwiGLU, RoPE, fused QK-norm + RoPE): filled by _modern_ops below
    rmsnorm: Callable
    swiglu: Callable
    rope: Callable
    qk_norm_rope: Callable


_TABLES: dict[str, JVPOps] = {}


def ops_table(implementation: str = "fused") -> JVPOps:
    """The op table of an implementation, built once (a plain dict rather than functools.lru_cache: torch.compile
    traces this call in every model forward, and Dynamo reads a dict lookup as a constant but warns about lru_cache)."""
    table = _TABLES.get(implementation)
    if table is None:
        table = _TABLES[implementation] = _build_table(implementation)
    return table


def _build_table(implementation: str) -> JVPOps:
    if implementation == "reference":
        from . import reference as R

        return JVPOps("reference", R.linear_jvp_ref, R.silu_jvp_ref, R.gelu_tanh_jvp_ref, R.mlp_jvp_ref,
                      R.layernorm_modulate_jvp_ref, R.gated_residual_jvp_ref, R.attention_jvp_ref,
                      **_modern_ops("reference"))
    if implementation == "fused":
        from .activations import gelu_tanh_jvp, silu_jvp
        from .attention import attention_jvp
        from .mlp import linear_jvp, mlp_jvp
        from .norm import layernorm_modulate_jvp
        from .residual import gated_residual_jvp

        return JVPOps("fused", linear_jvp, silu_jvp, gelu_tanh_jvp, mlp_jvp, layernorm_modulate_jvp,
                      gated_residual_jvp, attention_jvp, **_modern_ops("fused"))
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")


def _modern_ops(implementation: str) -> dict[str, Callable]:
    """The RMSNorm / SwiGLU / RoPE / QK-norm + RoPE fields of a table (reference.py re-exports their references)."""
    if implementation == "reference":
        from . import reference_modern as R

        return dict(rmsnorm=R.rmsnorm_jvp_ref, swiglu=R.swiglu_jvp_ref, rope=R.rope_jvp_ref,
                    qk_norm_rope=R.qk_norm_rope_jvp_ref)
    from .qk_norm_rope import qk_norm_rope_jvp
    from .rmsnorm import rmsnorm_jvp
    from .rope import rope_jvp
    from .swiglu import swiglu_jvp

    return dict(rmsnorm=rmsnorm_jvp, swiglu=swiglu_jvp, rope=rope_jvp, qk_norm_rope=qk_norm_rope_jvp)
