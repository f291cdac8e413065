"""What a Trainer shows and writes besides checkpoints: the run directory, metrics.jsonl, sample grids, evaluation."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..runtime import distributed
from . import parallel
from .ema import decay_key


class TrainerReporting:
    """Mixin of Trainer: the run directory, metric lines, EMA models for sampling, sample grids and evaluation."""

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
        extra = [k for k in sums if k not in ("loss", "v_loss", "raw_loss", "grad_norm", "lr")]  # objective's own
        row = {"step": self.step, **{k: sums[k] / n for k in ("loss", "v_loss", "raw_loss", "grad_norm", *extra)},
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
        from ..evaluation.samplers import sampler_for

        sample = sampler_for(self.config.loss)
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
        from ..evaluation.samplers import sampler_for

        return evaluate_model(model or self.ema.default, self.config.data, self.config.eval, self.device,
                              autocast=self._autocast, progress=self.config.train.progress,
                              sampler=sampler_for(self.config.loss))

    def _stage(self, what: str) -> None:
        """One line when a stage after the progress bar starts (with train.progress, on the main process)."""
        if self.config.train.progress and self.is_main:
            print(f"{self.config.preset or 'run'}: {what} ...", flush=True)


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as past any checkpoint (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
