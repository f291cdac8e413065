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

from mfkernels.ops import JVPOps, ops_table

BACKENDS = ("autograd", "explicit", "fused")
_TABLES = {"explicit": "reference", "fused": "fused"}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return backend


def ops_for(backend: str, *, checked: bool = True) -> JVPOps:
    """The op table of a `forward_jvp` backend: 'explicit' = mfkernels.reference, 'fused' = the mfkernels kernels.
    checked=False: ops that skip their argument checks (mfkernels.ops), for a network that validated its inputs."""
    check_backend(backend)
    if backend == "autograd":
        raise ValueError("the 'autograd' backend has no op table: it differentiates the plain forward with "
                         "torch.func.jvp")
    return ops_table(_TABLES[backend], checked=checked)


__all__ = ["BACKENDS", "JVPOps", "check_backend", "ops_for"]
