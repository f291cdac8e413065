"""Route torch's SDPA to the fused forward + JVP attention wherever it is called with a tangent.

    with mfkernels.jvp_attention():                       # or @mfkernels.jvp_attention() on a function
        u, u_dot = torch.func.jvp(model, (z,), (z_dot,))  # every F.scaled_dot_product_attention inside: fused

torch's `F.scaled_dot_product_attention` has no forward-mode derivative for its fused CPU / CUDA kernels, so
`torch.func.jvp` over a model written with it (every diffusers transformer, most DiT / SiT code) fails, or needs the
math backend (slow, O(N^2) memory). Inside `jvp_attention()` each call is routed by what it carries:

- a tangent (an input is a dual tensor of `torch.autograd.forward_ad`, or a `torch.func.jvp` input that carries one
  at the innermost transform level): `mfkernels.scaled_dot_product_attention` (one fused pass gives o and o_dot);
- no tangent (ordinary calls, sampling, a `torch.no_grad` forward, tensors that do not depend on the jvp inputs):
  torch's own function, untouched;
- a tangent with an argument the fused op refuses (dropout_p > 0, a non-positive scale, a head dim above 256, inputs
  that are not 4-D, a float attn_mask that requires grad or carries a tangent, ...): torch's math attention
  (`aten._scaled_dot_product_attention_math`, the kernel `sdpa_kernel(SDPBackend.MATH)` selects, which has forward
  AD), with one warning per process naming the argument. Never a silent wrong tangent;
- a tangent seen through another functorch transform nested inside the jvp (vmap, grad): the math attention as well
  (the fused op has no batching rule), with one warning.

How: one process-wide replacement of `torch.nn.functional.scaled_dot_product_attention`, installed by the first
active context and removed (the original function object put back) when the last one exits, even on an exception.
Which threads route is a thread-local stack of contexts, so a thread outside any context keeps torch's behaviour
while another thread is inside one. Contexts nest. Code that bound the function before the context (`from
torch.nn.functional import scaled_dot_product_attention` at import time) is not routed: diffusers, timm and most model
code look it up at call time. torch.compile: Dynamo cannot trace the routing inside a functorch transform and runs
the transform eagerly (bench/results/cpu/wrapped.md); the fused op's own tangent path is an eager island as well.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

_ORIGINAL = F.scaled_dot_product_attention   # torch's function, as it was when mfkernels was imported
_install_lock = threading.Lock()
_installs = 0                                  # active contexts, all threads together
_thread = threading.local()                    # .modes: the attention of each active context of this thread
ATTENTIONS = ("fused", "math")
_WARNED: set[str] = set()


# =============================================================================================== routing
def _has_tangent(x) -> bool:
    """A forward-mode tangent on x at the current level (forward_ad dual, or a torch.func.jvp-wrapped tensor)."""
    return isinstance(x, torch.Tensor) and fwAD.unpack_dual(x).tangent is not None


def _forward_mode_state() -> str:
    """'off' (no forward mode at all), 'jvp' (forward_ad, or torch.func.jvp innermost) or 'nested' (a jvp with vmap /
    grad inside it: tangents cannot be read at this level)."""
    if torch._C._are_functorch_transforms_active():
        from torch._C._functorch import TransformType, get_interpreter_stack, peek_interpreter_stack

        if not any(i.key() == TransformType.Jvp for i in get_interpreter_stack()):
            return "jvp" if fwAD._current_level >= 0 else "off"   # vmap / grad alone: no tangent in sight
        return "jvp" if peek_interpreter_stack().key() == TransformType.Jvp else "nested"
    return "jvp" if fwAD._current_level >= 0 else "off"


def _refusal(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple[str, str] | None:
    """(argument, why) when mfkernels.scaled_dot_product_attention would refuse this call, else None. The fused op's
    own argument checks, run without computing anything."""
    from . import _checks as C

    try:
        C.check_dropout(dropout_p)
    except NotImplementedError:
        return "dropout_p", f"dropout_p={dropout_p!r}: the fused attention has no dropout"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (query, key, value)]
        return "query/key/value", f"inputs of shapes {shapes}: the fused attention takes 4-D (B, H, N, D)"
    # the checks mfkernels.scaled_dot_product_attention runs (mfkernels/_checks.py), in its order
    checks = (
        ("is_causal", lambda: C.check_bool("is_causal", is_causal)),
        ("enable_gqa", lambda: C.check_bool("enable_gqa", enable_gqa)),
        ("query/key/value/attn_mask", lambda: C.check_attention_args(
            query, key, value, query[:0], key[:0], value[:0], attn_mask, causal=bool(is_causal),
            enable_gqa=bool(enable_gqa))),
        ("head dim", lambda: C.check_attention_kernel_args(query, key, value, None)),
        ("scale", lambda: C.check_attention_kernel_args(query, key, value, scale)),
        ("attn_mask", lambda: C.check_mask_grad(attn_mask)),
        ("attn_mask", lambda: C.check_mask_is_constant(attn_mask)),
    )
    for argument, check in checks:
        try:
            check()
        except (TypeError, ValueError, NotImplementedError) as err:
            return argument, str(err)
    return None


def _warn_once(argument: str, why: str) -> None:
    if argument in _WARNED:
        return
    _WARNED.add(argument)
    warnings.warn(f"mfkernels.jvp_attention: {argument} cannot go to the fused attention ({why}); this call and "
                  f"others like it run torch's math attention (exact, slower, O(N^2) memory)", RuntimeWarning,
                  stacklevel=4)


def math_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch's math attention (what sdpa_kernel(SDPBackend.MATH) runs), called directly: composite ops with forward
    AD everywhere, and no process-wide backend flag flipped (other threads keep their SDPA backends)."""
    return torch.ops.aten._scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p, is_causal,
                                                             scale=scale, enable_gqa=enable_gqa)[0]


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What F.scaled_dot_product_attention is while a jvp_attention context is active in some thread."""
    modes = getattr(_thread, "modes", None)
    if not modes:
        return _ORIGINAL(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
    state = _forward_mode_state()
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if state == "nested":
        _warn_once("functorch transform", "a vmap / grad transform runs inside torch.func.jvp here, and the fused op "
                                          "has no batching rule")
        return math_sdpa(*args)
    if state == "off" or not any(_has_tangent(x) for x in (query, key, value, attn_mask)):
        return _ORIGINAL(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
    if modes[-1] == "math":
        return math_sdpa(*args)
    refused = _refusal(*args)
    if refused is not None:
        _warn_once(*refused)
        return math_sdpa(*args)
    from .attention import scaled_dot_product_attention

    return scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


# ============================================================================================ the context
def _install() -> None:
    global _installs
    with _install_lock:
        if _installs == 0:
            if F.scaled_dot_product_attention is not _ORIGINAL:
                raise RuntimeError("mfkernels.jvp_attention: torch.nn.functional.scaled_dot_product_attention was "
                                   "replaced by someone else; refusing to stack a second replacement on it")
            F.scaled_dot_product_attention = _routed_sdpa
        _installs += 1


def _uninstall() -> None:
    global _installs
    with _install_lock:
        _installs -= 1
        if _installs == 0 and F.scaled_dot_product_attention is _routed_sdpa:
            F.scaled_dot_product_attention = _ORIGINAL


class jvp_attention(contextlib.ContextDecorator):
    """Context manager and decorator: inside it, SDPA calls that carry a tangent run the fused forward + JVP
    attention (module docstring). Re-entrant, nestable, thread-safe; torch's function is restored on exit.

    attention="math" sends the calls that carry a tangent to torch's math attention instead (a reference, and what
    peers get with fused attention switched off); the innermost context decides."""

    def __init__(self, attention: str = "fused"):
        if attention not in ATTENTIONS:
            raise ValueError(f"jvp_attention(attention=...) must be one of {ATTENTIONS}; got {attention!r}")
        self.attention = attention

    def __enter__(self) -> "jvp_attention":
        _install()
        if not hasattr(_thread, "modes"):
            _thread.modes = []
        _thread.modes.append(self.attention)
        return self

    def __exit__(self, *exc) -> bool:
        _thread.modes.pop()
        _uninstall()
        return False


def is_active() -> bool:
    """Whether the calling thread is inside a jvp_attention context."""
    return bool(getattr(_thread, "modes", None))


__all__ = ["jvp_attention", "math_sdpa", "is_active"]
