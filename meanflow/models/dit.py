"""DiT with adaLN-Zero (docs/design.md, 'Networks'): u(z, t, h | y) for images or latents, with a registry of sizes.

    model = build_dit("DiT-B/2", input_size=32, in_channels=4, num_classes=1000, backend="fused")
    u = model(z, t, h, y)                                                       # plain forward, h = t - r
    u, u_dot = model(z, t, h, y, tangents=(z_dot, t_dot, h_dot))                # forward + JVP
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import JVPOps
from .heads import ConditionEmbedders, LogVarHead, extra_heads
from .layers import DiTBlock, FinalLayer, Linear, TimestepEmbedder, patchify, unpatchify
from .network import JVPNetwork

@dataclass(frozen=True)
class DiTConfig:
    hidden: int
    depth: int
    heads: int
    patch: int


DIT_SIZES = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
    # CPU-sized presets: small enough to train on two cores in minutes.
    "Tiny": (96, 4, 4),
    "Micro": (48, 2, 2),
}
DIT_MODELS = {f"DiT-{s}/{p}": DiTConfig(*DIT_SIZES[s], p)
              for s in ("S", "B", "L", "XL", "Tiny", "Micro") for p in (2, 4, 8)}


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (N, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be a multiple of 4 for the 2-D sin-cos position embedding")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")

    def embed(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


class DiT(JVPNetwork):
    """Diffusion Transformer with adaLN-Zero conditioning on c = T_t(t) + T_h(h) + Y(y).

    Class-conditional with num_classes > 0 (label index num_classes is the null class used for guidance), else
    unconditional. Input (B, in_channels, H, W) with H, W multiples of the patch size.

    Options for the objectives beyond MeanFlow (meanflow.models.heads):
    - `conditions` (iMF: ("omega", "t_min", "t_max")): each embedded and added to c (adaLN), no tangent;
    - `v_depth` > 0 (iMF): a v head, a branch of `v_depth` blocks + its own final layer forking after the first
      depth - v_depth blocks (the u-path keeps all `depth` blocks); it runs primal-only, also in the JVP call;
    - `logvar` (sCM): a logvar(t) head.
    """

    def __init__(self, input_size: int | tuple[int, int] = 32, in_channels: int = 4, hidden: int = 384,
                 depth: int = 12, heads: int = 6, patch: int = 2, mlp_ratio: float = 4.0, num_classes: int = 0,
                 backend: str = "explicit", *, v_depth: int = 0, conditions: tuple[str, ...] = (),
                 logvar: bool = False):
        super().__init__(backend)
        if not 0 <= v_depth <= depth:
            raise ValueError(f"v_depth (blocks of the v-branch) must lie in [0, depth = {depth}]; got {v_depth}")
        self.heads = extra_heads(v_depth, logvar)
        self.conditions = tuple(conditions)
        self.v_depth = v_depth
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if height % patch or width % patch:
            raise ValueError(f"input_size {(height, width)} must be divisible by the patch size {patch}")
        self.in_channels, self.patch, self.num_classes, self.hidden = in_channels, patch, num_classes, hidden
        self.grid = (height // patch, width // patch)
        self.data_shape = (in_channels, height, width)
        self.patch_embed = Linear(in_channels * patch * patch, hidden)  # a stride-p conv is a linear map on patches
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, *self.grid), persistent=False)
        self.t_embedder = TimestepEmbedder(hidden)
        self.h_embedder = TimestepEmbedder(hidden)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.cond_embedder = ConditionEmbedders(hidden, self.conditions) if self.conditions else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden, patch * patch * in_channels)
        if v_depth:
            self.v_blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(v_depth))
            self.v_final = FinalLayer(hidden, patch * patch * in_channels)
        self.logvar = LogVarHead() if logvar else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, and zeros for every adaLN and the output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        embedders = [self.t_embedder, self.h_embedder]
        if self.cond_embedder is not None:
            embedders += list(self.cond_embedder.embedders.values())
        for emb in embedders:
            nn.init.normal_(emb.fc1.weight, std=0.02)
            nn.init.normal_(emb.fc2.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        zeroed = [b.adaLN for b in self.blocks] + [self.final.adaLN, self.final.linear]
        if self.v_depth:
            zeroed += [b.adaLN for b in self.v_blocks] + [self.v_final.adaLN, self.v_final.linear]
        if self.logvar is not None:
            zeroed.append(self.logvar.linear)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _patchify(self, z):
        return patchify(z, self.patch)

    def _unpatchify(self, x):
        return unpatchify(x, self.patch, self.grid[0])

    def _label(self, y):
        return self.y_embedder(y) if self.y_embedder is not None else 0.0

    def _conditioning(self, conditions):
        """The conditions' term of c (no tangent), 0 without conditions."""
        return self.cond_embedder(conditions) if self.cond_embedder is not None else 0.0

    def _extra_head(self, x_fork, c_act, t):
        """The second head's output (primal only): the v-branch from the fork point, or logvar(t)."""
        if self.heads[1] == "logvar":
            return self.logvar(t)
        for block in self.v_blocks:
            x_fork = block(x_fork, c_act)
        return self._unpatchify(self.v_final(x_fork, c_act))

    def _forward_plain(self, z, t, h, y, head=None, **conditions):
        if head == "logvar":
            return self.logvar(t)
        x = self.patch_embed(self._patchify(z)) + self.pos_embed
        c = self.t_embedder(t) + self.h_embedder(h) + self._label(y) + self._conditioning(conditions)
        c_act = F.silu(c)
        fork = len(self.blocks) - self.v_depth
        for block in self.blocks[:fork]:
            x = block(x, c_act)
        if head == "v":
            return self._extra_head(x, c_act, t)
        x_fork = x
        for block in self.blocks[fork:]:
            x = block(x, c_act)
        u = self._unpatchify(self.final(x, c_act))
        if len(self.heads) == 1 or head == "u":
            return u
        return u, self._extra_head(x_fork, c_act, t)

    def _forward_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, ops: JVPOps, head=None, **conditions):
        x, x_dot = self.patch_embed.forward_jvp(self._patchify(z), self._patchify(z_dot), ops)
        x = x + self.pos_embed  # fixed: no tangent
        te, te_dot = self.t_embedder.forward_jvp(t, t_dot, ops)
        he, he_dot = self.h_embedder.forward_jvp(h, h_dot, ops)
        # labels and the extra conditions carry no tangent
        c, c_dot = te + he + self._label(y) + self._conditioning(conditions), te_dot + he_dot
        # Under autocast the fp32 position / label embeddings promote the primal; tangents follow their primal's dtype.
        x_dot, c_dot = x_dot.to(x.dtype), c_dot.to(c.dtype)
        c_act, c_act_dot = ops.silu(c, c_dot)
        fork = len(self.blocks) - self.v_depth
        for block in self.blocks[:fork]:
            x, x_dot = block.forward_jvp(x, x_dot, c_act, c_act_dot, ops)
        x_fork = x
        for block in self.blocks[fork:]:
            x, x_dot = block.forward_jvp(x, x_dot, c_act, c_act_dot, ops)
        x, x_dot = self.final.forward_jvp(x, x_dot, c_act, c_act_dot, ops)
        out = (self._unpatchify(x), self._unpatchify(x_dot))
        if len(self.heads) == 1 or head == "u":
            return out
        return out + (self._extra_head(x_fork, c_act, t),)


def build_dit(name: str, *, input_size=32, in_channels=4, num_classes=0, backend="explicit", **kwargs) -> DiT:
    """A DiT from the registry, e.g. build_dit('DiT-B/2', input_size=32, in_channels=4, num_classes=1000)."""
    if name not in DIT_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(DIT_MODELS)}")
    cfg = DIT_MODELS[name]
    return DiT(input_size, in_channels, cfg.hidden, cfg.depth, cfg.heads, cfg.patch, num_classes=num_classes,
               backend=backend, **kwargs)



__all__ = ["DiT", "DiTConfig", "DIT_SIZES", "DIT_MODELS", "build_dit", "sincos_pos_embed_2d"]
