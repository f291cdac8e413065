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

Gradients through the tangent: every op takes `tangent_grad: bool | None` (mfkernels.reference, module docstring).
`ops_table(impl, tangent_grad=...)` fixes it for every op of the table, so that a network asks for (or rules out)
differentiable tangents without changing any layer's code:

- None (default): each op decides per call: y_dot is differentiable exactly when grad mode is on and a tangent input
  requires grad (a tangent that carries a graph is never cut silently);
- True: every op's y_dot is differentiable in its primal inputs, tangents and weights (TVM's loss differentiates u_dot;
  the first layer's tangent x_dot W^T must carry W's gradient even though x_dot itself needs none);
- False: every y_dot is detached (MeanFlow's stop-gradient target): the ops save nothing of the tangents.

`JVPOps.tangent_grad` says which; model code that computes a tangent by itself (outside the ops) reads it to decide
whether to record that computation (`JVPOps.tangent_grad_enabled`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

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
    tangent_grad: bool | None = None

    def tangent_grad_enabled(self, *tangents: torch.Tensor | None) -> bool:
        """Whether a tangent computed next to these ops (model code of its own, as a time embedding's) should be
        recorded by autograd: the table's tangent_grad rule applied to that computation's tangent inputs."""
        from ._runtime import tangent_grad_on

        return tangent_grad_on(self.tangent_grad, *tangents)


_TABLES: dict[tuple[str, bool, bool | None], JVPOps] = {}
_OPS = ("linear", "silu", "gelu_tanh", "mlp", "layernorm_modulate", "gated_residual", "attention", "rmsnorm", "swiglu",
        "rope", "qk_norm_rope")


def ops_table(implementation: str = "fused", *, checked: bool = True, tangent_grad: bool | None = None) -> JVPOps:
    """The op table of an implementation, built once (a plain dict rather than functools.lru_cache: torch.compile
    traces this call in every model forward, and Dynamo reads a dict lookup as a constant but warns about lru_cache).
    checked=False: the ops skip their argument checks; tangent_grad: None / True / False for every op (module
    docstring)."""
    table = _TABLES.get((implementation, checked, tangent_grad))
    if table is None:
        if tangent_grad not in (None, True, False):
            raise TypeError(f"tangent_grad must be None or a bool; got {tangent_grad!r}")
        table = _TABLES[(implementation, checked, tangent_grad)] = _build_table(implementation, checked, tangent_grad)
    return table


def _build_table(implementation: str, checked: bool, tangent_grad: bool | None) -> JVPOps:
    prefix = "" if checked else "_"
    if implementation == "reference":
        from . import reference

        ops = {op: getattr(reference, f"{prefix}{op}_jvp_ref") for op in _OPS}
    elif implementation == "fused":
        from . import activations, mlp, norm, qk_norm_rope, residual, rmsnorm, rope, swiglu
        from .attention import api as attention

        modules = dict(linear=mlp, silu=activations, gelu_tanh=activations, mlp=mlp, layernorm_modulate=norm,
                       gated_residual=residual, attention=attention, rmsnorm=rmsnorm, swiglu=swiglu, rope=rope,
                       qk_norm_rope=qk_norm_rope)
        ops = {op: getattr(modules[op], f"{prefix}{op}_jvp") for op in _OPS}
    else:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
    if tangent_grad is not None:  # every op called with the table's choice (the default table calls them bare)
        ops = {op: functools.partial(fn, tangent_grad=tangent_grad) for op, fn in ops.items()}
    return JVPOps(implementation, **ops, checked=checked, tangent_grad=tangent_grad)
