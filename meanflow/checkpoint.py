"""Checkpoint IO: atomic writes, a `latest` pointer, keep-last-N, clear errors for broken files.

Format: ONE `torch.save` file per checkpoint, `ckpt_<step>.pt`, holding plain containers of tensors, numbers and strings
(model, EMA weights, optimizer state, step, RNG states, data position, the config as a dict). Why one torch file and not
safetensors: a resumable checkpoint must carry the optimizer state and RNG states, which safetensors cannot express, and a
single file makes the atomic replace trivial (no half-updated directory). Everything in it is loadable with
`torch.load(weights_only=True)`, so reading a checkpoint never runs pickled code. For sharing weights, `export_weights`
writes the EMA weights as safetensors with the config in the metadata; `load_weights` reads either format.

Atomicity: write to a temporary file in the same directory, flush + fsync, `os.replace` onto the final name, fsync the
directory; then point `latest` (a one-line text file, replaced the same way) at it and delete the oldest checkpoints. A
kill at any moment leaves either the old or the new checkpoint complete, never a truncated one under a final name.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "meanflow-ckpt-v1"
CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path."""


# ---------------------------------------------------------------------------------------------- atomic writing
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the final file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace onto `path`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


# -------------------------------------------------------------------------------------------- run directories
def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt_{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of an interrupted write are ignored)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint: the `latest` pointer when it names an existing file, else the highest step on disk."""
    d = Path(run_dir) / "checkpoints"
    pointer = d / LATEST
    if pointer.is_file():
        target = d / pointer.read_text().strip()
        if CKPT_RE.match(target.name) and target.is_file():
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file from a file path, a run directory or its checkpoints/ folder."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        run_dir = p.parent if p.name == "checkpoints" else p
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"no checkpoint found in {p} (expected {run_dir}/checkpoints/ckpt_<step>.pt)")
        return found
    raise CheckpointError(f"checkpoint {p} does not exist")


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` as checkpoint `step` atomically, move `latest` to it, then delete all but the newest `keep`
    (keep <= 0: keep all)."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(".*.tmp"):  # left by a writer killed mid-write (one writer per run directory)
        stale.unlink(missing_ok=True)
    save_atomic({"format": FORMAT, "step": step, **state}, path)
    write_bytes_atomic(path.parent / LATEST, (path.name + "\n").encode())
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint (file or run directory); a truncated, corrupt or foreign file raises CheckpointError."""
    p = resolve_checkpoint(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip, pickle and EOF errors all mean 'unusable'
        raise CheckpointError(f"checkpoint {p} is corrupt or truncated and cannot be loaded "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              f"use an earlier checkpoint from {p.parent}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a meanflow checkpoint (no '{FORMAT}' format tag)")
    state["path"] = str(p)
    return state


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
