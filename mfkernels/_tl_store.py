"""Rounding of kernel stores for the modern-transformer ops (rmsnorm, swiglu, rope), importable without Triton.

The Triton 3.6 interpreter casts fp32 to bf16 by truncation while GPUs round to nearest even; a truncating store biases
every bf16 output towards zero, and sums of them (a weight gradient over many rows) drift. `round_to` (shared with the
attention kernels) rounds by hand under the interpreter; on a GPU `rne_bf16` is False and it is a plain cast.
"""
from __future__ import annotations

import torch

from ._runtime import interpreter_active, triton_importable

if triton_importable():
    from ._triton_utils import round_to
else:  # pragma: no cover - the kernels are never launched without Triton (the ops fall back to their references)
    round_to = None


def rne_bf16(dtype: torch.dtype) -> bool:
    """The RNE constexpr of a kernel storing `dtype`: emulate round-to-nearest-even (interpreter and bf16 only)."""
    return interpreter_active() and dtype == torch.bfloat16
