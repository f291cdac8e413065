"""The rank side of tests/test_objective_distributed.py: one spawn of 2 gloo ranks runs, for every objective beyond
MeanFlow, a DDP run and an FSDP2 run (2 ranks x 2 micro-batches) and an FSDP run resumed from the FSDP run's
distributed checkpoint; rank 0 saves the full weights (and TVM's teacher) for the parent test to compare with one
process."""
from __future__ import annotations


import torch

from meanflow.training.config import apply_overrides
from meanflow.training.presets import get_preset
from tests._dist_worker import full_state
from tests._gloo import gloo_rank

OBJECTIVES = ("fm", "imf", "scm", "alphaflow", "tvm")
QUIET = ["train.progress=false", "train.log_every=1", "train.threads=1", "eval.enabled=false", "train.device=cpu"]
# guidance (and so the guidance forwards, the null class and label dropout) wherever the objective has it
GUIDANCE = {"fm": ["loss.sample_cfg=2"], "imf": ["loss.omega_max=3"], "scm": ["loss.label_dropout=0.2"],
            "alphaflow": ["loss.omega=1.5", "loss.kappa=0.3", "loss.alpha_end_step=3"],  # alpha 1 -> 0 in 4 steps
            "tvm": ["loss.beta_sampler=cfg_uniform", "loss.label_dropout=0.25"]}


def objective_config(objective: str, *extra: str):
    """A tiny class-conditional DiT on 8x8 digits (iMF: v-branch and conditions; sCM: logvar head), 4 steps of 8."""
    return apply_overrides(get_preset("digits"), QUIET + [
        f"loss.objective={objective}", *GUIDANCE[objective], "train.steps=4", "train.batch_size=8",
        "model.hidden=16", "model.depth=2", "model.heads=2", "model.backend=explicit",
        "train.grad_clip=0.05",
        "train.warmup_steps=0", "train.ema_decays=0.9", "train.grid_size=4", "train.keep_ckpts=0", *extra])


# FSDP2 for every objective (the v-branch sharded per block, the heads in the root unit); DDP where the objective adds
# parameters or draws (flow matching's DDP path is MeanFlow's, tested in tests/test_distributed.py); a resume from the
# DCP checkpoint where the loss follows the step (sCM's warm-up, alpha-Flow's schedule)
DDP = ("imf", "scm", "alphaflow", "tvm")
RESUMED = ("scm", "alphaflow", "tvm")   # TVM: the teacher, sharded and checkpointed through DCP
# iMF's own network (meanflow.models.imf_dit: shared / u / v blocks, each an FSDP2 unit)
IMF_DIT = ("model.arch=imf_dit", "model.name=iMF-Micro/2", "model.hidden=0", "model.depth=0", "model.heads=0")
SCENARIOS = {"imfdit_fsdp": ("imf", ["train.parallel=fsdp", "train.grad_accum=2", *IMF_DIT], None)}
for _o in OBJECTIVES:
    if _o in DDP:
        SCENARIOS[f"{_o}_ddp"] = (_o, ["train.parallel=ddp", "train.grad_accum=2"], None)
    SCENARIOS[f"{_o}_fsdp"] = (_o, ["train.parallel=fsdp", "train.grad_accum=2", "train.ckpt_every=2"], None)
    if _o in RESUMED:
        SCENARIOS[f"{_o}_fsdp_resumed"] = (_o, ["train.parallel=fsdp", "train.grad_accum=2"],
                                           f"{_o}_fsdp/checkpoints/ckpt_00000002")


def teacher_state(trainer) -> dict:
    """The full teacher weights on CPU (every rank must call it: FSDP gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainer.teacher_model, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in full.items()}


def run(rank: int, world: int, port: int, out: str) -> None:
    from meanflow.training.trainer import Trainer

    with gloo_rank(rank, world, port, out) as out_dir:
        for name, (objective, overrides, resume) in SCENARIOS.items():
            trainer = Trainer(objective_config(objective, *overrides), out_dir / name,
                              resume=out_dir / resume if resume else None)
            trainer.train()
            state = full_state(trainer)
            if trainer.teacher is not None:  # TVM's teacher, gathered like the model (a collective under FSDP)
                state["teacher"] = teacher_state(trainer)
            if rank == 0:
                torch.save(state, out_dir / f"{name}.result.pt")
