"""The rank side of tests/test_wrapped_distributed.py: 2 gloo ranks train a wrapped diffusers DiT under DDP and FSDP2,
with the tangent pass joint (inside the wrapper's forward, with grad) and separate (no grad, then the primal with grad),
plus a control that calls the network around DDP (the peers' trap: gradients are then never synchronised). Rank 0
saves the full weights for the parent test to compare with single-process runs."""
from __future__ import annotations


import torch

from meanflow.models import ARCHS, register_arch
from meanflow.models.registry import _build_diffusers
from meanflow.training.config import apply_overrides
from meanflow.training.presets import get_preset
from tests._gloo import gloo_rank

TINY_DIT = ('{"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2, '
            '"attention_bias": false}')   # no key bias: its gradient is 0 up to rounding, which Adam would amplify
QUIET = ["train.progress=false", "train.log_every=1", "train.threads=1", "eval.enabled=false", "train.device=cpu",
         "train.grid_size=0", "train.keep_ckpts=0", "train.sample_every=0"]
SEPARATE = "diffusers_dit_separate"


def register_separate() -> None:
    """model.arch=diffusers_dit_separate: the same wrapped DiT with tangent_pass='separate'."""
    def build(cfg, shape, classes, backend, spec):
        net = _build_diffusers("DiTTransformer2DModel", cfg, shape, classes, backend, spec)
        net.tangent_pass = "separate"
        return net

    register_arch(SEPARATE, build)


def unregister_separate() -> None:
    ARCHS.pop(SEPARATE, None)


def wrapped_config(*extra):
    """A class-conditional tiny diffusers DiT on 8x8 digits, explicit backend (torch.func.jvp with math attention:
    the same routing as the fused one, without the Triton interpreter's cost), guidance and label dropout active."""
    guidance = [] if "loss.objective=scm" in extra else ["loss.kappa=0.3", "loss.omega=1.5"]
    return apply_overrides(get_preset("digits"), QUIET + guidance + [
        "model.arch=diffusers:DiTTransformer2DModel", f"model.config={TINY_DIT}", "model.backend=explicit",
        "model.hidden=0", "model.depth=0", "model.heads=0", "model.patch=0",
        "train.steps=2", "train.batch_size=8", "train.warmup_steps=0", "train.ema_decays=0.9", *extra])


# scenario -> config overrides (the trainer's own wrapping: DDP / fully_shard per diffusers block + root)
SCENARIOS = {
    "ddp": ["train.parallel=ddp"],
    "fsdp": ["train.parallel=fsdp"],
    "ddp_separate": ["train.parallel=ddp", f"model.arch={SEPARATE}"],
    "fsdp_separate": ["train.parallel=fsdp", f"model.arch={SEPARATE}"],
    "scm_fsdp": ["train.parallel=fsdp", "loss.objective=scm"],
    "ddp_bypassed": ["train.parallel=ddp"],   # the control: the loss calls the network inside DDP, not DDP
}


def record_first_gradients(trainer) -> dict:
    """Make the first optimizer step store the full (all-reduced / gathered) gradient of every parameter by name, as
    the optimizer sees it: the direct evidence of gradient sync (weights after Adam steps also carry its
    normalisation, which turns rounding noise in near-zero gradients into lr-sized steps)."""
    grads: dict = {}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        if not grads:
            for name, p in trainer.net.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                g = g.full_tensor() if hasattr(g, "full_tensor") else g
                grads[name] = g.detach().cpu().clone()
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return grads


def full_weights(trainer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.detach().cpu().clone() for k, v in get_model_state_dict(trainer.net, options=opts).items()}


def run(rank: int, world: int, port: int, out: str) -> None:
    from meanflow.training.trainer import Trainer

    register_separate()
    with gloo_rank(rank, world, port, out) as out_dir:
        for name, overrides in SCENARIOS.items():
            trainer = Trainer(wrapped_config(*overrides), out_dir / name)
            if name == "ddp_bypassed":
                trainer.model = trainer.net
            grads = record_first_gradients(trainer)
            trainer.train()
            weights = full_weights(trainer)
            if rank == 0:
                torch.save({"model": weights, "grads": grads, "step": trainer.step,
                            "class": type(trainer.model).__name__}, out_dir / f"{name}.result.pt")
