"""The command line: train / sample / eval / presets in-process, one `python -m meanflow` subprocess, resume, and the
error messages (unknown preset, unknown --set key, bad value, corrupt checkpoint, non-finite loss)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meanflow.cli import main
from meanflow.training.config import apply_overrides, valid_keys
from meanflow.training.presets import PRESETS, get_preset
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
TOY = ["--preset", "toy", "--set", "train.steps=8", "--set", "train.batch_size=32", "--set", "model.hidden=32",
       "--set", "model.depth=2", "--set", "train.progress=false", "--set", "eval.num_samples=200",
       "--set", "eval.sw_projections=32", "--set", "train.threads=1", "--set", "train.log_every=2"]


def test_presets_listing(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("toy", "mnist", "digits", "imagenet-B/2", "imagenet-L/2", "imagenet-XL/2"):
        assert name in out
    assert len(out.strip().splitlines()) == len(PRESETS)
    assert main(["presets", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "loss.kappa = 0.92  # weight of the conditional prediction" in out
    assert "train.betas = 0.9,0.95  # AdamW betas" in out


def test_imagenet_presets_carry_the_official_settings():
    for size, omega, kappa, t_end in (("B", 1.0, 0.5, 1.0), ("L", 0.2, 0.92, 0.8), ("XL", 0.2, 0.92, 0.75)):
        cfg = get_preset(f"imagenet-{size}/2")
        assert (cfg.loss.omega, cfg.loss.kappa, cfg.loss.t_start, cfg.loss.t_end) == (omega, kappa, 0.0, t_end)
        assert (cfg.loss.ratio, cfg.loss.p, cfg.loss.eps, cfg.loss.t_mean, cfg.loss.t_std) == (0.25, 1.0, 0.01, -0.4, 1.0)
        t = cfg.train
        assert (t.lr, t.weight_decay, t.betas, t.batch_size, t.ema_decays, t.warmup_steps) == \
            (1e-4, 0.0, (0.9, 0.95), 256, (0.9999,), 0)
        assert t.steps * t.batch_size // 1_281_167 == 240 and t.precision == "bf16"
        assert cfg.model.name == f"DiT-{size}/2" and cfg.model.backend == "fused"
        assert cfg.data.name == "latents" and cfg.data.latent_scale == 0.18215 and cfg.data.num_classes == 1000


def test_help_config(capsys):
    assert main(["train", "--preset", "mnist", "--set", "loss.omega=0.5", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "loss.omega = 0.5  # training-time guidance scale" in out and "[train]" in out
    for key in valid_keys(get_preset("mnist")):
        assert key in out


def test_set_parses_by_type_and_rejects_unknown_keys():
    cfg = apply_overrides(get_preset("mnist"), ["train.steps=7", "train.betas=0.8,0.9", "loss.flow_matching=true",
                                                "model.name=DiT-S/2", "train.ema_decays=0.9,0.99,0.999"])
    assert cfg.train.steps == 7 and cfg.train.betas == (0.8, 0.9) and cfg.model.name == "DiT-S/2"
    assert cfg.loss.flow_matching and cfg.loss.jvp_ratio == 0.0 and cfg.loss.weight_power == 0.0
    assert cfg.train.ema_decays == (0.9, 0.99, 0.999)
    with pytest.raises(ValueError, match="unknown config key 'train.stepz'; valid keys: .*train.steps"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(ValueError, match="train.steps takes a int; got 'many'"):
        apply_overrides(cfg, ["train.steps=many"])
    with pytest.raises(ValueError, match="ratio must lie in"):  # the core's own validation runs
        apply_overrides(cfg, ["loss.ratio=2"])
    with pytest.raises(ValueError, match="--set takes key=value"):
        apply_overrides(cfg, ["train.steps"])


def test_error_messages(tmp_path, capsys):
    assert main(["train", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'; available: toy, checkerboard" in capsys.readouterr().err
    assert main(["train", "--preset", "toy", "--set", "loss.omegaa=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'loss.omegaa'; valid keys:" in err and "loss.omega," in err
    assert main(["train", "--preset", "imagenet-B/2", "--out", str(tmp_path / "x")]) == 2
    assert "dataset 'latents' needs a path: --set data.path=..." in capsys.readouterr().err
    bad = tmp_path / "run" / "checkpoints" / "ckpt_00000005.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 truncated")
    for argv in (["train", "--resume", str(tmp_path / "run")], ["sample", "--ckpt", str(bad)],
                 ["eval", "--ckpt", str(tmp_path / "run")]):
        assert main(argv) == 1
        assert f"checkpoint {bad} is corrupt or truncated" in capsys.readouterr().err


def test_toy_train_sample_eval_resume(tmp_path, capsys):
    run = tmp_path / "toy"
    assert main(["train", *TOY, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"sample grid:   {run / 'final_1step.png'}" in out and f"sample grid:   {run / 'final_2step.png'}" in out
    assert '"sw":' in out and "sw_data_vs_data" in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    # a second train into the same directory must not silently overwrite it
    assert main(["train", *TOY, "--out", str(run)]) == 2
    assert f"run directory {run} already has checkpoints: pass --resume {run}" in capsys.readouterr().err
    # resume with more steps: continues at step 8
    assert main(["train", "--resume", str(run), "--set", "train.steps=10", "--set", "eval.enabled=false"]) == 0
    assert "resuming at step 8" in capsys.readouterr().out
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 10
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--midpoint", "0.4", "--num", "50",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["sample", "--ckpt", str(run / "ema.safetensors"), "--out", str(tmp_path / "t.png")]) == 0
    assert main(["sample", "--ckpt", str(run), "--labels", "1", "--out", str(tmp_path / "u.png")]) == 2
    assert "unconditional: --labels does not apply" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(run), "--weights", "model", "--set", "eval.num_samples=100",
                 "--set", "eval.steps=1", "--out", str(tmp_path / "e.json")]) == 0
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert metrics["step"] == 10 and metrics["weights"] == "model" and "1step" in metrics and "2step" not in metrics


def test_mnist_tiny_run(tmp_path, capsys):
    run = tmp_path / "mnist"
    argv = ["train", "--preset", "mnist", "--out", str(run), "--set", "train.steps=3", "--set", "train.batch_size=8",
            "--set", "model.hidden=16", "--set", "model.depth=1", "--set", "model.heads=2",
            "--set", "train.progress=false", "--set", "train.log_every=1", "--set", "train.sample_every=2",
            "--set", "eval.enabled=false", "--set", "train.threads=1"]
    assert main(argv) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    for name in ("final_1step.png", "final_2step.png", "samples/step_0000002_1step.png", "loss_curve.png",
                 "checkpoints/ckpt_00000003.pt"):
        assert (run / name).is_file(), name
    from PIL import Image

    side = 2 * (2 + 10 * (32 + 2))  # 10 x 10 digits of 32 px with 2 px gaps, upscaled 2x
    assert Image.open(run / "final_1step.png").size == (side, side)
    assert main(["sample", "--ckpt", str(run), "--labels", "3", "7", "--num", "4", "--out", str(tmp_path / "x.png")]) == 0
    assert main(["sample", "--ckpt", str(run), "--labels", "12", "--out", str(tmp_path / "y.png")]) == 2
    assert "--labels must lie in [0, 9]" in capsys.readouterr().err


def test_imagenet_preset_on_tiny_latent_shards(tmp_path, capsys):
    """The ImageNet path end to end at toy size: latent shards -> DiT -> latent grids; FID skipped with the reason."""
    import numpy as np

    rng = np.random.default_rng(0)
    shards = tmp_path / "latents"
    shards.mkdir()
    for i in range(2):
        np.save(shards / f"part{i}.npy", rng.standard_normal((6, 4, 8, 8)).astype(np.float32) / 0.18215)
        np.save(shards / f"part{i}.labels.npy", rng.integers(0, 1000, 6))
    argv = ["train", "--preset", "imagenet-B/2", "--out", str(tmp_path / "run"), "--set", f"data.path={shards}",
            "--set", "model.name=DiT-Micro/4", "--set", "model.backend=explicit", "--set", "train.precision=fp32",
            "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.progress=false",
            "--set", "train.threads=1", "--set", "eval.num_samples=8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FID skipped: FID on latents needs the decoded images" in out and "latents" in out
    assert (tmp_path / "run" / "final_1step.png").is_file()
    from meanflow.training.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "run")
    assert state["model"]["y_embedder.weight"].shape[0] == 1001  # 1000 classes + the null class


def test_non_finite_loss_via_cli(tmp_path, capsys):
    run = tmp_path / "nan"
    argv = ["train", *TOY, "--out", str(run), "--set", "train.lr=1e30", "--set", "train.warmup_steps=0",
            "--set", "train.ckpt_every=1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "at step 2: training stopped without saving; the last good checkpoint" in err and "ckpt_00000001.pt" in err
    from meanflow.training.checkpoint import load_checkpoint

    assert load_checkpoint(run)["step"] == 1


def test_ctrl_c_tells_how_to_resume(tmp_path, capsys, monkeypatch):
    from meanflow.training.trainer import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    assert main(["train", *TOY, "--out", str(tmp_path / "run")]) == 130
    assert f"interrupted at step 0; last checkpoint: none yet. Continue with: meanflow train --resume " \
           f"{tmp_path / 'run'}" in capsys.readouterr().err


def test_python_dash_m_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "meanflow", "train", *TOY, "--set", "eval.enabled=false",
                           "--out", str(tmp_path / "sub")], capture_output=True, text=True, env=env, timeout=300, check=False,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sample grid:" in proc.stdout and (tmp_path / "sub" / "checkpoints" / "latest").is_file()
    proc = subprocess.run([sys.executable, "-m", "meanflow", "train", "--preset", "nope"], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr
