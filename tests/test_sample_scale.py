"""Sampling at scale: `meanflow sample --num N --out X.npz` writes exactly N uint8 NHWC images (ADM's arr_0, labels in
arr_1), deterministic by seed, the same over 2 torchrun processes as in one (no duplicates, no drops); FID of such a
batch against reference statistics or images with a local TorchScript feature file, and the reason when there is none."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow.cli import main
from meanflow.evaluation.sampling import per_sample_noise, rank_rounds, sample_labels
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]


class TinyFeatures(torch.nn.Module):
    """Stands in for the Inception file: uint8-valued images -> 5 features (with the `return_features` flag)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 5, 3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = torch.tanh(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))
        return f if return_features else f.sum(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny class-conditional DiT on 8x8 digits, one training step (enough to sample from)."""
    from meanflow.training.config import apply_overrides
    from meanflow.training.presets import get_preset
    from meanflow.training.trainer import Trainer

    out = tmp_path_factory.mktemp("sample_run")
    torch.set_num_threads(1)
    cfg = apply_overrides(get_preset("digits"), [
        "train.steps=1", "train.batch_size=8", "model.hidden=16", "model.depth=1", "model.heads=2",
        "train.progress=false", "train.threads=1", "eval.enabled=false", "train.grid_size=10", "train.device=cpu"])
    Trainer(cfg, out).train()
    return out


def test_labels_noise_and_the_split_over_ranks():
    assert sample_labels(5, 3, "balanced").tolist() == [0, 1, 2, 0, 1]
    assert sample_labels(5, 10, [7, 2]).tolist() == [7, 2, 7, 2, 7]
    u = sample_labels(1000, 10, "uniform", seed=1)
    assert torch.equal(u, sample_labels(1000, 10, "uniform", seed=1)) and set(u.tolist()) == set(range(10))
    assert not torch.equal(u, sample_labels(1000, 10, "uniform", seed=2))
    assert sample_labels(5, 0, "uniform") is None
    with pytest.raises(ValueError, match=r"must lie in \[0, 9\]"):
        sample_labels(5, 10, [10])
    # noise of sample i depends on (seed, i) only: any subset, in any batch, gets the same rows
    full = per_sample_noise(range(6), (1, 4, 4), seed=3)
    torch.testing.assert_close(per_sample_noise([4, 1], (1, 4, 4), seed=3), full[[4, 1]], rtol=0, atol=0)
    # the rounds cover 0..N-1 exactly once, for any world size
    for num, bs, world in [(7, 2, 2), (50, 8, 3), (5, 10, 4), (1, 1, 8)]:
        seen = []
        for q in range(rank_rounds(num, bs, world)):
            for rank in range(world):
                start = (q * world + rank) * bs
                seen += list(range(min(start, num), min(start + bs, num)))
        assert seen == list(range(num))


@pytest.mark.full
def test_npz_over_two_torchrun_processes_equals_one(run, tmp_path, capsys):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    assert main(["sample", "--ckpt", str(run), "--device", "cpu", "--num", "7", "--batch-size", "2", "--out", str(one)]) == 0
    assert "wrote" in capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "meanflow", "sample", "--ckpt", str(run), "--num-samples", "7",
                           "--batch-size", "2", "--device", "cpu", "--out", str(two)],
                          capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 1 and "2 ranks" in proc.stdout
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].shape == (7, 8, 8, 1) and a["arr_0"].dtype == np.uint8
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
        images = a["arr_0"].reshape(7, -1)
        assert len({row.tobytes() for row in images}) == 7          # no sample written twice
    # deterministic by seed: the same file again, another seed another batch
    again, other = tmp_path / "again.npz", tmp_path / "other.npz"
    assert main(["sample", "--ckpt", str(run), "--device", "cpu", "--num", "7", "--batch-size", "2", "--out", str(again)]) == 0
    assert main(["sample", "--ckpt", str(run), "--device", "cpu", "--num", "7", "--batch-size", "2", "--seed", "1", "--out",
                 str(other)]) == 0
    with np.load(one) as a, np.load(again) as b, np.load(other) as c:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and not np.array_equal(a["arr_0"], c["arr_0"])


def test_fid_of_sample_batches(run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEANFLOW_INCEPTION", raising=False)
    feats = tmp_path / "tiny_features.pt"
    torch.jit.script(TinyFeatures()).save(str(feats))
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["sample", "--ckpt", str(run), "--num", "40", "--labels", "balanced", "--out", str(a)]) == 0
    assert main(["sample", "--ckpt", str(run), "--num", "40", "--seed", "5", "--out", str(b)]) == 0
    capsys.readouterr()
    import json

    stats = tmp_path / "a_stats.npz"
    assert main(["eval", "--samples", str(a), "--inception", str(feats), "--save-stats", str(stats)]) == 0
    with np.load(stats) as s:
        assert s["mu"].shape == (5,) and s["sigma"].shape == (5, 5)
    capsys.readouterr()
    # against its own statistics: 0; against its own images: 0; against another batch: > 0
    for ref in (stats, a):
        assert main(["eval", "--samples", str(a), "--fid-ref", str(ref), "--inception", str(feats)]) == 0
        assert json.loads(capsys.readouterr().out.removeprefix("metrics: "))["fid"] == pytest.approx(0, abs=1e-6)
    assert main(["eval", "--samples", str(b), "--fid-ref", str(stats), "--inception", str(feats),
                 "--out", str(tmp_path / "fid.json")]) == 0
    metrics = json.loads((tmp_path / "fid.json").read_text())
    assert metrics["fid"] > 1e-4 and metrics["num_samples"] == 40 and "statistics in" in metrics["reference"]
    capsys.readouterr()
    # no weights file: FID skipped with the reason, nothing downloaded
    assert main(["eval", "--samples", str(a), "--fid-ref", str(stats)]) == 0
    out = capsys.readouterr().out
    assert "FID skipped: no Inception weights file given" in out and "nothing is downloaded" in out
    # a weights file named on the command line that is not there: bad input (exit status 2), not a silent skip
    assert main(["eval", "--samples", str(a), "--inception", str(tmp_path / "nope.pt")]) == 2
    assert f"--inception file {tmp_path / 'nope.pt'} does not exist" in capsys.readouterr().err
    # usage errors
    assert main(["eval"]) == 2 and "needs --ckpt RUN" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(run), "--labels", "x", "--out", str(tmp_path / "c.npz")]) == 2
    assert "--labels takes class numbers" in capsys.readouterr().err
