"""The JVP backends: one seam, three ways to get (u, du/dt).

| backend    | how                                                                           |
|------------|-------------------------------------------------------------------------------|
| `autograd` | torch.func.jvp over the plain forward, whole batch, SDPA forced to math        |
| `explicit` | every layer's `forward_jvp` with the pure-torch ops of `mfkernels.reference`   |
| `fused`    | the same `forward_jvp` calls routed to the mfkernels Triton / native ops       |

`explicit` and `fused` share all model code: a layer's `forward_jvp(..., ops)` calls `ops.linear`, `ops.attention`, ...
and the backend only decides which implementation `ops` holds.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

BACKENDS = ("autograd", "explicit", "fused")


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


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return backend


@functools.lru_cache(maxsize=None)
def ops_for(backend: str) -> JVPOps:
    """The op table of a `forward_jvp` backend ('explicit' or 'fused')."""
    check_backend(backend)
    if backend == "explicit":
        from mfkernels import reference as R

        return JVPOps("explicit", R.linear_jvp_ref, R.silu_jvp_ref, R.gelu_tanh_jvp_ref, R.mlp_jvp_ref,
                      R.layernorm_modulate_jvp_ref, R.gated_residual_jvp_ref, R.attention_jvp_ref)
    if backend == "fused":
        from mfkernels.activations import gelu_tanh_jvp, silu_jvp
        from mfkernels.attention import attention_jvp
        from mfkernels.mlp import linear_jvp, mlp_jvp
        from mfkernels.norm import layernorm_modulate_jvp
        from mfkernels.residual import gated_residual_jvp

        return JVPOps("fused", linear_jvp, silu_jvp, gelu_tanh_jvp, mlp_jvp, layernorm_modulate_jvp,
                      gated_residual_jvp, attention_jvp)
    raise ValueError("the 'autograd' backend has no op table: it differentiates the plain forward with torch.func.jvp")
