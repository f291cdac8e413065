"""The improved-MeanFlow network (iMF; Geng, Lu et al. 2025), rebuilt from the official code (Lyy-iiis/imeanflow,
`models/imfDiT.py`; the architecture only, no code copied) on the mfkernels ops, so that its tangent runs fused.

    net = build_imf_dit("iMF-B/2", input_size=32, in_channels=4, num_classes=1000, backend="fused")
    u, v = net(z, t, h, y, omega=omega, t_min=t_min, t_max=t_max)                      # plain: both heads
    v = net(z, t, h, y, head="v", omega=..., t_min=..., t_max=...)                     # the v-branch alone
    u, u_dot, v = net(z, t, h, y, tangents=(z_dot, t_dot, h_dot), omega=..., ...)     # u with its tangent, v plain

What the official network is, and what this one does the same (docs/design.md, 'Networks'):
- In-context conditioning, no adaLN: learned token groups, each plus the embedding of its condition, are prepended to
  the patch tokens in the order [class (8) | omega (4) | t_min (2) | t_max (2) | h (4) | patches]: y through a label
  table (num_classes + 1 rows, the last the null class), h, 1 - 1/omega, t_min and t_max through four sinusoidal
  timestep embedders (256 frequencies, Linear-SiLU-Linear). t itself is not an input ("We don't explicitly condition on
  time t, only on h = t - r" in the official forward): t and its tangent are accepted and ignored.
- Blocks: x += attn(RMSNorm(x)) * attn_scale;  x += SwiGLU(RMSNorm(x)) * mlp_scale, with zero-initialised vector gates
  (C,) (no conditioning inside the block). Attention: q, k, v projections without bias (here one stacked qkv Linear:
  the same parameters), QK-norm (RMSNorm with a learned scale per head dim), RoPE on q and k,
  softmax(q k^T / sqrt Dh) v, an output projection without bias. RMSNorm eps 1e-6, learned scale (init 1). SwiGLU
  without biases, hidden width int(C * 8 / 3) (the official int() truncation: 2048 at C = 768, 2730 at C = 1024);
  here W1 and W3 are one stacked Linear (the same parameters).
- RoPE: 1-D over the whole sequence (positions 0 .. L-1, condition tokens first), theta 10000, frequencies
  theta^(-2i/Dh), pairs (x[2i], x[2i+1]) (the official code multiplies a complex view of the head dim): not 2-D axial.
- depth - head_depth shared blocks, then a u-branch and a v-branch of head_depth (8) blocks each, each with its own
  final layer (RMSNorm, then a zero-initialised Linear with bias to p * p * C_out), applied to the patch tokens.
- Initialisation: block linears N(0, (0.32 / sqrt(fan_in))^2), embedder linears N(0, 1 / fan_in), label table and the
  learned tokens N(0, 1 / C), the patch embedding Xavier-uniform, zero biases, zero final layers and gates.
Layouts follow this engine: z is (B, C, H, W) (the official JAX code is NHWC); patches flattened as (c, p1, p2) like a
stride-p conv's weight, unpatchified from (p1, p2, c) as the official torch code does.

Parameter counts (count_parameters, num_classes = 1000, 32x32x4 latents, patch 2) follow from, per block,
4 C^2 (q, k, v, out) + 3 C H_mlp (SwiGLU) + 4 C (two RMSNorms, two gates) + 2 Dh (QK-norm scales), plus the embedders
(patch C (p^2 C_in + 1), four timestep embedders 256 C + C^2 + 2 C each, labels 1001 C, 20 C of tokens) and two final
layers C + (C + 1) p^2 C_out. See IMF_PARAMETERS; `v_branch=False` drops the v-branch as the official eval mode does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mfkernels.nn import RMSNorm, RotaryAttention, SwiGLU, rope_angles, scaled_residual, scaled_residual_jvp

from .backends import JVPOps
from .layers import Linear, TimestepEmbedder, patchify, unpatchify
from .network import JVPNetwork


@dataclass(frozen=True)
class IMFConfig:
    hidden: int
    depth: int  # blocks on the u path: (depth - head_depth) shared + head_depth u-branch (the v-branch adds head_depth)
    heads: int
    patch: int
    head_depth: int = 8


IMF_SIZES = {
    "B": (768, 12, 12, 8),
    "M": (768, 24, 12, 8),
    "L": (1024, 32, 16, 8),
    "XL": (1024, 48, 16, 8),
    # CPU sizes (not in the paper): the same architecture, small enough to train on two cores.
    "Tiny": (96, 4, 4, 2),
    "Micro": (48, 2, 2, 1),
}
IMF_MODELS = {f"iMF-{s}/{p}": IMFConfig(*IMF_SIZES[s][:3], p, IMF_SIZES[s][3])
              for s in IMF_SIZES for p in (2, 4, 8)}

# count_parameters of build_imf_dit(name, input_size=32, in_channels=4, num_classes=1000): (training: with the
# v-branch, inference: v_branch=False). The paper lists 89M for iMF-B/2, the inference size: the official eval mode
# builds no v-branch blocks (it keeps an unused v final layer, C + (C + 1) p^2 C_out = 13,072 / 17,424 parameters more,
# which v_branch=False drops). Checked in tests/test_imf_dit.py against the formula in the module docstring.
IMF_PARAMETERS = {
    "iMF-B/2": (145_596_960, 88_935_184),
    "iMF-M/2": (230_570_016, 173_908_240),
    "iMF-L/2": (509_752_352, 409_054_224),
    "iMF-XL/2": (711_113_760, 610_415_632),
}

WEIGHT_INIT = 0.32  # official weight_init_constant of the blocks' linears
TOKEN_GROUPS = ("class", "omega", "t_min", "t_max", "time")  # prefix order of the official sequence


class IMFBlock(nn.Module):
    """x += Attn(RMSNorm(x)) * attn_scale;  x += SwiGLU(RMSNorm(x)) * mlp_scale  (QK-norm + RoPE attention)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 8 / 3):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = RotaryAttention(dim, heads, qk_norm=True, interleaved=True)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))  # int(): the official rounding (truncation)
        self.attn_scale = nn.Parameter(torch.zeros(dim))
        self.mlp_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x, cos, sin):
        x = scaled_residual(x, self.attn(self.norm1(x), cos, sin), self.attn_scale)
        return scaled_residual(x, self.mlp(self.norm2(x)), self.mlp_scale)

    def forward_jvp(self, x, x_dot, cos, sin, ops: JVPOps):
        h, h_dot = self.norm1.forward_jvp(x, x_dot, ops)
        a, a_dot = self.attn.forward_jvp(h, h_dot, cos, sin, ops)
        x, x_dot = scaled_residual_jvp(x, a, self.attn_scale, x_dot, a_dot, ops)
        h, h_dot = self.norm2.forward_jvp(x, x_dot, ops)
        m, m_dot = self.mlp.forward_jvp(h, h_dot, ops)
        return scaled_residual_jvp(x, m, self.mlp_scale, x_dot, m_dot, ops)


class IMFFinalLayer(nn.Module):
    """RMSNorm then Linear to patch pixels (zero-initialised)."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = Linear(dim, out_features)

    def forward(self, x):
        return self.linear(self.norm(x))

    def forward_jvp(self, x, x_dot, ops: JVPOps):
        h, h_dot = self.norm.forward_jvp(x, x_dot, ops)
        return self.linear.forward_jvp(h, h_dot, ops)


class IMFDiT(JVPNetwork):
    """iMF's DiT: in-context conditioning on (y, h, omega, t_min, t_max), a shared trunk, u- and v-branches.

    Class-conditional with num_classes > 0 (label num_classes is the null class), else the class tokens carry no label.
    Input (B, in_channels, H, W) with H, W multiples of the patch size. See the module docstring.
    """

    heads = ("u", "v")
    conditions = ("omega", "t_min", "t_max")

    def __init__(self, input_size: int | tuple[int, int] = 32, in_channels: int = 4, hidden: int = 768,
                 depth: int = 12, num_heads: int = 12, patch: int = 2, mlp_ratio: float = 8 / 3,
                 num_classes: int = 1000, head_depth: int = 8, v_branch: bool = True,
                 tokens: tuple[int, int, int, int, int] = (8, 4, 2, 2, 4), backend: str = "explicit"):
        super().__init__(backend)
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if height % patch or width % patch:
            raise ValueError(f"input_size {(height, width)} must be divisible by the patch size {patch}")
        if not 0 < head_depth <= depth:
            raise ValueError(f"head_depth must be in [1, depth = {depth}]; got {head_depth}")
        if hidden % num_heads or (hidden // num_heads) % 2:
            raise ValueError(f"hidden {hidden} / num_heads {num_heads} must be an even head dim (RoPE)")
        self.in_channels, self.patch, self.num_classes, self.hidden = in_channels, patch, num_classes, hidden
        self.grid = (height // patch, width // patch)
        self.data_shape = (in_channels, height, width)
        if not v_branch:  # the official eval mode: u only
            self.heads = ("u",)
        self.patch_embed = Linear(in_channels * patch * patch, hidden)  # a stride-p conv is a linear map on patches
        self.h_embedder, self.omega_embedder = TimestepEmbedder(hidden), TimestepEmbedder(hidden)
        self.t_min_embedder, self.t_max_embedder = TimestepEmbedder(hidden), TimestepEmbedder(hidden)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.tokens = nn.ParameterDict({g: nn.Parameter(torch.empty(n, hidden)) for g, n in zip(TOKEN_GROUPS, tokens)})
        self.prefix = sum(tokens)
        cos, sin = rope_angles(hidden // num_heads, self.prefix + self.grid[0] * self.grid[1])
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.shared_blocks = nn.ModuleList(IMFBlock(hidden, num_heads, mlp_ratio) for _ in range(depth - head_depth))
        self.u_blocks = nn.ModuleList(IMFBlock(hidden, num_heads, mlp_ratio) for _ in range(head_depth))
        self.v_blocks = nn.ModuleList(IMFBlock(hidden, num_heads, mlp_ratio) for _ in range(head_depth if v_branch
                                                                                              else 0))
        out = patch * patch * in_channels
        self.u_final = IMFFinalLayer(hidden, out)
        self.v_final = IMFFinalLayer(hidden, out) if v_branch else None
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------------ set-up
    def initialize_weights(self) -> None:
        """The official initialisation (module docstring)."""
        def normal_(linear: nn.Linear, gain: float) -> None:
            nn.init.normal_(linear.weight, std=gain / math.sqrt(linear.in_features))
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

        for block in (*self.shared_blocks, *self.u_blocks, *self.v_blocks):
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc13, block.mlp.fc2):
                normal_(linear, WEIGHT_INIT)
        for emb in (self.h_embedder, self.omega_embedder, self.t_min_embedder, self.t_max_embedder):
            normal_(emb.fc1, 1.0)
            normal_(emb.fc2, 1.0)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=1 / math.sqrt(self.hidden))
        for tokens in self.tokens.values():
            nn.init.normal_(tokens, std=1 / math.sqrt(self.hidden))
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        for final in (self.u_final, self.v_final):
            if final is not None:
                nn.init.zeros_(final.linear.weight)
                nn.init.zeros_(final.linear.bias)

    def _patchify(self, z):
        return patchify(z, self.patch)

    def _unpatchify(self, x):
        return unpatchify(x, self.patch, self.grid[0])

    def _angles(self):
        return self.rope_cos, self.rope_sin

    # ------------------------------------------------------------------------------------------------ sequence
    def _condition_tokens(self, y, embeddings):
        """[class | omega | t_min | t_max | time] tokens: each learned group plus its condition's embedding (B, C)."""
        label = self.y_embedder(y) if self.y_embedder is not None else None
        groups = []
        for name, emb in zip(TOKEN_GROUPS, (label, *embeddings)):
            tok = self.tokens[name][None]
            groups.append(tok.expand(embeddings[0].shape[0], -1, -1) if emb is None else tok + emb[:, None, :])
        return groups

    def _sequence(self, z, h, y, omega, t_min, t_max):
        x = self.patch_embed(self._patchify(z))
        embeddings = (self.omega_embedder(1 - 1 / omega), self.t_min_embedder(t_min), self.t_max_embedder(t_max),
                      self.h_embedder(h))
        return torch.cat([*self._condition_tokens(y, embeddings), x.to(embeddings[0].dtype)], dim=1)

    def _sequence_jvp(self, z, h, y, z_dot, h_dot, omega, t_min, t_max, ops: JVPOps):
        """The sequence and its tangent: only the patch tokens (z) and the time tokens (h) have one; t is no input."""
        kt = z_dot.shape[0]
        x, x_dot = self.patch_embed.forward_jvp(self._patchify(z), self._patchify(z_dot), ops)
        he, he_dot = self.h_embedder.forward_jvp(h, h_dot, ops)
        embeddings = (self.omega_embedder(1 - 1 / omega), self.t_min_embedder(t_min), self.t_max_embedder(t_max), he)
        seq = torch.cat([*self._condition_tokens(y, embeddings), x.to(he.dtype)], dim=1)
        n_time = self.tokens["time"].shape[0]
        frozen = seq.new_zeros(kt, self.prefix - n_time, self.hidden)  # class, omega, t_min, t_max: no tangent
        seq_dot = torch.cat([frozen, he_dot.to(seq.dtype)[:, None, :].expand(kt, n_time, self.hidden),
                             x_dot.to(seq.dtype)], dim=1)
        return seq, seq_dot

    def _branch(self, blocks, final, seq):
        cos, sin = self._angles()
        for block in blocks:
            seq = block(seq, cos, sin)
        return self._unpatchify(final(seq[:, self.prefix:]))

    # ------------------------------------------------------------------------------------------------ forwards
    def _forward_plain(self, z, t, h, y, *, head=None, omega, t_min, t_max):
        seq = self._sequence(z, h, y, omega, t_min, t_max)
        cos, sin = self._angles()
        for block in self.shared_blocks:
            seq = block(seq, cos, sin)
        if head == "v":
            return self._branch(self.v_blocks, self.v_final, seq)
        u = self._branch(self.u_blocks, self.u_final, seq)
        if head == "u" or self.v_final is None:
            return u
        return u, self._branch(self.v_blocks, self.v_final, seq)

    def _forward_jvp(self, z, t, h, y, z_dot, t_dot, h_dot, ops: JVPOps, *, head=None, omega, t_min, t_max):
        seq, seq_dot = self._sequence_jvp(z, h, y, z_dot, h_dot, omega, t_min, t_max, ops)
        cos, sin = self._angles()
        for block in self.shared_blocks:
            seq, seq_dot = block.forward_jvp(seq, seq_dot, cos, sin, ops)
        u_seq, u_dot = seq, seq_dot
        for block in self.u_blocks:
            u_seq, u_dot = block.forward_jvp(u_seq, u_dot, cos, sin, ops)
        u, u_dot = self.u_final.forward_jvp(u_seq[:, self.prefix:], u_dot[:, self.prefix:], ops)
        u, u_dot = self._unpatchify(u), self._unpatchify(u_dot)
        if head == "u" or self.v_final is None:
            return u, u_dot
        # the v-branch: primal only (the objectives need no tangent of v), from the shared trunk's primal
        return u, u_dot, self._branch(self.v_blocks, self.v_final, seq)


def build_imf_dit(name: str, *, input_size=32, in_channels=4, num_classes=1000, backend="explicit",
                  **kwargs) -> IMFDiT:
    """An iMF network from the registry, e.g. build_imf_dit('iMF-B/2', input_size=32, in_channels=4, num_classes=1000).
    kwargs override the constructor's other arguments (v_branch=False: inference, as the official eval mode)."""
    if name not in IMF_MODELS:
        raise ValueError(f"unknown iMF model {name!r}; choose one of {sorted(IMF_MODELS)}")
    cfg = IMF_MODELS[name]
    return IMFDiT(input_size, in_channels, cfg.hidden, cfg.depth, cfg.heads, cfg.patch, num_classes=num_classes,
                  head_depth=cfg.head_depth, backend=backend, **kwargs)


def build_imf_from_config(cfg, data_shape: tuple[int, ...], num_classes: int, backend: str, spec=None) -> IMFDiT:
    """The builder of model.arch=imf_dit (registry signature: cfg, data_shape, num_classes, backend[, spec]).

    cfg.name from IMF_MODELS; cfg.hidden / depth / heads / patch override its sizes when > 0. The SwiGLU width is iMF's
    int(hidden * 8 / 3): cfg.mlp_ratio (DiT's MLP) must stay at its default 4.0. `spec` (the heads and conditions an
    objective calls the network with, if given) must ask for no more than iMF's: heads ("u", "v") and the conditions
    ("omega", "t_min", "t_max"); a spec with the head "u" alone builds the network without its v-branch."""
    if len(data_shape) != 3:
        raise ValueError(f"model.arch=imf_dit needs image-like data (C, H, W); the dataset gives {data_shape}")
    if cfg.name not in IMF_MODELS:
        raise ValueError(f"unknown model.name {cfg.name!r} for model.arch=imf_dit; choose one of {sorted(IMF_MODELS)}")
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"model.mlp_ratio={cfg.mlp_ratio} applies to DiT's MLP; iMF's SwiGLU width is fixed at "
                         f"int(hidden * 8 / 3) as in the official code")
    v_branch = True
    if spec is not None:
        extra_heads = [h for h in spec.heads if h not in IMFDiT.heads]
        if extra_heads:
            raise ValueError(f"model.arch=imf_dit has the heads {list(IMFDiT.heads)}; the objective asks for "
                             f"{extra_heads} too")
        if tuple(spec.conditions) != IMFDiT.conditions:
            raise ValueError(f"model.arch=imf_dit takes the conditions {list(IMFDiT.conditions)} (iMF's guidance "
                             f"inputs); the objective calls it with {list(spec.conditions)}")
        v_branch = "v" in spec.heads
    base = IMF_MODELS[cfg.name]
    c, h, w = data_shape
    depth = cfg.depth or base.depth
    return IMFDiT((h, w), c, cfg.hidden or base.hidden, depth, cfg.heads or base.heads, cfg.patch or base.patch,
                  num_classes=num_classes, head_depth=min(base.head_depth, depth), v_branch=v_branch, backend=backend)


__all__ = ["IMFDiT", "IMFBlock", "IMFConfig", "IMF_MODELS", "IMF_PARAMETERS", "build_imf_dit", "build_imf_from_config"]
