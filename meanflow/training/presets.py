"""Named run configurations. `get_preset(name)` returns a fresh RunConfig; `meanflow presets` lists them.

| preset            | data                      | model                      | budget (2 shared CPU cores)   |
|-------------------|---------------------------|----------------------------|-------------------------------|
| toy, checkerboard | 2-D checkerboard          | MLP 256 x 4                | 3000 steps, ~30 s on 1 core   |
| moons, 8gaussians | 2-D toys                  | MLP 256 x 4                | 3000 steps, ~30 s on 1 core   |
| digits            | sklearn 8x8 digits        | DiT 64 wide, 3 blocks, p 2 | 1500 steps, ~1 min            |
| mnist (the demo)  | 5,000 MNIST digits, 32 px | DiT-Tiny/4 (96 wide, 4)    | 2500 steps, ~7-10 min         |
| imagenet-B/2, -L/2, -XL/2 | SD-VAE latents 4x32x32 | DiT-B/2, L/2, XL/2 | 240 epochs (1,201,095 steps) |
| toy-OBJ, mnist-OBJ | as toy / mnist          | as toy / mnist (+ the objective's heads) | as toy / mnist  |
| mnist-diffusers   | as mnist                  | diffusers DiT, 64 wide, 4, p 4 (wrapped) | 1000 steps, ~13 min |

toy-OBJ and mnist-OBJ (OBJ = fm, meanflow, imf, scm, alphaflow, tvm) train the same network on the same data with the
same optimizer, batch and steps as `toy` / `mnist` (an equal budget), each with its objective (loss.objective) tuned for
it; bench/learn_objectives.py trains them all and writes the learning table (docs/objectives.md). toy-meanflow and
mnist-meanflow ARE toy and mnist. toy-tvm and mnist-tvm differentiate through the JVP (TVM), which every backend does
exactly; they keep `auto` (explicit on CPU, fused on CUDA): see TANGENT_GRAD_OBJECTIVES. The exception to the equal
budget is mnist-scm: consistency training does not learn MNIST from scratch at this budget, so it continues an mnist-fm
run (train.init_from=runs/mnist-fm, its 2500 steps on top) at a lower learning rate, and refuses to start without that
run.

The ImageNet presets carry the official hyperparameters (docs/cli.md, 'Presets') and need `--set data.path=...`
(latent shards from `meanflow prepare-latents`). train.batch_size is the global batch (256): under
`torchrun --nproc_per_node=8 -m meanflow train --preset imagenet-XL/2 ...` each GPU takes 32 rows; train.parallel picks
DDP (default) or FSDP2, and train.grad_accum splits each GPU's rows further when memory is short.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from ..objectives import AlphaFlowConfig, FlowMatchingConfig, IMFConfig, MeanFlowConfig, SCMConfig, TVMConfig

IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    build: Callable[[], RunConfig]


def _toy(data: str) -> Callable[[], RunConfig]:
    def build() -> RunConfig:
        return RunConfig(
            preset=data if data != "checkerboard" else "toy",
            description=f"2-D {data}, unconditional MLP (256 x 4), explicit JVP backend",
            model=ModelConfig(arch="mlp", hidden=256, depth=4, backend="auto"),
            data=DataConfig(name=data),
            # Unconditional, so no guidance. Tuned by 30-second runs scored by SW_2 at 1 step (0.127 -> 0.063 on
            # checkerboard): a softer adaptive weight (p 0.5, the paper's CIFAR-style range) helped most, then more
            # r != t rows than ImageNet's 0.25 (JVP rows are cheap for an MLP) and a longer EMA.
            loss=MeanFlowConfig(ratio=0.75, p=0.5, eps=0.01, label_dropout=0.0),
            train=TrainConfig(steps=3000, batch_size=256, lr=1e-3, warmup_steps=100, ema_decays=(0.995,),
                              log_every=100, sample_every=1000),
            eval=EvalConfig(num_samples=5000, steps=(1, 2)),
        )
    return build


def _digits() -> RunConfig:
    # The mnist recipe (see below) on 8x8 digits: 16 tokens of 2x2 pixels, so every step is cheap.
    return RunConfig(
        preset="digits", description="sklearn 8x8 digits, class-conditional micro DiT (64 wide, 3 blocks, patch 2)",
        model=ModelConfig(arch="dit", name="DiT-Micro/2", hidden=64, depth=3, heads=4),
        data=DataConfig(name="digits"),
        loss=MeanFlowConfig(ratio=0.25, omega=2.0, kappa=0.0, p=1.0, eps=0.01),
        train=TrainConfig(steps=1500, batch_size=32, lr=4e-3, warmup_steps=100, grad_clip=1.0, ema_decays=(0.995,),
                          log_every=50, sample_every=500),
        eval=EvalConfig(num_samples=1000),
    )


def _mnist() -> RunConfig:
    # Calibrated on 2 CPU cores shared with other jobs (130-150 samples/s on one thread, ~210 on two;
    # docs/mnist_metrics.json), by 5-minute runs scored with the digit classifier. What mattered, in order: a high learning rate (4e-3 >> 2e-3 >>
    # 1e-3), many small steps (batch 32 beats 64 at equal time), ratio 0.25 with kappa = 0 (cheaper guidance forwards
    # than kappa > 0, so more steps, and better samples), a short EMA. Patch 2 costs 4x per step and loses at equal time;
    # the sampling guidance is omega / (1 - kappa) = 2.
    return RunConfig(
        preset="mnist", description="THE DEMO: 5,000 real MNIST digits, class-conditional DiT-Tiny/4, ~10 min on CPU",
        model=ModelConfig(arch="dit", name="DiT-Tiny/4"),
        data=DataConfig(name="mnist"),
        loss=MeanFlowConfig(ratio=0.25, omega=2.0, kappa=0.0, p=1.0, eps=0.01),
        train=TrainConfig(steps=2500, batch_size=32, lr=4e-3, warmup_steps=100, grad_clip=1.0,
                          ema_decays=(0.995, 0.99), log_every=50, sample_every=500),
        eval=EvalConfig(num_samples=1000),
    )


def _imagenet(size: str, omega: float, kappa: float, t_end: float) -> Callable[[], RunConfig]:
    def build() -> RunConfig:
        return RunConfig(
            preset=f"imagenet-{size}/2",
            description=f"ImageNet-256 SD-VAE latents, DiT-{size}/2, official MeanFlow settings "
                        f"(omega {omega}, kappa {kappa}, [0, {t_end}]); needs --set data.path=...",
            model=ModelConfig(arch="dit", name=f"DiT-{size}/2", backend="fused"),
            data=DataConfig(name="latents", path="", latent_scale=0.18215, num_classes=1000),
            loss=MeanFlowConfig(time_sampler="logit_normal", t_mean=-0.4, t_std=1.0, ratio=0.25, p=1.0, eps=0.01,
                                omega=omega, kappa=kappa, t_start=0.0, t_end=t_end, label_dropout=0.1),
            # 240 epochs at batch 256: ceil(240 * 1,281,167 / 256) = 1,201,095 steps
            train=TrainConfig(steps=-(-240 * IMAGENET_TRAIN_IMAGES // 256), batch_size=256, lr=1e-4, betas=(0.9, 0.95),
                              weight_decay=0.0, ema_decays=(0.9999,), precision="bf16", log_every=100,
                              sample_every=10_000, ckpt_every=10_000, keep_ckpts=3,
                              ckpt_minutes=30.0),  # a DiT-XL/2 state is GBs: every half hour, and on SIGTERM
            eval=EvalConfig(num_samples=50_000, batch_size=250),
        )
    return build


# A diffusers DiTTransformer2DModel (meanflow.models.wrap; docs/any_network.md) of DiT-Tiny/4's layout but 64 wide,
# on the demo's data, loss and optimizer, at 1000 steps so that its slower tangent call (torch.func.jvp over the whole
# module) still trains in minutes on CPU (docs/any_network.md: time and sample scores of one run). The timestep is t
# itself (time_scale 1), not diffusers' 1000 t: the engine's own DiT embeds raw t for the reason given in
# meanflow.models.layers.timestep_embedding.
MNIST_DIFFUSERS_DIT = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 16, "patch_size": 4}


def _mnist_diffusers() -> RunConfig:
    cfg = _mnist()
    cfg.preset = "mnist-diffusers"
    cfg.description = "real MNIST digits, a diffusers DiTTransformer2DModel (64 wide, 4 blocks, patch 4), wrapped"
    cfg.model = ModelConfig(arch="diffusers:DiTTransformer2DModel", config=json.dumps(MNIST_DIFFUSERS_DIT),
                            time_scale=1.0)
    cfg.train.steps, cfg.train.sample_every = 1000, 250
    return cfg


# The objectives on the toy and the demo, at the same budget as `toy` / `mnist` (only the loss section differs; see
# docs/objectives.md for what each learns and how the knobs were chosen).
OBJECTIVE_NAMES = ("fm", "meanflow", "imf", "scm", "alphaflow", "tvm")
# Objectives whose tangent must carry gradient (TVM): their presets say the cost. They keep the model's `auto` backend
# (explicit on CPU, fused on CUDA): every backend is exact for them (docs/design.md, 'Gradients through the tangent'),
# and on CPU explicit is the fastest exact one (bench/results/cpu/objectives_tvm.json).
TANGENT_GRAD_OBJECTIVES = frozenset({"tvm"})


def _toy_loss(objective: str):
    # Unconditional 2-D data (std ~1.15): no guidance. iMF's and alpha-Flow's knobs mirror the toy MeanFlow's where they
    # have the same one (ratio 0.75 of r != t rows, p 0.5): 30-60 s runs scored by SW_2 at 1 step preferred them to the
    # official ratio 0.5 / p 1 (iMF 0.079 vs 0.129; alpha-Flow 0.063 vs 0.115, and 0.121 with alpha held at 0: the
    # weighting, not the curriculum, made the difference). sCM: warm-up 300 or 1000 steps gave the same (0.070).
    return {
        "fm": FlowMatchingConfig(label_dropout=0.0),
        "meanflow": MeanFlowConfig(ratio=0.75, p=0.5, eps=0.01, label_dropout=0.0),
        "imf": IMFConfig(ratio=0.75, p=0.5, omega_max=1.0, sample_omega=1.0, label_dropout=0.0),
        "scm": SCMConfig(sigma_data=1.0, warmup_steps=1000, label_dropout=0.0),
        "alphaflow": AlphaFlowConfig(ratio=0.75, p=0.5, clamp=10.0, label_dropout=0.0),
        "tvm": TVMConfig(cfg=1.0, sample_cfg=1.0, label_dropout=0.0),
    }[objective]


def _mnist_loss(objective: str):
    # Class-conditional digits in [-1, 1]: training-time guidance where the objective has it (MeanFlow's omega 2 =
    # the demo; iMF's omega ~ log-uniform [1, 4], sampled at 2 inside [0, 1]), sampling-time guidance 2 for flow
    # matching (2 forwards per Euler step).
    return {
        "fm": FlowMatchingConfig(label_dropout=0.1, sample_cfg=2.0),
        "meanflow": MeanFlowConfig(ratio=0.25, omega=2.0, kappa=0.0, p=1.0, eps=0.01),
        "imf": IMFConfig(ratio=0.25, omega_max=4.0, sample_omega=2.0, sample_t_min=0.0, sample_t_max=1.0),
        # sCM continues a flow-matching run ('flow': F from the FM velocity; see _mnist_scm_train)
        "scm": SCMConfig(sigma_data=0.5, warmup_steps=500, label_dropout=0.0, parametrization="flow"),
        "alphaflow": AlphaFlowConfig(ratio=0.25, omega=2.0, kappa=0.0),
        "tvm": TVMConfig(cfg=2.0, sample_cfg=2.0),
    }[objective]


# A preset that continues another preset's run (train.init_from) names that preset here; Trainer refuses to start it
# without the run (check_start).
STARTS_FROM = {"mnist-scm": "mnist-fm"}
MNIST_SCM_LR = 3e-4


def _mnist_scm_train(cfg: RunConfig) -> None:
    # Consistency training from scratch does not learn MNIST at this budget (label match at chance for every learning
    # rate and warm-up tried; docs/objectives.md), and from a flow-matching run the full tangent term diverges at the
    # shared lr 4e-3. So mnist-scm continues `meanflow train --preset mnist-fm` (whose default run directory is
    # runs/mnist-fm) at a small learning rate; the steps, batch and optimizer are otherwise the demo's.
    cfg.train.init_from = f"runs/{STARTS_FROM['mnist-scm']}"
    cfg.train.lr = MNIST_SCM_LR


def check_start(cfg: RunConfig) -> None:
    """A preset that continues another preset's run cannot start without it: one line (exit status 2 in the CLI) that
    names train.init_from and the command that makes the run. Other configs pass unchecked."""
    source = STARTS_FROM.get(cfg.preset)
    if source is None:
        return
    path = cfg.train.init_from
    if path and Path(path).exists():
        return
    what = "train.init_from is empty" if not path else f"train.init_from={path} does not exist"
    raise FileNotFoundError(f"preset {cfg.preset} starts from a {source} run ({what}): make it with "
                            f"`meanflow train --preset {source}` (it writes runs/{source}) or point train.init_from "
                            f"at another {source} run")


def _mnist_summary(objective: str) -> str:
    if objective == "scm":
        return ("real MNIST digits, DiT-Tiny/4, sCM continuing a flow-matching run: needs `meanflow train --preset "
                "mnist-fm` first (train.init_from=runs/mnist-fm)")
    cost = ("the gradient through the JVP: ~40 min on 1 thread" if objective in TANGENT_GRAD_OBJECTIVES
            else "~10 min on 2 cores")
    return f"real MNIST digits, DiT-Tiny/4, objective {objective} (the demo's budget, {cost})"


def _with_objective(base: Callable[[], RunConfig], kind: str, objective: str) -> Callable[[], RunConfig]:
    def build() -> RunConfig:
        cfg = base()
        cfg.preset = f"{kind}-{objective}"
        cfg.description = f"{cfg.description}; objective {objective} (an equal budget with `{kind}`)"
        cfg.loss = (_toy_loss if kind == "toy" else _mnist_loss)(objective)
        if objective == "fm":  # the Euler baseline: 1, 2 and 50 steps
            cfg.eval.steps = (1, 2, 50)
        if cfg.preset == "mnist-scm":
            _mnist_scm_train(cfg)
            cfg.description = ("5,000 real MNIST digits, class-conditional DiT-Tiny/4; objective scm continuing the "
                               f"mnist-fm run (train.init_from) at lr {MNIST_SCM_LR:g}: the demo's steps on top of "
                               "that run's")
        return cfg
    return build


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("toy", "2-D checkerboard, MLP, ~30 s of training on 1 CPU core (MeanFlow 1-step vs the data; "
                  "more sampling steps score worse on this preset, see docs/cli.md)", _toy("checkerboard")),
    Preset("checkerboard", "alias of toy", _toy("checkerboard")),
    Preset("moons", "2-D two moons, MLP, ~30 s of training on 1 CPU core", _toy("moons")),
    Preset("8gaussians", "2-D eight Gaussians, MLP, ~30 s of training on 1 CPU core", _toy("8gaussians")),
    Preset("digits", "sklearn 8x8 digits, tiny class-conditional DiT, ~1 min on CPU", _digits),
    Preset("mnist", "THE DEMO: real MNIST digits, class-conditional DiT-Tiny/4, ~10 min on 2 CPU cores", _mnist),
    Preset("imagenet-B/2", "ImageNet-256 latents, DiT-B/2, official settings (omega 1.0, kappa 0.5); "
                           "needs data.path", _imagenet("B", 1.0, 0.5, 1.0)),
    Preset("imagenet-L/2", "ImageNet-256 latents, DiT-L/2, official settings (omega 0.2, kappa 0.92, [0, 0.8]); "
                           "needs data.path", _imagenet("L", 0.2, 0.92, 0.8)),
    Preset("imagenet-XL/2", "ImageNet-256 latents, DiT-XL/2, official settings (omega 0.2, kappa 0.92, "
                            "[0, 0.75]); needs data.path", _imagenet("XL", 0.2, 0.92, 0.75)),
    Preset("mnist-diffusers", "real MNIST digits, a wrapped diffusers DiT (torch.func.jvp with the fused "
                              "attention), 1000 steps, ~13 min on 1 shared CPU core", _mnist_diffusers),
    *[Preset(f"toy-{o}", f"2-D checkerboard, MLP, objective {o} (the toy's budget)",
             _with_objective(_toy("checkerboard"), "toy", o)) for o in OBJECTIVE_NAMES],
    *[Preset(f"mnist-{o}", _mnist_summary(o), _with_objective(_mnist, "mnist", o)) for o in OBJECTIVE_NAMES],
]}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name].build()
