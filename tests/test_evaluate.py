"""Evaluation: sliced Wasserstein on known distributions, the Fréchet distance on known statistics, FID through a
small TorchScript feature network, and the cached digit classifier."""
import math
import os

import numpy as np
import pytest
import torch

from meanflow.training.config import DataConfig, EvalConfig
from meanflow.evaluation.evaluate import evaluate_model, load_inception
from meanflow.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_of_features,
    random_directions,
    sliced_wasserstein,
    wasserstein_1d,
)
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)


# ------------------------------------------------------------------------------------------ sliced Wasserstein
def test_sliced_wasserstein_of_shifted_gaussians():
    """x ~ N(0, I2), y ~ N(mu, I2): every projection is a pure shift by theta.mu, so W_p(theta) = |theta.mu|, hence
    SW_2 = sqrt(mean (theta.mu)^2) and SW_1 = mean |theta.mu| over the projections used (-> |mu| / sqrt(2) and
    2 |mu| / pi for many directions)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([3.0, 0.0])
    x, y = torch.randn(5000, 2, generator=g), torch.randn(5000, 2, generator=g) + mu
    proj = random_directions(500, 2, seed=0) @ mu.double()
    sw2, sw1 = sliced_wasserstein(x, y, p=2, num_projections=500), sliced_wasserstein(x, y, p=1, num_projections=500)
    assert sw2 == pytest.approx(float(proj.pow(2).mean().sqrt()), abs=0.05)
    assert sw1 == pytest.approx(float(proj.abs().mean()), abs=0.05)
    assert sw2 == pytest.approx(3 / math.sqrt(2), abs=0.15) and sw1 == pytest.approx(6 / math.pi, abs=0.15)
    assert sliced_wasserstein(x, x[torch.randperm(5000, generator=g)]) == pytest.approx(0, abs=1e-9)
    assert sliced_wasserstein(x, torch.randn(5000, 2, generator=g)) < 0.06


def test_wasserstein_1d_is_exact_for_unequal_sizes():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(7), rng.standard_normal(5) + 1
    ours = wasserstein_1d(torch.tensor(a)[None], torch.tensor(b)[None], p=1)[0]
    assert float(ours) == pytest.approx(wasserstein_distance(a, b), rel=1e-12)
    # W_2 of {0, 1} vs {0}: half the mass moves by 1 -> W_2^2 = 0.5
    assert float(wasserstein_1d(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0]]), p=2)[0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same d"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 3))


# ------------------------------------------------------------------------------------------ Fréchet distance
def test_frechet_distance_known_values():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((3000, 8)) @ rng.standard_normal((8, 8))
    assert frechet_distance_of_features(f, f) == pytest.approx(0, abs=1e-8)
    shift = np.arange(8) * 0.5
    assert frechet_distance_of_features(f, f + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2 plus the mean term
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    assert frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(
        3 + float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum()))
    mu, sigma = feature_statistics(torch.tensor(f))
    assert np.allclose(mu, f.mean(0)) and np.allclose(sigma, np.cov(f, rowvar=False))
    with pytest.raises(ValueError, match="statistics do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------------- FID via TorchScript file
class TinyFeatures(torch.nn.Module):
    """Stands in for the Inception file: uint8-valued images -> features, with the `return_features` flag."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = torch.relu(self.conv(x.float() / 255.0)).mean(dim=(2, 3))
        return f if return_features else f.sum(1)


@pytest.fixture
def feature_file(tmp_path):
    path = tmp_path / "tiny_features.pt"
    torch.jit.script(TinyFeatures()).save(str(path))
    return path


def test_fid_with_a_torchscript_feature_file(feature_file):
    ext, reason = load_inception(feature_file)
    assert reason == "" and ext.kwargs == {"return_features": True}
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    f = ext.features(x, batch_size=20)
    assert f.shape == (64, 6) and f.dtype == torch.float64
    assert ext.features(x[:, :1]).shape == (64, 6)   # grey images are repeated to RGB
    assert frechet_distance_of_features(f, f) == pytest.approx(0, abs=1e-10)
    assert frechet_distance_of_features(f, ext.features((x + 0.5).clamp(-1, 1))) > 1e-4


def test_fid_reasons_when_no_file(tmp_path, feature_file):
    assert load_inception("")[0] is None and "nothing is downloaded" in load_inception("")[1]
    assert load_inception(tmp_path / "nope.pt")[1] == f"Inception weights file {tmp_path / 'nope.pt'} not found"
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "cannot load Inception weights file" in load_inception(tmp_path / "junk.pt")[1]


def test_image_folder_evaluation_uses_the_feature_file(tmp_path, feature_file, monkeypatch, capsys):
    from PIL import Image

    from meanflow.models import DiT

    for k in range(2):
        (tmp_path / "imgs" / f"c{k}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8, 3), 60 * k + 10 * i, np.uint8)).save(tmp_path / "imgs" / f"c{k}" / f"{i}.png")
    model = DiT(8, 3, hidden=16, depth=1, heads=2, patch=4, num_classes=2)
    data = DataConfig(name="folder", path=str(tmp_path / "imgs"), image_size=8)
    out = evaluate_model(model, data, EvalConfig(num_samples=12, steps=(1,), inception=str(feature_file)))
    assert out["1step"]["fid"] > 0 and "FID with" in out["metric"]
    monkeypatch.delenv("MEANFLOW_INCEPTION", raising=False)
    out = evaluate_model(model, data, EvalConfig(num_samples=12, steps=(1,)))
    assert "no Inception weights file given" in out["fid_skipped"] and "FID skipped" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- digit classifier
@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    old = os.environ.get("MEANFLOW_CACHE")
    os.environ["MEANFLOW_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["MEANFLOW_CACHE"]
    if old is None:
        del os.environ["MEANFLOW_CACHE"]
    else:
        os.environ["MEANFLOW_CACHE"] = old


def test_digit_classifier_caches_and_is_accurate(fresh_cache):
    from meanflow.evaluation.classifier import accuracy, load_or_train
    from meanflow.data.datasets import build_dataset

    _, meta = load_or_train("digits", verbose=False)
    assert meta["trained"] and meta["test_accuracy"] > 0.9 and meta["path"].startswith(fresh_cache)
    again, meta2 = load_or_train("digits", verbose=False)
    assert not meta2["trained"] and meta2["test_accuracy"] == meta["test_accuracy"]
    test = build_dataset("digits", split="test")
    assert accuracy(again, test.x, test.y) == pytest.approx(meta["test_accuracy"])
    with pytest.raises(ValueError, match="exists for 'mnist' and 'digits'"):
        load_or_train("moons")


def test_digit_metrics_of_real_and_untrained_samples(fresh_cache):
    """The metric separates real digits from noise: an untrained model's samples score far below real digits."""
    from meanflow.evaluation.classifier import load_or_train, predict
    from meanflow.data.datasets import build_dataset
    from meanflow.models import DiT

    model = DiT(8, 1, hidden=16, depth=1, heads=2, patch=2, num_classes=10)  # adaLN-zero: samples = the noise
    out = evaluate_model(model, DataConfig(name="digits"), EvalConfig(num_samples=200, steps=(1,)))
    ref = out["reference"]
    assert ref["classifier_test_accuracy"] > 0.9 and ref["fd_real_train_vs_test"] < 0.25 * out["1step"]["fd"]
    assert 0 <= out["1step"]["confident"] <= 1 and out["1step"]["label_match"] < 0.4
    clf, _ = load_or_train("digits", verbose=False)
    test = build_dataset("digits", split="test")
    _, conf, _ = predict(clf, test.x)
    assert float((conf > 0.9).float().mean()) > out["1step"]["confident"]


@pytest.mark.full
def test_mnist_classifier_reaches_high_accuracy(fresh_cache):
    from meanflow.evaluation.classifier import load_or_train

    _, meta = load_or_train("mnist", verbose=False)
    assert meta["test_accuracy"] > 0.93
