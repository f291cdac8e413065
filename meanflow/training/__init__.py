"""Training: the loop and what it needs beside it.

    trainer.py      Trainer: the loop and one step (micro-batches, optimizer, EMA)
    state.py        what a checkpoint of a run holds, save / resume (exact, at any world size)
    reporting.py    run directory, metrics.jsonl, sample grids, evaluation
    config.py       RunConfig (model / data / loss / train / eval sections), --set key=value overrides
    presets.py      named RunConfigs (toys, digits, mnist, ImageNet)
    checkpoint.py   atomic checkpoints (one file, or DCP directories when distributed), weight export
    ema.py          exponential moving averages of the weights
    cuda_graphs.py  CUDAGraphModel: the training call replayed from CUDA graphs
    parallel.py     DDP / FSDP2 wrapping, the sharded EMA, distributed checkpoint state
"""
from .config import RunConfig, TrainConfig, apply_overrides
from .cuda_graphs import CUDAGraphModel, graphed_ddp
from .presets import PRESETS, get_preset
from .trainer import NonFiniteLossError, Trainer

__all__ = ["RunConfig", "TrainConfig", "apply_overrides", "CUDAGraphModel", "graphed_ddp", "PRESETS", "get_preset",
           "NonFiniteLossError", "Trainer"]
