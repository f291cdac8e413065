"""The JVP backends: one seam, three ways to get (u, du/dt).

| backend    | how                                                                           |
|------------|-------------------------------------------------------------------------------|
| `autograd` | torch.func.jvp over the plain forward, whole batch, SDPA forced to math        |
| `explicit` | every layer's `forward_jvp` with the pure-torch ops of `mfkernels.reference`   |
| `fused`    | the same `forward_jvp` calls routed to the mfkernels Triton / native ops       |

`explicit` and `fused` share all model code: a layer's `forward_jvp(..., ops)` calls `ops.linear`, `ops.attention`, ...
and the backend only decides which implementation `ops` holds.

A differentiable tangent (`tangent_grad=True`: gradients flow from u_dot to the parameters, as TVM's loss needs) comes
from every backend: `autograd` records torch.func.jvp's tangent graph (meanflow/models/tangent_grad.py makes its layer
norms exact); `explicit` and `fused` hand the network the op table whose ops all take tangent_grad=True
(`ops_for(backend, tangent_grad=True)`: mfkernels.ops, 'Gradients through the tangent'), and the stop-gradient table
(tangent_grad=False) otherwise. `check_tangent_grad` is the one place that refuses what cannot be exact.
"""
from __future__ import annotations

from mfkernels.ops import JVPOps, ops_table

BACKENDS = ("autograd", "explicit", "fused")
_TABLES = {"explicit": "reference", "fused": "fused"}
# Backends whose u_dot can carry gradient: all of them (autograd: torch.func.jvp under grad mode; explicit / fused: the
# op tables with tangent_grad=True). check_tangent_grad refuses any other.
TANGENT_GRAD_BACKENDS = BACKENDS


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return backend


def check_tangent_grad(backend: str, tangent_grad: bool, has_tangents: bool) -> None:
    """Refuse tangent_grad=True where u_dot cannot carry gradient: without tangents, or on a backend whose ops return
    a detached tangent (the one refusal: JVPNetwork.forward and CUDAGraphModel both ask here)."""
    if not tangent_grad:
        return
    if not has_tangents:
        raise ValueError("tangent_grad=True makes u_dot differentiable; it needs a call with tangents=(z_dot, t_dot, "
                         "h_dot)")
    if backend not in TANGENT_GRAD_BACKENDS:
        raise NotImplementedError(f"tangent_grad=True is not supported on the {backend!r} backend: its ops return "
                                  f"a detached tangent. Use one of {TANGENT_GRAD_BACKENDS}")


def ops_for(backend: str, *, checked: bool = True, tangent_grad: bool | None = None) -> JVPOps:
    """The op table of a `forward_jvp` backend: 'explicit' = mfkernels.reference, 'fused' = the mfkernels kernels.
    checked=False: ops that skip their argument checks (mfkernels.ops), for a network that validated its inputs.
    tangent_grad: True / False for every op of the table (a differentiable / a detached tangent), None: each op's own
    rule (mfkernels.ops)."""
    check_backend(backend)
    if backend == "autograd":
        raise ValueError("the 'autograd' backend has no op table: it differentiates the plain forward with "
                         "torch.func.jvp")
    return ops_table(_TABLES[backend], checked=checked, tangent_grad=tangent_grad)


__all__ = ["BACKENDS", "TANGENT_GRAD_BACKENDS", "JVPOps", "check_backend", "check_tangent_grad", "ops_for"]
