"""Checkpoint IO: round trip, keep-last-N and the `latest` pointer, atomic writes under failures and a real kill,
clear errors for corrupt / foreign / missing checkpoints, and exported safetensors weights."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from meanflow.training import checkpoint as ck
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "config": {"preset": "x"}, "rng": {"python": (3, (1, 2), None)}}


def test_round_trip_keep_and_latest(tmp_path):
    for step in (10, 20, 30):
        path = ck.save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert path == tmp_path / "checkpoints" / "ckpt_00000030.pt"
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt_00000020.pt", "ckpt_00000030.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "ckpt_00000030.pt"
    state = ck.load_checkpoint(tmp_path)  # a run directory resolves to its latest checkpoint
    assert state["step"] == 30 and torch.equal(state["model"]["w"], torch.full((3,), 30.0))
    assert state["rng"]["python"] == (3, (1, 2), None) and state["path"] == str(path)
    assert ck.load_checkpoint(tmp_path / "checkpoints")["step"] == 30
    assert ck.load_checkpoint(ck.checkpoint_path(tmp_path, 20))["step"] == 20


def test_latest_falls_back_to_scanning(tmp_path):
    ck.save_checkpoint(tmp_path, 5, _state(5), keep=0)
    ck.save_checkpoint(tmp_path, 7, _state(7), keep=0)
    (tmp_path / "checkpoints" / "latest").write_text("ckpt_00000099.pt\n")   # points at nothing
    assert ck.latest_checkpoint(tmp_path).name == "ckpt_00000007.pt"
    (tmp_path / "checkpoints" / "latest").unlink()
    assert ck.latest_checkpoint(tmp_path).name == "ckpt_00000007.pt"


def test_failure_before_replace_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, _state(1.0))

    def crash(*_):  # the process "dies" after writing the temporary file, before the rename
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ck.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, _state(2.0))
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path)["step"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt_00000001.pt", "latest"]


def test_failure_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, _state(1.0))
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError("disk full")

    monkeypatch.setattr(ck.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, 2, _state(2.0))
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path)["step"] == 1
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # the partial file is removed


def test_sigkill_during_write_leaves_a_loadable_checkpoint(tmp_path):
    """A real process killed with SIGKILL while its temporary checkpoint file is being written/synced."""
    child = textwrap.dedent(f"""
        import os, sys, time, torch
        sys.path.insert(0, {str(REPO)!r})
        from meanflow.training import checkpoint as ck
        real_fsync = os.fsync
        def slow_fsync(fd):
            time.sleep(0.3)        # widen the window between 'bytes written' and 'renamed'
            real_fsync(fd)
        ck.os.fsync = slow_fsync
        for step in range(1, 1000):
            ck.save_checkpoint({str(tmp_path)!r}, step, {{"model": {{"w": torch.full((1_000_000,), float(step))}}}},
                               keep=2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    ckdir = tmp_path / "checkpoints"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait for one complete checkpoint AND a temporary file of the next one
            done = ck.list_checkpoints(tmp_path)
            if done and list(ckdir.glob(".ckpt_*.tmp")):
                break
            assert proc.poll() is None, "the writer died on its own"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(ckdir.glob(".ckpt_*.tmp"))  # the kill did interrupt a write
    state = ck.load_checkpoint(tmp_path)
    assert state["step"] >= 1 and torch.equal(state["model"]["w"], torch.full((1_000_000,), float(state["step"])))


def test_corrupt_truncated_and_foreign_files_name_the_path(tmp_path):
    path = ck.save_checkpoint(tmp_path, 3, _state(3.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=f"checkpoint {path} is corrupt or truncated"):
        ck.load_checkpoint(path)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ck.CheckpointError, match=f"checkpoint {path} is corrupt or truncated"):
        ck.load_checkpoint(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(ck.CheckpointError, match=f"{other} is not a meanflow checkpoint"):
        ck.load_checkpoint(other)
    with pytest.raises(ck.CheckpointError, match=f"checkpoint {tmp_path / 'missing.pt'} does not exist"):
        ck.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ck.CheckpointError, match="no checkpoint found in .*empty_run"):
        ck.load_checkpoint(tmp_path / "empty_run")


def test_checkpoints_never_unpickle_code(tmp_path):
    """weights_only loading: a checkpoint smuggling an arbitrary object is refused, not executed."""
    path = tmp_path / "checkpoints" / "ckpt_00000001.pt"
    path.parent.mkdir()
    torch.save({"format": ck.FORMAT, "step": 1, "evil": Path("x")}, path)
    with pytest.raises(ck.CheckpointError, match="corrupt or truncated"):
        ck.load_checkpoint(path)


def test_exported_weights_round_trip(tmp_path):
    sd = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    ck.export_weights(tmp_path / "w.safetensors", sd, {"preset": "toy"})
    loaded, config, _ = ck.load_weights(tmp_path / "w.safetensors")
    assert config == {"preset": "toy"} and all(torch.equal(loaded[k], sd[k]) for k in sd)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ck.CheckpointError, match="bad.safetensors is corrupt or truncated"):
        ck.load_weights(tmp_path / "bad.safetensors")
