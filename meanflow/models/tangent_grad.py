"""Exact gradients of a tangent on the `autograd` backend (tangent_grad=True): torch ops whose forward-mode rule is not
differentiable are replaced, or refused, while torch.func.jvp runs.

torch.func.jvp under grad mode records the tangent's own graph, so u_dot can be differentiated (TVM's loss does). That
graph is exact only where every op's forward-mode formula is itself differentiable in its inputs. Measured against
float64 central differences (torch 2.13, CPU; tests/test_objective_tvm.py), it is NOT for the layer norms: their
forward-mode formula reuses the mean and 1/std that the forward kernel saved, which carry no gradient, so the gradient
of the tangent misses their dependence on the input and comes out wrong (off by O(1), not by rounding). This hits
F.layer_norm / torch.layer_norm / torch.native_layer_norm (every DiT block's LayerNormModulate), F.batch_norm in
training mode and F.instance_norm. rms_norm, group_norm, softmax, log_softmax, gelu, silu, normalize and the other
ops the networks here use measured exact.

Within `differentiable_tangent_ops()`:
- F.layer_norm / torch.layer_norm compute the same normalisation from ordinary ops (mean, variance, rsqrt), whose
  derivatives of every order autograd composes correctly;
- batch_norm in training mode, instance_norm and torch.native_layer_norm raise NotImplementedError naming the op (a
  network with them has no exact tangent gradient on this backend; nothing is silently wrong).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_LAYER_NORMS = (F.layer_norm, torch.layer_norm)
_REFUSED = {F.instance_norm: "F.instance_norm", torch.instance_norm: "torch.instance_norm",
            torch.native_layer_norm: "torch.native_layer_norm (use F.layer_norm)"}
_BATCH_NORMS = {F.batch_norm: "F.batch_norm", torch.batch_norm: "torch.batch_norm"}


def composite_layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing `normalized_shape` dims (biased variance, as
    F.layer_norm), from ordinary ops. Computed in fp32 or wider; under autocast the result stays fp32 (as autocast
    runs layer_norm), otherwise it is returned in x's dtype."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    centred = xf - xf.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


def _training(args, kwargs) -> bool:
    """The `training` argument of F.batch_norm / torch.batch_norm (positional index 5 in both)."""
    return bool(kwargs.get("training", args[5] if len(args) > 5 else False))


class _DifferentiableTangentOps(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LAYER_NORMS:
            x, shape = args[0], args[1]
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            bias = args[3] if len(args) > 3 else kwargs.get("bias")
            eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
            return composite_layer_norm(x, shape, weight, bias, eps)
        name = _REFUSED.get(func) or (_BATCH_NORMS.get(func) if func in _BATCH_NORMS and _training(args, kwargs)
                                      else None)
        if name is not None:
            raise NotImplementedError(f"{name} has no exact tangent gradient on the autograd backend (its "
                                      f"forward-mode rule treats the normalisation statistics as constants); "
                                      f"tangent_grad=True cannot be used with it")
        return func(*args, **kwargs)


@contextlib.contextmanager
def differentiable_tangent_ops():
    """Ops with exact gradients of their tangent while torch.func.jvp runs (module docstring)."""
    with _DifferentiableTangentOps():
        yield


__all__ = ["composite_layer_norm", "differentiable_tangent_ops"]
