"""The trainer: run outputs, bit-exact resume after an interruption, non-finite loss handling, gradient accumulation,
EMA, warmup, and MeanFlow's point on a 2-D toy (1-step samples far better than 1-step flow matching)."""
import json

import pytest
import torch

from meanflow import euler_sample, sample
from meanflow.training.checkpoint import list_checkpoints, load_checkpoint
from meanflow.training.config import apply_overrides
from meanflow.data.datasets import build_dataset
from meanflow.training.ema import EMA
from meanflow.objectives.meanflow import MeanFlowLoss
from meanflow.evaluation.metrics import sliced_wasserstein
from meanflow.training.presets import get_preset
from meanflow.training.trainer import NonFiniteLossError, Trainer
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)

QUIET = ["train.progress=false", "train.log_every=1", "train.threads=1"]


def toy_config(*extra):
    return apply_overrides(get_preset("toy"), QUIET + [
        "train.steps=6", "train.batch_size=32", "train.warmup_steps=2", "model.hidden=32", "model.depth=2",
        "eval.num_samples=200", "eval.sw_projections=32", "train.grid_size=200", *extra])


def digits_config(*extra):
    # a class-conditional DiT with guidance (kappa > 0) and label dropout: every random draw of the objective is used
    return apply_overrides(get_preset("digits"), QUIET + [
        "train.steps=6", "train.batch_size=8", "model.hidden=16", "model.depth=1", "model.heads=2",
        "eval.enabled=false", *extra])


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_outputs(tmp_path):
    summary = Trainer(toy_config("train.ckpt_every=3", "train.sample_every=3"), tmp_path).train()
    rows = losses(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert set(rows[0]) == {"step", "loss", "v_loss", "raw_loss", "lr", "grad_norm", "samples_per_s", "elapsed"}
    assert rows[0]["lr"] == pytest.approx(5e-4) and rows[-1]["lr"] == pytest.approx(1e-3)  # 2 warmup steps
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000003.pt", "ckpt_00000006.pt"]
    for name in ("final_1step.png", "final_2step.png", "samples/step_0000003_1step.png", "loss_curve.png",
                 "config.json", "eval.json", "ema.safetensors", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert summary["metrics"]["1step"]["sw"] > 0 and summary["grids"][0].endswith("final_1step.png")
    state = load_checkpoint(tmp_path)
    assert state["step"] == 6 and state["config"]["preset"] == "toy" and set(state["ema"]) == {"0.995"}


@pytest.mark.parametrize("make_config", [toy_config, digits_config], ids=["toy-mlp", "digits-dit-guided"])
def test_resume_after_interruption_is_bit_exact(tmp_path, make_config):
    cfg = make_config("train.ckpt_every=3", "train.keep_ckpts=0")
    straight = Trainer(cfg, tmp_path / "a")
    straight.train()

    interrupted = Trainer(cfg, tmp_path / "b")
    real_step = interrupted.train_step

    def dies_at_step_5():
        if interrupted.step == 4:
            raise KeyboardInterrupt("simulated kill")
        return real_step()

    interrupted.train_step = dies_at_step_5
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert [r["step"] for r in losses(tmp_path / "b")] == [1, 2, 3, 4]      # step 4 was logged, not checkpointed
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')                                           # a line cut short by the kill
    resumed = Trainer(cfg, tmp_path / "b", resume=tmp_path / "b")
    assert resumed.step == 3
    resumed.train()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 7))                       # the redone step 4 replaced the old line
    for key in ("loss", "v_loss", "raw_loss", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key               # exact equality, not approx
    for name, p in straight.net.state_dict().items():
        assert torch.equal(p, resumed.net.state_dict()[name]), name
    for name, p in straight.ema.default.state_dict().items():
        assert torch.equal(p, resumed.ema.default.state_dict()[name]), name


def test_resume_restores_the_process_random_generators(tmp_path):
    """A network or loss that draws from torch / numpy / python's global generators (dropout, a user's augmentation)
    continues their streams on resume: each step draws one number from each, and the resumed run's draws are the
    uninterrupted run's."""
    import random

    import numpy as np

    cfg = toy_config("train.ckpt_every=2", "train.keep_ckpts=0")
    real_step = Trainer.train_step

    def run(trainer, draws, stop_at=None):
        def step():
            if trainer.step == stop_at:
                raise KeyboardInterrupt
            draws.append((torch.rand(1).item(), float(np.random.rand()), random.random()))
            return real_step(trainer)

        trainer.train_step = step
        try:
            trainer.train()
        except KeyboardInterrupt:
            pass

    straight, first, second = [], [], []
    run(Trainer(cfg, tmp_path / "a"), straight)
    run(Trainer(cfg, tmp_path / "b"), first, stop_at=3)           # steps 1-3 drawn, checkpoint after step 2
    run(Trainer(cfg, tmp_path / "b", resume=tmp_path / "b"), second)
    assert first[:2] + second == straight


class NaNAtCall:
    """The MeanFlow loss, but NaN from the n-th call on."""

    def __init__(self, config, n):
        self.inner, self.n, self.calls = MeanFlowLoss(config), n, 0

    def __call__(self, model, x, y=None, **kw):
        self.calls += 1
        loss, stats = self.inner(model, x, y, **kw)
        return (loss * float("nan") if self.calls >= self.n else loss), stats


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    cfg = toy_config("train.ckpt_every=2")
    trainer = Trainer(cfg, tmp_path, loss_fn=NaNAtCall(cfg.loss, 4))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 4: training stopped without "
                                                 r"saving; the last good checkpoint .*ckpt_00000002.pt is untouched"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000002.pt"]
    state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_grad_accumulation_matches_the_full_batch(tmp_path):
    def quadratic(model, x, y=None, generator=None):  # deterministic: a mean over rows, like the MeanFlow loss
        t = torch.full((x.shape[0],), 0.5)
        loss = model(x, t, 0.5 * t).pow(2).sum(1).mean()
        return loss, {"loss": loss.detach(), "v_loss": loss.detach(), "raw_loss": loss.detach()}

    nets = []
    for accum in (1, 4):
        trainer = Trainer(toy_config("train.steps=1", f"train.grad_accum={accum}", "eval.enabled=false"),
                          tmp_path / str(accum), loss_fn=quadratic)
        trainer.train_step()
        nets.append(trainer.net.state_dict())
    for name in nets[0]:
        assert torch.allclose(nets[0][name], nets[1][name], atol=1e-6, rtol=1e-5), name
    with pytest.raises(ValueError, match="batch_size 32 must divide by train.grad_accum 5"):
        Trainer(toy_config("train.grad_accum=5"), tmp_path / "bad")


def test_ema_starts_as_a_copy_and_follows_the_model():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, (0.9, 0.5))
    assert torch.equal(ema.default.weight, net.weight) and not ema.default.weight.requires_grad
    before = ema.models["0.5"].weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.models["0.5"].weight, 0.5 * before + 0.5 * net.weight)
    assert torch.allclose(ema.models["0.9"].weight, 0.9 * before + 0.1 * net.weight)
    with pytest.raises(ValueError, match="EMA decays must lie in"):
        EMA(net, (1.0,))


def test_resume_with_another_batch_size_is_refused(tmp_path):
    Trainer(toy_config("eval.enabled=false"), tmp_path).train()
    with pytest.raises(Exception, match="does not fit this run's config: data position was saved with seed 0 and "
                                        "batch size 32"):
        Trainer(toy_config("train.batch_size=16"), tmp_path, resume=tmp_path)


def test_what_the_user_watches_moves(tmp_path, capsys):
    """The progress bar and the loss curve's first panel show raw_loss and v_loss (the weighted loss sits near 1 by
    construction and stays in metrics.jsonl); the stages after the bar announce themselves and show progress."""
    import re

    from meanflow.evaluation.plotting import loss_curve_figure

    Trainer(toy_config("train.progress=true", "train.log_every=3"), tmp_path).train()
    out, err = capsys.readouterr()
    assert "raw_loss=" in err and "v_loss=" in err and not re.search(r"(?<![_a-z])loss=", err)
    assert "toy: final sample grids, loss curve, weights ..." in out and "toy: evaluation ..." in out
    assert "evaluation: sampling (1, 2-step): 100%" in err and "400/400" in err  # 200 samples x 2 step counts
    rows = losses(tmp_path)
    assert {"loss", "v_loss", "raw_loss"} <= set(rows[0])
    first, second = loss_curve_figure(rows).axes
    assert [line.get_label() for line in first.get_lines()] == ["raw_loss", "v_loss"]
    assert [line.get_label() for line in second.get_lines()] == ["loss (weighted)"]


def test_classifier_training_shows_progress(capsys):
    from meanflow.evaluation.classifier import train_classifier

    x, y = torch.rand(40, 1, 8, 8) * 2 - 1, torch.arange(40) % 4
    train_classifier(x, y, epochs=1, min_steps=3, batch_size=16, progress=True)
    err = capsys.readouterr().err
    assert "digit classifier (trained once, then cached): 100%" in err and "3/3" in err


@pytest.mark.full
def test_meanflow_one_step_beats_flow_matching_one_step(tmp_path):
    """MeanFlow's point: at the same small budget, 1-step MeanFlow samples are far closer to the data than 1 Euler
    step of a flow-matching model (which lands near the mean of the data)."""
    common = QUIET + ["train.steps=600", "train.batch_size=256", "train.log_every=100", "eval.enabled=false",
                      "train.grid_size=16"]
    mf = Trainer(apply_overrides(get_preset("toy"), common), tmp_path / "mf")
    mf.train()
    fm = Trainer(apply_overrides(get_preset("toy"), common + ["loss.flow_matching=true"]), tmp_path / "fm")
    fm.train()
    data = build_dataset("checkerboard").sample(4000, torch.Generator().manual_seed(1))[0]
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(2))
    sw_mf = sliced_wasserstein(sample(mf.ema.default, noise, steps=1), data, num_projections=256)
    sw_fm = sliced_wasserstein(euler_sample(fm.ema.default, noise, steps=1), data, num_projections=256)
    sw_floor = sliced_wasserstein(build_dataset("checkerboard").sample(4000, torch.Generator().manual_seed(3))[0],
                                  data, num_projections=256)
    print(f"SW_2 at 1 step: MeanFlow {sw_mf:.3f}, flow matching {sw_fm:.3f}, data vs data {sw_floor:.3f}")
    assert sw_mf < 0.25 * sw_fm  # measured: 0.106 vs 0.900 (data vs data: 0.032)
