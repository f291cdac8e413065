"""Distributed training on CPU with gloo (2 processes): DDP and FSDP2 runs equal a single-process run on the same global
batch, for the explicit backend and for the autograd backend (torch.func.jvp inside the wrapped forward: the peers'
trap); gradient accumulation equals one big micro-batch; distributed (DCP) checkpoints resume exactly, at the same world
size and after a change of world size (2 -> 1, and 1 -> 2 from a one-process checkpoint); and `torchrun -m meanflow
train` end to end.

One torch.multiprocessing spawn runs every distributed scenario (tests/_dist_worker.py); the tests here compare its
results with single-process runs. "Equal" means |a - b| <= 1e-7 + 1e-6 |b| elementwise (the runs differ only in float
summation order: observed differences are one or two float32 ulps); resumed runs are compared bit for bit.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meanflow.runtime import distributed
from meanflow.training import parallel
from meanflow.training.checkpoint import (
    is_dcp_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
)
from meanflow.training.trainer import Trainer
from tests._dist_worker import SCENARIOS, dit_config, run
from tests._latent_fixtures import make_image_folder, make_tiny_vae
from tests._single_thread import single_thread  # noqa: F401  (autouse fixture)
from tests.utils import free_port

pytestmark = pytest.mark.full  # long: runs with --full (CI runs it)

REPO = Path(__file__).resolve().parents[1]


def snapshot(trainer) -> dict:
    return {"model": {k: v.detach().clone() for k, v in trainer.net.state_dict().items()},
            "ema": {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in trainer.ema.models.items()},
            "step": trainer.step}


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same(a: dict, b: dict, exact: bool = False):
    assert a.keys() == b.keys()
    for k in b:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references, then one 2-rank spawn of every scenario in tests/_dist_worker.py."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    single = Trainer(dit_config("train.ckpt_every=2"), out / "single")   # A = 1, the reference
    single.train()
    refs = {"single": snapshot(single)}
    accum = Trainer(dit_config("train.grad_accum=2"), out / "single_accum")
    accum.train()
    refs["single_accum"] = snapshot(accum)
    autograd = Trainer(dit_config("model.backend=autograd", "train.steps=2"), out / "single_autograd")
    autograd.train()
    refs["single_autograd"] = snapshot(autograd)
    make_image_folder(out / "latent_src" / "images")   # for prepare-latents over 2 ranks
    make_tiny_vae(out / "latent_src" / "vae")
    try:
        mp.spawn(run, args=(2, free_port(), str(out)), nprocs=2, join=True)
    except Exception:
        errors = "\n".join(p.read_text() for p in out.glob("rank*.error.txt"))
        raise AssertionError(f"a rank failed:\n{errors}") from None
    results = {name: torch.load(out / f"{name}.result.pt", weights_only=True) for name in SCENARIOS}
    return out, refs, results


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name", ["ddp", "fsdp", "ddp_graphs", "ddp_compiled", "fsdp_compiled"])
def test_two_ranks_equal_one_process_on_the_same_global_batch(runs, name):
    """DDP / FSDP2, explicit backend, 2 ranks x 2 micro-batches of 2 rows == 1 process with one batch of 8: weights and
    both EMAs after 4 steps (guidance, label dropout, clipping active), and the logged (rank-averaged) losses. Also
    with train.compile (torch.compile around DDP; each block compiled before fully_shard)."""
    out, refs, results = runs
    got, ref = results[name], refs["single"]
    if name.endswith("compiled"):
        # whole model: the tangent call and the guidance call (dynamic rows); per block: forward_jvp and forward
        # of the blocks (one graph each, shared by both blocks); nothing recompiled over the 4 steps
        assert 2 <= got["compiled_graphs"] <= 3, got["compiled_graphs"]
    else:
        assert got["compiled_graphs"] == 0
    assert got["step"] == ref["step"] == 4
    assert_same(got["model"], ref["model"])
    for decay in ("0.9", "0.5"):
        assert_same(got["ema"][decay], ref["ema"][decay])
    for a, b in zip(losses(out / name), losses(out / "single"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["v_loss"] == pytest.approx(b["v_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and a["grad_norm"] > 0.05  # clipping active


@pytest.mark.parametrize("name", ["ddp_autograd", "fsdp_autograd"])
def test_autograd_backend_gradients_are_synchronised(runs, name):
    """The autograd backend runs torch.func.jvp INSIDE the wrapped model's forward: gradients still go through DDP's
    all-reduce / FSDP's reduce-scatter (unsynchronised gradients would leave rank 0 with half the batch's gradient)."""
    _, refs, results = runs
    assert_same(results[name]["model"], refs["single_autograd"]["model"])


def test_gradient_accumulation_equals_one_micro_batch(runs):
    """accum=2 == one micro-batch of twice the size, in one process (and on 2 ranks: the tests above run accum=2)."""
    _, refs, _ = runs
    assert_same(refs["single_accum"]["model"], refs["single"]["model"])
    assert_same(refs["single_accum"]["ema"]["0.9"], refs["single"]["ema"]["0.9"])


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_resume_from_a_distributed_checkpoint_is_exact(runs, name):
    out, _, results = runs
    assert results[f"{name}_resumed"]["step"] == 4
    assert_same(results[f"{name}_resumed"]["model"], results[name]["model"], exact=True)
    for decay in ("0.9", "0.5"):
        assert_same(results[f"{name}_resumed"]["ema"][decay], results[name]["ema"][decay], exact=True)
    resumed, straight = losses(out / f"{name}_resumed"), losses(out / name)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[2:]]


def test_sigterm_on_one_rank_checkpoints_every_rank_and_resumes_exactly(runs):
    """A signal that reaches one rank stops both after the same step, with one checkpoint; the resumed run equals
    the uninterrupted one."""
    out, _, results = runs
    assert results["ddp_sigterm"] == {"stopped_at": 2, "exit_status": 143}
    resumed = results["ddp_sigterm_resumed"]
    assert resumed["step"] == 4
    assert_same(resumed["model"], results["ddp"]["model"], exact=True)
    for decay in ("0.9", "0.5"):
        assert_same(resumed["ema"][decay], results["ddp"]["ema"][decay], exact=True)
    assert [r["loss"] for r in losses(out / "ddp_sigterm_resumed")] == [r["loss"] for r in losses(out / "ddp")[2:]]


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_world_size_change_2_to_1(runs, tmp_path, name):
    """A 2-rank checkpoint continued by one process: DCP reshards model / optimizer / EMA, the data position and the
    objective's generator are global, so steps 3 and 4 are those of the uninterrupted 2-rank run."""
    out, _, results = runs
    ckpt = out / name / "checkpoints" / "ckpt_00000002"
    assert is_dcp_checkpoint(ckpt)
    one = Trainer(dit_config("train.grad_accum=2"), tmp_path / "one", resume=ckpt)
    assert one.world_size == 1 and one.step == 2
    one.train()
    got = snapshot(one)
    assert_same(got["model"], results[name]["model"])
    assert_same(got["ema"]["0.5"], results[name]["ema"]["0.5"])
    for a, b in zip(losses(tmp_path / "one"), losses(out / name)[2:], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_one_process_checkpoint_continued_by_two_ranks(runs):
    """The other direction: a single-file checkpoint (step 2 of the reference) loaded by 2 FSDP ranks (each keeps its
    shard of the full state), continued to step 4 == the reference."""
    _, refs, results = runs
    assert_same(results["fsdp_from_single"]["model"], refs["single"]["model"])
    assert_same(results["fsdp_from_single"]["ema"]["0.9"], refs["single"]["ema"]["0.9"])


def test_ddp_checkpoint_continued_under_fsdp(runs):
    _, _, results = runs
    assert_same(results["fsdp_from_ddp"]["model"], results["ddp"]["model"])
    assert_same(results["fsdp_from_ddp"]["ema"]["0.5"], results["ddp"]["ema"]["0.5"])


def test_fsdp_bf16_mixed_precision(runs):
    """train.precision=bf16 under FSDP: bf16 compute copies of the weights (MixedPrecisionPolicy) and autocast, fp32
    master weights and gradient reduction; the times stay fp32 (no input casting)."""
    out, _, results = runs
    policy = parallel.mixed_precision_policy("bf16")
    assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (torch.bfloat16, torch.float32,
                                                                                     False)
    assert parallel.mixed_precision_policy("fp32") is None
    assert all(v.dtype == torch.float32 and v.isfinite().all() for v in results["fsdp_bf16"]["model"].values())
    for a, b in zip(losses(out / "fsdp_bf16"), losses(out / "single")[:2], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3) and a["v_loss"] == pytest.approx(b["v_loss"], rel=0.05)


def test_distributed_checkpoint_layout_and_inference_weights(runs):
    out, _, results = runs
    ckpts = list_checkpoints(out / "fsdp")
    assert [p.name for p in ckpts] == ["ckpt_00000002", "ckpt_00000004"]        # keep_ckpts=0: all kept
    assert (out / "fsdp" / "checkpoints" / "latest").read_text().strip() == "ckpt_00000004"
    files = sorted(p.name for p in ckpts[-1].iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt", "rank_00000.pt", "rank_00001.pt"]
    assert not list((out / "fsdp" / "checkpoints").glob(".tmp*"))               # no leftovers of the atomic write
    meta = load_checkpoint(out / "fsdp")
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["parallel"] == "fsdp"
    assert meta["ema_decays"] == ["0.9", "0.5"] and meta["data"]["batches"] == 4
    for which, expected in (("ema", results["fsdp"]["ema"]["0.9"]), ("0.5", results["fsdp"]["ema"]["0.5"]),
                            ("model", results["fsdp"]["model"])):
        weights, cfg, step = load_weights(out / "fsdp", which)                    # sharded EMA, read whole
        assert step == 4 and cfg["train"]["parallel"] == "fsdp"
        assert_same(weights, expected, exact=True)
    # the exported EMA weights of a distributed run are the gathered EMA
    exported, _, _ = load_weights(out / "fsdp" / "ema.safetensors")
    assert_same(exported, results["fsdp"]["ema"]["0.9"], exact=True)


def test_ddp_with_cuda_graphs_checkpoints_resume_exactly(runs):
    """DDP(CUDAGraphModel(net)): its checkpoints use the network's own parameter names, so a plain DDP checkpoint is
    continued with graphs on, to the same weights as the uninterrupted plain run."""
    _, _, results = runs
    assert results["ddp_graphs_resumed"]["step"] == 4
    assert_same(results["ddp_graphs_resumed"]["model"], results["ddp"]["model"], exact=True)
    assert_same(results["ddp_graphs"]["model"], results["ddp"]["model"], exact=True)


def test_fsdp_with_cuda_graphs_is_refused(runs):
    out, _, _ = runs
    message = (out / "fsdp_graphs.txt").read_text()
    assert "train.cuda_graphs does not work with train.parallel=fsdp" in message and "train.parallel=ddp" in message


def test_indivisible_global_batch_is_refused(runs):
    out, _, _ = runs
    assert (out / "bad.txt").read_text() == ("train.batch_size 6 (the global batch) must divide by world size 2 x "
                                             "train.grad_accum 2")


def test_prepare_latents_over_two_ranks_equals_one_process(runs):
    """Each rank encodes the shards s with s % 2 == rank, rank 0 writes the manifest; the posterior noise is seeded per
    image, so the shards are those of a one-process run (made here with another batch size)."""
    import numpy as np

    from meanflow.data.latents import prepare_latents

    out, _, _ = runs
    src, two = out / "latent_src", out / "latents_2ranks"
    one = prepare_latents(src / "images", src / "vae", out / "latents_1rank", image_size=16, flip=True, batch_size=3,
                          shard_size=2, workers=0, device="cpu", log=lambda *a, **k: None)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest == {**one, "source": manifest["source"]} and manifest["count"] == 12
    assert manifest["shards"] == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    for name in manifest["shards"]:
        a, b = np.load(two / name), np.load(out / "latents_1rank" / name)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert (np.load(two / name.replace(".npy", ".labels.npy")) ==
                np.load(out / "latents_1rank" / name.replace(".npy", ".labels.npy"))).all()


# ------------------------------------------------------------------------------------------------- pieces
def test_single_process_context_and_helpers(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main, ctx.owned) == (0, 1, False, True, False)
    net = torch.nn.Linear(2, 2)
    assert parallel.wrap_model(net, "fsdp", ctx) is net                     # one process: nothing to wrap
    with pytest.raises(ValueError, match="train.parallel must be one of"):
        parallel.wrap_model(net, "zero3", ctx)
    assert distributed.all_reduce_mean(torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]
    assert distributed.rank_seed(0, 10, 1) == distributed.rank_seed(0, 10, 1) != distributed.rank_seed(0, 10, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        distributed.setup("cpu")
    # train.parallel is ignored by a single process (and validated)
    monkeypatch.delenv("WORLD_SIZE")
    t = Trainer(dit_config("train.parallel=fsdp", "train.steps=1"), tmp_path / "one")
    assert t.parallel == "none" and t.model is t.net
    with pytest.raises(ValueError, match="train.parallel must be one of"):
        Trainer(dit_config("train.parallel=zero"), tmp_path / "bad")


def test_torchrun_train_and_resume(tmp_path):
    """`torchrun --nproc_per_node 2 -m meanflow train` (env:// rendezvous, gloo on CPU): rank 0 alone prints and writes
    the run files; the checkpoint is a DCP directory that a one-process `meanflow train --resume` continues."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    args = ["--preset", "digits", "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "model.hidden=16",
            "--set", "model.depth=1", "--set", "model.heads=2", "--set", "train.progress=false",
            "--set", "eval.enabled=false", "--set", "train.grid_size=10", "--set", "train.parallel=fsdp",
            "--set", "train.device=cpu",
            "--out", str(run_dir)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "meanflow", "train", *args],
                          capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1 and "2 ranks (fsdp, gloo)" in proc.stdout
    assert is_dcp_checkpoint(run_dir / "checkpoints" / "ckpt_00000002")
    assert [r["step"] for r in losses(run_dir)] == [2]                       # log_every 50: logged at the end
    for name in ("final_1step.png", "ema.safetensors", "summary.json", "config.json"):
        assert (run_dir / name).is_file(), name
    proc = subprocess.run([sys.executable, "-m", "meanflow", "train", "--resume", str(run_dir), "--set",
                           "train.steps=3"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step 2" in proc.stdout and (run_dir / "checkpoints" / "ckpt_00000003.pt").is_file()
