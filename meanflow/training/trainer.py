"""The MeanFlow trainer: AdamW + EMA(s) + checkpoints + metrics + sample grids + final evaluation.

    from meanflow import Trainer, get_preset
    summary = Trainer(get_preset("mnist"), "runs/mnist").train()

Layout (meanflow.training.parallel and meanflow.runtime.distributed hold the torch.distributed side):
- model wrapping ........ `_graph_model` (CUDAGraphModel with train.cuda_graphs), then `_wrap_model` (DDP(...) or
                          fully_shard(...) under torchrun with train.parallel=ddp|fsdp)
- data loading .......... `_build_batches` (BatchIterator; its rank / world_size split is the distributed sampler)
- the optimizer step .... `train_step` (micro-batches, gradient accumulation) and `_optimizer_step` (clip, AdamW, EMA)
- checkpoint IO ......... `save` / `load` in state.py (TrainerState; file formats in checkpoint.py: one file in one
                          process, DCP directories when distributed)
- reporting ............. run directory, metrics.jsonl, sample grids, evaluation in reporting.py (TrainerReporting);
                          on the main process only (`self.is_main`); logged losses are means over all ranks.

Determinism: every random draw of the objective (noise, t, r, label dropout, ...) comes from one generator owned by the
trainer, the data order from the BatchIterator's seed, and both positions are checkpointed, so on CPU a resumed run
reproduces the uninterrupted run's losses bit for bit (same thread count). Objectives whose loss follows the training
step (alpha-Flow's alpha schedule, sCM's tangent warm-up) get `step=` from the trainer: the checkpointed step count, so
a resumed run continues their schedules exactly.

The objective is `loss.objective` (meanflow.objectives.build_objective); the network is built with what it needs (its
NetworkSpec: iMF's v head and conditions, sCM's logvar head) and checked against it before training starts.

Distributed runs draw the objective's random draws (`objective.draw`: noise, times, label dropout, omega, ...) for the
WHOLE global batch on every rank (the generator has the same seed and state everywhere) and each rank keeps the rows of
its own data: every row gets the same
numbers whatever the world size or the gradient accumulation, so a run on W processes with A micro-batches computes the
same step as one process on the full batch (up to float summation order; tested), and the generator's state is one
global state, which is why a checkpoint resumes exactly at another world size too.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..data.datasets import BatchIterator, Dataset, dataset_from_config
from ..models.registry import build_model
from ..objectives.registry import build_objective, network_spec
from ..runtime import distributed
from ..runtime.host import resolve_device
from ..runtime.seeding import seed_everything
from . import checkpoint as ckpt
from . import parallel
from .compile import check_compile_options, compile_blocks, compile_model
from .config import RunConfig, TrainConfig
from .cuda_graphs import CUDAGraphModel
from .ema import EMA
from .reporting import TrainerReporting
from .interrupts import StopSignals, TrainingInterrupted
from .presets import check_start
from .state import TrainerState
from .validation import check_config

__all__ = ["NonFiniteLossError", "Trainer"]


# parameters of the objective-specific parts (meanflow.models.heads) that a source network of another objective lacks
_HEAD_PREFIXES = ("logvar.", "v_blocks.", "v_final.", "v_layers.", "v_out.", "cond_embedder.")


def checkpoint_clock() -> float:
    """Seconds, for train.ckpt_minutes: read once a step (a seam of its own, so a test can run the clock)."""
    return time.monotonic()


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN / inf; training stopped without writing a checkpoint."""


class Trainer(TrainerState, TrainerReporting):
    """Trains a model with the objective of config.loss from a RunConfig into a run directory.

    `resume`: a checkpoint file or run directory to continue from exactly (same batches, same noise).
    `loss_fn`: override the objective (tests); default build_objective(config.loss) (MeanFlowLoss for MeanFlow).
    """

    def __init__(self, config: RunConfig, out_dir: str | os.PathLike, *, resume: str | os.PathLike | None = None,
                 loss_fn=None):
        check_config(config)  # one line naming the key, before anything is built
        if resume is None:  # a preset that continues another run needs it (a resumed run has its weights already)
            check_start(config)
        self.config, self.out_dir = config, Path(out_dir)
        tc: TrainConfig = config.train
        if tc.batch_size % tc.grad_accum:
            raise ValueError(f"train.batch_size {tc.batch_size} must divide by train.grad_accum {tc.grad_accum}")
        if tc.parallel not in parallel.PARALLEL_MODES:
            raise ValueError(f"train.parallel must be one of {parallel.PARALLEL_MODES}; got {tc.parallel!r}")
        # torchrun: a process group (NCCL on cuda:LOCAL_RANK, gloo on CPU); plain python: rank 0 of 1
        self.dist = distributed.setup(tc.device)
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        if self.world_size > 1 and tc.batch_size % (self.world_size * tc.grad_accum):
            raise ValueError(f"train.batch_size {tc.batch_size} (the global batch) must divide by world size "
                             f"{self.world_size} x train.grad_accum {tc.grad_accum}")
        self.parallel = tc.parallel if self.world_size > 1 else "none"
        if tc.compile:
            check_compile_options(tc.compile_mode, tc.compile_backend, self.parallel)
        self.device = self.dist.device if self.world_size > 1 else resolve_device(tc.device)
        self.threads = torch.get_num_threads()  # set by the entry point (cli: set_threads(train.threads))
        seed_everything(tc.seed)  # the same seed on every rank: identical initial weights

        self.dataset: Dataset = dataset_from_config(config.data)
        self.net = self._build_plain_model()
        self.net.check_inputs = False  # inputs come from our own sampler; the range checks would sync every call
        # the objective, checked against the network before anything else is built (a clear error naming what is
        # missing, e.g. iMF's v head for a custom architecture)
        self.loss_fn = loss_fn or build_objective(config.loss, model=self.net, total_steps=tc.steps)
        if tc.init_from and resume is None:
            self._init_weights(tc.init_from)
        self.mesh = parallel.device_mesh(self.dist) if self.parallel == "fsdp" else None
        self.ema = self._build_ema(tc.ema_decays)
        # An objective that trains against a teacher (TVM: an EMA of the network, used by the loss) declares its
        # decay; the teacher is owned here like the evaluation EMA: a copy of the network now (after init_from),
        # updated after every optimizer step, checkpointed and sharded like the model, passed to the loss as teacher=.
        decay = getattr(self.loss_fn, "teacher_decay", None)
        self.teacher = self._build_ema((decay,)) if decay is not None else None
        # What the loss calls: net, or DDP / FSDP around it; with train.cuda_graphs a CUDA-graph replayer sits between
        # them (DDP(CUDAGraphModel(net))): DDP's all-reduce hooks fire on the gradients the replay hands to autograd.
        self.model = self._wrap_model(self._graph_model(self.net))
        # after wrapping: under FSDP the parameters are this rank's shards (DTensors)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                           weight_decay=tc.weight_decay)
        self.batches = self._build_batches()
        # One generator for every random draw of the objective: checkpointed, so resuming repeats the same draws.
        self.generator = torch.Generator(self.device).manual_seed(tc.seed + 1)

        self.step, self.elapsed = 0, 0.0
        self.last_checkpoint: Path | None = None
        if resume is not None:
            self.load(resume)
        self.grid_noise, self.grid_labels = self._grid_inputs()

    # ----------------------------------------------------------------------------------------- the seams
    def _wrap_model(self, net: nn.Module) -> nn.Module:
        """DDP(net) or FSDP2-sharded net under torchrun (train.parallel), net itself in one process. The loss calls
        `model(..., tangents=...)` through the wrapper, so DDP's gradient hooks / FSDP's all-gathers see the real
        forward, for every JVP backend. With train.compile: each block compiled before FSDP2 shards it, or the
        network's forward (then DDP around it)."""
        tc = self.config.train
        if tc.compile:  # in place, before the wrappers: they run eagerly around the compiled code
            options = {"mode": tc.compile_mode, "backend": tc.compile_backend}
            if self.parallel == "fsdp":
                compile_blocks(net, parallel.shard_units(net), **options)
            else:
                compile_model(net, **options)
        return parallel.wrap_model(net, self.parallel, self.dist, precision=self._precision(), mesh=self.mesh)

    def _build_ema(self, decays) -> EMA:
        """EMA copies of the network: under FSDP made from the full model, then sharded like it; else on the
        unwrapped module (identical on every rank under DDP)."""
        if self.parallel == "fsdp":
            return parallel.ShardedEMA(self.net, decays, self.mesh, factory=self._build_plain_model)
        return EMA(self.net, decays)

    @property
    def teacher_model(self) -> nn.Module | None:
        """The objective's teacher network (sharded under FSDP: every rank calls it), None without one."""
        return next(iter(self.teacher.models.values())) if self.teacher is not None else None

    def _graph_model(self, net: nn.Module) -> nn.Module:
        """CUDAGraphModel(net) with train.cuda_graphs (one process or DDP), else net."""
        if not self.config.train.cuda_graphs:
            return net
        if self.config.train.compile:
            raise ValueError("train.cuda_graphs and train.compile do not combine: for CUDA graphs of a compiled model "
                             "use train.compile_mode=reduce-overhead (Inductor's CUDA graphs) with cuda_graphs off")
        if self.parallel == "fsdp":
            raise ValueError("train.cuda_graphs does not work with train.parallel=fsdp: FSDP2 gathers and frees each "
                             "block's weights from Python hooks inside the forward and backward, which a graph replay "
                             "would skip. Use train.parallel=ddp with CUDA graphs, or turn train.cuda_graphs off")
        if self.device.type != "cuda":
            warnings.warn(f"train.cuda_graphs is on but the device is {self.device}: CUDA graphs need a GPU, the "
                          f"training call runs eagerly", RuntimeWarning, stacklevel=3)
        return CUDAGraphModel(net)  # passes non-CUDA and no-grad calls through to net

    def _build_plain_model(self) -> nn.Module:
        """A fresh, unwrapped network of this run's architecture (on this rank's device), with what the objective
        needs (its heads and conditions)."""
        return build_model(self.config.model, self.dataset.data_shape, self.dataset.num_classes, self.device,
                           spec=network_spec(self.config.loss)).to(self.device)

    def _init_weights(self, path: str) -> None:
        """train.init_from: start from another run's EMA weights (e.g. sCM from a flow-matching run of the same
        network). Every weight of the source must fit; weights the source lacks (an extra head such as sCM's logvar)
        keep their initialisation and are listed."""
        state, _, step = ckpt.load_weights(path, "ema")
        try:
            missing, unexpected = self.net.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shapes differ
            raise ckpt.CheckpointError(f"train.init_from={path} does not fit this network ({type(self.net).__name__})"
                                       f": {str(exc).splitlines()[-1].strip()}; is it the same architecture?") from exc
        if unexpected:
            raise ckpt.CheckpointError(f"train.init_from={path}: weights {sorted(unexpected)[:5]} do not exist in "
                                       f"this network ({type(self.net).__name__}); is it the same architecture?")
        body = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
        if body:
            raise ckpt.CheckpointError(f"train.init_from={path} lacks weights of this network's body: "
                                       f"{sorted(body)[:5]}; is it the same architecture?")
        if self.is_main:
            extra = f"; kept the initialisation of {sorted({k.split('.')[0] for k in missing})}" if missing else ""
            print(f"initialised the network from {path} (step {step}){extra}", flush=True)

    def _build_batches(self) -> BatchIterator:
        return BatchIterator(self.dataset, self.config.train.batch_size, self.config.train.seed,
                             rank=self.rank, world_size=self.world_size)

    def _precision(self) -> str:
        precision = self.config.train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be 'auto', 'fp32' or 'bf16'; got {precision!r}")
        return precision

    def _autocast(self):
        """bf16 autocast (DDP and one process: fp32 weights; FSDP: bf16 compute copies from its MixedPrecisionPolicy,
        with autocast still deciding which ops run in bf16) or nothing for fp32."""
        if self._precision() == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def lr_at(self, step: int) -> float:
        """Linear warmup over train.warmup_steps, then constant (the official schedule has no decay)."""
        tc = self.config.train
        if tc.warmup_steps > 0:
            return tc.lr * min(1.0, (step + 1) / tc.warmup_steps)
        return tc.lr

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One optimizer step over train.batch_size samples (the global batch: this rank's rows of it) in
        train.grad_accum micro-batches; returns float stats (means over all ranks)."""
        tc = self.config.train
        n = tc.grad_accum
        self.net.train()
        x, y = next(self.batches)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if y is not None else None
        draws = self._objective_draws(x)
        xs, ys = x.chunk(n), (y.chunk(n) if y is not None else [None] * n)
        keys = tuple(getattr(self.loss_fn, "log_keys", ("loss", "v_loss", "raw_loss")))
        totals = dict.fromkeys(keys, 0.0)
        local = torch.zeros(len(keys), device=self.device)
        for i in range(n):
            kwargs = {k: v[i] for k, v in draws.items()} if draws else {"generator": self.generator}
            if getattr(self.loss_fn, "uses_step", False):
                kwargs["step"] = self.step  # alpha-Flow's schedule, sCM's warm-up: restored with the step on resume
            if self.teacher is not None:
                kwargs["teacher"] = self.teacher_model
            # all but the last micro-batch skip the gradient all-reduce (DDP no_sync / FSDP requires_gradient_sync)
            with parallel.gradient_sync(self.model, i == n - 1):
                with self._autocast():
                    loss, stats = self.loss_fn(self.model, xs[i], ys[i], **kwargs)
                if self.world_size == 1:
                    value = loss.item()  # one host sync per micro-batch: stop on NaN before it reaches the weights
                    if not math.isfinite(value):
                        rows = stats.get("nonfinite_rows")  # objectives that count them (TVM)
                        where = f" in {int(rows)} of {xs[i].shape[0]} rows" if rows is not None else ""
                        self._stop_non_finite(f"non-finite loss ({value}{where})")
                # the mean over micro-batches (and, by the all-reduce's average, over ranks) equals the full-batch
                # mean: each micro-loss is itself a mean over its rows, and every rank has as many rows
                (loss / n).backward()
            if self.world_size == 1:
                for k in keys:
                    totals[k] += float(stats[k]) / n
            else:
                local += torch.stack([torch.as_tensor(stats[k], device=self.device).detach().float()
                                      for k in keys]) / n
        if self.world_size > 1:
            # one all-reduce for the logged means; a NaN on any rank reaches every rank, so all stop together
            # (before the optimizer step: the weights stay clean)
            totals = dict(zip(keys, distributed.all_reduce_mean(local).tolist()))
            if not all(math.isfinite(v) for v in totals.values()):
                self._stop_non_finite(f"non-finite loss ({totals['loss']}) on at least one rank")
        totals["grad_norm"] = self._optimizer_step()
        totals["lr"] = self.lr_at(self.step)
        self.step += 1
        return totals

    def _objective_draws(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]] | None:
        """The objective's random draws for the WHOLE global batch, this rank's rows of them, per micro-batch.

        `objective.draw` makes them in the order the objective draws them itself, from the generator that has the
        same state on every rank; rank r keeps rows r::W, as the BatchIterator does with the data, then the
        micro-batch chunks. So the numbers of each row do not depend on the world size or on grad_accum. One process
        with one micro-batch lets the loss draw them itself (the same numbers, without the loss's checks of given
        draws, which cost host syncs).
        """
        tc = self.config.train
        if self.world_size == 1 and tc.grad_accum == 1:
            return None
        if not hasattr(self.loss_fn, "draw"):
            if self.world_size > 1:
                raise ValueError("distributed training needs an objective with draw() (meanflow.objectives.Objective): "
                                 "its random draws are made for the global batch and split over the ranks")
            return None  # a custom objective draws per micro-batch itself
        batch = tc.batch_size
        like = x.new_empty((batch,) + tuple(x.shape[1:]))
        out = self.loss_fn.draw(batch, like, conditional=self.net.num_classes > 0, generator=self.generator)
        rows = slice(self.rank, None, self.world_size)
        return {k: v[rows].chunk(tc.grad_accum) for k, v in out.items()}

    def _optimizer_step(self) -> float:
        """Gradient norm (and clipping), AdamW, zero grads, EMA update. Returns the pre-clip gradient norm."""
        tc = self.config.train
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        params = [p for p in self.net.parameters() if p.grad is not None]
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        if self.parallel == "fsdp":  # the norm over all shards of the sharded gradients
            grad_norm = parallel.grad_norm_and_clip(params, max_norm)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            self._stop_non_finite(f"non-finite gradient norm ({grad_norm})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.net)
        if self.teacher is not None:
            self.teacher.update(self.net)
        return grad_norm

    def _agree(self, signum: int, time_due: bool) -> tuple[int, bool]:
        """(a stop signal, a time-based checkpoint due) as every rank sees them: a signal or a clock on any rank
        decides for all, since a checkpoint is a collective. One process: as given, no sync."""
        if self.world_size == 1:
            return signum, time_due
        flags = distributed.all_reduce_max(torch.tensor([float(signum), float(time_due)], device=self.device))
        return int(flags[0]), bool(flags[1])

    def _stop_non_finite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        kept = f"the last good checkpoint {self.last_checkpoint} is untouched" if self.last_checkpoint \
            else "no checkpoint was written"
        raise NonFiniteLossError(f"{what} at step {self.step + 1}: training stopped without saving; {kept}. "
                                 f"Lower train.lr, set train.grad_clip, or check the data.")

    # --------------------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Train to train.steps, writing metrics, grids and checkpoints; then final grids, loss curve, evaluation.

        Returns a summary: run_dir, checkpoint, grids, loss_curve, metrics (evaluation), samples_per_s, wall_s.
        """
        from tqdm.auto import tqdm

        tc = self.config.train
        self._prepare_run_dir()
        start_step, t_start = self.step, time.perf_counter()
        window = {"n": 0, "t": time.perf_counter(), "sums": {}}
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (tc.progress and self.is_main), dynamic_ncols=True,
                   desc=self.config.preset or "train")
        last_save = checkpoint_clock()
        try:
            with StopSignals() as stop:
                while self.step < tc.steps:
                    stats = self.train_step()
                    bar.update(1)
                    self._accumulate(window, stats)
                    if self.step % tc.log_every == 0 or self.step == tc.steps:
                        row = self._log(window, t_start)
                        # raw_loss and v_loss show learning; the weighted loss sits near 1 by construction (adaptive
                        # weighting) and stays in metrics.jsonl only
                        bar.set_postfix_str(f"raw_loss={row['raw_loss']:.4g}, v_loss={row['v_loss']:.4g}, "
                                            f"{row['samples_per_s']:.0f} samples/s")
                    if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                        ema = self.ema_model()  # under FSDP a collective (the EMA is gathered to rank 0)
                        if self.is_main:
                            self.sample_grids(self.out_dir / "samples", f"step_{self.step:07d}_", model=ema)
                    now = checkpoint_clock()
                    signum, time_due = self._agree(stop.requested or 0,
                                                   tc.ckpt_minutes > 0 and now - last_save >= 60.0 * tc.ckpt_minutes)
                    every = tc.ckpt_every and self.step % tc.ckpt_every == 0
                    if signum or ((every or time_due) and self.step < tc.steps):
                        self.save(time.perf_counter() - t_start)
                        last_save = now
                    if signum:
                        raise TrainingInterrupted(signum, self.step, self.last_checkpoint)
        finally:
            bar.close()
        wall = time.perf_counter() - t_start
        steps_run = self.step - start_step
        if self.last_checkpoint is None or ckpt.checkpoint_step(self.last_checkpoint) != self.step:
            self.save(wall)
        summary = {"run_dir": str(self.out_dir), "checkpoint": str(self.last_checkpoint), "step": self.step,
                   "wall_s": round(wall, 2), "threads": self.threads, "device": str(self.device),
                   "world_size": self.world_size, "parallel": self.parallel,
                   "samples_per_s": round(steps_run * tc.batch_size / wall, 2) if wall > 0 and steps_run else None}
        ema = self.ema_model()
        if self.is_main:  # the other ranks are done (evaluation below runs on rank 0 alone)
            self._stage("final sample grids, loss curve, weights")
            summary["grids"] = [str(p) for p in self.sample_grids(self.out_dir, "final_", model=ema)]
            from ..evaluation.plotting import save_loss_curve

            summary["loss_curve"] = str(save_loss_curve(self.metrics_path, self.out_dir / "loss_curve.png"))
            ckpt.export_weights(self.out_dir / "ema.safetensors", ema.state_dict(), self.config.to_dict(), self.step)
            summary["weights"] = str(self.out_dir / "ema.safetensors")
            if self.config.eval.enabled:
                self._stage("evaluation")
                t_eval = time.perf_counter()
                summary["metrics"] = self.evaluate(ema)
                summary["eval_s"] = round(time.perf_counter() - t_eval, 2)
                (self.out_dir / "eval.json").write_text(json.dumps(summary["metrics"], indent=2) + "\n")
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

