"""meanflow: a thin PyTorch training stack for MeanFlow (one-step generative models).

    from meanflow import build_dit, MeanFlowLoss, MeanFlowConfig, sample
    model = build_dit("DiT-B/2", input_size=32, in_channels=4, num_classes=1000, backend="fused")
    loss, stats = MeanFlowLoss(MeanFlowConfig(omega=1.0, kappa=0.5))(model, x, y)
    images = sample(model, noise, y, steps=1)

Training: `Trainer(get_preset("mnist"), "runs/mnist").train()`, or the `meanflow` command (meanflow.cli).
"""
from .backends import BACKENDS
from .config import RunConfig, apply_overrides
from .cuda_graphs import CUDAGraphModel, graphed_ddp
from .data import BatchIterator, build_dataset
from .loss import MeanFlowConfig, MeanFlowLoss
from .model import DIT_MODELS, DiT, MLPNet, build_dit, count_parameters, unwrap
from .presets import PRESETS, get_preset
from .sample import draw_noise, euler_sample, make_schedule, sample
from .time_sampling import sample_t_r
from .train import TrainConfig, Trainer

__all__ = ["BACKENDS", "CUDAGraphModel", "graphed_ddp", "MeanFlowConfig", "MeanFlowLoss", "DIT_MODELS", "DiT",
           "MLPNet", "build_dit",
           "count_parameters", "unwrap", "draw_noise", "euler_sample", "make_schedule", "sample", "sample_t_r",
           "RunConfig", "TrainConfig", "Trainer", "apply_overrides", "get_preset", "PRESETS", "build_dataset",
           "BatchIterator"]
