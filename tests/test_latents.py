"""The latent pipeline end to end on a tiny image folder with a tiny random AutoencoderKL (nothing downloaded):
prepare-latents -> train on the shards -> sample with decoding -> images of the right shape; the posterior and scale
conventions; resuming an interrupted prepare-latents; clear errors for unusable VAE paths."""
import json

import numpy as np
import pytest
import torch

from meanflow.cli import main
from meanflow.data.datasets import ImageFolder, LatentShards
from meanflow.data.latents import (
    VAEError,
    decode_latents,
    encode_images,
    load_vae,
    manifest_scale_factor,
)
from tests._latent_fixtures import make_image_folder, make_tiny_vae
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_src")
    return make_image_folder(root / "images"), make_tiny_vae(root / "vae")


def test_prepare_train_sample_end_to_end(src, tmp_path, capsys):
    images, vae_dir = src
    lat = tmp_path / "latents"
    assert main(["prepare-latents", "--images", str(images), "--vae", str(vae_dir), "--out", str(lat),
                 "--image-size", "16", "--flip", "--batch-size", "4", "--shard-size", "4", "--workers", "0"]) == 0
    manifest = json.loads((lat / "manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["images"] == 6 and manifest["shape"] == [4, 8, 8]
    assert manifest["classes"] == ["n01_cat", "n02_dog"] and manifest["num_classes"] == 2
    assert manifest["scale_factor"] == 0.18215 and manifest["scaled"] is False and manifest["flip"] is True
    assert manifest["shards"] == ["shard_00000.npy", "shard_00001.npy"] and manifest_scale_factor(lat) == 0.18215
    assert "train with --set data.name=latents" in capsys.readouterr().out

    # what data.py reads: unscaled latents times data.latent_scale; shard 0 = images 0-3, then their mirror images
    ds = LatentShards(lat, scale=0.18215)
    assert len(ds) == 12 and ds.data_shape == (4, 8, 8) and ds.num_classes == 2
    raw = np.load(lat / "shard_00000.npy")
    x, y = ds.get(np.arange(8))
    torch.testing.assert_close(x, torch.from_numpy(raw) * 0.18215)
    assert y.tolist() == [0, 0, 0, 1] * 2
    vae = load_vae(vae_dir)
    folder = ImageFolder(images, 16)
    pix = folder.get(np.arange(4))[0]
    mean = encode_images(vae, torch.cat([pix, pix.flip(-1)]), posterior="mean")
    std = vae.encode(torch.cat([pix, pix.flip(-1)])).latent_dist.std
    z = (torch.from_numpy(raw) - mean) / std                  # the posterior noise: standard normal, per row distinct
    assert 0.5 < z.std() < 1.5 and not torch.allclose(z[0], z[4])

    # train on the shards (the ImageNet preset at toy size)
    run = tmp_path / "run"
    assert main(["train", "--preset", "imagenet-B/2", "--out", str(run), "--set", f"data.path={lat}",
                 "--set", "data.num_classes=0", "--set", "model.name=DiT-Micro/4",
                 "--set", "model.backend=explicit", "--set", "train.precision=fp32", "--set", "train.steps=2",
                 "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "train.threads=1",
                 "--set", "train.grid_size=2", "--set", "eval.enabled=false"]) == 0
    capsys.readouterr()
    # a latent model's samples need the VAE to become an image batch
    assert main(["sample", "--ckpt", str(run), "--num", "2", "--out", str(tmp_path / "x.npz")]) == 2
    assert "pass --vae PATH" in capsys.readouterr().err

    # sample with decoding: uint8 NHWC images in the ADM layout, labels alongside
    out = tmp_path / "samples.npz"
    assert main(["sample", "--ckpt", str(run), "--num", "5", "--batch-size", "2", "--vae", str(vae_dir),
                 "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z["arr_0"].shape == (5, 16, 16, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].shape == (5,) and set(z["arr_1"].tolist()) <= {0, 1}
    assert "arr_0 uint8 (5, 16, 16, 3)" in capsys.readouterr().out
    # a PNG grid decoded too
    assert main(["sample", "--ckpt", str(run), "--num", "2", "--vae", str(vae_dir), "--out",
                 str(tmp_path / "g.png")]) == 0
    from PIL import Image

    # one row of 16 px decoded images with 2 px padding, upscaled 4x (8 px latents would give 8 x (8 + 4))
    assert Image.open(tmp_path / "g.png").size[1] == 4 * (16 + 4)

    # with data.vae set, the trainer's sample grids are decoded as well
    from meanflow.training.checkpoint import load_checkpoint
    from meanflow.training.config import RunConfig, apply_overrides
    from meanflow.training.trainer import Trainer

    cfg = apply_overrides(RunConfig.from_dict(load_checkpoint(run)["config"]), [f"data.vae={vae_dir}"])
    trainer = Trainer(cfg, tmp_path / "run2", resume=run)
    paths = trainer.sample_grids(tmp_path / "grids", "x_")
    assert Image.open(paths[0]).size[1] == 4 * (16 + 4)


def test_decode_divides_by_the_scale_it_was_trained_with(src):
    vae = load_vae(src[1])
    z = torch.randn(2, 4, 8, 8)
    direct = vae.decode(z).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_latents(vae, z * 0.5, 0.5), direct, rtol=1e-5, atol=1e-5)
    assert decode_latents(vae, z[:0], 0.5).shape == (0, 3, 16, 16)


def test_interrupted_prepare_latents_continues(src, tmp_path):
    images, vae_dir = src
    args = ["prepare-latents", "--images", str(images), "--vae", str(vae_dir), "--out", str(tmp_path / "lat"),
            "--image-size", "16", "--shard-size", "2", "--workers", "0", "--format", "safetensors"]
    assert main(args) == 0
    shards = sorted((tmp_path / "lat").glob("*.safetensors"))
    assert len(shards) == 3
    before = {p.name: p.read_bytes() for p in shards}
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()                                         # as if killed before writing shard 1
    assert main(args) == 0
    assert {p.name: p.read_bytes() for p in shards} == before  # redone identically (seeded per image)
    assert shards[0].stat().st_mtime_ns == stamps[shards[0].name]  # finished shards are not redone
    assert len(LatentShards(tmp_path / "lat")) == 6


def test_unusable_vae_paths_are_clear_errors(src, tmp_path, capsys):
    images, vae_dir = src
    with pytest.raises(VAEError, match="does not exist"):
        load_vae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEError, match="is not a diffusers model folder"):
        load_vae(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(VAEError, match="describes a diffusers UNet2DModel, not an AutoencoderKL"):
        load_vae(tmp_path / "unet")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(VAEError, match="cannot load the AutoencoderKL"):
        load_vae(tmp_path / "noweights")
    pipeline = tmp_path / "pipeline"                           # a pipeline folder: the VAE in vae/
    pipeline.mkdir()
    (pipeline / "vae").symlink_to(vae_dir)
    assert load_vae(pipeline).config.latent_channels == 4
    assert main(["prepare-latents", "--images", str(images), "--vae", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "meanflow prepare-latents: error: VAE path" in err and "nothing is downloaded" in err
