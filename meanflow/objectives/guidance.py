"""Classifier-free guidance folded into MeanFlow training, with the extra forwards kept small (docs/design.md,
'Guidance folded into training').

Guided velocity, where t lies in [t_start, t_end] and the label is kept (elsewhere v_g = v):
    v_g = omega v + (1 - omega - kappa) u(z, t, t | null) + kappa u(z, t, t | c)      (kappa = 0: no conditional term)

The official code runs two extra no-grad forwards over the whole batch. Here only the rows that need guidance are
evaluated, in ONE no-grad call:
- rows with r != t (the tangent rows) need v_g BEFORE the main call (it is their tangent): u(.|null) and, if kappa > 0,
  u(.|c);
- rows with r = t need v_g only for the target, AFTER the main call; their main-call output IS u(z, t, t | c)
  (h = 0, same label), so u(.|c) comes free as u.detach() and only u(.|null) is evaluated.
At ratio 0.25 that is 1.25 batches instead of 2, less the dropped labels and the rows outside the interval.

Row counts, eager and under torch.compile:
- eagerly only the rows that need guidance are gathered (nonzero: one host sync), so the guidance call's batch changes
  from step to step; its inputs are marked dynamic in dim 0 (torch._dynamo.maybe_mark_dynamic), so a compiled model
  compiles that call once for any row count instead of recompiling every step;
- while torch.compile traces the loss itself, a data-dependent row count would break the graph: the call then takes a
  fixed bucket, every row of its kind (k tangent rows with c and with null, B - k rows with null), and masks the rows
  that need no guidance out of v_g (torch.where). Same v_g, at most 1.25 batches of compute, no recompile ever.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PendingGuidance:
    """Guidance for the r = t rows, finished once the main call has produced u (their conditional output)."""

    rows: torch.Tensor      # indices (into the batch) of r = t rows that need guidance
    u_null: torch.Tensor    # u(z, t, t | null) for those rows
    forward_rows: int = 0   # how many rows the no-grad guidance call evaluated (for the stats)
    need: torch.Tensor | None = None  # bucketed layout (compile): rows are all r = t rows, need masks the guided ones

    def finish(self, v_g: torch.Tensor, v: torch.Tensor, u: torch.Tensor, omega: float, kappa: float) -> torch.Tensor:
        if self.need is not None:
            k = v_g.shape[0] - self.need.shape[0]
            guided = combine(v[k:], self.u_null, u.detach()[k:], omega, kappa)
            return torch.cat([v_g[:k], torch.where(_rows_mask(self.need, v), guided, v_g[k:])])
        if self.rows.numel() == 0:
            return v_g
        v_g = v_g.clone()
        v_g[self.rows] = combine(v[self.rows], self.u_null, u.detach()[self.rows], omega, kappa)
        return v_g


def _rows_mask(need: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return need.reshape((-1,) + (1,) * (like.dim() - 1))


def combine(v, u_null, u_cond, omega: float, kappa: float) -> torch.Tensor:
    """omega v + (1 - omega - kappa) u_null + kappa u_cond, in v's dtype."""
    out = omega * v + (1.0 - omega - kappa) * u_null.to(v.dtype)
    if kappa != 0.0:
        out = out + kappa * u_cond.to(v.dtype)
    return out


@torch.no_grad()
def guided_velocity(model, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, y: torch.Tensor, drop: torch.Tensor,
                    k: int, *, omega: float, kappa: float, t_start: float, t_end: float, null_class: int
                    ) -> tuple[torch.Tensor, PendingGuidance]:
    """v_g for the tangent rows [0, k) now, and what the r = t rows [k, B) need to finish theirs later."""
    need = ~drop & (t >= t_start) & (t <= t_end)
    if torch.compiler.is_compiling():
        return _bucketed(model, z, t, v, y, need, k, omega=omega, kappa=kappa, null_class=null_class)
    a = need[:k].nonzero().squeeze(1)            # tangent rows that need guidance
    b = k + need[k:].nonzero().squeeze(1)        # r = t rows that need guidance
    use_cond = kappa != 0.0
    idx = torch.cat([a, a, b]) if use_cond else torch.cat([a, b])
    n_cond = a.numel() if use_cond else 0
    labels = torch.cat([y[a][:n_cond], torch.full((idx.numel() - n_cond,), null_class, dtype=y.dtype, device=y.device)])
    v_g = v.clone()
    if idx.numel() == 0:
        return v_g, PendingGuidance(b, v.new_zeros((0,) + v.shape[1:]), 0)
    zg, tg = z[idx], t[idx]
    hg = torch.zeros_like(tg)
    for inp in (zg, tg, hg, labels):  # the row count changes every step: one compile of a compiled model for all
        torch._dynamo.maybe_mark_dynamic(inp, 0)
    u_g = model(zg, tg, hg, labels)   # h = 0: r = t
    u_cond_a, u_null_a, u_null_b = u_g.split([n_cond, a.numel(), b.numel()])
    if a.numel():
        v_g[a] = combine(v[a], u_null_a, u_cond_a, omega, kappa)
    return v_g, PendingGuidance(b, u_null_b, idx.numel())


def _bucketed(model, z, t, v, y, need, k: int, *, omega: float, kappa: float, null_class: int
              ) -> tuple[torch.Tensor, PendingGuidance]:
    """The same v_g with a fixed row count (no data-dependent shape: what torch.compile can trace in one graph).

    One call over [tangent rows with c (kappa > 0 only); tangent rows with null; r = t rows with null]; rows that need
    no guidance are computed and then masked out of v_g."""
    use_cond = kappa != 0.0
    parts = [slice(0, k)] * (2 if use_cond else 1) + [slice(k, None)]
    zg, tg = torch.cat([z[p] for p in parts]), torch.cat([t[p] for p in parts])
    null = torch.full_like(y, null_class)
    labels = torch.cat(([y[:k]] if use_cond else []) + [null[:k], null[k:]])
    u_g = model(zg, tg, torch.zeros_like(tg), labels)   # h = 0: r = t
    n_cond = k if use_cond else 0
    u_cond_a, u_null_a, u_null_b = u_g.split([n_cond, k, z.shape[0] - k])
    guided_a = combine(v[:k], u_null_a, u_cond_a if use_cond else None, omega, kappa)
    v_g = torch.cat([torch.where(_rows_mask(need[:k], v), guided_a, v[:k]), v[k:]])
    rows = torch.arange(k, z.shape[0], device=z.device)
    return v_g, PendingGuidance(rows, u_null_b, zg.shape[0], need=need[k:])
