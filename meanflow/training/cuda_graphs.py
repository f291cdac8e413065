"""CUDA graphs for the training call of a network: one replay instead of hundreds of kernel launches from Python.

At DiT-B size and a per-GPU batch of 64 the fused MeanFlow step is bound by the host, not the GPU: each block issues
its kernels through Python (argument checks, autograd, Triton's launcher; launches per block in
bench/results/cpu/HOST.md), and the GPU finishes them faster than Python issues them (host and device time of a
DiT-B/2 forward + JVP: bench/results/h200-2026-11-26-b/forward.json; eager and graphed steps:
bench/results/h100-2026-11-26/step.json; docs/design.md, 'Host overhead and the eager path'). A CUDA graph records the
forward and the backward of that call once and then replays them with a single launch each.

    graphed = CUDAGraphModel(model)                  # model: a JVPNetwork on CUDA, not DDP / FSDP wrapped
    ddp = graphed_ddp(model, device_ids=[i])          # several processes: DDP(CUDAGraphModel(model))
    loss, stats = MeanFlowLoss(...)(graphed, x, y)   # the main call (with grad) is captured on first use

What is graphed: calls made with grad enabled on CUDA tensors (the MeanFlow main call with its tangents, or a
flow-matching forward), one graph pair (forward, backward) per distinct (shapes, dtypes, backend, autocast, training)
key, captured on first use after `warmup` eager runs (which also run Triton's autotuning). Everything else (no-grad
calls such as the guidance forward, whose row count changes every step; CPU tensors) runs eagerly through the model.

Rules, checked where they can be:
- A call's backward must run before the next call of the same graph (the graph's activations are static buffers):
  a second call first makes the backward of the earlier one raise, never silently use the wrong activations.
- Parameters are read in place at replay, so optimizer steps and `load_state_dict` (in-place copies) are seen;
  replacing parameter tensors (`module.to(...)`, `assign=True`) is detected and the graphs are captured again.
- The call must be free of host synchronisation: the network's value checks are done here, outside the graph.
- DDP: wrap the graphed network, DDP(CUDAGraphModel(net)), built by `graphed_ddp(net, ...)` (which constructs DDP
  on the capture stream: see `capture_stream`). The replay hands the parameter gradients to autograd, so
  their accumulation (and DDP's all-reduce hooks on it) runs eagerly after the replayed backward; the all-reduce then
  starts when the whole backward is done instead of overlapping it bucket by bucket. The other way round, or FSDP
  (which gathers and frees weights from hooks inside the forward), is refused: a replay would skip those hooks.
Outputs are returned as fresh tensors (copies of the graph's outputs); parameter gradients are copies too, so they
accumulate correctly over micro-batches.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ..models.backends import check_tangent_grad
from ..models.validate import check_conditions, check_network_inputs

__all__ = ["CUDAGraphModel", "capture_stream", "graphed_ddp"]


# Only this thread's calls are checked while capturing: a process-group's background threads (the NCCL watchdog
# querying events, gloo's workers) may touch CUDA at any time, and under the default "global" mode that would abort
# the capture although it records nothing of theirs.
_CAPTURE_MODE = "thread_local"


_capture_streams: dict[int, torch.cuda.Stream] = {}


def capture_stream(device: torch.device | str | int | None = None) -> torch.cuda.Stream:
    """The side stream (one per device and process) on which CUDAGraphModel warms up and captures.

    One stream, not a fresh one per capture, because autograd remembers the stream on which each parameter's
    gradient-accumulator node was made: DDP keeps those nodes alive from its construction on, and a backward captured
    on another stream would then have to synchronise with that one, which a capture forbids. `graphed_ddp` builds
    DDP on this stream for that reason."""
    index = torch.device("cuda" if device is None else device).index
    if index is None:
        index = torch.cuda.current_device()
    if index not in _capture_streams:
        _capture_streams[index] = torch.cuda.Stream(device=index)
    return _capture_streams[index]


def graphed_ddp(net: nn.Module, **ddp_kwargs) -> nn.Module:
    """DistributedDataParallel(CUDAGraphModel(net), **ddp_kwargs), built so that the training call can be captured.

    DDP is constructed on `capture_stream()` (see there). The replay hands the parameter gradients to autograd, so
    DDP's all-reduce hooks fire as usual, once the replayed backward is done. `net` may already be a CUDAGraphModel."""
    from torch.nn.parallel import DistributedDataParallel

    graphed = net if isinstance(net, CUDAGraphModel) else CUDAGraphModel(net)
    device = next(graphed.parameters()).device
    if device.type != "cuda":  # nothing is captured off CUDA: the wrapper passes calls through
        return DistributedDataParallel(graphed, **ddp_kwargs)
    stream = capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        ddp = DistributedDataParallel(graphed, **ddp_kwargs)
    torch.cuda.current_stream(device).wait_stream(stream)
    return ddp


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class _Capture:
    """One captured call: static inputs, forward graph and outputs, backward graph and parameter gradients."""

    def __init__(self, call, inputs: tuple[torch.Tensor, ...], params: list[nn.Parameter], warmup: int):
        self.params = params
        self.inputs = tuple(a.detach().clone() for a in inputs)  # the graph reads its inputs from here
        self.generation = 0
        enabled, dtype = _autocast_state()
        # make_graphed_callables' rule: autocast's weight-cast cache must be off while capturing (a cached cast made
        # inside the graph's pool would be reused outside it). Replays do not look at autocast at all.
        autocast = torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)
        side = capture_stream(self.inputs[0].device)  # warm-up and capture on one stream (see capture_stream)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:  # eager warm-up: compiles and autotunes every kernel
            for _ in range(max(1, warmup)):
                outs = call(*self.inputs)
                self._grads(outs, [torch.ones_like(o) for o in outs if o.requires_grad])
        torch.cuda.current_stream().wait_stream(side)
        del outs
        torch.cuda.synchronize()

        self.pool = torch.cuda.graph_pool_handle()
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, pool=self.pool, stream=side,
                              capture_error_mode=_CAPTURE_MODE), autocast:
            outs = call(*self.inputs)
        self.outputs = tuple(outs)
        self.differentiable = tuple(o.requires_grad for o in self.outputs)
        self.grad_outputs = tuple(torch.zeros_like(o) for o in self.outputs)
        self.backward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backward_graph, pool=self.pool, stream=side, capture_error_mode=_CAPTURE_MODE):
            self.param_grads = self._grads(self.outputs, [g for g, d in zip(self.grad_outputs, self.differentiable)
                                                          if d])

    def _grads(self, outs, grad_outputs):
        diff = [o for o in outs if o.requires_grad]
        if not diff:
            return [None] * len(self.params)
        return list(torch.autograd.grad(diff, self.params, grad_outputs=grad_outputs, allow_unused=True))


class _Replay(torch.autograd.Function):
    """Forward: copy the inputs in, replay the forward graph. Backward: copy the output gradients in, replay the
    backward graph, hand out copies of the parameter gradients."""

    @staticmethod
    def forward(ctx, capture: _Capture, *args):
        n = len(capture.inputs)
        for static, arg in zip(capture.inputs, args[:n]):
            static.copy_(arg)
        capture.forward_graph.replay()
        capture.generation += 1
        ctx.capture, ctx.generation = capture, capture.generation
        outs = tuple(o.clone() for o in capture.outputs)
        ctx.mark_non_differentiable(*[o for o, d in zip(outs, capture.differentiable) if not d])
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        capture = ctx.capture
        if ctx.generation != capture.generation:
            raise RuntimeError("CUDAGraphModel: this call's backward ran after a later call of the same graph, whose "
                               "replay overwrote the activations it needs. Run each call's backward before the next "
                               "call (or use the model without CUDAGraphModel for this pattern).")
        for static, grad, diff in zip(capture.grad_outputs, grads, capture.differentiable):
            if diff:
                static.zero_() if grad is None else static.copy_(grad)
        capture.backward_graph.replay()
        n = len(capture.inputs)
        param_grads = tuple(g.clone() if g is not None else None for g in capture.param_grads)
        return (None,) + (None,) * n + param_grads


class _Call(nn.Module):
    """The network call with positional tensors only (what a graph can take as static inputs): z, t, h, then y,
    then the conditions in the network's order, then the three tangents."""

    def __init__(self, net: nn.Module, backend: str, has_y: bool, has_tangents: bool, head: str | None):
        super().__init__()
        self.net, self.backend, self.has_y, self.has_tangents, self.head = net, backend, has_y, has_tangents, head
        self.condition_names = tuple(getattr(net, "conditions", ()))

    def forward(self, z, t, h, *rest):
        rest = list(rest)
        y = rest.pop(0) if self.has_y else None
        conditions = {name: rest.pop(0) for name in self.condition_names}
        tangents = tuple(rest) if self.has_tangents else None
        kwargs = {"head": self.head} if self.head is not None else {}
        out = self.net(z, t, h, y, tangents=tangents, backend=self.backend, **kwargs, **conditions)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class CUDAGraphModel(nn.Module):
    """Wraps a JVPNetwork so that its training calls (grad enabled, CUDA) replay from CUDA graphs (module docstring).

    Same call as the network: `model(z, t, h, y, tangents=..., backend=...)`. `module` is the network (so
    `meanflow.unwrap` and the loss find it); the wrapper has no state of its own in `state_dict`.
    `warmup`: eager runs before a capture. `max_graphs`: captured keys kept (least recently used dropped first).
    """

    def __init__(self, module: nn.Module, *, warmup: int = 3, max_graphs: int = 4):
        super().__init__()
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(module, DistributedDataParallel) or type(module).__name__.startswith("FSDP"):
            raise ValueError(f"CUDAGraphModel wraps a plain network; got {type(module).__name__} (DDP / FSDP run "
                             f"Python hooks during forward and backward, which a graph replay would skip). With DDP, "
                             f"wrap the other way round: meanflow.graphed_ddp(net, ...); FSDP cannot be graphed")
        if not hasattr(module, "_forward_jvp"):
            raise TypeError(f"CUDAGraphModel wraps a meanflow JVPNetwork (DiT, MLPNet); got {type(module).__name__}")
        self.module = module
        self.warmup, self.max_graphs = warmup, max_graphs
        self._captures: OrderedDict = OrderedDict()
        self.captures_made = 0  # how many graphs were captured (a test / log hook)

    def state_dict(self, *args, **kwargs):  # the network's own keys, no "module." prefix
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._captures.clear()
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, z, t, h, y=None, tangents=None, backend: str | None = None, *, head: str | None = None,
                tangent_grad: bool = False, **conditions):
        params = [p for p in self.module.parameters() if p.requires_grad]
        kwargs = {"head": head} if head is not None else {}
        if tangent_grad:
            kwargs["tangent_grad"] = True
        if not (z.is_cuda and torch.is_grad_enabled() and params):
            return self.module(z, t, h, y, tangents=tangents, backend=backend, **kwargs, **conditions)
        backend = backend or self.module.backend
        check_tangent_grad(backend, tangent_grad, tangents is not None)
        if tangent_grad:
            # The backward graph recorded here differentiates the outputs it saw at capture; a differentiable
            # tangent (TVM) has not been recorded and checked against eager training yet: refused, not guessed.
            raise NotImplementedError("CUDAGraphModel does not record calls with tangent_grad=True yet (a "
                                      "differentiable u_dot, e.g. TVM); train with train.cuda_graphs=false")
        check_network_inputs(self.module, z, t, h, y, tangents, check_values=self.module.check_inputs)
        check_conditions(self.module, conditions, z.shape[0], z.device)
        names = tuple(getattr(self.module, "conditions", ()))
        args = ((z, t, h) + ((y,) if y is not None else ()) + tuple(conditions[n] for n in names)
                + (tuple(tangents) if tangents is not None else ()))
        key = (backend, y is not None, tangents is not None, head, self.module.training, _autocast_state(),
               tuple((a.shape, a.dtype, a.device) for a in args), tuple(p.data_ptr() for p in params))
        capture = self._captures.get(key)
        if capture is None:
            capture = self._capture(key, args, params, backend, y is not None, tangents is not None, head)
        else:
            self._captures.move_to_end(key)
        outs = _Replay.apply(capture, *args, *params)
        return outs if len(outs) > 1 else outs[0]

    def _capture(self, key, args, params, backend: str, has_y: bool, has_tangents: bool,
                 head: str | None) -> _Capture:
        live_params = {id(p) for p in params}
        for old in list(self._captures):  # parameters were replaced: graphs reading the old ones are stale
            if any(id(p) not in live_params for p in self._captures[old].params):
                del self._captures[old]
        while len(self._captures) >= self.max_graphs:
            self._captures.popitem(last=False)
        call = _Call(self.module, backend, has_y, has_tangents, head)
        checks = self.module.check_inputs
        self.module.check_inputs = False  # value checks sync with the host: not allowed while capturing
        try:
            capture = _Capture(call, args, params, self.warmup)
        except RuntimeError as exc:
            raise RuntimeError(f"CUDAGraphModel: recording the {backend!r} training call in a CUDA graph failed: "
                               f"{str(exc).splitlines()[0]}. Something in the call cannot be captured (a host "
                               f"synchronisation such as .item() or a data-dependent shape, or a kernel compiled for "
                               f"the first time; under DDP, a DDP not built by meanflow.graphed_ddp); run it without "
                               f"CUDAGraphModel (train.cuda_graphs=false). The CUDA "
                               f"context of this process may be unusable after a failed capture.") from exc
        finally:
            self.module.check_inputs = checks
        self._captures[key] = capture
        self.captures_made += 1
        return capture
