"""Small helpers shared by the DiT block-glue kernels (norm, activations, mlp, residual).

Two halves:

* Triton device functions (`@triton.jit`): the activations and their derivatives, written with `tl.exp` / `tl.sigmoid`
  only, because libdevice calls fail under the Triton interpreter (DESIGN.md 4).
* Host-side launch heuristics: block sizes, warp counts, how many rows one program of a reduction kernel walks.

The module imports without Triton (macOS, CPU-only installs): `triton` / `tl` are then a stub whose `jit` leaves the
function as it is, so every kernel module still imports and its public op falls back to the `_ref` op (the kernels
are never launched, because `_runtime.triton_can_run` is False).
"""
from __future__ import annotations

import functools
import math

import torch

from ._runtime import triton_importable

if triton_importable():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised in a subprocess by tests/test_activations.py

    class _TritonStub:
        """Stands in for `triton` and `triton.language` so that kernel definitions still parse."""

        @staticmethod
        def constexpr(value=None):
            return value

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _TritonStub()

# ------------------------------------------------------------------------------------------------ device functions
# GELU(tanh): g(a) = 0.5 a (1 + tanh(u)), u = k (a + c a^3), k = sqrt(2/pi), c = 0.044715.
# 0.5 (1 + tanh(u)) == sigmoid(2u) exactly, so g(a) = a sigmoid(2u): no tanh (a libdevice call on GPU, absent in the
# interpreter) and no cancellation in 1 + tanh(u) for very negative a. With s = sigmoid(2u), ds/da = 2 s (1 - s) u':
#   g'(a) = s + a * 2 s (1 - s) * k (1 + 3 c a^2)
# which is the reference's 0.5 (1 + th) + 0.5 a (1 - th^2) k (1 + 3 c a^2) term by term (0.5 (1 - th^2) = 2 s (1 - s)).
GELU_2K = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))
GELU_C = tl.constexpr(0.044715)

# Activation selectors (a constexpr argument of the shared elementwise kernels).
ACT_GELU_TANH = 0
ACT_SILU = 1


@triton.jit
def gelu_tanh_and_grad(a):
    """(g(a), g'(a)) for g(a) = 0.5 a (1 + tanh(k (a + c a^3))) = a sigmoid(2 k (a + c a^3))."""
    a2 = a * a
    s = tl.sigmoid(GELU_2K * (a + GELU_C * a2 * a))
    return a * s, s + a * s * (1.0 - s) * GELU_2K * (1.0 + 3.0 * GELU_C * a2)


@triton.jit
def silu_and_grad(a):
    """(silu(a), silu'(a)) = (a s, s (1 + a (1 - s))), s = sigmoid(a)."""
    s = tl.sigmoid(a)
    return a * s, s * (1.0 + a * (1.0 - s))


@triton.jit
def act_and_grad(a, ACT: tl.constexpr):
    """Dispatch on the constexpr ACT (resolved at compile time: one specialisation per activation)."""
    if ACT == 0:
        y, d = gelu_tanh_and_grad(a)
    else:
        y, d = silu_and_grad(a)
    return y, d


# ------------------------------------------------------------------------------------------------ host heuristics
def acc_dtype(*dtypes: torch.dtype):
    """Accumulation / math dtype of a kernel: fp64 if any input is fp64 (exact tests), else fp32.

    16-bit inputs are always upcast after the load: fp32 math is the contract, and bf16 arithmetic is wrong under the
    interpreter (DESIGN.md 4). Loads and stores stay in the tensors' own dtypes.
    """
    return tl.float64 if torch.float64 in dtypes else tl.float32


def torch_acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Row kernels keep one whole row of C features in registers; DiT-XL has C = 1152 (BLOCK_C 2048). Beyond this the
# register file spills, and a two-pass (looped) row kernel would be needed.
MAX_ROW_BLOCK = 16384


def row_block(c: int, op: str) -> int:
    block = next_power_of_2(c)
    if block > MAX_ROW_BLOCK:
        raise ValueError(f"mfkernels.{op}: rows of {c} features are longer than the one-pass row kernel handles "
                         f"(at most {MAX_ROW_BLOCK}); use the `_ref` op for such sizes")
    return block


def row_warps(block_c: int) -> int:
    """One row per program: about 8 fp32 values per thread (128-bit loads for 16-bit data), 1 to 16 warps."""
    return min(max(block_c // 256, 1), 16)


# Elementwise kernels: 1024 elements per program, 4 warps: 8 elements per thread, i.e. 16-byte vector loads for 16-bit
# dtypes; plenty of programs (a (64*256, 4608) GELU has 75k) to hide latency without a persistent loop.
ELEMENTWISE_BLOCK = 1024
ELEMENTWISE_WARPS = 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_rows_per_program(batch: int, tokens: int, col_blocks: int, device: torch.device) -> int:
    """How many tokens one program of a per-sample reduction kernel (the backward of modulate / gate) walks.

    Each program reduces its tokens into one partial row that the launcher sums (deterministically) over programs.
    Aim for about 4 programs per SM: fewer programs leave SMs idle, more just make the partial buffer bigger.
    Under the interpreter the total work is the same either way, so keep programs few.
    """
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 1
    chunks = max(1, min(tokens, -(-target // max(1, batch * col_blocks))))
    return -(-tokens // chunks)


def row_stride(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A 2-D (B, C) operand with unit stride over C (copied if not), and its row stride.

    adaLN outputs are chunks of one (B, 6C) linear output: (B, C) views with row stride 6C. Passing the stride lets the
    kernels read them in place instead of copying six tensors per block.
    """
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0)
