"""Small Triton helpers shared by the mfkernels kernels.

Kept tiny on purpose: only what every kernel needs to behave the same on a GPU and under the Triton 3.6 interpreter
(TRITON_INTERPRET=1), where bf16 arithmetic is unusable and fp32 -> bf16 casts truncate instead of rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import interpreter_active

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def compute_dtypes(dtype: torch.dtype):
    """(ACC, DOT, PREC, RNE_BF16) constexprs for a kernel reading tensors of `dtype`.

    ACC: accumulation dtype (fp64 for fp64 inputs, else fp32).
    DOT: dtype of tl.dot operands. 16-bit inputs feed the tensor cores in their own dtype on a GPU (as flash attention
    does for P); under the interpreter they are upcast to fp32 first because its bf16 arithmetic is garbage.
    PREC: tl.dot input precision, ignored for 16-bit. fp32: "tf32x3" on a GPU (three TF32 products, near-fp32
    accuracy on the tensor cores; Triton's "ieee" fp32 dot falls back to FMA code that spills tens of KB per thread in
    the attention kernels); "ieee" in the interpreter (which computes dots in numpy anyway) and for fp64.
    RNE_BF16: emulate round-to-nearest-even on bf16 stores (the interpreter's fp32 -> bf16 cast truncates).
    """
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    interp = interpreter_active()
    if dtype in (torch.float16, torch.bfloat16):
        dot = tl.float32 if interp else tl_dtype(dtype)
        prec = "tf32"
    else:
        dot = acc
        prec = "tf32x3" if (dtype == torch.float32 and not interp) else "ieee"
    return acc, dot, prec, bool(interp and dtype == torch.bfloat16)


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
