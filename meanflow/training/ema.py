"""Exponential moving averages of a model's weights, one fp32 copy per decay.

Each EMA starts as a copy of the model (so early samples are already meaningful) and is updated after every optimizer
step: ema = decay * ema + (1 - decay) * weights. The copies stay fp32 whatever precision the training step uses, and
are plain modules (eval mode, no grad) that the samplers can call directly.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


def decay_key(decay: float) -> str:
    """The name an EMA is stored under in checkpoints, e.g. '0.9999'."""
    return f"{decay:g}"


class EMA:
    def __init__(self, model: nn.Module, decays: Iterable[float]):
        self.decays = tuple(float(d) for d in decays)
        if not self.decays:
            raise ValueError("at least one EMA decay is needed (train.ema_decays)")
        for d in self.decays:
            if not 0.0 <= d < 1.0:
                raise ValueError(f"EMA decays must lie in [0, 1); got {d}")
        self.models: dict[str, nn.Module] = {}
        for d in self.decays:
            ema = copy.deepcopy(model).float().eval()
            ema.requires_grad_(False)
            self.models[decay_key(d)] = ema

    @property
    def default(self) -> nn.Module:
        """The first decay's model: the one that samples grids and is evaluated."""
        return self.models[decay_key(self.decays[0])]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() for p in model.parameters()]
        buffers = list(model.buffers())
        for d in self.decays:
            ema = self.models[decay_key(d)]
            torch._foreach_lerp_(list(ema.parameters()), params, 1.0 - d)
            for eb, b in zip(ema.buffers(), buffers):  # buffers (none in DiT/MLP today) follow the model as is
                eb.copy_(b)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {k: m.state_dict() for k, m in self.models.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if set(state) != set(self.models):
            raise ValueError(f"the checkpoint has EMA decays {sorted(state)}; this run has {sorted(self.models)}")
        for k, m in self.models.items():
            m.load_state_dict(state[k])

    def to(self, device) -> EMA:
        for m in self.models.values():
            m.to(device)
        return self
