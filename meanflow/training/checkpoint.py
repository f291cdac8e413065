"""Checkpoint IO: atomic writes, a `latest` pointer, keep-last-N, clear errors for broken files.

Two formats, both under run/checkpoints/ with one `latest` pointer:

- single-process runs: ONE `torch.save` file per checkpoint, `ckpt_<step>.pt`, holding plain containers of tensors, numbers and strings
(model, EMA weights, optimizer state, step, RNG states, data position, the config as a dict). Why one torch file and not
safetensors: a resumable checkpoint must carry the optimizer state and RNG states, which safetensors cannot express, and a
single file makes the atomic replace trivial (no half-updated directory). Everything in it is loadable with
`torch.load(weights_only=True)`, so reading a checkpoint never runs pickled code. For sharing weights, `export_weights`
writes the EMA weights as safetensors with the config in the metadata; `load_weights` reads either format.

Atomicity: write to a temporary file in the same directory, flush + fsync, `os.replace` onto the final name, fsync the
directory; then point `latest` (a one-line text file, replaced the same way) at it and delete the oldest checkpoints. A
kill at any moment leaves either the old or the new checkpoint complete, never a truncated one under a final name.

- distributed runs (torchrun, world size > 1): a DIRECTORY per checkpoint, `ckpt_<step>/`, written with
  torch.distributed.checkpoint (DCP): `.metadata` + one `__<rank>_0.distcp` file per rank holding that rank's shards
  of {"model", "optim", "ema"} (and "teacher" for an objective with one, e.g. TVM) (FSDP: sharded DTensors; DDP: each replicated tensor written once), `meta.pt` (rank 0:
  step, config, global data position, the objective's generator state (identical on every rank), world size, EMA
  decays) and `rank_<r>.pt` (each rank's process RNG states). Every rank writes into `.tmp_ckpt_<step>/`; after a
  barrier rank 0 writes meta.pt and renames the directory onto its final name (multi-node runs need the run
  directory on a shared file system). DCP reshards on load, so a checkpoint loads at any world size, one process
  included; `load_weights` reads the EMA / model weights of either format for inference.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch

from ..runtime.files import fsync_dir, save_atomic, write_bytes_atomic

FORMAT = "meanflow-ckpt-v1"
DCP_FORMAT = "meanflow-dcp-v1"
CKPT_RE = re.compile(r"^ckpt_(\d+)(\.pt)?$")
LATEST = "latest"
DCP_META = "meta.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path."""


# -------------------------------------------------------------------------------------------- run directories
def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt_{step:08d}.pt"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where a distributed (DCP) checkpoint of `step` lives: a directory."""
    return Path(run_dir) / "checkpoints" / f"ckpt_{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    m = CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    """A complete distributed checkpoint directory (DCP's .metadata and our meta.pt)."""
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file() and (p / DCP_META).is_file()


def _is_complete(p: Path) -> bool:
    return p.is_file() if p.suffix == ".pt" else is_dcp_checkpoint(p)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, files and DCP directories, oldest first (temporary files and directories of an
    interrupted write are ignored)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name)) and _is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint: the `latest` pointer when it names an existing one, else the highest step on disk."""
    d = Path(run_dir) / "checkpoints"
    pointer = d / LATEST
    if pointer.is_file():
        target = d / pointer.read_text().strip()
        if CKPT_RE.match(target.name) and _is_complete(target):
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint (file or DCP directory) from its own path, a run directory or its checkpoints/ folder."""
    p = Path(path)
    if p.is_file() or is_dcp_checkpoint(p):
        return p
    if p.is_dir():
        if CKPT_RE.match(p.name):
            raise CheckpointError(unreadable_message(p, RuntimeError(f"no .metadata / {DCP_META}"))
                                  .replace("is corrupt or truncated", "is incomplete", 1))
        run_dir = p.parent if p.name == "checkpoints" else p
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"no checkpoint found in {p} (expected {run_dir}/checkpoints/ckpt_<step>.pt or "
                                  f"ckpt_<step>/)")
        return found
    raise CheckpointError(f"checkpoint {p} does not exist")


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _point_latest_and_prune(final: Path, run_dir, keep: int) -> None:
    write_bytes_atomic(final.parent / LATEST, (final.name + "\n").encode())
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != final:
                _remove(old)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` as checkpoint `step` atomically, move `latest` to it, then delete all but the newest `keep`
    (keep <= 0: keep all)."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(".*.tmp"):  # left by a writer killed mid-write (one writer per run directory)
        stale.unlink(missing_ok=True)
    save_atomic({"format": FORMAT, "step": step, **state}, path)
    _point_latest_and_prune(path, run_dir, keep)
    return path


def _why_unreadable(p: Path, exc: BaseException) -> str:
    """A short reason: torch's reader errors run to several sentences of advice, some of it wrong here (e.g. to
    retry with weights_only=False)."""
    if p.is_file() and not zipfile.is_zipfile(p):  # torch.save writes a zip archive whose index sits at the end
        return f"not a complete torch archive: {p.stat().st_size} bytes"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 90 else text[:87] + "..."


def _looks_complete(p: Path) -> bool:
    """Cheap: a checkpoint file whose zip index is intact, or a complete DCP directory (nothing is loaded)."""
    return zipfile.is_zipfile(p) if p.is_file() else is_dcp_checkpoint(p)


def unreadable_message(p: Path, exc: BaseException) -> str:
    """One short paragraph: which file is broken and what to do given the checkpoints that exist beside it."""
    run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    others = [c for c in list_checkpoints(run_dir) if c != p and _looks_complete(c)]
    what = f"checkpoint {p} is corrupt or truncated ({_why_unreadable(p, exc)})"
    if others:
        return (f"{what}; the newest other checkpoint is {others[-1]}: pass that path instead, or delete the broken "
                f"file so that {run_dir} resolves to it")
    weights = run_dir / "ema.safetensors"
    if weights.is_file():
        return (f"{what}, and {run_dir} has no other intact checkpoint: its final weights {weights} still sample "
                f"and evaluate; training cannot resume (train again with another --out)")
    return f"{what}, and {run_dir} has no other intact checkpoint: train the run again (with another --out)"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint (file or run directory); a truncated, corrupt or foreign file raises CheckpointError.

    For a distributed (DCP) checkpoint this returns its meta.pt (step, config, data position, ...) without the
    tensors: those are loaded in place by `load_dcp` (training) or `load_weights` (inference).
    """
    p = resolve_checkpoint(path)
    if p.is_dir():
        return read_dcp_meta(p)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip, pickle and EOF errors all mean 'unusable'
        raise CheckpointError(unreadable_message(p, exc)) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a meanflow checkpoint (no '{FORMAT}' format tag)")
    state["path"] = str(p)
    return state


# ------------------------------------------------------------------------------------ distributed checkpoints
def _dist_rank() -> tuple[int, bool]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank() if on else 0), on


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it 'assumes the intent' of single-process IO even when asked for it with no_dist=True."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier(on: bool) -> None:
    if on:
        import torch.distributed as dist

        dist.barrier()


def save_dcp_checkpoint(run_dir: str | os.PathLike, step: int, tensors: dict, meta: dict, rank_state: dict,
                        keep: int = 2) -> Path:
    """A collective: every rank passes its `tensors` (state dicts of tensors / DTensors) and its `rank_state`; rank 0's
    `meta` is kept. Written into .tmp_ckpt_<step>/, renamed onto ckpt_<step>/ by rank 0 once complete; `latest` then
    moves and all but the newest `keep` checkpoints are deleted."""
    import torch.distributed.checkpoint as dcp

    rank, on = _dist_rank()
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in list(final.parent.glob(".tmp_ckpt_*")) + list(final.parent.glob(".*.tmp")):
            _remove(stale)  # left by a run killed mid-write
        tmp.mkdir()
    _barrier(on)
    with _quiet_dcp():
        dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not on)
    save_atomic(rank_state, tmp / f"rank_{rank:05d}.pt")
    _barrier(on)
    if rank == 0:
        save_atomic({"format": DCP_FORMAT, "step": step, **meta}, tmp / DCP_META)
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run that stops where it started)
            aside = final.parent / f".tmp_old_{final.name}"
            os.replace(final, aside)
            _remove(aside)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        _point_latest_and_prune(final, run_dir, keep)
    _barrier(on)
    return final


def read_dcp_meta(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        meta = torch.load(p / DCP_META, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(unreadable_message(p, exc).replace(f"checkpoint {p} is corrupt",
                                                                 f"checkpoint {p} has a corrupt {DCP_META}", 1)) from exc
    if not isinstance(meta, dict) or meta.get("format") != DCP_FORMAT:
        raise CheckpointError(f"{p} is not a meanflow distributed checkpoint (no '{DCP_FORMAT}' format tag)")
    meta["path"] = str(p)
    return meta


def load_dcp(path: str | os.PathLike, tensors: dict) -> dict | None:
    """Fill `tensors` (state dicts shaped like this run's: any world size, sharded or not) in place from a DCP
    checkpoint; return this rank's saved rank state (None when the checkpoint has none for this rank)."""
    import torch.distributed.checkpoint as dcp

    rank, on = _dist_rank()
    p = Path(path)
    try:
        with _quiet_dcp():
            dcp.load(tensors, checkpoint_id=str(p), no_dist=not on)
    except Exception as exc:
        raise CheckpointError(f"distributed checkpoint {p} does not fit this run ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1][:400] if str(exc).strip() else ''})") from exc
    rank_file = p / f"rank_{rank:05d}.pt"
    return torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.is_file() else None


def _dcp_tensors_with_prefix(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint whose flattened name starts with `prefix`, loaded whole in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    empty = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
             for k, md in metadata.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if not empty:
        raise CheckpointError(f"distributed checkpoint {path} has no tensors under {prefix!r}")
    with _quiet_dcp():
        dcp.load(empty, checkpoint_id=str(path), no_dist=True)
    return {k[len(prefix):]: v for k, v in empty.items()}


# --------------------------------------------------------------------------------------- inference weights
def export_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict, step: int = -1) -> None:
    """Weights as safetensors with the run config as JSON metadata (for sharing and `meanflow sample`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_bytes_atomic(path, save(tensors, metadata={"format": FORMAT, "config": json.dumps(config),
                                                     "step": str(step)}))


def load_weights(path: str | os.PathLike, which: str = "ema") -> tuple[dict[str, torch.Tensor], dict, int]:
    """(state_dict, config dict, step) for inference from a checkpoint (.pt / run dir) or an exported .safetensors.

    `which`: 'ema' (the first EMA), 'model' (the raw weights), or a decay such as '0.9999'.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
        except Exception as exc:  # safetensors raises several types for a broken file
            raise CheckpointError(f"weights file {p} is corrupt or truncated ({exc})") from exc
        if "config" not in meta:
            raise CheckpointError(f"weights file {p} has no meanflow config in its metadata")
        return tensors, json.loads(meta["config"]), int(meta.get("step", -1))
    state = load_checkpoint(p)
    if Path(state["path"]).is_dir():  # a distributed checkpoint: read the full weights of one state dict
        decays = list(state["ema_decays"])
        if which == "model":
            prefix = "model."
        else:
            match = 0 if which == "ema" else next((i for i, k in enumerate(decays) if float(k) == float(which)), None)
            if match is None:
                raise CheckpointError(f"checkpoint {state['path']} has EMA decays {decays}; not {which}")
            prefix = f"ema.{match}."
        return _dcp_tensors_with_prefix(Path(state["path"]), prefix), state["config"], state["step"]
    if which == "model":
        return state["model"], state["config"], state["step"]
    emas = state["ema"]
    if which == "ema":
        key = next(iter(emas))
    else:
        key = next((k for k in emas if float(k) == float(which)), None)
        if key is None:
            raise CheckpointError(f"checkpoint {state['path']} has EMA decays {list(emas)}; not {which}")
    return emas[key], state["config"], state["step"]
