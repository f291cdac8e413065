"""The rank side of tests/test_distributed.py: one torch.multiprocessing spawn of 2 gloo ranks runs every distributed
scenario in turn (a spawn costs seconds on 2 CPU cores, a scenario a fraction of one); rank 0 saves what the parent
test compares against single-process runs."""
from __future__ import annotations

import os

import torch

from meanflow.training.config import apply_overrides
from meanflow.training.interrupts import TrainingInterrupted
from meanflow.training.presets import get_preset
from tests._gloo import gloo_rank

# device=cpu: gloo ranks on CPU even where a GPU is visible (two ranks cannot share one GPU)
QUIET = ["train.progress=false", "train.log_every=1", "train.threads=1", "eval.enabled=false", "train.device=cpu"]


def dit_config(*extra):
    """A class-conditional DiT on 8x8 digits with every random draw of the objective in use (guidance with kappa > 0,
    label dropout), clipping that is active (a small max norm) and two EMAs."""
    return apply_overrides(get_preset("digits"), QUIET + [
        "train.steps=4", "train.batch_size=8", "model.hidden=16", "model.depth=2", "model.heads=2",
        "model.backend=explicit", "loss.kappa=0.3", "loss.omega=1.5", "train.grad_clip=0.05", "train.warmup_steps=0",
        "train.ema_decays=0.9,0.5", "train.grid_size=4", "train.keep_ckpts=0", *extra])


def full_state(trainer) -> dict:
    """Full (gathered) model and EMA weights of a trainer, on CPU; every rank must call it (FSDP gathers)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(trainer.net, options=opts)  # net: DDP / graph wrappers would prefix the names
    emas = {}
    for key in trainer.ema.models:
        m = trainer.ema_model(float(key))
        emas[key] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()} if m is not None else None
    return {"model": {k: v.detach().cpu().clone() for k, v in model.items()}, "ema": emas, "step": trainer.step}


# scenario name -> (config overrides, resume-from (relative to the output folder) or None)
SCENARIOS = {
    "ddp": (["train.parallel=ddp", "train.grad_accum=2", "train.ckpt_every=2"], None),
    "fsdp": (["train.parallel=fsdp", "train.grad_accum=2", "train.ckpt_every=2"], None),
    # DDP around the CUDA-graph wrapper (on CPU the wrapper passes every call through: this checks the wiring,
    # gradient sync through it and its checkpoints; tests/test_cuda_graphs.py checks the replay under DDP on a GPU)
    "ddp_graphs": (["train.parallel=ddp", "train.cuda_graphs=true", "train.grad_accum=2", "train.ckpt_every=2"],
                   None),
    "ddp_graphs_resumed": (["train.parallel=ddp", "train.cuda_graphs=true", "train.grad_accum=2"],
                           "ddp/checkpoints/ckpt_00000002"),
    "ddp_autograd": (["train.parallel=ddp", "model.backend=autograd", "train.steps=2"], None),
    "fsdp_autograd": (["train.parallel=fsdp", "model.backend=autograd", "train.steps=2"], None),
    "ddp_resumed": (["train.parallel=ddp", "train.grad_accum=2"], "ddp/checkpoints/ckpt_00000002"),
    "fsdp_resumed": (["train.parallel=fsdp", "train.grad_accum=2"], "fsdp/checkpoints/ckpt_00000002"),
    # a one-process checkpoint (.pt, written by the parent test) continued by 2 FSDP ranks
    "fsdp_from_single": (["train.parallel=fsdp"], "single/checkpoints/ckpt_00000002.pt"),
    # a DDP checkpoint continued under FSDP (the same parameter names: DCP reshards)
    "fsdp_from_ddp": (["train.parallel=fsdp", "train.grad_accum=2"], "ddp/checkpoints/ckpt_00000002"),
    # train.compile: torch.compile around DDP (the whole model), per block before fully_shard under FSDP2
    # (aot_eager: Dynamo + AOT autograd as with inductor, without compiling C++ on 2 CPU cores)
    "ddp_compiled": (["train.parallel=ddp", "train.grad_accum=2", "train.compile=true",
                      "train.compile_backend=aot_eager"], None),
    "fsdp_compiled": (["train.parallel=fsdp", "train.grad_accum=2", "train.compile=true",
                       "train.compile_backend=aot_eager"], None),
    # SIGTERM reaches rank 1 only, inside step 2: both ranks finish the step, checkpoint it together and stop; the
    # resumed run must equal the uninterrupted "ddp" scenario
    "ddp_sigterm": (["train.parallel=ddp", "train.grad_accum=2"], None),
    "ddp_sigterm_resumed": (["train.parallel=ddp", "train.grad_accum=2"], "ddp_sigterm/checkpoints/ckpt_00000002"),
    # bf16: FSDP's MixedPrecisionPolicy (bf16 compute copies, fp32 reduction) under CPU autocast
    "fsdp_bf16": (["train.parallel=fsdp", "train.precision=bf16", "train.steps=2"], None),
}


def _signal_rank_1_in_step_2(trainer, rank: int) -> None:
    import signal

    real_step = trainer.train_step

    def step():
        if rank == 1 and trainer.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step()

    trainer.train_step = step


def run(rank: int, world: int, port: int, out: str) -> None:
    from meanflow.training.trainer import Trainer

    with gloo_rank(rank, world, port, out) as out_dir:
        from torch._dynamo.utils import counters

        for name, (overrides, resume) in SCENARIOS.items():
            torch._dynamo.reset()
            counters.clear()
            trainer = Trainer(dit_config(*overrides), out_dir / name,
                              resume=out_dir / resume if resume else None)
            if name.endswith("_sigterm"):
                _signal_rank_1_in_step_2(trainer, rank)
                try:
                    trainer.train()
                except TrainingInterrupted as stop:
                    state = {"stopped_at": stop.step, "exit_status": stop.exit_status}
                    if rank == 0:
                        torch.save(state, out_dir / f"{name}.result.pt")
                    continue
                raise AssertionError("the SIGTERM scenario trained to the end")
            trainer.train()
            state = full_state(trainer)
            state["compiled_graphs"] = counters["stats"]["unique_graphs"]  # Dynamo graphs this scenario compiled
            if rank == 0:
                torch.save(state, out_dir / f"{name}.result.pt")
        # prepare-latents over the 2 ranks (each encodes its shards, rank 0 writes the manifest)
        src = out_dir / "latent_src"
        if (src / "vae").is_dir():
            from meanflow.data.latents import prepare_latents

            prepare_latents(src / "images", src / "vae", out_dir / "latents_2ranks", image_size=16, flip=True,
                            batch_size=2, shard_size=2, workers=0, device="cpu", log=lambda *a, **k: None)
        # a global batch that the ranks x micro-batches cannot split is refused on every rank
        try:
            Trainer(dit_config("train.batch_size=6", "train.grad_accum=2"), out_dir / "bad")
        except ValueError as exc:
            if rank == 0:
                (out_dir / "bad.txt").write_text(str(exc))
        # FSDP cannot be graphed: refused on every rank with a message that says what to use instead
        try:
            Trainer(dit_config("train.parallel=fsdp", "train.cuda_graphs=true"), out_dir / "fsdp_graphs")
        except ValueError as exc:
            if rank == 0:
                (out_dir / "fsdp_graphs.txt").write_text(str(exc))
