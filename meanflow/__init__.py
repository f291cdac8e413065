"""meanflow: a thin PyTorch training stack for MeanFlow and other JVP-based one-step generative models.

    from meanflow import build_dit, MeanFlowLoss, MeanFlowConfig, sample
    model = build_dit("DiT-B/2", input_size=32, in_channels=4, num_classes=1000, backend="fused")
    loss, stats = MeanFlowLoss(MeanFlowConfig(omega=1.0, kappa=0.5))(model, x, y)
    images = sample(model, noise, y, steps=1)

Other objectives on the same ops (flow matching, iMF, sCM, alpha-Flow, TVM): `build_objective(default_config("imf"),
model=net)` or IMFLoss / SCMLoss / AlphaFlowLoss / FlowMatchingLoss / TVMLoss directly, sampled by
`sampler_for(config)`. Your own network: subclass `JVPNetwork` (docs/byo_network.md).

Training: `Trainer(get_preset("mnist"), "runs/mnist").train()`, or the `meanflow` command (meanflow.cli).

Layout (imports only point down the list):
    cli.py        the command line
    training/     the trainer, run configs, presets, checkpoints, EMA, CUDA graphs, DDP / FSDP2
    evaluation/   samplers (one per objective), metrics, evaluation, plots
    objectives/   the training objectives (flow matching, MeanFlow, iMF, sCM, alpha-Flow, TVM), guidance, time sampling
    models/       the network protocol (JVPNetwork), DiT, the iMF network, MLPNet, heads, layers with a tangent, op tables
    data/         datasets, batches, latents
    runtime/      process groups, atomic writes, seeds, devices
"""
from .data import BatchIterator, build_dataset
from .evaluation import draw_noise, euler_sample, make_schedule, sample
from .evaluation.samplers import sampler_for
from .models import (BACKENDS, DIT_MODELS, IMF_CONDITIONS, TVM_CONDITIONS, DiT, JVPNetwork, LogVarHead, MLPNet,
                     NetworkSpec, build_dit, build_model, count_parameters, register_arch, unwrap)
from .objectives import (AlphaFlowConfig, AlphaFlowLoss, FlowMatchingConfig, FlowMatchingLoss, IMFConfig, IMFLoss,
                         MeanFlowConfig, MeanFlowLoss, Objective, SCMConfig, SCMLoss, TVMConfig, TVMLoss,
                         build_objective, default_config, sample_t_r)
from .training import (PRESETS, CUDAGraphModel, NonFiniteLossError, RunConfig, TrainConfig, Trainer,
                       apply_overrides, get_preset, graphed_ddp)

__all__ = ["BACKENDS", "CUDAGraphModel", "graphed_ddp", "MeanFlowConfig", "MeanFlowLoss", "DIT_MODELS", "DiT",
           "JVPNetwork", "MLPNet", "build_dit", "build_model", "count_parameters", "unwrap", "draw_noise",
           "euler_sample", "make_schedule", "sample", "sample_t_r", "RunConfig", "TrainConfig", "Trainer",
           "NonFiniteLossError", "apply_overrides", "get_preset", "PRESETS", "build_dataset", "BatchIterator",
           "Objective", "FlowMatchingConfig", "FlowMatchingLoss", "IMFConfig", "IMFLoss", "SCMConfig", "SCMLoss",
           "AlphaFlowConfig", "AlphaFlowLoss", "build_objective", "default_config", "sampler_for", "register_arch",
           "NetworkSpec", "LogVarHead", "IMF_CONDITIONS", "TVM_CONDITIONS", "TVMConfig", "TVMLoss"]
