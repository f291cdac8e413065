"""The MeanFlow trainer: AdamW + EMA(s) + checkpoints + metrics + sample grids + final evaluation.

    from meanflow import Trainer, get_preset
    summary = Trainer(get_preset("mnist"), "runs/mnist").train()

Layout (meanflow.training.parallel and meanflow.runtime.distributed hold the torch.distributed side):
- model wrapping ........ `_graph_model` (CUDAGraphModel with train.cuda_graphs), then `_wrap_model` (DDP(...) or
                          fully_shard(...) under torchrun with train.parallel=ddp|fsdp)
- data loading .......... `_build_batches` (BatchIterator; its rank / world_size split is the distributed sampler)
- the optimizer step .... `train_step` (micro-batches, gradient accumulation) and `_optimizer_step` (clip, AdamW, EMA)
- checkpoint IO ......... `save` / `load` (meanflow.training.checkpoint: one file in one process, DCP directories when
                          distributed)
Logging, grids and evaluation run on the main process only (`self.is_main`); logged losses are means over all ranks.

Determinism: every random draw of the objective (noise, t, r, label dropout) comes from one generator owned by the
trainer, the data order from the BatchIterator's seed, and both positions are checkpointed, so on CPU a resumed run
reproduces the uninterrupted run's losses bit for bit (same thread count).

Distributed runs draw the objective's noise, times and label dropout for the WHOLE global batch on every rank (the
generator has the same seed and state everywhere) and each rank keeps the rows of its own data: every row gets the same
numbers whatever the world size or the gradient accumulation, so a run on W processes with A micro-batches computes the
same step as one process on the full batch (up to float summation order; tested), and the generator's state is one
global state, which is why a checkpoint resumes exactly at another world size too.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.datasets import BatchIterator, Dataset, dataset_from_config
from ..models.registry import build_model
from ..objectives.meanflow import MeanFlowLoss
from ..runtime import distributed
from ..runtime.host import resolve_device
from ..runtime.seeding import seed_everything
from . import checkpoint as ckpt
from . import parallel
from .config import RunConfig, TrainConfig
from .cuda_graphs import CUDAGraphModel
from .ema import EMA, decay_key

__all__ = ["NonFiniteLossError", "Trainer"]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN / inf; training stopped without writing a checkpoint."""


# ------------------------------------------------------------------------------------------------------ helpers
def _numpy_state_to_plain(state) -> tuple:
    # numpy's MT19937 state holds an ndarray; checkpoints keep plain types so torch.load(weights_only=True) reads them
    return (state[0], torch.from_numpy(state[1].astype(np.int64)), int(state[2]), int(state[3]), float(state[4]))


def _numpy_state_from_plain(state) -> tuple:
    return (state[0], state[1].numpy().astype(np.uint32), state[2], state[3], state[4])


# ------------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Trains a MeanFlow model from a RunConfig into a run directory.

    `resume`: a checkpoint file or run directory to continue from exactly (same batches, same noise).
    `loss_fn`: override the objective (tests); default MeanFlowLoss(config.loss).
    """

    def __init__(self, config: RunConfig, out_dir: str | os.PathLike, *, resume: str | os.PathLike | None = None,
                 loss_fn=None):
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
        self.device = self.dist.device if self.world_size > 1 else resolve_device(tc.device)
        self.threads = torch.get_num_threads()  # set by the entry point (cli: set_threads(train.threads))
        seed_everything(tc.seed)  # the same seed on every rank: identical initial weights

        self.dataset: Dataset = dataset_from_config(config.data)
        self.net = build_model(config.model, self.dataset.data_shape, self.dataset.num_classes, self.device)
        self.net.to(self.device)
        self.net.check_inputs = False  # inputs come from our own sampler; the range checks would sync every call
        self.mesh = parallel.device_mesh(self.dist) if self.parallel == "fsdp" else None
        if self.parallel == "fsdp":  # EMA copies made from the full model, then sharded like it
            self.ema = parallel.ShardedEMA(self.net, tc.ema_decays, self.mesh, factory=self._build_plain_model)
        else:
            self.ema = EMA(self.net, tc.ema_decays)  # DDP: on the unwrapped module (identical on every rank)
        # What the loss calls: net, or DDP / FSDP around it; with train.cuda_graphs a CUDA-graph replayer sits between
        # them (DDP(CUDAGraphModel(net))): DDP's all-reduce hooks fire on the gradients the replay hands to autograd.
        self.model = self._wrap_model(self._graph_model(self.net))
        # after wrapping: under FSDP the parameters are this rank's shards (DTensors)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                           weight_decay=tc.weight_decay)
        self.loss_fn = loss_fn or MeanFlowLoss(config.loss)
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
        forward, for every JVP backend."""
        return parallel.wrap_model(net, self.parallel, self.dist, precision=self._precision(), mesh=self.mesh)

    def _graph_model(self, net: nn.Module) -> nn.Module:
        """CUDAGraphModel(net) with train.cuda_graphs (one process or DDP), else net."""
        if not self.config.train.cuda_graphs:
            return net
        if self.parallel == "fsdp":
            raise ValueError("train.cuda_graphs does not work with train.parallel=fsdp: FSDP2 gathers and frees each "
                             "block's weights from Python hooks inside the forward and backward, which a graph replay "
                             "would skip. Use train.parallel=ddp with CUDA graphs, or turn train.cuda_graphs off")
        if self.device.type != "cuda":
            warnings.warn(f"train.cuda_graphs is on but the device is {self.device}: CUDA graphs need a GPU, the "
                          f"training call runs eagerly", RuntimeWarning, stacklevel=3)
        return CUDAGraphModel(net)  # passes non-CUDA and no-grad calls through to net

    def _build_plain_model(self) -> nn.Module:
        """A fresh, unwrapped network of this run's architecture (on this rank's device)."""
        return build_model(self.config.model, self.dataset.data_shape, self.dataset.num_classes,
                           self.device).to(self.device)

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
        keys = ("loss", "v_loss", "raw_loss")
        totals = dict.fromkeys(keys, 0.0)
        local = torch.zeros(len(keys), device=self.device)
        for i in range(n):
            kwargs = {k: v[i] for k, v in draws.items()} if draws else {"generator": self.generator}
            # all but the last micro-batch skip the gradient all-reduce (DDP no_sync / FSDP requires_gradient_sync)
            with parallel.gradient_sync(self.model, i == n - 1):
                with self._autocast():
                    loss, stats = self.loss_fn(self.model, xs[i], ys[i], **kwargs)
                if self.world_size == 1:
                    value = loss.item()  # one host sync per micro-batch: stop on NaN before it reaches the weights
                    if not math.isfinite(value):
                        self._stop_non_finite(f"non-finite loss ({value})")
                # the mean over micro-batches (and, by the all-reduce's average, over ranks) equals the full-batch
                # mean: each micro-loss is itself a mean over its rows, and every rank has as many rows
                (loss / n).backward()
            if self.world_size == 1:
                for k in keys:
                    totals[k] += float(stats[k]) / n
            else:
                local += torch.stack([stats[k].detach().float() for k in keys]) / n
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

        Drawn in the order MeanFlowLoss draws them itself (noise, label dropout, (t, r)), from the generator that has
        the same state on every rank; rank r keeps rows r::W, as the BatchIterator does with the data, then the
        micro-batch chunks. So the numbers of each row do not depend on the world size or on grad_accum. One process
        with one micro-batch lets the loss draw them itself (the same numbers, without the loss's checks of given
        times, which cost host syncs).
        """
        tc = self.config.train
        if self.world_size == 1 and tc.grad_accum == 1:
            return None
        if not isinstance(self.loss_fn, MeanFlowLoss):
            if self.world_size > 1:
                raise ValueError("distributed training needs the MeanFlowLoss objective (its random draws are made "
                                 "for the global batch and split over the ranks)")
            return None  # a custom objective draws per micro-batch itself
        c, g, batch = self.loss_fn.config, self.generator, tc.batch_size
        noise = torch.randn((batch,) + tuple(x.shape[1:]), device=x.device, dtype=x.dtype, generator=g)
        out = {"noise": noise}
        if self.net.num_classes > 0:
            out["drop"] = torch.rand(batch, device=x.device, generator=g) < c.label_dropout
        out["t"], out["r"] = self.loss_fn.sample_times(batch, x.device, g)
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
        return grad_norm

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
        try:
            while self.step < tc.steps:
                stats = self.train_step()
                bar.update(1)
                self._accumulate(window, stats)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    row = self._log(window, t_start)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", v_loss=f"{row['v_loss']:.4g}",
                                    samples_s=f"{row['samples_per_s']:.0f}")
                if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                    ema = self.ema_model()  # under FSDP a collective (the EMA is gathered to rank 0)
                    if self.is_main:
                        self.sample_grids(self.out_dir / "samples", f"step_{self.step:07d}_", model=ema)
                if tc.ckpt_every and self.step % tc.ckpt_every == 0 and self.step < tc.steps:
                    self.save(time.perf_counter() - t_start)
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
            summary["grids"] = [str(p) for p in self.sample_grids(self.out_dir, "final_", model=ema)]
            from ..evaluation.plotting import save_loss_curve

            summary["loss_curve"] = str(save_loss_curve(self.metrics_path, self.out_dir / "loss_curve.png"))
            ckpt.export_weights(self.out_dir / "ema.safetensors", ema.state_dict(), self.config.to_dict(), self.step)
            summary["weights"] = str(self.out_dir / "ema.safetensors")
            if self.config.eval.enabled:
                summary["metrics"] = self.evaluate(ema)
                (self.out_dir / "eval.json").write_text(json.dumps(summary["metrics"], indent=2) + "\n")
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def _prepare_run_dir(self) -> None:
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(self.config.to_json() + "\n")
            # On resume, drop metric lines past the checkpoint: the interrupted run logged steps that will be redone.
            if self.metrics_path.exists():
                keep = [line for line in self.metrics_path.read_text().splitlines()
                        if _logged_step(line) <= self.step]
                self.metrics_path.write_text("".join(line + "\n" for line in keep))
            if self.config.data.name == "latents":
                self._check_latent_scale()
        distributed.barrier()

    def _check_latent_scale(self) -> None:
        """Warn when the shards' manifest (meanflow prepare-latents) names another VAE scale than data.latent_scale."""
        from ..data.latents import manifest_scale_factor

        found = manifest_scale_factor(self.config.data.path)
        if found is not None and abs(found - self.config.data.latent_scale) > 1e-9:
            print(f"warning: the latents' manifest says the VAE's scaling factor is {found}, but data.latent_scale "
                  f"is {self.config.data.latent_scale} (set --set data.latent_scale={found} unless intended)",
                  flush=True)

    @staticmethod
    def _accumulate(window: dict, stats: dict) -> None:
        window["n"] += 1
        for k, v in stats.items():
            window["sums"][k] = window["sums"].get(k, 0.0) + v

    def _log(self, window: dict, t_start: float) -> dict:
        """Append one metrics line: means over the steps since the last line."""
        now = time.perf_counter()
        n, sums = window["n"], window["sums"]
        row = {"step": self.step, **{k: sums[k] / n for k in ("loss", "v_loss", "raw_loss", "grad_norm")},
               "lr": sums["lr"] / n,
               "samples_per_s": n * self.config.train.batch_size / max(now - window["t"], 1e-9),
               "elapsed": self.elapsed + now - t_start}
        window.update(n=0, t=now, sums={})
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    # --------------------------------------------------------------------------------- grids and eval
    def _grid_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fixed noise and labels, so grids at different steps (and of resumed runs) are comparable."""
        n, k = self.config.train.grid_size, self.dataset.num_classes
        if not n:
            n = 2000 if self.dataset.kind == "points" else (10 * k if 0 < k <= 10 else 64)
        noise = torch.randn((n,) + tuple(self.dataset.data_shape), generator=torch.Generator().manual_seed(12345))
        labels = None
        if k > 0:
            labels = (torch.arange(n) // max(1, n // k)).clamp(max=k - 1) if k <= 10 else \
                torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(54321))
        return noise, labels

    def ema_model(self, decay: float | None = None) -> nn.Module | None:
        """The full EMA network for sampling / evaluation / export (the first decay by default). Under FSDP this
        gathers the sharded EMA: every rank must call it, and only rank 0 gets the module (the others get None)."""
        if isinstance(self.ema, parallel.ShardedEMA):
            return self.ema.gather(decay, device=self.device)
        return self.ema.models[decay_key(decay)] if decay is not None else self.ema.default

    def _vae(self):
        """The VAE that decodes latent samples for grids (data.vae), loaded once; None without one."""
        if self.dataset.kind != "latent" or not self.config.data.vae:
            return None
        if getattr(self, "_vae_model", None) is None:
            from ..data.latents import load_vae

            self._vae_model = load_vae(self.config.data.vae, self.device)
        return self._vae_model

    @torch.no_grad()
    def sample_grids(self, directory: Path, prefix: str, model: nn.Module | None = None) -> list[Path]:
        """1-step and 2-step samples of the EMA model (by default) as PNGs: image grids, or scatter plots for toys;
        latents are decoded to images when data.vae names a VAE."""
        from ..evaluation.plotting import save_samples
        from ..evaluation.sampling import sample

        model = model or self.ema.default
        directory.mkdir(parents=True, exist_ok=True)
        noise = self.grid_noise.to(self.device)
        labels = self.grid_labels.to(self.device) if self.grid_labels is not None else None
        vae, kind = self._vae(), self.dataset.kind
        paths = []
        for steps in (1, 2):
            with self._autocast():
                x = sample(model, noise, labels, steps=steps).float()
            if vae is not None:
                from ..data.latents import decode_latents

                x, kind = decode_latents(vae, x, self.config.data.latent_scale), "image"
            x = x.cpu()
            path = directory / f"{prefix}{steps}step.png"
            save_samples(x, path, kind=kind, title=f"step {self.step}: {steps}-step samples",
                         nrow=10 if labels is not None and self.dataset.num_classes <= 10 else None,
                         reference=self._reference_points() if self.dataset.kind == "points" else None)
            paths.append(path)
        return paths

    def _reference_points(self) -> torch.Tensor:
        return self.dataset.sample(len(self.grid_noise), torch.Generator().manual_seed(777))[0]

    def evaluate(self, model: nn.Module | None = None) -> dict:
        from ..evaluation.evaluate import evaluate_model

        return evaluate_model(model or self.ema.default, self.config.data, self.config.eval, self.device,
                              autocast=self._autocast)

    # ------------------------------------------------------------------------------------ checkpoint IO
    def state_dict(self) -> dict:
        """The whole training state of a one-process run (distributed runs save through DCP, see `save`)."""
        return {
            "config": self.config.to_dict(),
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data": self.batches.state_dict(),
            "elapsed": self.elapsed,
            "rng": {"generator": self.generator.get_state(), **_process_rng_state()},
        }

    def save(self, wall: float = 0.0) -> Path:
        """Checkpoint the current step (atomic; keeps the newest train.keep_ckpts). One process: one file, written
        here; distributed: a DCP directory, a collective every rank enters."""
        if self.world_size > 1:
            self.last_checkpoint = self._save_distributed(self.elapsed + wall)
            return self.last_checkpoint
        state = self.state_dict()
        state["elapsed"] = self.elapsed + wall
        if self.is_main:
            self.last_checkpoint = ckpt.save_checkpoint(self.out_dir, self.step, state, self.config.train.keep_ckpts)
        return self.last_checkpoint

    def _dcp_tensors(self) -> tuple[dict, dict, dict]:
        """This rank's (model, optimizer, EMA) state dicts for DCP: sharded under FSDP, keyed by parameter names."""
        model_state, optim_state = parallel.get_train_state(self.net, self.optimizer)
        ema_state = {str(i): parallel.get_module_state(m) for i, m in enumerate(self.ema.models.values())}
        return model_state, optim_state, ema_state

    def _save_distributed(self, elapsed: float) -> Path:
        model_state, optim_state, ema_state = self._dcp_tensors()
        meta = {"config": self.config.to_dict(), "data": self.batches.state_dict(), "elapsed": elapsed,
                "generator": self.generator.get_state(), "world_size": self.world_size, "parallel": self.parallel,
                "ema_decays": list(self.ema.models)}
        return ckpt.save_dcp_checkpoint(self.out_dir, self.step, {"model": model_state, "optim": optim_state,
                                                                  "ema": ema_state},
                                        meta, {"rank": self.rank, "world_size": self.world_size,
                                               "rng": _process_rng_state()}, self.config.train.keep_ckpts)

    def load(self, path: str | os.PathLike) -> None:
        """Resume from a checkpoint of either format, at any world size (see meanflow.training.checkpoint)."""
        where = ckpt.resolve_checkpoint(path)
        if ckpt.is_dcp_checkpoint(where):
            self._load_distributed(where)
            return
        state = ckpt.load_checkpoint(where, map_location=self.device)
        try:
            if self.world_size == 1:
                self.net.load_state_dict(state["model"])
                self.ema.load_state_dict(state["ema"])
                self.optimizer.load_state_dict(state["optimizer"])
            else:  # a one-process checkpoint continued by several: full state dicts, each rank keeps its part
                names = [n for n, _ in self.net.named_parameters()]
                parallel.set_train_state(self.net, self.optimizer, state["model"],
                                            parallel.optimizer_state_by_name(state["optimizer"], names), full=True)
                self._set_ema_states([state["ema"][k] for k in self.ema.models], full=True,
                                     saved=list(state["ema"]))
            self.batches.load_state_dict(state["data"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {where} does not fit this run's config: {exc}") from exc
        rng = state["rng"]
        self.generator.set_state(rng["generator"].cpu() if hasattr(rng["generator"], "cpu") else rng["generator"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        if self.world_size == 1:
            _set_process_rng_state(rng)
        else:
            self._reseed_process_rngs()
        self.last_checkpoint = Path(where)

    def _set_ema_states(self, states: list[dict], *, full: bool, saved: list[str]) -> None:
        if saved != list(self.ema.models):
            raise ValueError(f"the checkpoint has EMA decays {saved}; this run has {list(self.ema.models)}")
        for m, s in zip(self.ema.models.values(), states):
            parallel.set_module_state(m, s, full=full)

    def _load_distributed(self, where: Path) -> None:
        meta = ckpt.read_dcp_meta(where)
        try:
            if list(meta["ema_decays"]) != list(self.ema.models):
                raise ValueError(f"the checkpoint has EMA decays {list(meta['ema_decays'])}; this run has "
                                 f"{list(self.ema.models)}")
            self.batches.load_state_dict(meta["data"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {where} does not fit this run's config: {exc}") from exc
        model_state, optim_state, ema_state = self._dcp_tensors()
        rank_state = ckpt.load_dcp(where, {"model": model_state, "optim": optim_state, "ema": ema_state})
        parallel.set_train_state(self.net, self.optimizer, model_state, optim_state)
        self._set_ema_states([ema_state[str(i)] for i in range(len(ema_state))], full=False,
                             saved=list(meta["ema_decays"]))
        self.generator.set_state(meta["generator"])  # one global state: the same draws at any world size
        self.step, self.elapsed = int(meta["step"]), float(meta["elapsed"])
        if rank_state is not None and int(meta["world_size"]) == self.world_size:
            _set_process_rng_state(rank_state["rng"])
        else:
            self._reseed_process_rngs()
        self.last_checkpoint = where

    def _reseed_process_rngs(self) -> None:
        """After a world-size change the saved per-rank RNG states do not map onto the new ranks: reseed this rank's
        process RNGs (torch, CUDA, numpy, python) from (seed, step, rank). The objective's draws are unaffected:
        they come from the trainer's generator, whose state is global and restored exactly."""
        seed = distributed.rank_seed(self.config.train.seed, self.step, self.rank)
        seed_everything(seed)


def _process_rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate()}


def _set_process_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    np.random.set_state(_numpy_state_from_plain(rng["numpy"]))
    random.setstate(_to_tuples(rng["python"]))


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as past any checkpoint (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _to_tuples(x):
    """python's random state must be tuples all the way down (a checkpoint round trip may give lists)."""
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x

