"""Datasets (shapes, ranges, labels), image folders and latent shards on tiny temp data, clear errors, and the
deterministic, resumable batch iterator."""
import json

import numpy as np
import pytest
import torch

from meanflow.data.datasets import TOYS, BatchIterator, ImageFolder, LatentShards, build_dataset, split_indices
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)


@pytest.mark.parametrize("name", TOYS)
def test_toys_shapes_and_determinism(name):
    ds = build_dataset(name)
    assert ds.data_shape == (2,) and ds.num_classes == 0 and not ds.finite and ds.kind == "points"
    x, y = ds.sample(4000, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2) and x.dtype == torch.float32 and y is None
    assert x.abs().max() < 3.5 and 0.3 < x.std() < 2.0  # roughly unit scale, what the noise expects
    x2, _ = ds.sample(4000, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_checkerboard_occupies_alternate_squares():
    x, _ = build_dataset("checkerboard").sample(5000, torch.Generator().manual_seed(1))
    cells = torch.floor(x).long() + 2          # cell indices 0..3 on the 4x4 board over [-2, 2]^2
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all() or ((cells[:, 0] + cells[:, 1]) % 2 == 1).all()


def test_mnist_and_digits():
    mnist = build_dataset("mnist")
    assert mnist.data_shape == (1, 32, 32) and mnist.num_classes == 10 and len(mnist) == 4500
    x, y = mnist.get(np.arange(0, 4500, 450))
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1.0 and (x[..., :2, :] == -1).all()  # padded border
    assert y.dtype == torch.int64 and set(build_dataset("mnist", split="test").y.tolist()) == set(range(10))
    assert len(build_dataset("mnist", split="test")) == 500
    digits = build_dataset("digits", split="all")
    assert digits.data_shape == (1, 8, 8) and len(digits) == 1797 and digits.num_classes == 10
    assert digits.x.min() == -1 and digits.x.max() == 1


def test_splits_are_disjoint():
    train, test = split_indices(100, "train"), split_indices(100, "test")
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 100
    with pytest.raises(ValueError, match="split must be"):
        split_indices(10, "val")


# ---------------------------------------------------------------------------------------------- image folder
def _write_images(root, classes=("cat", "dog"), per_class=3, size=(40, 24)):
    from PIL import Image

    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = np.full((size[1], size[0], 3), 40 * (k + 1) + i, dtype=np.uint8)
            arr[:, : size[0] // 2, 0] = 255          # a red left half, to check the center crop
            Image.fromarray(arr).save(root / name / f"{i}.png")


def test_image_folder(tmp_path):
    _write_images(tmp_path)
    (tmp_path / "empty").mkdir()                     # folders without images are not classes
    (tmp_path / "cat" / "notes.txt").write_text("x")  # nor are non-image files
    ds = build_dataset("folder", path=str(tmp_path), image_size=16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.num_classes == 2 and ds.data_shape == (3, 16, 16)
    x, y = ds.get(np.array([0, 5]))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]
    assert x.min() >= -1 and x.max() <= 1
    # 40x24 -> short side 16 -> 27x16 -> center crop keeps both halves: red on the left, not on the right
    assert x[0, 0, :, 0].min() > 0.99 and x[0, 0, :, -1].max() < 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path / 'nope'} does not exist"):
        build_dataset("folder", path=str(tmp_path / "nope"))
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match=f"no class sub-folders with images found in {tmp_path}"):
        build_dataset("folder", path=str(tmp_path))
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolder(tmp_path, 8)
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        ds.get(np.array([0]))
    with pytest.raises(ValueError, match="needs a path"):
        build_dataset("folder")


# --------------------------------------------------------------------------------------------- latent shards
def test_latent_shards_all_formats(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    lat = [rng.standard_normal((n, 4, 4, 4)).astype(np.float32) for n in (3, 4, 5)]
    lab = [rng.integers(0, 7, n) for n in (3, 4, 5)]
    save_file({"latents": lat[0], "labels": lab[0]}, str(tmp_path / "a.safetensors"))
    np.savez(tmp_path / "b.npz", latents=lat[1], labels=lab[1])
    np.save(tmp_path / "c.npy", lat[2])
    np.save(tmp_path / "c.labels.npy", lab[2])
    ds = build_dataset("latents", path=str(tmp_path), latent_scale=0.5)
    assert len(ds) == 12 and ds.data_shape == (4, 4, 4) and ds.num_classes == max(map(max, lab)) + 1
    x, y = ds.get(np.array([11, 0, 4, 3]))
    assert torch.allclose(x[0], torch.from_numpy(lat[2][4]) * 0.5)
    assert torch.allclose(x[1], torch.from_numpy(lat[0][0]) * 0.5)
    assert torch.allclose(x[2], torch.from_numpy(lat[1][1]) * 0.5)
    assert y.tolist() == [lab[2][4], lab[0][0], lab[1][1], lab[1][0]]
    # a manifest chooses (and orders) the shards and sets the class count
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": ["b.npz"], "num_classes": 1000}))
    ds = LatentShards(tmp_path)
    assert len(ds) == 4 and ds.num_classes == 1000
    assert torch.allclose(ds.get(np.array([0]))[0][0], torch.from_numpy(lat[1][0]) * 0.18215)


def test_latent_shard_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="latent data .* does not exist"):
        build_dataset("latents", path=str(tmp_path / "none"))
    with pytest.raises(ValueError, match=f"no latent shards found in {tmp_path}"):
        build_dataset("latents", path=str(tmp_path))
    np.savez(tmp_path / "bad.npz", latents=np.zeros((5, 4, 2, 2), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"shard .*bad.npz has latents \(5, 4, 2, 2\) but labels \(3,\)"):
        build_dataset("latents", path=str(tmp_path))
    (tmp_path / "bad.npz").unlink()
    np.savez(tmp_path / "nolab.npz", latents=np.zeros((5, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"nolab.npz lacks \['labels'\]"):
        build_dataset("latents", path=str(tmp_path))
    (tmp_path / "nolab.npz").unlink()
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="has no labels file .*x.labels.npy"):
        build_dataset("latents", path=str(tmp_path))
    (tmp_path / "x.npy").unlink()
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ValueError, match="cannot read latent shard .*trunc.safetensors"):
        build_dataset("latents", path=str(tmp_path))
    (tmp_path / "trunc.safetensors").unlink()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest .* is malformed"):
        build_dataset("latents", path=str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; choose one of"):
        build_dataset("cifar")


# ------------------------------------------------------------------------------------------- batch iterator
class _Range:
    """A finite dataset whose examples are their own indices."""
    finite, name, data_shape, num_classes = True, "range", (1,), 3

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def get(self, idx):
        idx = torch.as_tensor(idx)
        return idx.float()[:, None], idx % 3


def test_iterator_covers_each_epoch_and_crosses_epoch_ends():
    it = BatchIterator(_Range(10), batch_size=4, seed=3)
    seen = torch.cat([next(it)[0][:, 0] for _ in range(5)]).long()      # 20 indices = exactly 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])                         # reshuffled per epoch
    assert it.state_dict()["epoch"] == 2 and it.state_dict()["offset"] == 0


@pytest.mark.parametrize("dataset", [_Range(10), build_dataset("moons")], ids=["finite", "infinite"])
def test_iterator_resumes_the_same_batches(dataset):
    it = BatchIterator(dataset, batch_size=4, seed=5)
    for _ in range(3):
        next(it)
    state = it.state_dict()
    expected = [next(it)[0] for _ in range(4)]
    resumed = BatchIterator(dataset, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)[0]) for a in expected)
    with pytest.raises(ValueError, match="saved with seed 5 and batch size 4"):
        BatchIterator(dataset, batch_size=8, seed=5).load_state_dict(state)


def test_iterator_ranks_partition_the_global_batch():
    full = next(BatchIterator(_Range(10), batch_size=4, seed=1))[0]
    parts = [next(BatchIterator(_Range(10), batch_size=4, seed=1, rank=r, world_size=2))[0] for r in range(2)]
    assert sorted(torch.cat(parts)[:, 0].tolist()) == sorted(full[:, 0].tolist())
    with pytest.raises(ValueError, match="must divide by world_size"):
        BatchIterator(_Range(10), batch_size=3, seed=1, rank=0, world_size=2)
