"""Tiny inputs for the latent pipeline tests, made on the spot (nothing downloaded): an ImageNet-layout folder of
random PNGs of assorted sizes in 2 class folders, and a randomly initialised diffusers AutoencoderKL (2 blocks: 2x
downsampling, 4 latent channels) saved with save_pretrained."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def make_image_folder(root: Path, per_class: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("n01_cat", "n02_dog")):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = 16 + 3 * i, 20 - 2 * i + c  # not square, not 16: exercises resize + center crop
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"img_{i}.png")
    return root


def make_tiny_vae(path: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(str(path))
    return path
