"""Tiny diffusers transformers for the wrapped-network tests: one or two layers, width 16, a few tokens, random init.

TINY[name]() -> (module, data_shape, num_classes); the text-conditioned models are class-conditional through the
adapter's learned text tokens."""
from __future__ import annotations

import warnings


def _quiet():
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


def dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, num_layers=1,
                                 sample_size=4, patch_size=2, num_embeds_ada_norm=3, norm_num_groups=1), (2, 4, 4), 3


def sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=2, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=2, pos_embed_max_size=4), (2, 4, 4), 3


def flux():
    from diffusers import FluxTransformer2DModel

    # images of 1 channel packed into 2x2 patches: in_channels 4; RoPE over (frame, row, col) with 2 + 2 + 4 = 8
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)), (1, 4, 6), 3


def wan():
    from diffusers import WanTransformer3DModel

    # a video of 2 frames of 4 x 4, 2 channels
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=2,
                                 out_channels=2, text_dim=8, freq_dim=16, ffn_dim=16, num_layers=1,
                                 rope_max_seq_len=16), (2, 2, 4, 4), 3


def pixart():
    from diffusers import PixArtTransformer2DModel

    # out_channels 2 C: a learned-sigma model, whose first C channels the adapter returns
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                    num_layers=1, sample_size=4, patch_size=2, cross_attention_dim=16,
                                    caption_channels=8, norm_num_groups=1), (2, 4, 4), 3


TINY = {"DiT": dit, "SD3": sd3, "Flux": flux, "Wan": wan, "PixArt": pixart}
_quiet()
