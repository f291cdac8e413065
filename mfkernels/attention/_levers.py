"""Opt-in Hopper levers of the forward + JVP kernel: A/B switches, all OFF by default until a GPU measurement says
otherwise (bench/bench_attention.py times each one on and off, row by row; docs/design.md, 'Kernel shapes').

    MFKERNELS_ATTN_TMA=1          K, V, K_dot, V_dot tiles through tensor descriptors (tl.make_tensor_descriptor: TMA
                                  loads on sm_90, bounds handled by the copy engine) instead of pointer tiles
    MFKERNELS_ATTN_PERSISTENT=1   persistent programs: one per SM, each looping over (row tile, batch * head) tiles
    MFKERNELS_ATTN_PAD_D=1        (not a Hopper lever: _pieces.py) pad head dims to a power of two, the pre-split tiles

Warp specialisation (tl.range(..., warp_specialize=True)) is not a lever here: in Triton 3.6.0 it does
nothing on sm_90 at 8 warps (the warps of every bf16 attention config): the PTX is byte-identical with and without it
(the automatic partitioning pass, tritongpu-warp-specialize, runs only for compute capability >= 10:
backends/nvidia/compiler.py, make_ttgir); at 4 warps the Hopper pass (nvgpu-warp-specialization) fails to compile a
probe loop of dots. tests/test_attention_sm90_compile.py::test_warp_specialize_is_a_no_op_on_sm90 keeps checking the
8-warp case, so a Triton that starts to specialise on sm_90 is noticed.

The variables are read at each launch (host side, no device sync), so a benchmark can flip them between calls; each
lever is a constexpr of the kernel and part of its autotune key (a lever gets its own compiled variant and tuning).

Where a lever cannot apply it is not used, silently equal in result: tensor descriptors need what the hardware needs
(the head dim contiguous, 16-byte aligned base addresses and row strides: tma_applies), which a view of a packed
projection may not satisfy; the pointer path then runs.
"""
from __future__ import annotations

import os

import torch

from .._runtime import interpreter_active, sm_count

ENV = {"tma": "MFKERNELS_ATTN_TMA", "persistent": "MFKERNELS_ATTN_PERSISTENT"}
INTERPRETER_PROGRAMS = 3  # persistent programs under the interpreter: fewer than tiles, so the tile loop is exercised


def lever_on(name: str) -> bool:
    return os.environ.get(ENV[name], "0") == "1"


def tma_applies(*tensors: torch.Tensor) -> bool:
    """Every tensor can back a 2-D (rows x head dim) tensor descriptor per (batch, head): last dim contiguous, base and
    every other stride a multiple of 16 bytes (TMA's alignment rules)."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((s * size) % 16 for s in t.stride()[:-1]):
            return False
    return True


def persistent_programs(device: torch.device) -> int:
    """How many persistent programs to launch: one per SM on a GPU (the forward + JVP tiles use the whole register
    file at 8 warps: one resident program per SM), a few under the interpreter."""
    if device.type != "cuda" or interpreter_active():
        return INTERPRETER_PROGRAMS
    return sm_count(device)


_ALLOCATOR_SET = False


def ensure_descriptor_allocator() -> None:
    """Tensor descriptors made inside a kernel need global scratch memory for the descriptor itself
    (triton.set_allocator); set once, with the caching allocator (stream-ordered, CUDA-graph safe)."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET or interpreter_active():
        return
    import triton

    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    _ALLOCATOR_SET = True


def forward_levers(tensors: tuple[torch.Tensor, ...]) -> dict:
    """The lever constexprs of the forward + JVP kernel for this call (env switches, TMA only where it applies)."""
    tma = lever_on("tma") and tma_applies(*tensors)
    if tma:
        ensure_descriptor_allocator()
    return dict(USE_TMA=tma, PERSISTENT=lever_on("persistent"))
