"""train.compile: a short compiled training run equals the eager run (losses, weights), for the DiT with guidance (the
guidance call's row count changes every step) and the MLP; clear refusals. (The fused backend under compile, loss
and guidance included: tests/test_compile.py; the trainer's wiring is the same for every backend.) The 2-rank DDP /
FSDP2 compiled runs are in tests/test_distributed.py (scenarios ddp_compiled / fsdp_compiled)."""
import json

import pytest
import torch

from meanflow.training.compile import is_compiled
from meanflow.training.config import apply_overrides
from meanflow.training.presets import get_preset
from meanflow.training.trainer import Trainer
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)

QUIET = ["train.progress=false", "train.log_every=1", "train.threads=1", "eval.enabled=false"]


@pytest.fixture(autouse=True)
def _no_stale_aot_autograd_cache():
    """AOTAutogradCache keys a compiled graph on the Dynamo graph, not on a custom op's Python autograd formula: after
    an edit of an op's backward (or with another checkout's cache in a shared /tmp) it could replay the old one."""
    import torch._functorch.config

    # the config module's own patch: monkeypatch's undo deletes the key on torch 2.13 + pytest 9.2
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def digits_config(*extra):
    # class-conditional DiT, guidance with kappa > 0 over part of the interval, label dropout
    return apply_overrides(get_preset("digits"), QUIET + [
        "train.steps=4", "train.batch_size=8", "model.hidden=16", "model.depth=2", "model.heads=2",
        "model.backend=explicit", "loss.kappa=0.3", "loss.omega=1.5", "loss.t_end=0.8", *extra])


def toy_config(*extra):
    return apply_overrides(get_preset("toy"), QUIET + [
        "train.steps=4", "train.batch_size=32", "model.hidden=32", "model.depth=2", *extra])


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(config, out):
    torch._dynamo.reset()
    trainer = Trainer(config, out)
    trainer.train()
    return trainer


def assert_same_run(a, b, out_a, out_b, rtol=1e-5):
    for ra, rb in zip(losses(out_a), losses(out_b), strict=True):
        for key in ("loss", "v_loss", "raw_loss", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=rtol, abs=1e-7), (ra["step"], key)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys()  # the compiled model's checkpoints keep the network's own names
    for k in sb:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("preset,backend", [pytest.param("digits", "aot_eager", marks=pytest.mark.full),
                                            ("toy", "inductor")])
def test_compiled_training_equals_eager(tmp_path, preset, backend):
    make = digits_config if preset == "digits" else toy_config
    eager = run(make(), tmp_path / "eager")
    compiled = run(make("train.compile=true", f"train.compile_backend={backend}"), tmp_path / "compiled")
    assert compiled.model is compiled.net and is_compiled(compiled.net) and not is_compiled(eager.net)
    assert_same_run(compiled, eager, tmp_path / "compiled", tmp_path / "eager")
    rows = {r["step"]: r for r in losses(tmp_path / "compiled")}
    assert len(rows) == 4


@pytest.mark.parametrize("overrides,match", [
    (["train.compile_mode=fast"], "train.compile_mode must be one of"),
    (["train.compile_backend=tvm"], "train.compile_backend must be one of"),
    (["train.cuda_graphs=true"], "train.cuda_graphs and train.compile do not combine"),
])
def test_bad_compile_options_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        Trainer(toy_config("train.compile=true", *overrides), tmp_path)


@pytest.mark.parametrize("objective", ["fm", "imf", "scm", "alphaflow", "tvm"])
def test_compiled_training_equals_eager_for_each_objective(tmp_path, objective):
    """Every objective's network compiles in place (iMF's v-branch and conditions, sCM's logvar head and per-row time
    tangents, alpha-Flow's mixed rows, TVM's gradient through torch.func.jvp on the autograd backend) and trains as in
    eager."""
    def make(*extra):
        return apply_overrides(get_preset(f"toy-{objective}"), QUIET + [
            "train.steps=4", "train.batch_size=32", "model.hidden=32", "model.depth=2", *extra])

    eager = run(make(), tmp_path / "eager")
    compiled = run(make("train.compile=true", "train.compile_backend=aot_eager"), tmp_path / "compiled")
    assert is_compiled(compiled.net)
    assert_same_run(compiled, eager, tmp_path / "compiled", tmp_path / "eager")
