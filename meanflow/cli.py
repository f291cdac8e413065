"""The `meanflow` command (also `python -m meanflow`).

    meanflow train --preset mnist                                  # the CPU demo (~10 min)
    meanflow train --preset toy --set train.steps=500 --out runs/toy
    meanflow train --resume runs/mnist                             # continue exactly where it stopped
    meanflow sample --ckpt runs/mnist --steps 1 --labels 3 --num 16 --out threes.png
    meanflow eval --ckpt runs/mnist
    meanflow presets --verbose

  At scale (torchrun spreads each over the GPUs; one process works too):
    meanflow prepare-latents --images /data/imagenet/train --vae /models/sd-vae-ft-mse --out /data/latents --flip
    torchrun --nproc_per_node=8 -m meanflow train --preset imagenet-XL/2 --set data.path=/data/latents --out runs/xl2
    torchrun --nproc_per_node=8 -m meanflow sample --ckpt runs/xl2 --vae VAE --num-samples 50000 --out samples.npz
    meanflow eval --samples samples.npz --fid-ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception.pt
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

# Light imports only at module level: `meanflow presets` and `--help` should answer instantly.


# ------------------------------------------------------------------------------------------------- exit status
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
EXIT_POLICY = """exit status:
  0    success
  1    the run started and failed: a non-finite loss, out of memory, a disk or device error, an internal error
  2    bad input, nothing was run: an argument or --set value out of range, an unknown preset, key or option, or a
       file named on the command line that is missing, corrupt or does not fit (checkpoints included)
  130  interrupted (Ctrl-C, SIGINT); `train` finishes the step it is in, checkpoints it and prints the command
       that resumes the run (a second Ctrl-C stops at once, without that checkpoint)
  143  terminated (SIGTERM, e.g. a scheduler's preemption notice); `train` behaves as on Ctrl-C
Errors are one line on stderr; MEANFLOW_DEBUG=1 shows the full traceback instead."""


class RunFailed(Exception):
    """A failure after the run started (exit status 1, whatever the underlying exception's type)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one line as every other error (no usage dump), exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _exit_status(exc: BaseException) -> int:
    if isinstance(exc, RunFailed):
        return EXIT_FAILED
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_BAD_INPUT
    ckpt = sys.modules.get(f"{__package__}.training.checkpoint")  # not imported: cannot be a CheckpointError
    if ckpt is not None and isinstance(exc, ckpt.CheckpointError):
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def _one_line(exc: BaseException) -> str:
    """The message of an error as one line; errors that are not ours also name their type."""
    cause = exc.__cause__ if isinstance(exc, RunFailed) and exc.__cause__ is not None else exc
    text = " ".join(str(cause).split()) or type(cause).__name__
    ours = cause.__class__.__module__.startswith(__package__ or "meanflow") or isinstance(
        cause, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError))
    return text if ours else f"{type(cause).__name__}: {text} (MEANFLOW_DEBUG=1 shows the traceback)"


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """Python warnings as `meanflow CMD: warning: ...` lines on stderr instead of file:line + source."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"meanflow {command}: warning: {message}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


# ------------------------------------------------------------------------------------------- argument types
def _int_arg(low: int):
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes an integer; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}; got {value}")
        return value
    return parse


def _open_unit(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number in (0, 1); got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1); got {text}")
    return value


def _device_arg(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N; got {text!r}")
    return text


def _weights_arg(text: str) -> str:
    if text in ("ema", "model"):
        return text
    try:
        ok = 0.0 < float(text) < 1.0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"must be ema, model or an EMA decay in (0, 1) such as 0.9999; got {text!r}")
    return text


def _new_file(path: str | None, what: str, suffixes: tuple[str, ...] | None = None) -> Path | None:
    """An output file: right suffix, not a directory (its folder is made when it is written, not here)."""
    if not path:
        return None
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise ValueError(f"{what} must end in {', '.join(suffixes[:-1]) + ' or ' if len(suffixes) > 1 else ''}"
                         f"{suffixes[-1]}; got {path}")
    if p.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name")
    return p


def _existing(path: str | None, what: str, *, folder: bool = False) -> None:
    if path and not (Path(path).is_dir() if folder else Path(path).exists()):
        raise FileNotFoundError(f"{what} {path} does not exist" + (" (or is not a folder)" if folder else ""))


def _start(resume: bool, step: int, init_from: str) -> str:
    """How a run starts, for its first line: resumed, initialised from another run's weights, or from scratch."""
    if resume:
        return f"resuming at step {step}"
    return f"step 0 from the weights of {init_from}" if init_from else "from scratch"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# ------------------------------------------------------------------------------------------------- helpers
def _run_config(args):
    """(RunConfig, the resumed checkpoint's state or None) of `train`: the resumed run's config or the preset, with
    --set applied."""
    from .training.checkpoint import load_checkpoint, resolve_checkpoint
    from .training.config import RunConfig, apply_overrides
    from .training.presets import get_preset

    resumed = None
    if args.resume:
        if args.preset:
            raise ValueError("--preset does not apply with --resume: the run's saved config is used (change fields "
                             "with --set)")
        resumed = load_checkpoint(resolve_checkpoint(args.resume))
        cfg = RunConfig.from_dict(resumed["config"])
    else:
        cfg = get_preset(args.preset or "mnist")
    return apply_overrides(cfg, args.set or []), resumed


def _sets_key(args, key: str) -> bool:
    return any(item.split("=", 1)[0].strip() == key for item in args.set or [])


def _run_dir(args, cfg) -> Path:
    from .training.checkpoint import list_checkpoints, resolve_checkpoint

    if args.out:
        out = Path(args.out)
    elif args.resume:
        ck = resolve_checkpoint(args.resume)
        out = ck.parent.parent  # run/checkpoints/ckpt_N.pt -> run
    else:
        out = Path("runs") / cfg.preset.replace("/", "-")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the run directory must be a folder")
    try:  # here, before anything is built: a folder that cannot be made is bad input naming --out
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the run directory ({exc.strerror or exc})") from None
    if not args.resume and list_checkpoints(out):
        raise ValueError(f"run directory {out} already has checkpoints: pass --resume {out} to continue it, "
                         f"or choose another --out")
    return out


def _choose_threads(args, cfg, resumed: dict | None) -> tuple[int, str]:
    """Set torch's CPU threads: a resumed run reuses the count its checkpoint recorded (bit-exact resume needs it)
    unless --set train.threads=N says otherwise; else train.threads (0: automatic). Returns (count, why)."""
    from .runtime.host import set_threads

    recorded = (resumed or {}).get("threads")
    if recorded and not _sets_key(args, "train.threads"):
        return set_threads(int(recorded)), "as recorded by the run"
    # the ranks of a node share its cores
    n = set_threads(cfg.train.threads, share=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return n, ("automatic" if cfg.train.threads == 0 else "train.threads")


def _print_summary(summary: dict) -> None:
    print(f"\nrun directory: {summary['run_dir']}")
    print(f"checkpoint:    {summary['checkpoint']}")
    for path in summary.get("grids", []):
        print(f"sample grid:   {path}")
    if summary.get("loss_curve"):
        print(f"loss curve:    {summary['loss_curve']}")
    if summary.get("samples_per_s"):
        print(f"throughput:    {summary['samples_per_s']:.1f} samples/s on {summary['device']} "
              f"({_plural(summary['threads'], 'thread')}), {summary['wall_s']:.0f} s")
    if summary.get("eval_s") is not None:
        print(f"evaluation:    {summary['eval_s']:.0f} s")
    if "metrics" in summary:
        _print_metrics(summary["metrics"])


def _print_metrics(metrics: dict) -> None:
    """The same block for `train` and `eval`: JSON with one top-level key per line, floats to 4 significant digits
    (the JSON files keep full precision)."""
    rows = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in _rounded(metrics).items()]
    print("metrics: {\n" + ",\n".join(rows) + "\n}")


def _rounded(obj):
    """Floats to 4 significant digits for the terminal."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


def _load_for_inference(path: str, which: str, device):
    """(model, config) of a checkpoint / run directory / exported .safetensors, in eval mode."""
    from .training.checkpoint import load_weights
    from .training.config import RunConfig
    from .models.registry import build_model
    from .objectives.registry import network_spec

    state_dict, cfg_dict, step = load_weights(path, which)
    cfg = RunConfig.from_dict(cfg_dict)
    shape, classes = _data_signature(cfg)
    model = build_model(cfg.model, shape, classes, device, spec=network_spec(cfg.loss))
    model.load_state_dict(state_dict)
    return model.to(device).eval(), cfg, step


def _data_signature(cfg) -> tuple[tuple[int, ...], int]:
    """The data shape and class count the model was built for, without loading a large dataset when avoidable."""
    from .data.datasets import TOYS, dataset_from_config

    if cfg.data.name in TOYS:
        return (2,), 0
    if cfg.data.name == "mnist":
        return (1, 32, 32), 10
    if cfg.data.name == "digits":
        return (1, 8, 8), 10
    if cfg.data.name == "latents":  # prepare-latents' manifest knows both: no need to read (or even have) the shards
        manifest = Path(cfg.data.path)
        manifest = manifest if manifest.suffix == ".json" else manifest / "manifest.json"
        try:
            spec = json.loads(manifest.read_text())
            shape, classes = tuple(int(v) for v in spec["shape"]), cfg.data.num_classes or int(spec["num_classes"])
            return shape, classes
        except (OSError, ValueError, KeyError, TypeError):
            pass
    ds = dataset_from_config(cfg.data)
    return tuple(ds.data_shape), ds.num_classes


# ---------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from .training.config import describe_config
    from .training.interrupts import TrainingInterrupted

    cfg, resumed = _run_config(args)
    if args.help_config:
        print(describe_config(cfg))
        return EXIT_OK
    if resumed is not None and cfg.train.steps <= int(resumed["step"]):
        raise ValueError(f"the run is already at step {resumed['step']} and train.steps is {cfg.train.steps}: pass "
                         f"--set train.steps=N with N > {resumed['step']} to train it longer")
    from .runtime import distributed
    from .runtime.host import check_device
    from .training.trainer import Trainer

    check_device(cfg.train.device)
    if not args.resume:  # before the run directory is made: a preset's missing starting run is bad input
        from .training.presets import check_start

        check_start(cfg)
    out = _run_dir(args, cfg)
    # process-wide, so the entry point decides, not the library
    threads, why = _choose_threads(args, cfg, resumed)
    trainer = Trainer(cfg, out, resume=args.resume)
    try:
        if trainer.is_main:
            n_params = sum(p.numel() for p in trainer.ema.models[next(iter(trainer.ema.models))].parameters())
            ranks = (f", {trainer.world_size} ranks ({trainer.parallel}, {trainer.dist.backend})"
                     if trainer.world_size > 1 else "")
            arch = type(trainer.net).__name__.removeprefix("FSDP")  # fully_shard renames the class
            size = f"{n_params / 1e6:.2f}M" if n_params >= 100_000 else f"{n_params:,}"
            print(f"{cfg.preset or 'run'}: {arch} with {size} parameters on "
                  f"{trainer.dataset!r}, device {trainer.device}{ranks}, {_plural(threads, 'CPU thread')} ({why}), "
                  f"{_start(args.resume, trainer.step, cfg.train.init_from)} -> {out}",
                  flush=True)
        try:
            summary = trainer.train()
        except TrainingInterrupted as stop:  # the step was finished and checkpointed
            if trainer.is_main:
                print(f"\n{stop.signal_name} at step {stop.step}: finished the step and saved {stop.checkpoint}. "
                      f"{_resume_hint(trainer, out)}", file=sys.stderr)
            return stop.exit_status
        except (KeyboardInterrupt, _Terminated) as exc:  # a second Ctrl-C, or a signal outside the training loop
            if trainer.is_main:
                print(f"\ninterrupted at step {trainer.step}, not checkpointed. {_resume_hint(trainer, out, True)}",
                      file=sys.stderr)
            return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
        except Exception as exc:  # the run started: whatever went wrong now is a failed run, not bad input
            raise RunFailed(str(exc)) from exc
        if trainer.is_main:
            _print_summary(summary)
        return EXIT_OK
    finally:
        distributed.cleanup(trainer.dist)


def _resume_hint(trainer, out: Path, name_checkpoint: bool = False) -> str:
    """The command that continues the run, or why there is none: it is printed only when a checkpoint exists."""
    from .training.checkpoint import checkpoint_step, latest_checkpoint

    last = latest_checkpoint(out)
    if last is None:
        return "No checkpoint was written yet: nothing to resume; start the run again."
    launcher = "torchrun ... -m meanflow" if trainer.world_size > 1 else "meanflow"
    where = f" (from {last}, step {checkpoint_step(last)})" if name_checkpoint else ""
    return f"Continue with: {launcher} train --resume {out}{where}"


class _Terminated(Exception):
    """SIGTERM outside the training loop (while building the run or evaluating it)."""


@contextlib.contextmanager
def _sigterm_as_exception():
    """SIGTERM raises _Terminated (exit status 143 with a message) instead of killing the process silently; the
    training loop installs its own handlers, which finish and checkpoint the step first."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _label_mode(values: list[str] | None):
    """--labels: None, 'uniform', 'balanced' or a list of class numbers (>= 0; the upper bound needs the model)."""
    if not values:
        return None
    if len(values) == 1 and values[0] in ("uniform", "balanced"):
        return values[0]
    try:
        labels = [int(v) for v in values]
    except ValueError:
        labels = None
    if labels is None or min(labels) < 0:
        raise ValueError(f"--labels takes class numbers (>= 0), 'uniform' or 'balanced'; got {' '.join(values)}")
    return labels


def _decoder(args, cfg, device):
    """latents -> images with the VAE of --vae (else data.vae) for latent models; None for pixel models."""
    vae_path = args.vae or (cfg.data.vae if cfg.data.name == "latents" else "")
    if cfg.data.name != "latents":
        if args.vae:
            raise ValueError(f"--vae applies to latent models; this model was trained on {cfg.data.name!r}")
        return None
    if not vae_path:
        return None
    from .data.latents import decode_latents, load_vae

    vae = load_vae(vae_path, device)
    return lambda z: decode_latents(vae, z, cfg.data.latent_scale, batch_size=args.decode_batch_size)


def _check_sample_args(args) -> None:
    """What can be judged before loading the model (the rest, e.g. a label's upper bound, needs it)."""
    if args.midpoint is not None and args.steps != 2:
        raise ValueError(f"--midpoint sets the intermediate time of 2-step sampling; it needs --steps 2 "
                         f"(got --steps {args.steps})")
    _new_file(args.out, "--out", (".png", ".jpg", ".jpeg", ".npz"))


def cmd_sample(args) -> int:
    _check_sample_args(args)
    mode = _label_mode(args.labels)
    import torch

    from .runtime import distributed
    from .evaluation.plotting import save_samples
    from .evaluation.samplers import sampler_for
    from .evaluation.sampling import draw_noise, generate_uint8, sample_labels, save_npz
    from .runtime.host import check_device, set_threads

    check_device(args.device)
    ctx = distributed.setup(args.device)
    try:
        set_threads(0, share=ctx.local_world_size)
        device = ctx.device
        model, cfg, step = _load_for_inference(args.ckpt, args.weights, device)
        sample = sampler_for(cfg.loss)  # the sampler of the objective the model was trained with
        classes = model.num_classes
        decode = _decoder(args, cfg, device)
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else None
        if str(args.out).endswith(".npz"):  # at scale: uint8 NHWC images over all ranks, gathered on rank 0
            if len(model.data_shape) != 3:
                raise ValueError("--out .npz writes images; this model makes 2-D points (use --out X.png)")
            if cfg.data.name == "latents" and decode is None:
                raise ValueError("this model makes VAE latents: pass --vae PATH (a local diffusers AutoencoderKL "
                                 "folder) to decode them into images")
            labels = sample_labels(args.num, classes, mode or "uniform", args.seed)
            images = generate_uint8(model, args.num, model.data_shape, labels, steps=args.steps,
                                    midpoint=args.midpoint, seed=args.seed, batch_size=args.batch_size,
                                    device=device, decode=decode, autocast=autocast, rank=ctx.rank,
                                    world_size=ctx.world_size, log=print if ctx.is_main else None, sampler=sample)
            if ctx.is_main:
                save_npz(args.out, images, labels)
                print(f"wrote {args.out}: arr_0 {images.dtype} {tuple(images.shape)}"
                      + (", arr_1 labels" if labels is not None else "")
                      + f" ({_plural(args.steps, 'step')}, {args.weights} weights of step {step}, seed {args.seed}"
                      + (f", {ctx.world_size} ranks" if ctx.distributed else "") + ")")
            distributed.barrier()
            return EXIT_OK
        if ctx.distributed:
            raise ValueError("a PNG grid is drawn by one process; use --out samples.npz to sample over ranks")
        labels = sample_labels(args.num, classes, mode or "balanced", args.seed)
        noise = draw_noise(args.num, model.data_shape, seed=args.seed, device=device)
        with (autocast() if autocast else contextlib.nullcontext()):
            x = sample(model, noise, labels.to(device) if labels is not None else None, steps=args.steps,
                       midpoint=args.midpoint).float()
        kind = "points" if len(model.data_shape) == 1 else ("latent" if cfg.data.name == "latents" else "image")
        if decode is not None:
            x, kind = decode(x), "image"
        nrow = 10 if labels is not None and mode is None and classes <= 10 else None
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_samples(x.cpu(), args.out, kind=kind, nrow=nrow,
                     title=f"{_plural(args.steps, 'step')} sampling (step {step})")
        print(f"wrote {args.out} ({_plural(args.num, 'sample')}, {_plural(args.steps, 'step')}, {args.weights} "
              f"weights of step {step})")
        return EXIT_OK
    finally:
        distributed.cleanup(ctx)


def cmd_eval(args) -> int:
    from .training.config import apply_overrides
    from .evaluation.evaluate import evaluate_model, fid_of_samples
    from .evaluation.samplers import sampler_for
    from .runtime.host import resolve_device, set_threads

    out = _new_file(args.out, "--out", (".json",))
    if args.samples:  # FID of a sample batch (.npz) against reference statistics or images
        if args.ckpt:
            raise ValueError("pass --ckpt (evaluate a model) or --samples (FID of an image batch), not both")
        if args.set or args.weights:
            raise ValueError("--set and --weights go with --ckpt; --samples evaluates an image batch as it is")
        _existing(args.samples, "--samples file")
        _existing(args.fid_ref, "--fid-ref file")
        _existing(args.inception, "--inception file")
        if _new_file(args.save_stats, "--save-stats", (".npz",)):
            Path(args.save_stats).parent.mkdir(parents=True, exist_ok=True)
        device = resolve_device(args.device)
        set_threads(0)
        metrics = fid_of_samples(args.samples, args.fid_ref, args.inception, batch_size=args.batch_size or 250,
                                 device=device, save_stats=args.save_stats, progress=True)
        _print_metrics(metrics)
    else:
        if not args.ckpt:
            raise ValueError("meanflow eval needs --ckpt RUN (evaluate a model) or --samples X.npz (FID of samples)")
        if args.fid_ref or args.inception or args.save_stats or args.batch_size:
            raise ValueError("--fid-ref / --inception / --save-stats / --batch-size go with --samples; for a model "
                             "use --set eval.fid_ref=... --set eval.inception=... --set eval.batch_size=...")
        from .training.config import RunConfig

        apply_overrides(RunConfig(), args.set or [])  # bad keys and values fail before the model loads
        device = resolve_device(args.device)
        set_threads(0)
        model, cfg, step = _load_for_inference(args.ckpt, args.weights or "ema", device)
        cfg = apply_overrides(cfg, args.set or [])
        print(f"evaluating {args.ckpt}: {args.weights or 'ema'} weights of step {step}", flush=True)
        metrics = {"checkpoint": str(args.ckpt), "step": step, "weights": args.weights or "ema",
                   **evaluate_model(model, cfg.data, cfg.eval, device, progress=True, sampler=sampler_for(cfg.loss))}
        _print_metrics(metrics)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {out}")
    return EXIT_OK


def cmd_prepare_latents(args) -> int:
    from .data.latents import prepare_latents
    from .runtime.host import check_device, set_threads

    check_device(args.device)
    _existing(args.images, "--images folder", folder=True)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; the shards go into a folder")
    set_threads(0, share=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    prepare_latents(args.images, args.vae, args.out, image_size=args.image_size, flip=args.flip,
                    batch_size=args.batch_size, shard_size=args.shard_size, posterior=args.posterior, seed=args.seed,
                    fmt=args.format, dtype=args.dtype, workers=args.workers, device=args.device)
    return EXIT_OK


def cmd_presets(args) -> int:
    from .training.config import describe_config
    from .training.presets import PRESETS

    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.summary}")
        if args.verbose:
            print("    " + describe_config(preset.build()).replace("\n", "\n    "))
    return 0


# ------------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="meanflow", description="Train, sample and evaluate MeanFlow models.",
                 epilog="Examples:\n" + "\n".join(__doc__.splitlines()[2:]).rstrip() + "\n\n" + EXIT_POLICY,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tr = sub.add_parser("train", help="train a model from a preset (or resume a run)")
    tr.add_argument("--preset", help="preset name (see `meanflow presets`; default: mnist)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="change one config field, e.g. --set train.steps=100 --set loss.omega=0.5 (repeatable; "
                         "see --help-config for every key)")
    tr.add_argument("--out", help="run directory (default: runs/<preset>, or the resumed run's directory)")
    tr.add_argument("--resume", metavar="PATH", help="run directory or checkpoint file to continue exactly (its saved "
                                                     "config is used, --preset is ignored; --set still applies, e.g. "
                                                     "train.steps to train longer)")
    tr.add_argument("--help-config", action="store_true",
                    help="print every config field of the preset (with --set applied), its value and help, then exit")
    tr.set_defaults(func=cmd_train)

    def add_ckpt_args(p, required=True):
        p.add_argument("--ckpt", required=required,
                       help="run directory, checkpoint (ckpt_N.pt file or ckpt_N/ directory) or exported weights "
                            "(.safetensors)")
        p.add_argument("--weights", default=None if not required else "ema", type=_weights_arg,
                       help="'ema' (the first EMA, default), 'model' (raw weights) or an EMA decay such as 0.9999")
        p.add_argument("--device", default="auto", type=_device_arg, help="auto | cpu | cuda | cuda:N")

    sa = sub.add_parser("sample", help="draw a sample grid (.png) or a sample batch for FID (.npz, torchrun-ready)")
    add_ckpt_args(sa)
    sa.add_argument("--steps", type=_int_arg(1), default=1, help="sampling steps (1 = one network evaluation)")
    sa.add_argument("--midpoint", type=_open_unit, default=None, help="the intermediate time of 2-step sampling (0.5)")
    sa.add_argument("--num", "--num-samples", dest="num", type=_int_arg(1), default=64,
                    help="number of samples (under torchrun spell it --num-samples: torchrun's own parser reads "
                         "--num as an abbreviation of its --numa-binding)")
    sa.add_argument("--labels", nargs="+", metavar="LABEL",
                    help="class labels repeated to --num, or 'uniform' (seeded i.i.d. labels: the .npz default) or "
                         "'balanced' (0, 1, 2, ...: the .png default)")
    sa.add_argument("--seed", type=_int_arg(0), default=0, help="noise (and uniform label) seed")
    sa.add_argument("--out", default="samples.png",
                    help="output: X.png (a grid) or X.npz (arr_0 uint8 N x H x W x C, arr_1 labels; the ADM "
                         "convention; under torchrun the ranks share the work and rank 0 writes)")
    sa.add_argument("--batch-size", type=_int_arg(1), default=250, help="samples per forward pass and rank (.npz)")
    sa.add_argument("--vae", default="", help="local diffusers AutoencoderKL folder that decodes a latent model's "
                                              "samples to images (default: the run's data.vae)")
    sa.add_argument("--decode-batch-size", type=_int_arg(1), default=64, help="latents per VAE decoder call")
    sa.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="the MeanFlow model's sampling precision (bf16: autocast)")
    sa.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="evaluate a trained model (sliced Wasserstein / digit classifier / FID), or the "
                                     "FID of a sample batch (--samples)")
    add_ckpt_args(ev, required=False)
    ev.add_argument("--samples", help="an .npz of uint8 images (arr_0, N x H x W x C) as `meanflow sample --out X.npz` "
                                      "writes: report its FID against --fid-ref")
    ev.add_argument("--fid-ref", help="reference: an .npz with mu and sigma (e.g. ADM's reference batches) or with "
                                      "arr_0 reference images")
    ev.add_argument("--inception", help="local TorchScript Inception file (default: $MEANFLOW_INCEPTION); nothing is "
                                        "downloaded, FID is skipped with the reason when there is none")
    ev.add_argument("--save-stats", help="also write the samples' (mu, sigma) as an .npz (a reference for later runs)")
    ev.add_argument("--batch-size", type=_int_arg(1), help="images per Inception call (--samples; default 250)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="change config fields, e.g. --set eval.num_samples=5000 --set eval.inception=PATH "
                         "--set data.path=...")
    ev.add_argument("--out", help="also write the metrics JSON here")
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("prepare-latents", help="encode an image folder (class per sub-folder) into VAE latent shards "
                                                "for data.name=latents (torchrun-ready)")
    pl.add_argument("--images", required=True, help="image folder: root/<class>/<image> (ImageNet train layout)")
    pl.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (config.json + weights), e.g. "
                                                 "sd-vae-ft-mse saved with save_pretrained; nothing is downloaded")
    pl.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    pl.add_argument("--image-size", type=_int_arg(1), default=256, help="resize the short side, center-crop to this square")
    pl.add_argument("--flip", action="store_true", help="also encode a horizontally mirrored copy of every image")
    pl.add_argument("--batch-size", type=_int_arg(1), default=64, help="images per VAE encoder call")
    pl.add_argument("--shard-size", type=_int_arg(1), default=10_000, help="images per shard")
    pl.add_argument("--posterior", default="sample", choices=("sample", "mean"),
                    help="store a posterior sample (mean + std * eps, seeded per image; the official recipe) or the "
                         "mean")
    pl.add_argument("--seed", type=_int_arg(0), default=0, help="seed of the posterior samples")
    pl.add_argument("--format", default="npy", choices=("npy", "safetensors", "npz"),
                    help="shard format (npy: memory-mapped when training, shared by a node's ranks)")
    pl.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored latent dtype")
    pl.add_argument("--workers", type=_int_arg(0), default=4, help="image decoding threads")
    pl.add_argument("--device", default="auto", type=_device_arg, help="auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)")
    pl.set_defaults(func=cmd_prepare_latents)

    pr = sub.add_parser("presets", help="list the presets")
    pr.add_argument("--verbose", "-v", action="store_true", help="also print every config field of each preset")
    pr.set_defaults(func=cmd_presets)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `meanflow` console script. Exit status: see EXIT_POLICY (0 ok, 1 the run failed, 2 bad
    input, 130 interrupted); errors print one line, MEANFLOW_DEBUG=1 shows full tracebacks instead."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error, already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    with _warnings_as_lines(args.command):
        if os.environ.get("MEANFLOW_DEBUG"):
            with _sigterm_as_exception():
                return args.func(args)
        try:
            with _sigterm_as_exception():
                return args.func(args)
        except KeyboardInterrupt:
            print(f"\nmeanflow {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except _Terminated:
            print(f"\nmeanflow {args.command}: terminated (SIGTERM)", file=sys.stderr)
            return EXIT_TERMINATED
        except Exception as exc:  # noqa: BLE001 - every error becomes one line and an exit status
            print(f"meanflow {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return _exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
