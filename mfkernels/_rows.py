"""Row layouts for the row-wise kernels (RMSNorm, RoPE, QK-norm): read strided views in place instead of copying.

A row kernel works on the last dim D of a tensor with logical shape (B, d1, ..., dk, D). The usual inputs are views:
q of a fused qkv projection is (B, N, H, Dh) with strides (3 N C, 3 C, Dh, 1); its transpose (B, H, N, Dh) is what the
attention kernels want. The kernels address row r = (b, i1, i2) as  b s0 + i1 s1 + i2 s2  (elements), so any tensor
whose non-batch leading dims merge into at most two (L1, L2) runs with no copy. The batch dim is never merged: tangent
rows are the first kt rows of dim 0, and a tangent may have strides of its own.

`row_layout` merges the leading dims of several tensors of one logical shape together (a merge must be valid for all of
them) and returns None when more than two remain; the launchers then copy (`.contiguous()`), which always fits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """Non-batch leading sizes (L1, L2) and, per tensor, the element strides (s0, s1, s2) of (b, i1, i2)."""

    sizes: tuple[int, int]
    strides: tuple[tuple[int, int, int], ...]

    @property
    def rows_per_sample(self) -> int:
        return self.sizes[0] * self.sizes[1]


def row_layout(shape: tuple[int, ...], *tensors: torch.Tensor) -> RowLayout | None:
    """Merge the leading dims 1..n-2 of `shape` for every tensor (each viewed with `shape`, except that its dim 0 may
    differ: a tangent). Returns None if more than two leading groups remain."""
    groups: list[tuple[int, list[int]]] = []  # (size, stride per tensor), outermost first
    for dim in range(1, len(shape) - 1):
        size = shape[dim]
        if size == 1:  # a unit dim has no stride that matters
            continue
        strides = [t.stride(dim) for t in tensors]
        if groups:
            prev_size, prev_strides = groups[-1]
            if all(ps == s * size for ps, s in zip(prev_strides, strides)):
                groups[-1] = (prev_size * size, strides)
                continue
        groups.append((size, strides))
    if len(groups) > 2:
        return None
    while len(groups) < 2:
        groups.insert(0, (1, [0] * len(tensors)))
    (l1, s1), (l2, s2) = groups
    batch = [t.stride(0) if t.dim() else 0 for t in tensors]
    return RowLayout((l1, l2), tuple((b, a, c) for b, a, c in zip(batch, s1, s2)))


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels read a row with unit stride: copy only when the last dim is strided."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def rows_for(shape: tuple[int, ...], *tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], RowLayout]:
    """The tensors (unit last stride; copied contiguous if their leading dims do not merge into two), their layout."""
    tensors = tuple(unit_last_stride(t) for t in tensors)
    layout = row_layout(shape, *tensors)
    if layout is None:
        tensors = tuple(t.contiguous() for t in tensors)
        layout = row_layout(shape, *tensors)
        assert layout is not None  # contiguous (or broadcast-then-contiguous) leading dims always merge into one
    return tensors, layout
