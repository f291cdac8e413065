"""What objectives beyond MeanFlow need from a network, and the small modules that provide it.

    spec = NetworkSpec(heads=("u", "v"), conditions=("omega", "t_min", "t_max"), conditional=True)   # iMF

- `NetworkSpec`: the heads and per-row conditions an objective calls the network with (meanflow.objectives asks for one,
  meanflow.models.registry builds a network that has it). MeanFlow / flow matching / alpha-Flow: heads ("u",) and no
  conditions; iMF: ("u", "v") and ("omega", "t_min", "t_max"); sCM: ("u", "logvar"); TVM: ("u",) and ("beta",).
- `ConditionEmbedders`: the extra conditions, each through its own sinusoidal embedder + MLP, summed into the adaLN
  conditioning vector c (they carry no tangent). omega enters as 1 - 1/omega (0 for no guidance), as in the official
  imfDiT; the interval ends enter raw; TVM's beta = 1 / cfg in (0, 1] enters raw, as the official TVM DiT embeds it.
- `LogVarHead`: sCM's learned loss weighting logvar(t): Linear over a sinusoidal embedding of the network's time input,
  zero at initialisation (logvar = 0: weight 1). It lives ON the network, as one more output head, so that it is
  trained, checkpointed, EMA'd and wrapped by DDP / FSDP2 exactly like the rest of the weights, and it is evaluated
  inside the network's forward (FSDP2 gathers a module's parameters only inside its forward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import Linear, TimestepEmbedder, timestep_embedding

IMF_CONDITIONS = ("omega", "t_min", "t_max")
TVM_CONDITIONS = ("beta",)


@dataclass(frozen=True)
class NetworkSpec:
    """The call an objective makes: the network's output heads (the first one, "u", carries the tangent), its extra
    per-row conditions, and whether it must be class-conditional (guidance)."""

    heads: tuple[str, ...] = ("u",)
    conditions: tuple[str, ...] = ()
    conditional: bool = False


def condition_features(name: str, value: torch.Tensor) -> torch.Tensor:
    """The scalar a network sees for a condition: omega as 1 - 1/omega (no guidance -> 0, omega -> inf -> 1), others
    raw (t_min, t_max and TVM's beta lie in [0, 1])."""
    return 1.0 - 1.0 / value if name == "omega" else value


class ConditionEmbedders(nn.Module):
    """sum_k MLP_k(sinusoid(feature_k)) over the conditions, a (B, hidden) term added to c (no tangent)."""

    def __init__(self, hidden: int, names: tuple[str, ...]):
        super().__init__()
        self.names = tuple(names)
        self.embedders = nn.ModuleDict({name: TimestepEmbedder(hidden) for name in self.names})

    def forward(self, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        out = 0.0
        for name in self.names:
            out = out + self.embedders[name](condition_features(name, conditions[name]))
        return out


class LogVarHead(nn.Module):
    """logvar(t) = w . sinusoid(t) + b, one scalar per row; zero-initialised."""

    def __init__(self, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear = Linear(freq_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(self.linear.weight.dtype)
        return self.linear(emb).squeeze(-1)


def extra_heads(v_depth: int, logvar: bool) -> tuple[str, ...]:
    """The heads of a built-in network: ("u",), ("u", "v") with a v-branch, ("u", "logvar") with a logvar head."""
    if v_depth and logvar:
        raise ValueError("a network has at most one extra head: a v-branch (iMF) or a logvar head (sCM), not both")
    return ("u", "v") if v_depth else (("u", "logvar") if logvar else ("u",))


__all__ = ["IMF_CONDITIONS", "TVM_CONDITIONS", "NetworkSpec", "condition_features", "ConditionEmbedders", "LogVarHead",
           "extra_heads"]
