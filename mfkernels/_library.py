"""The one registration path of the Triton ops: a torch.library custom op for tracing, a direct path for eager calls.

Each op is written once, as four functions:

    impl(*args) -> outputs                 the op's body: calls the Triton launcher (fresh outputs, no aliasing)
    fake(*args) -> outputs                 the outputs' shapes, dtypes and strides only (FakeTensor tracing)
    setup_context(ctx, inputs, output)     what the backward needs (ctx.save_for_backward, mark_non_differentiable)
    backward(ctx, *grads) -> grads         one gradient (or None) per input; may call other FusedOps

and `FusedOp` registers them twice, over the same functions:

* `torch.library.custom_op("mfkernels::<name>")` + `register_fake` + `register_autograd`: the op Dynamo records as one
  opaque node (AOT autograd traces `backward` into the backward graph), what `torch.library.opcheck` checks, what
  torch.func transforms see as a leaf, and what `torch.ops.mfkernels.<name>` calls from anywhere;
* an `autograd.Function` built from `impl` + `setup_context` + `backward`: what an eager call goes through. The custom
  op's dispatch (schema parsing, the Python autograd kernel, the fake-tensor machinery's checks) costs host time of
  its own, more than the op's whole Python body at small sizes (bench/results/cpu/HOST.md, "Host microseconds per
  fused op call": eager against via custom op). Eager fused steps are host-bound on a GPU (docs/design.md, 'Host
  overhead and the eager path'), so eager calls skip it.

`FusedOp.__call__` takes the custom op whenever anything traces or transforms the call (torch.compile, AOT autograd
tracing a backward formula, opcheck, fake tensors, torch.func, tensor subclasses) and the Function (or, with nothing to
differentiate, the body) for a plain eager call. Both paths run the same functions, and tests/test_custom_ops.py
checks that they agree bit for bit.

Differentiable tangent outputs: setup_context decides which outputs are non-differentiable. An op whose tangent output
must be differentiable on request takes a `tangent_grad: bool` argument (part of the schema, so a traced graph records
it) and its setup_context leaves the tangent differentiable (saving what the tangent's backward needs) when it is set;
its backward then receives the tangent's gradient too. `mfkernels::attention_jvp_fwd` is such an op
(attention/registration.py); the other ops mark their tangent non-differentiable and take no such argument yet.
"""
from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "mfkernels"


class FusedOp:
    """One fused op: `torch.ops.mfkernels.<name>` for torch.compile / opcheck, a direct path for eager calls.

    name: the op's name in the mfkernels namespace. impl: the body, with type hints (the op's schema is inferred from
    them). fake: the FakeTensor implementation. setup_context / backward: as for `torch.library.register_autograd`;
    without them the op is not differentiable (backward ops). mutates_args: as for `torch.library.custom_op`.
    check: the argument check of the registered op only, run in its body (`torch.ops.mfkernels.<name>` may be called
    from anywhere); the eager path runs none: the public function that calls it checked its inputs already.
    """

    def __init__(self, name: str, impl: Callable, fake: Callable, *, setup_context: Callable | None = None,
                 backward: Callable | None = None, mutates_args: tuple[str, ...] = (),
                 check: Callable | None = None):
        self.name = f"{NAMESPACE}::{name}"
        self.impl = impl
        body = impl if check is None else _checked(impl, check)
        self.custom_op = torch.library.custom_op(self.name, body, mutates_args=mutates_args,
                                                 schema=_schema(impl, mutates_args))
        self.custom_op.register_fake(fake)
        self.function = None
        if backward is not None:
            self.custom_op.register_autograd(backward, setup_context=setup_context)
            self.function = _eager_function(name, impl, setup_context, backward)
        self.op = getattr(getattr(torch.ops, NAMESPACE), name).default

    def __call__(self, *args):
        if not _plain_eager(args):
            return self.op(*args)
        if self.function is not None and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return self.function.apply(*args)
        return self.impl(*args)

    def __repr__(self) -> str:
        return f"FusedOp({self.name})"


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(args) -> bool:
    """True for an ordinary eager call: no torch.compile / Dynamo trace, no tracing or fake-tensor dispatch mode (AOT
    autograd, make_fx, opcheck), no torch.func transform, and every tensor argument a plain tensor or Parameter (not a
    FakeTensor, FunctionalTensor, DTensor or other subclass, which must see the registered op).

    A TorchDispatchMode that only observes (counts or times the aten ops, e.g. bench/bench_host.py's launch counter)
    may set the class attribute `mfkernels_observer = True`: the eager path is then kept under it."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack() and not _only_observers():
        return False
    for a in args:  # a plain loop: measurably cheaper than all() over a generator, on every call
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TYPES:
            return False
    return True


def _only_observers() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return all(getattr(mode, "mfkernels_observer", False) for mode in _get_current_dispatch_mode_stack())


def _schema(impl: Callable, mutates_args: tuple[str, ...]) -> str:
    """The op schema inferred from impl's type hints (as torch.library.custom_op would)."""
    return torch.library.infer_schema(impl, mutates_args=mutates_args)


def _checked(impl: Callable, check: Callable) -> Callable:
    def body(*args):
        check(*args)
        return impl(*args)

    body.__name__, body.__doc__, body.__annotations__ = impl.__name__, impl.__doc__, impl.__annotations__
    return body


def _eager_function(name: str, impl: Callable, setup_context: Callable, backward: Callable):
    """An autograd.Function running impl, setup_context and backward exactly as the custom op's autograd does."""

    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    def function_backward(ctx, *grads):
        return backward(ctx, *grads)

    return type(f"{name}_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(function_backward)})
