"""Op tables: the set of forward+JVP ops a model's `forward_jvp` calls, in two implementations.

- "reference": the pure-torch ops of `mfkernels.reference` (run anywhere; the readable statement of the rules).
- "fused": the Triton / native ops (CUDA, or CPU under TRITON_INTERPRET=1; each falls back to its reference with one
  warning where Triton cannot run).

A model written against `JVPOps` switches implementation by switching tables; nothing else changes.

Checked or not: `ops_table(impl)` holds the public ops, which validate their arguments on every call (what a user's
own module calling them wants). `ops_table(impl, checked=False)` holds their private twins (`_<op>_jvp`,
`_<op>_jvp_ref`), which skip the validation: for a caller whose inputs are already validated and whose layers build
every op argument themselves, as `meanflow`'s networks (JVPNetwork.forward validates z, t, h, y and the tangents once;
its layers then call these). Same results, same errors from torch where a shape cannot work; only the argument
checks that name the wrong argument are skipped (docs/kernels.md, 'Where checks live').
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
    rmsnorm: Callable
    swiglu: Callable
    rope: Callable
    qk_norm_rope: Callable
    checked: bool = True


_TABLES: dict[tuple[str, bool], JVPOps] = {}
_OPS = ("linear", "silu", "gelu_tanh", "mlp", "layernorm_modulate", "gated_residual", "attention", "rmsnorm", "swiglu",
        "rope", "qk_norm_rope")


def ops_table(implementation: str = "fused", *, checked: bool = True) -> JVPOps:
    """The op table of an implementation, built once (a plain dict rather than functools.lru_cache: torch.compile
    traces this call in every model forward, and Dynamo reads a dict lookup as a constant but warns about lru_cache).
    checked=False: the ops skip their argument checks (module docstring)."""
    table = _TABLES.get((implementation, checked))
    if table is None:
        table = _TABLES[(implementation, checked)] = _build_table(implementation, checked)
    return table


def _build_table(implementation: str, checked: bool) -> JVPOps:
    prefix = "" if checked else "_"
    if implementation == "reference":
        from . import reference

        return JVPOps("reference", **{op: getattr(reference, f"{prefix}{op}_jvp_ref") for op in _OPS},
                      checked=checked)
    if implementation == "fused":
        from . import activations, mlp, norm, qk_norm_rope, residual, rmsnorm, rope, swiglu
        from .attention import api as attention

        modules = dict(linear=mlp, silu=activations, gelu_tanh=activations, mlp=mlp, layernorm_modulate=norm,
                       gated_residual=residual, attention=attention, rmsnorm=rmsnorm, swiglu=swiglu, rope=rope,
                       qk_norm_rope=qk_norm_rope)
        return JVPOps("fused", **{op: getattr(modules[op], f"{prefix}{op}_jvp") for op in _OPS}, checked=checked)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
