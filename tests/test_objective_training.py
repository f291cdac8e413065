"""The trainer with every objective (loss.objective): configs and --set, checkpoints that resume exactly (alpha-Flow's
schedule and sCM's warm-up continue from the checkpointed step), gradient accumulation equal to one micro-batch (the
objective's draws are made for the whole batch), a start from another run's weights (train.init_from), the CUDA-graph
wrapper on CPU, and the CLI's sample / eval with each objective's sampler."""
import json

import pytest
import torch

from meanflow.cli import main
from meanflow.objectives import IMFConfig, MeanFlowConfig
from meanflow.training.checkpoint import CheckpointError
from meanflow.training.config import RunConfig, apply_overrides, describe_config
from meanflow.training.presets import PRESETS, get_preset
from meanflow.training.trainer import Trainer
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)

QUIET = ["train.progress=false", "train.log_every=1", "eval.enabled=false", "train.threads=1", "train.device=cpu",
         "train.grid_size=8"]
OBJECTIVES = ["fm", "imf", "scm", "alphaflow", "tvm"]


def toy_config(objective: str, *extra: str) -> RunConfig:
    return apply_overrides(get_preset(f"toy-{objective}"), QUIET + [
        "train.steps=4", "train.batch_size=16", "model.hidden=16", "model.depth=3", "train.ckpt_every=2",
        "train.keep_ckpts=0", "train.warmup_steps=0", *extra])


def digits_config(objective: str, *extra: str) -> RunConfig:
    """A tiny class-conditional DiT with guidance where the objective has it (the heads and conditions in use)."""
    guidance = {"fm": ["loss.sample_cfg=2"], "imf": [], "scm": ["loss.label_dropout=0.2"],
                "alphaflow": ["loss.omega=1.5", "loss.kappa=0.3"]}[objective]
    return apply_overrides(get_preset("digits"), QUIET + [
        f"loss.objective={objective}", *guidance, "train.steps=4", "train.batch_size=8", "model.hidden=16",
        "model.depth=2", "model.heads=2", "model.backend=explicit", "train.ckpt_every=2", "train.keep_ckpts=0",
        *extra])


def lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}


# ------------------------------------------------------------------------------------------------- configs
def test_set_switches_the_objective_and_validates_its_knobs():
    cfg = apply_overrides(get_preset("mnist"), ["loss.omega_max=4", "loss.objective=imf"])  # order does not matter
    assert isinstance(cfg.loss, IMFConfig) and cfg.loss.omega_max == 4.0 and cfg.loss.ratio == 0.5
    assert "loss.omega_max = 4.0" in describe_config(cfg) and "loss.kappa" not in describe_config(cfg)
    with pytest.raises(ValueError, match=r"loss.omega_max is a knob of objective imf; this run's objective is "
                                         r"'meanflow' \(set loss.objective=imf as well\)"):
        apply_overrides(get_preset("mnist"), ["loss.omega_max=4"])
    with pytest.raises(ValueError, match="ratio must lie in"):
        apply_overrides(get_preset("mnist"), ["loss.objective=imf", "loss.ratio=2"])
    with pytest.raises(ValueError, match="unknown objective 'edm'"):
        apply_overrides(get_preset("mnist"), ["loss.objective=edm"])
    with pytest.raises(ValueError, match="alpha_schedule must be one of"):
        apply_overrides(get_preset("toy"), ["loss.objective=alphaflow", "loss.alpha_schedule=cosine"])
    # the same objective keeps the preset's knobs
    assert apply_overrides(get_preset("mnist"), ["loss.objective=meanflow"]).loss == get_preset("mnist").loss


@pytest.mark.parametrize("preset", [f"{k}-{o}" for k in ("toy", "mnist") for o in
                                    ("fm", "meanflow", "imf", "scm", "alphaflow", "tvm")])
def test_presets_round_trip_through_their_dict(preset):
    cfg = get_preset(preset)
    back = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg and type(back.loss) is type(cfg.loss)
    assert cfg.loss.objective == preset.split("-", 1)[1]
    base = get_preset(preset.split("-")[0])
    if preset == "mnist-scm":  # it continues an mnist-fm run at a lower lr (tests/test_preset_scm.py)
        base.train.init_from, base.train.lr = cfg.train.init_from, cfg.train.lr
    # an equal budget: the same network, data, training and JVP backend (TVM's gradient through the JVP included: every
    # backend is exact for it, and `auto` is the fastest exact one on CPU, presets.TANGENT_GRAD_OBJECTIVES)
    assert (cfg.model, cfg.data, cfg.train) == (base.model, base.data, base.train)
    assert cfg.model.backend == "auto"
    if preset.startswith("mnist-"):  # the listing says what a run costs: TVM's gradient through the JVP is the long one
        assert ("through the JVP" in PRESETS[preset].summary) == (preset == "mnist-tvm")
    # a config saved before objectives existed (no 'objective' key) reads as MeanFlow
    old = json.loads(get_preset("toy").to_json())
    del old["loss"]["objective"]
    assert isinstance(RunConfig.from_dict(old).loss, MeanFlowConfig)


# --------------------------------------------------------------------------------------- training and resume
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_resume_is_exact_and_accumulation_equals_one_batch(tmp_path, objective):
    a = Trainer(toy_config(objective), tmp_path / "a")
    a.train()
    resumed = Trainer(toy_config(objective), tmp_path / "b", resume=tmp_path / "a" / "checkpoints" /
                      "ckpt_00000002.pt")
    assert resumed.step == 2
    resumed.train()
    assert all(torch.equal(x, y) for x, y in zip(weights(resumed).values(), weights(a).values()))
    straight, again = lines(tmp_path / "a"), lines(tmp_path / "b")
    assert [r["loss"] for r in again] == [r["loss"] for r in straight[2:]]
    keys = {"fm": set(), "imf": {"loss_u", "loss_v"}, "scm": {"logvar"}, "alphaflow": {"alpha"},
            "tvm": {"nonfinite_rows"}}[objective]
    assert keys <= set(straight[0]) and all(r[k] == s[k] for r, s in zip(again, straight[2:]) for k in keys)
    if objective == "alphaflow":  # the schedule over the run's 4 steps: 1 -> 0, continued exactly by the resume
        assert straight[0]["alpha"] == 1.0 and straight[-1]["alpha"] == 0.0
    accum = Trainer(toy_config(objective, "train.grad_accum=2"), tmp_path / "c")
    accum.train()
    for x, y in zip(weights(accum).values(), weights(a).values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# tvm's conditional DiT run and resume (its teacher included): tests/test_objective_tvm.py
@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o != "tvm"])
def test_conditional_dit_with_heads_trains_and_resumes(tmp_path, objective):
    a = Trainer(digits_config(objective), tmp_path / "a")
    summary = a.train()
    assert summary["step"] == 4 and (tmp_path / "a" / "final_2step.png").is_file()
    b = Trainer(digits_config(objective), tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "ckpt_00000002.pt")
    b.train()
    assert all(torch.equal(x, y) for x, y in zip(weights(b).values(), weights(a).values()))
    ema = a.ema_model()
    assert set(ema.state_dict()) == set(a.net.state_dict())           # the heads are EMA'd with the rest


def test_imf_trains_the_imf_network_by_name(tmp_path):
    """model.arch=imf_dit (meanflow.models.imf_dit) with loss.objective=imf: built by the registry with the spec."""
    cfg = digits_config("imf", "model.arch=imf_dit", "model.name=iMF-Micro/2", "model.hidden=0", "model.depth=0",
                        "model.heads=0", "train.steps=2")
    t = Trainer(cfg, tmp_path / "imfdit")
    t.train()
    assert type(t.net).__name__ == "IMFDiT" and t.net.heads == ("u", "v") and t.step == 2


def test_cuda_graph_wrapper_passes_through_on_cpu(tmp_path):
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a GPU"):
        t = Trainer(digits_config("imf", "train.cuda_graphs=true", "train.steps=1"), tmp_path / "g")
    t.train()
    assert t.model is not t.net and t.step == 1


def test_scm_starts_from_a_flow_matching_run(tmp_path):
    """train.init_from: an FM run's EMA weights; the logvar head the FM network lacks keeps its (zero) init. With the
    'flow' parametrization the sCM network is then exactly the FM flow in TrigFlow form."""
    fm = Trainer(toy_config("fm"), tmp_path / "fm")
    fm.train()
    scm = Trainer(toy_config("scm", "loss.parametrization=flow", f"train.init_from={tmp_path / 'fm'}"),
                  tmp_path / "scm")
    fm_weights = fm.ema_model().state_dict()
    for k, v in scm.net.state_dict().items():
        if k.startswith("logvar."):
            assert v.abs().max() == 0
        else:
            assert torch.equal(v, fm_weights[k]), k
    assert all(torch.equal(m.state_dict()[k], v) for m in scm.ema.models.values() for k, v in fm_weights.items())
    # F at init is the FM velocity in TrigFlow form: F = (x_t (cos t - sin t / sigma_d) + v(z_s, s)) / a
    from meanflow.objectives.scm import trigflow_F

    x_t, t = torch.randn(5, 2), torch.rand(5) * 1.5 + 0.01
    sd = scm.config.loss.sigma_data
    a = torch.cos(t) + sd * torch.sin(t)
    with torch.no_grad():
        v = fm.ema_model()(x_t / a[:, None], sd * torch.sin(t) / a, torch.zeros(5))
        expected = (x_t * (torch.cos(t) - torch.sin(t) / sd)[:, None] + v) / a[:, None]
        torch.testing.assert_close(trigflow_F(scm.net, x_t, t, None, sd, "flow"), expected)
    # another architecture is refused, naming the weights
    with pytest.raises(CheckpointError, match="does not fit this network .*size mismatch.*same architecture"):
        Trainer(toy_config("scm", "model.hidden=8", f"train.init_from={tmp_path / 'fm'}"), tmp_path / "bad")


@pytest.mark.parametrize("objective", ["imf", "scm", "tvm"])
def test_cli_train_sample_eval_with_the_objectives_sampler(tmp_path, objective, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", f"toy-{objective}", "--out", str(run)]
    for s in QUIET + ["train.steps=3", "model.hidden=16", "model.depth=3", "train.batch_size=16"]:
        args += ["--set", s]
    assert main(args) == 0
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--num", "8", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["eval", "--ckpt", str(run), "--set", "eval.num_samples=64", "--set", "eval.steps=1,2",
                 "--out", str(tmp_path / "e.json")]) == 0
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert metrics["1step"]["sw"] > 0 and metrics["2step"]["sw"] > 0
