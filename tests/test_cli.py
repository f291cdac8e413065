"""The command line: train / sample / eval / presets in-process, one `python -m meanflow` subprocess, resume (also
under another automatic thread count), and the error policy: every bad argument or --set value is one line on stderr
and exit status 2 (bad input), a run that fails after it started is exit status 1, Ctrl-C 130."""
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
    with pytest.raises(ValueError, match=r"unknown config key 'train.stepz'; did you mean train.steps"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'train.hidden'; did you mean model.hidden\?"):
        apply_overrides(cfg, ["train.hidden=3"])  # the right field in the wrong section
    with pytest.raises(ValueError, match=r"unknown config key 'nothing.like.it' \(`meanflow train --help-config`"):
        apply_overrides(cfg, ["nothing.like.it=3"])
    with pytest.raises(ValueError, match="train.steps takes an integer; got 'many'"):
        apply_overrides(cfg, ["train.steps=many"])
    with pytest.raises(ValueError, match="train.lr takes a number; got '1e-3x'"):
        apply_overrides(cfg, ["train.lr=1e-3x"])
    with pytest.raises(ValueError, match="ratio must lie in"):  # the core's own validation runs
        apply_overrides(cfg, ["loss.ratio=2"])
    with pytest.raises(ValueError, match="--set takes key=value"):
        apply_overrides(cfg, ["train.steps"])


def test_error_messages(tmp_path, capsys):
    assert main(["train", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'; available: toy, checkerboard" in capsys.readouterr().err
    assert main(["train", "--preset", "toy", "--set", "loss.omegaa=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'loss.omegaa'; did you mean loss.omega?" in err and len(err) < 200, err
    assert main(["train", "--preset", "imagenet-B/2", "--out", str(tmp_path / "x")]) == 2
    assert "dataset 'latents' needs a path: --set data.path=..." in capsys.readouterr().err
    # a path the dataset would ignore is refused, naming both keys
    assert main(["train", "--preset", "toy", "--out", str(tmp_path / "y"), "--set", "data.path=/data/x"]) == 2
    assert "data.path is read only by data.name=folder or latents; data.name is 'checkerboard'" in \
        _one_error_line(capsys)
    # an --out that cannot be made is bad input naming --out (a file stands where its parent folder should be)
    (tmp_path / "file").write_text("")
    assert main(["train", "--preset", "toy", "--out", str(tmp_path / "file" / "run")]) == 2
    assert f"--out {tmp_path / 'file' / 'run'}: cannot create the run directory" in _one_error_line(capsys)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_corrupt_checkpoint_is_bad_input_with_a_short_message_for_what_exists(tmp_path, capsys):
    import torch

    run = tmp_path / "run"
    bad = run / "checkpoints" / "ckpt_00000005.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 truncated")
    for argv in (["train", "--resume", str(run)], ["sample", "--ckpt", str(bad)], ["eval", "--ckpt", str(run)]):
        assert main(argv) == 2  # like a missing file: bad input, nothing ran
        err = _one_error_line(capsys)
        assert f"checkpoint {bad} is corrupt or truncated (not a complete torch archive: 14 bytes)" in err
        assert f"{run} has no other intact checkpoint: train the run again" in err
        assert len(err.replace(str(bad), "F").replace(str(run), "R")) < 200, err  # was ~400 characters of torch's
        assert "PytorchStreamReader" not in err and "earlier" not in err
    (run / "ema.safetensors").write_bytes(b"")  # a finished run's final weights: the way to keep sampling
    assert main(["sample", "--ckpt", str(run)]) == 2
    assert f"its final weights {run / 'ema.safetensors'} still sample and evaluate" in _one_error_line(capsys)
    good = run / "checkpoints" / "ckpt_00000003.pt"
    torch.save({}, good)  # an intact archive (its contents are not read to suggest it)
    random_bytes = run / "checkpoints" / "ckpt_00000007.pt"
    random_bytes.write_bytes(bytes(range(256)) * 40)
    assert main(["eval", "--ckpt", str(run)]) == 2
    err = _one_error_line(capsys)
    assert f"checkpoint {random_bytes} is corrupt" in err and f"the newest other checkpoint is {good}" in err
    assert main(["sample", "--ckpt", str(tmp_path / "nothing")]) == 2
    assert f"checkpoint {tmp_path / 'nothing'} does not exist" in _one_error_line(capsys)


MISSING = "/nonexistent/run"
BAD_ARGUMENTS = [  # argv, what the one-line error says; none of these gets as far as loading a model
    (["sample", "--ckpt", MISSING, "--num", "-3"], "argument --num/--num-samples: must be >= 1; got -3"),
    (["sample", "--ckpt", MISSING, "--num", "0"], "argument --num/--num-samples: must be >= 1; got 0"),
    (["sample", "--ckpt", MISSING, "--num", "2.5"], "argument --num/--num-samples: takes an integer; got '2.5'"),
    (["sample", "--ckpt", MISSING, "--steps", "0"], "argument --steps: must be >= 1; got 0"),
    (["sample", "--ckpt", MISSING, "--steps", "2", "--midpoint", "1"], "argument --midpoint: must lie in (0, 1)"),
    (["sample", "--ckpt", MISSING, "--steps", "2", "--midpoint", "nan"], "argument --midpoint: must lie in (0, 1)"),
    (["sample", "--ckpt", MISSING, "--midpoint", "0.5"], "--midpoint sets the intermediate time of 2-step sampling; "
                                                        "it needs --steps 2 (got --steps 1)"),
    (["sample", "--ckpt", MISSING, "--seed", "-1"], "argument --seed: must be >= 0; got -1"),
    (["sample", "--ckpt", MISSING, "--batch-size", "0"], "argument --batch-size: must be >= 1; got 0"),
    (["sample", "--ckpt", MISSING, "--decode-batch-size", "0"], "argument --decode-batch-size: must be >= 1; got 0"),
    (["sample", "--ckpt", MISSING, "--labels", "3", "x"], "--labels takes class numbers (>= 0), 'uniform' or"),
    (["sample", "--ckpt", MISSING, "--labels", "-1"], "--labels takes class numbers (>= 0), 'uniform' or"),
    (["sample", "--ckpt", MISSING, "--weights", "1.5"], "argument --weights: must be ema, model or an EMA decay"),
    (["sample", "--ckpt", MISSING, "--device", "tpu"], "argument --device: must be auto, cpu, cuda or cuda:N"),
    (["sample", "--ckpt", MISSING, "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["sample", "--ckpt", MISSING, "--out", "grid.gif"], "--out must end in .png, .jpg, .jpeg or .npz; got grid.gif"),
    (["sample", "--ckpt", MISSING], f"checkpoint {MISSING} does not exist"),
    (["sample", "--ckpt", MISSING, "--out", "new/dir/x.png"], f"checkpoint {MISSING} does not exist"),
    (["eval", "--ckpt", MISSING, "--out", "new/dir/m.json"], f"checkpoint {MISSING} does not exist"),
    (["sample"], "the following arguments are required: --ckpt"),
    (["eval"], "meanflow eval needs --ckpt RUN (evaluate a model) or --samples X.npz"),
    (["eval", "--ckpt", MISSING, "--batch-size", "0"], "argument --batch-size: must be >= 1; got 0"),
    (["eval", "--ckpt", MISSING, "--batch-size", "8"], "--batch-size go with --samples; for a model use --set"),
    (["eval", "--ckpt", MISSING, "--samples", "s.npz"], "pass --ckpt (evaluate a model) or --samples"),
    (["eval", "--samples", "/nonexistent/s.npz"], "--samples file /nonexistent/s.npz does not exist"),
    (["eval", "--samples", "/nonexistent/s.npz", "--set", "eval.steps=1"], "--set and --weights go with --ckpt"),
    (["eval", "--ckpt", MISSING, "--fid-ref", "ref.npz"], "--fid-ref / --inception / --save-stats / --batch-size go"),
    (["eval", "--ckpt", MISSING, "--set", "eval.num_samples=0"], "eval.num_samples must be >= 2; got 0"),
    (["eval", "--ckpt", MISSING, "--set", "eval.steps=1,0"], "eval.steps must be >= 1 (each value); got '1,0'"),
    (["eval", "--ckpt", MISSING, "--set", "eval.batch_size=-5"], "eval.batch_size must be >= 1; got -5"),
    (["eval", "--ckpt", MISSING, "--out", "m.txt"], "--out must end in .json; got m.txt"),
    (["eval", "--ckpt", MISSING, "--device", "cuda:x"], "argument --device: must be auto, cpu, cuda or cuda:N"),
    (["train", "--set", "train.steps=0"], "train.steps must be >= 1; got 0"),
    (["train", "--set", "train.steps=-5"], "train.steps must be >= 1; got -5"),
    (["train", "--set", "train.steps=1.5"], "train.steps takes an integer; got '1.5'"),
    (["train", "--set", "train.batch_size=0"], "train.batch_size must be >= 1; got 0"),
    (["train", "--set", "train.grad_accum=0"], "train.grad_accum must be >= 1; got 0"),
    (["train", "--set", "train.lr=-1e-3"], "train.lr must be > 0; got -0.001"),
    (["train", "--set", "train.lr=nan"], "train.lr must be finite; got nan"),
    (["train", "--set", "train.lr=inf"], "train.lr must be finite; got inf"),
    (["train", "--set", "train.betas=0.9,1.0"], "train.betas must lie in [0, 1) (each value); got '0.9,1.0'"),
    (["train", "--set", "train.betas=0.9"], "train.betas takes 2 comma-separated values; got '0.9'"),
    (["train", "--set", "train.weight_decay=-1"], "train.weight_decay must be >= 0; got -1.0"),
    (["train", "--set", "train.warmup_steps=-1"], "train.warmup_steps must be >= 0; got -1"),
    (["train", "--set", "train.grad_clip=-1"], "train.grad_clip must be >= 0; got -1.0"),
    (["train", "--set", "train.ema_decays=0.99,1"], "train.ema_decays must lie in (0, 1) (each value)"),
    (["train", "--set", "train.ema_decays="], "train.ema_decays needs at least one value"),
    (["train", "--set", "train.seed=-1"], "train.seed must be >= 0; got -1"),
    (["train", "--set", "train.threads=-2"], "train.threads must be >= 0; got -2"),
    (["train", "--set", "train.log_every=0"], "train.log_every must be >= 1; got 0"),
    (["train", "--set", "train.sample_every=-1"], "train.sample_every must be >= 0; got -1"),
    (["train", "--set", "train.ckpt_every=-1"], "train.ckpt_every must be >= 0; got -1"),
    (["train", "--set", "train.keep_ckpts=-1"], "train.keep_ckpts must be >= 0; got -1"),
    (["train", "--set", "train.grid_size=-1"], "train.grid_size must be >= 0; got -1"),
    (["train", "--set", "train.progress=maybe"], "train.progress takes a boolean (true/false); got 'maybe'"),
    (["train", "--set", "train.device=tpu"], "train.device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
    (["train", "--set", "train.precision=fp16"], "train.precision must be one of auto, fp32, bf16; got 'fp16'"),
    (["train", "--set", "train.parallel=zero"], "train.parallel must be one of ddp, fsdp; got 'zero'"),
    (["train", "--set", "model.arch=cnn"], "model.arch must be one of dit, mlp, imf_dit, diffusers:<ClassName>; got 'cnn'"),
    (["train", "--set", "model.backend=jax"], "model.backend must be one of auto, autograd, explicit, fused"),
    (["train", "--set", "model.hidden=-1"], "model.hidden must be >= 0; got -1"),
    (["train", "--set", "model.mlp_ratio=0"], "model.mlp_ratio must be > 0; got 0.0"),
    (["train", "--set", "data.name=cifar"], "data.name must be one of checkerboard, moons, 8gaussians, digits"),
    (["train", "--set", "data.image_size=0"], "data.image_size must be >= 1; got 0"),
    (["train", "--set", "data.split=val"], "data.split must be one of train, test, all; got 'val'"),
    (["train", "--set", "data.latent_scale=0"], "data.latent_scale must be > 0; got 0.0"),
    (["train", "--set", "data.workers=-1"], "data.workers must be >= 0; got -1"),
    (["train", "--set", "loss.ratio=2"], "ratio must lie in [0, 1]; got 2.0"),
    (["train", "--set", "loss.p=-1"], "loss.p must be >= 0; got -1.0"),
    (["train", "--set", "loss.t_std=0"], "loss.t_std must be > 0; got 0.0"),
    (["train", "--set", "loss.t_end=1.5"], "the guidance interval must satisfy 0 <= t_start <= t_end <= 1"),
    (["train", "--set", "eval.num_samples=1"], "eval.num_samples must be >= 2; got 1"),
    (["train", "--set", "eval.sw_projections=0"], "eval.sw_projections must be >= 1; got 0"),
    (["train", "--set", "train.steps"], "--set takes key=value (e.g. train.steps=100); got 'train.steps'"),
    (["train", "--resume", MISSING], f"checkpoint {MISSING} does not exist"),
    (["train", "--resume", MISSING, "--preset", "toy"], "--preset does not apply with --resume"),
    (["prepare-latents", "--images", "/nonexistent/i", "--vae", "v", "--out", "o"],
     "--images folder /nonexistent/i does not exist"),
    (["prepare-latents", "--images", "i", "--vae", "v", "--out", "o", "--image-size", "0"],
     "argument --image-size: must be >= 1; got 0"),
    (["prepare-latents", "--images", "i", "--vae", "v", "--out", "o", "--batch-size", "0"],
     "argument --batch-size: must be >= 1; got 0"),
    (["prepare-latents", "--images", "i", "--vae", "v", "--out", "o", "--shard-size", "0"],
     "argument --shard-size: must be >= 1; got 0"),
    (["prepare-latents", "--images", "i", "--vae", "v", "--out", "o", "--workers", "-1"],
     "argument --workers: must be >= 0; got -1"),
    (["prepare-latents", "--images", "i", "--vae", "v", "--out", "o", "--seed", "x"],
     "argument --seed: takes an integer; got 'x'"),
    (["presets", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS,
                         ids=[" ".join(a).replace(MISSING, "X") or "(no command)" for a, _ in BAD_ARGUMENTS])
def test_bad_input_is_one_line_and_exit_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written anywhere else
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert message in err, err
    assert err.startswith("meanflow")
    assert not any(tmp_path.iterdir())  # bad input writes nothing (e.g. `--num 0` made an empty PNG)


def test_help_states_the_exit_status_policy(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit status:" in out and "130" in out
    assert "2    bad input, nothing was run" in out and "missing, corrupt or does not fit (checkpoints included)" in out
    assert "1    the run started and failed" in out


def test_toy_train_sample_eval_resume(tmp_path, capsys):
    run = tmp_path / "toy"
    assert main(["train", *TOY, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "1 CPU thread (train.threads)," in out and "(1 thread)," in out and "1 threads" not in out
    assert f"from scratch -> {run}" in out
    assert f"sample grid:   {run / 'final_1step.png'}" in out and f"sample grid:   {run / 'final_2step.png'}" in out
    assert '"sw":' in out and "sw_data_vs_data" in out and "\nevaluation:    " in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    # a second train into the same directory must not silently overwrite it
    assert main(["train", *TOY, "--out", str(run)]) == 2
    assert f"run directory {run} already has checkpoints: pass --resume {run}" in capsys.readouterr().err
    # a finished run is not "resumed" to where it already is
    assert main(["train", "--resume", str(run)]) == 2
    assert "the run is already at step 8 and train.steps is 8: pass --set train.steps=N with N > 8" in \
        _one_error_line(capsys)
    # resume with more steps: continues at step 8
    assert main(["train", "--resume", str(run), "--set", "train.steps=10", "--set", "eval.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "1 CPU thread (as recorded by the run), resuming at step 8" in out
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 10
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--midpoint", "0.4", "--num", "50",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["sample", "--ckpt", str(run / "ema.safetensors"), "--out", str(tmp_path / "t.png")]) == 0
    assert "(64 samples, 1 step, ema weights of step 10)" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(run), "--labels", "1", "--out", str(tmp_path / "u.png")]) == 2
    assert "unconditional: --labels does not apply" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(run), "--num", "0", "--out", str(tmp_path / "empty.png")]) == 2
    assert not (tmp_path / "empty.png").exists()  # it used to be an empty 684x4 PNG and exit status 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run), "--weights", "model", "--set", "eval.num_samples=100",
                 "--set", "eval.steps=1", "--out", str(tmp_path / "e.json")]) == 0
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert metrics["step"] == 10 and metrics["weights"] == "model" and "1step" in metrics and "2step" not in metrics
    out = capsys.readouterr().out
    # printed as `train` prints its metrics: the same block, 4 significant digits (the file keeps full precision)
    block = out[out.index("metrics: "):out.index(f"wrote {tmp_path / 'e.json'}")]
    from meanflow.cli import _rounded

    assert json.loads(block.removeprefix("metrics: ")) == _rounded(metrics) != metrics
    # a run started from another run's weights says so on its first line (not "from scratch")
    assert main(["train", *TOY, "--set", "train.steps=2", "--set", "eval.enabled=false", "--set",
                 f"train.init_from={run}", "--out", str(tmp_path / "init")]) == 0
    assert f"step 0 from the weights of {run} -> {tmp_path / 'init'}" in capsys.readouterr().out


def test_resume_reuses_the_runs_thread_count_when_the_automatic_choice_changes(tmp_path, capsys, monkeypatch):
    """train.threads=0 follows the machine's load, so a resume may choose another count than the run had; it reuses
    the count the checkpoint recorded, and its losses equal an uninterrupted run's exactly. The control: forcing the
    other count (with the warning that says so) changes the losses, so this config does depend on the count."""
    import shutil

    import torch

    import meanflow.runtime.host as host
    from meanflow.training.trainer import Trainer

    def machine(busy_cores: float):  # 2 cores: the automatic choice is 2 - busy_cores threads
        monkeypatch.setattr(host.os, "cpu_count", lambda: 2)
        monkeypatch.setattr(host.os, "getloadavg", lambda: (busy_cores, 0.0, 0.0))

    argv = ["train", "--preset", "toy", "--set", "train.steps=6", "--set", "train.batch_size=2048",
            "--set", "model.hidden=32", "--set", "model.depth=2", "--set", "train.progress=false",
            "--set", "train.log_every=1", "--set", "train.ckpt_every=3", "--set", "train.grid_size=16",
            "--set", "eval.enabled=false", "--set", "train.threads=0"]
    real_step, seen = Trainer.train_step, []

    def spy(self):
        seen.append(torch.get_num_threads())
        return real_step(self)

    def killed_in_step_5(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self)

    machine(busy_cores=0)
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    assert "2 CPU threads (automatic)" in capsys.readouterr().out
    monkeypatch.setattr(Trainer, "train_step", killed_in_step_5)
    assert main([*argv, "--out", str(tmp_path / "run")]) == 130  # killed after the checkpoint of step 3
    shutil.copytree(tmp_path / "run", tmp_path / "forced")
    capsys.readouterr()

    machine(busy_cores=1)  # the load went up: automatic would now pick 1 thread
    monkeypatch.setattr(Trainer, "train_step", spy)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "2 CPU threads (as recorded by the run), resuming at step 3" in out and "warning" not in err
    assert seen == [2, 2, 2]
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "v_loss", "raw_loss", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key  # exact

    seen.clear()
    assert main(["train", "--resume", str(tmp_path / "forced"), "--set", "train.threads=1"]) == 0
    out, err = capsys.readouterr()
    assert "1 CPU thread (train.threads), resuming at step 3" in out
    assert err.count("meanflow train: warning:") == 1 and "written with 2 CPU thread(s), this process uses 1: " \
        "training continues, but not bit for bit" in err
    # the control is the thread count the steps ran with, not their numbers: whether 1 and 2 threads round a
    # gradient differently depends on the CPU
    assert seen == [1, 1, 1]


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_finishes_the_step_checkpoints_it_and_the_resumed_run_equals_an_uninterrupted_one(
        tmp_path, capsys, monkeypatch, signame, status):
    """SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C) arrive in the middle of step 3: the step is
    finished and checkpointed, the exit status is 128 + the signal, the printed command resumes, and the resumed run's
    losses equal an uninterrupted run's bit for bit."""
    import signal

    from meanflow.training.trainer import Trainer

    argv = ["train", *TOY, "--set", "train.steps=6", "--set", "train.log_every=1", "--set", "eval.enabled=false"]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    real_step = Trainer.train_step

    def signalled_in_step_3(self):
        if self.step == 2:
            os.kill(os.getpid(), getattr(signal, signame))  # delivered between bytecodes, inside the step
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", signalled_in_step_3)
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "run")]) == status
    err = capsys.readouterr().err
    assert f"{signame} at step 3: finished the step and saved {tmp_path / 'run' / 'checkpoints'}" in err
    assert f"Continue with: meanflow train --resume {tmp_path / 'run'}" in err
    from meanflow.training.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "run")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone after the run
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "v_loss", "raw_loss", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key


def test_an_interrupt_before_any_checkpoint_prints_no_resume_command(tmp_path, capsys, monkeypatch):
    """A hard stop (a second Ctrl-C) in the first step: nothing was saved, so no resume command is printed."""
    from meanflow.training.trainer import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert main(["train", *TOY, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 0, not checkpointed. No checkpoint was written yet: nothing to resume" in err
    assert "--resume" not in err


def test_a_hard_interrupt_names_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from meanflow.training.trainer import Trainer

    real_step = Trainer.train_step

    def killed_in_step_5(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", killed_in_step_5)
    assert main(["train", *TOY, "--out", str(tmp_path / "run"), "--set", "train.ckpt_every=3"]) == 130
    assert f"interrupted at step 4, not checkpointed. Continue with: meanflow train --resume {tmp_path / 'run'} " \
           f"(from {tmp_path / 'run' / 'checkpoints' / 'ckpt_00000003.pt'}, step 3)" in capsys.readouterr().err


def test_checkpoints_by_time(tmp_path, monkeypatch):
    """train.ckpt_minutes (on by default in every preset) writes checkpoints as the minutes pass, not by step count: on
    a clock that reads 25 s later at every step, ckpt_minutes=1 checkpoints steps 3 and 6 (75 s apart), and the end."""
    import itertools

    import meanflow.training.trainer as trainer_module
    from meanflow.training.checkpoint import checkpoint_step, list_checkpoints

    assert all(get_preset(name).train.ckpt_minutes > 0 for name in PRESETS)
    ticks = itertools.count()
    monkeypatch.setattr(trainer_module, "checkpoint_clock", lambda: 25.0 * next(ticks))
    run = tmp_path / "run"
    assert main(["train", *TOY, "--out", str(run), "--set", "train.ckpt_minutes=1", "--set", "train.keep_ckpts=0",
                 "--set", "eval.enabled=false"]) == 0
    assert [checkpoint_step(p) for p in list_checkpoints(run)] == [3, 6, 8]


def test_sigterm_to_a_real_process(tmp_path):
    """The scheduler's view: a `python -m meanflow train` process gets SIGTERM, exits 143 after checkpointing, and
    the command it prints resumes the run."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "meanflow", "train", "--preset", "toy", "--set", "train.steps=100000",
                             "--set", "train.threads=1", "--set", "train.progress=false", "--set", "train.log_every=1",
                             "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM at step" in err and f"Continue with: meanflow train --resume {run}" in err
    from meanflow.training.checkpoint import load_checkpoint

    assert load_checkpoint(run)["step"] >= 1


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
