"""The Triton helpers every kernel shares: dtypes, rounding, the activations, launch heuristics.

Four parts, in the order a kernel uses them:

* dtypes: the Triton dtype of a torch dtype and the constexprs of a kernel's math (`compute_dtypes`, `tl_acc_dtype`:
  the accumulation dtype of `_runtime.acc_dtype` as a Triton dtype);
* rounding of stores (`round_to`, `rne_bf16`): the Triton 3.6 interpreter casts fp32 to bf16 by truncation while GPUs
  round to nearest even; a truncating store biases every bf16 output towards zero, and sums of them (a weight gradient
  over many rows) drift, so stores round by hand under the interpreter (a plain cast on a GPU);
* device functions of the activations (`gelu_tanh_and_grad`, `silu_and_grad`, `act_and_grad`), written with `tl.exp`
  / `tl.sigmoid` only: libdevice calls (tanh among them) fail under the interpreter;
* host-side launch heuristics: block sizes, warp counts, how many programs a reduction kernel runs.

Importable without Triton (macOS, CPU-only installs): `triton` / `tl` are then a stub whose `jit` leaves a function as
it is, so every kernel module still imports and its public op falls back to its `_ref` op (kernels are never launched,
because `_runtime.triton_can_run` is False). The attention package needs Triton itself (autotune configs at import).
"""
from __future__ import annotations

import math

import torch

from ._runtime import acc_dtype, interpreter_active, sm_count, triton_importable

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


# ----------------------------------------------------------------------------------------------------------- dtypes
def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch float dtype."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def tl_acc_dtype(*dtypes: torch.dtype):
    """The ACC constexpr of a kernel reading tensors of `dtypes`: `_runtime.acc_dtype` (fp64 if any input is fp64,
    else fp32) as a Triton dtype. 16-bit inputs are always upcast after the load: fp32 math is the contract, and bf16
    arithmetic is wrong under the interpreter."""
    return tl.float64 if acc_dtype(*dtypes) == torch.float64 else tl.float32


def compute_dtypes(dtype: torch.dtype):
    """(ACC, DOT, PREC, RNE_BF16) constexprs for a kernel with tl.dot products reading tensors of `dtype`.

    ACC: accumulation dtype (tl_acc_dtype).
    DOT: dtype of tl.dot operands. 16-bit inputs feed the tensor cores in their own dtype on a GPU (as flash attention
    does for P); under the interpreter they are upcast to fp32 first because its bf16 arithmetic is garbage.
    PREC: tl.dot input precision, ignored for 16-bit. fp32: "tf32x3" on a GPU (three TF32 products, near-fp32
    accuracy on the tensor cores; Triton's "ieee" fp32 dot falls back to FMA code that spills tens of KB per thread in
    the attention kernels); "ieee" in the interpreter (which computes dots in numpy anyway) and for fp64.
    RNE_BF16: emulate round-to-nearest-even on bf16 stores (rne_bf16).
    """
    acc = tl_acc_dtype(dtype)
    interp = interpreter_active()
    if dtype in (torch.float16, torch.bfloat16):
        dot = tl.float32 if interp else tl_dtype(dtype)
        prec = "tf32"
    else:
        dot = acc
        prec = "tf32x3" if (dtype == torch.float32 and not interp) else "ieee"
    return acc, dot, prec, rne_bf16(dtype)


# --------------------------------------------------------------------------------------------------------- rounding
def rne_bf16(dtype: torch.dtype) -> bool:
    """The RNE_BF16 constexpr of a kernel storing `dtype`: emulate round-to-nearest-even (interpreter and bf16 only)."""
    return interpreter_active() and dtype == torch.bfloat16


@triton.jit
def round_to(x, OUT: tl.constexpr, RNE_BF16: tl.constexpr):
    """Cast x to OUT. With RNE_BF16 (interpreter only, x fp32, OUT bf16) round to nearest even by hand:
    add 0x7FFF plus the lowest kept bit, then drop the low 16 bits, so the final cast is exact."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = (bits >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(OUT)


# ------------------------------------------------------------------------------------------------------ activations
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


# ------------------------------------------------------------------------------------------------ launch heuristics
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


def reduction_rows_per_program(batch: int, tokens: int, col_blocks: int, device: torch.device) -> int:
    """How many tokens one program of a per-sample reduction kernel (the backward of modulate) walks.

    Each program reduces its tokens into one partial row that the launcher sums (deterministically) over programs.
    Aim for about 4 programs per SM: fewer programs leave SMs idle, more just make the partial buffer bigger.
    Under the interpreter the total work is the same either way, so keep programs few.
    """
    target = 4 * sm_count(device) if device.type == "cuda" else 1
    chunks = max(1, min(tokens, -(-target // max(1, batch * col_blocks))))
    return -(-tokens // chunks)


def partial_sum_programs(n_tiles: int, device: torch.device) -> int:
    """Programs of a backward whose programs walk row tiles with stride P and keep one weight-gradient partial each
    (RMSNorm, QK-norm): ~4 per SM on a GPU; 3 under the interpreter, so that tests see several programs each walking
    several tiles."""
    target = 4 * sm_count(device) if device.type == "cuda" else 3
    return max(1, min(n_tiles, target))


def row_stride(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A 2-D (B, C) operand with unit stride over C (copied if not), and its row stride.

    adaLN outputs are chunks of one (B, 6C) linear output: (B, C) views with row stride 6C. Passing the stride lets the
    kernels read them in place instead of copying six tensors per block.
    """
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0)
