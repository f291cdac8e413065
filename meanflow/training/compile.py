"""torch.compile for training (train.compile): the whole model in one process and under DDP, each block under FSDP2.

    compile_model(net, mode="default")                             # net.forward compiled in place (fullgraph)
    model = DDP(compile_model(net))                                # DDP: around the compiled network
    compile_blocks(net, units); shard_model(net, mesh)             # FSDP2: per block, then fully_shard (torchtitan)

Everything is compiled in place (instance attributes `forward` / `forward_jvp`), so the modules, their parameter names
and checkpoints stay those of the eager network, and the wrappers (DDP, FSDP2) sit outside the compiled code.

The fused ops are torch.library custom ops (mfkernels._library), so Dynamo puts each one in the graph whole and the
model call compiles with fullgraph=True; fullgraph stays on so that a graph break (which would silently leave parts
of the step eager) is an error instead.

- Whole model: compiles `forward` (the plain call and the tangent call are two graphs of one frame). Under DDP the
  frame is compiled inside DDP's forward, so Dynamo's DDPOptimizer splits the graph at the gradient buckets and the
  all-reduce can still overlap the backward. (torch.compile(DDP(net)) would not take fullgraph=True: Dynamo breaks the
  graph at DDP's own forward on purpose.)
- Per block (FSDP2): each block's `forward` and `forward_jvp` are compiled in place (instance attributes), before
  fully_shard: FSDP2's all-gather / reshard hooks then run eagerly around the compiled block, as in torchtitan. The
  blocks share one compiled graph per method (same code, parameters as graph inputs).
- The guidance call's batch changes every step; its inputs are marked dynamic (objectives/guidance.py), so it compiles
  once, not every step.

Modes (train.compile_mode, the `mode` of torch.compile; only on CUDA do they differ):
    default                       Inductor's kernels, no CUDA graphs
    max-autotune-no-cudagraphs    autotuned GEMM / Triton templates (long first compile), no CUDA graphs
    reduce-overhead               Inductor's CUDA graphs (one process or DDP; refused under FSDP2, whose hooks
                                  gather and free the weights outside the graphs)
    max-autotune                  both
train.compile_backend picks the torch.compile backend: inductor (default), aot_eager or eager (debugging, and the CPU
tests, where inductor compiles C++ for every graph).
"""
from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def check_compile_options(mode: str, backend: str, parallel: str) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode must be one of {COMPILE_MODES}; got {mode!r}")
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"train.compile_backend must be one of {COMPILE_BACKENDS}; got {backend!r}")
    if parallel == "fsdp" and mode in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"train.compile_mode={mode} records CUDA graphs, which do not work with train.parallel=fsdp "
                         f"(FSDP2 gathers and frees each block's weights from Python hooks around the compiled "
                         f"blocks). Use compile_mode=default or max-autotune-no-cudagraphs under FSDP, or DDP")


def _options(mode: str, backend: str) -> dict:
    kwargs: dict = {"fullgraph": True, "backend": backend}
    if backend == "inductor":
        kwargs["mode"] = mode
    return kwargs


def compile_model(net: nn.Module, *, mode: str = "default", backend: str = "inductor") -> nn.Module:
    """The whole network: `net.forward` compiled in place (fullgraph=True). Wrap DDP around it afterwards. Returns net."""
    _check_compilable(net)
    net.forward = torch.compile(net.forward, **_options(mode, backend))
    return net


def is_compiled(module: nn.Module, method: str = "forward") -> bool:
    """True when module.<method> was compiled in place by compile_model / compile_blocks (possibly wrapped since by
    FSDP2's forward-method hook, which keeps the compiled callable as __wrapped__)."""
    fn = module.__dict__.get(method)
    while fn is not None:
        if hasattr(fn, "_torchdynamo_orig_callable"):
            return True
        fn = getattr(fn, "__wrapped__", None) or getattr(getattr(fn, "__func__", None), "__wrapped__", None)
    return False


def compile_blocks(net: nn.Module, units: list[nn.Module], *, mode: str = "default",
                   backend: str = "inductor") -> nn.Module:
    """Compile each unit's forward (and forward_jvp) in place; the network around them stays eager. Call before
    fully_shard. Returns net.

    The plain `forward` serves the guidance call, whose row count changes every step: its tensor arguments are marked
    dynamic in dim 0 on every call (the network's own inputs are marked by the loss, but the blocks see activations
    computed eagerly around them), so it compiles once for any batch (sizes 0 and 1 are specialised by Dynamo)."""
    _check_compilable(net)
    options = _options(mode, backend)
    for unit in units:
        unit.forward = _dynamic_batch(torch.compile(unit.forward, **options))
        if hasattr(unit, "forward_jvp"):
            unit.forward_jvp = torch.compile(unit.forward_jvp, **options)
    return net


def _check_compilable(net: nn.Module) -> None:
    """A network that cannot be compiled exactly says why in `compile_refusal` (e.g. a wrapped module, whose tangent
    call is torch.func.jvp: meanflow.models.wrapped)."""
    refusal = getattr(net, "compile_refusal", None)
    if refusal:
        raise ValueError(f"train.compile: {refusal}")


def _dynamic_batch(compiled):
    def call(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim():
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(*args, **kwargs)

    call.__wrapped__ = compiled
    return call


__all__ = ["COMPILE_MODES", "COMPILE_BACKENDS", "check_compile_options", "compile_model", "compile_blocks",
           "is_compiled"]
