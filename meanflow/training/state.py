"""The training state of a Trainer: what a checkpoint holds, how it is written and how a run resumes from it.

One process: one atomic `torch.save` file per checkpoint (model, EMA, the objective's teacher if it has one,
optimizer, data position, the objective's generator, every process RNG); several processes: a DCP directory that resumes at any world size
(meanflow.training.checkpoint has the file formats). A resumed run reproduces the uninterrupted run's draws exactly.
"""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from ..runtime import distributed
from ..runtime.seeding import seed_everything
from . import checkpoint as ckpt
from . import parallel


class TrainerState:
    """Mixin of Trainer: state_dict / save / load (both checkpoint formats) and the process RNGs."""

    def state_dict(self) -> dict:
        """The whole training state of a one-process run (distributed runs save through DCP, see `save`)."""
        return {
            "config": self.config.to_dict(),
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            **({"teacher": self.teacher.state_dict()} if self.teacher is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "data": self.batches.state_dict(),
            "elapsed": self.elapsed,
            "threads": self.threads,  # CPU results are bit-exact only at the same count: --resume reuses it
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

    def _dcp_tensors(self) -> dict[str, dict]:
        """This rank's model, optimizer, EMA (and teacher) state dicts for DCP: sharded under FSDP, keyed by parameter
        names."""
        model_state, optim_state = parallel.get_train_state(self.net, self.optimizer)
        tensors = {"model": model_state, "optim": optim_state,
                   "ema": {str(i): parallel.get_module_state(m) for i, m in enumerate(self.ema.models.values())}}
        if self.teacher is not None:
            tensors["teacher"] = parallel.get_module_state(self.teacher_model)
        return tensors

    def _save_distributed(self, elapsed: float) -> Path:
        meta = {"config": self.config.to_dict(), "data": self.batches.state_dict(), "elapsed": elapsed,
                "generator": self.generator.get_state(), "world_size": self.world_size, "parallel": self.parallel,
                "ema_decays": list(self.ema.models), "threads": self.threads}
        return ckpt.save_dcp_checkpoint(self.out_dir, self.step, self._dcp_tensors(),
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
                if self.teacher is not None:
                    self.teacher.load_state_dict(self._saved_teacher(state))
                self.optimizer.load_state_dict(state["optimizer"])
            else:  # a one-process checkpoint continued by several: full state dicts, each rank keeps its part
                names = [n for n, _ in self.net.named_parameters()]
                parallel.set_train_state(self.net, self.optimizer, state["model"],
                                            parallel.optimizer_state_by_name(state["optimizer"], names), full=True)
                self._set_ema_states([state["ema"][k] for k in self.ema.models], full=True,
                                     saved=list(state["ema"]))
                if self.teacher is not None:
                    parallel.set_module_state(self.teacher_model, next(iter(self._saved_teacher(state).values())),
                                              full=True)
            self.batches.load_state_dict(state["data"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {where} does not fit this run's config: {exc}") from exc
        self._check_threads(state.get("threads"), where)
        rng = state["rng"]
        self.generator.set_state(rng["generator"].cpu() if hasattr(rng["generator"], "cpu") else rng["generator"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        if self.world_size == 1:
            _set_process_rng_state(rng)
        else:
            self._reseed_process_rngs()
        self.last_checkpoint = Path(where)

    def _check_threads(self, recorded: int | None, where) -> None:
        """Warn when a CPU run resumes at another thread count than it ran with: float sums split differently, so
        the losses drift from the uninterrupted run's in the last digits (CUDA kernels do not depend on it)."""
        if recorded and int(recorded) != self.threads and self.device.type == "cpu":
            warnings.warn(f"{where} was written with {int(recorded)} CPU thread(s), this process uses {self.threads}: "
                          f"training continues, but not bit for bit like an uninterrupted run (`meanflow train "
                          f"--resume` reuses the run's count unless --set train.threads=N overrides it)", RuntimeWarning, stacklevel=3)

    def _saved_teacher(self, state: dict) -> dict:
        """The teacher's state of a one-process checkpoint ({decay: state dict}), checked against this run's."""
        if "teacher" not in state:
            raise ValueError(f"the checkpoint has no teacher; this run's objective ({self.config.loss.objective}) "
                             f"trains against one")
        if list(state["teacher"]) != list(self.teacher.models):
            raise ValueError(f"the checkpoint's teacher has decay {list(state['teacher'])}; this run's has "
                             f"{list(self.teacher.models)}")
        return state["teacher"]

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
        self._check_threads(meta.get("threads"), where)
        tensors = self._dcp_tensors()
        rank_state = ckpt.load_dcp(where, tensors)
        parallel.set_train_state(self.net, self.optimizer, tensors["model"], tensors["optim"])
        ema_state = tensors["ema"]
        self._set_ema_states([ema_state[str(i)] for i in range(len(ema_state))], full=False,
                             saved=list(meta["ema_decays"]))
        if self.teacher is not None:
            parallel.set_module_state(self.teacher_model, tensors["teacher"])
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


def _numpy_state_to_plain(state) -> tuple:
    # numpy's MT19937 state holds an ndarray; checkpoints keep plain types so torch.load(weights_only=True) reads them
    return (state[0], torch.from_numpy(state[1].astype(np.int64)), int(state[2]), int(state[3]), float(state[4]))


def _numpy_state_from_plain(state) -> tuple:
    return (state[0], state[1].numpy().astype(np.uint32), state[2], state[3], state[4])


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


def _to_tuples(x):
    """python's random state must be tuples all the way down (a checkpoint round trip may give lists)."""
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
