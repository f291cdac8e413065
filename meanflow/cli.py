"""The `meanflow` command (also `python -m meanflow`).

    meanflow train --preset mnist                                  # the CPU demo (~10 min)
    meanflow train --preset toy --set train.steps=500 --out runs/toy
    meanflow train --resume runs/mnist                             # continue exactly where it stopped
    meanflow sample --ckpt runs/mnist --steps 1 --labels 3 --num 16 --out threes.png
    meanflow eval --ckpt runs/mnist
    meanflow presets --verbose
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Light imports only at module level: `meanflow presets` and `--help` should answer instantly.


# ------------------------------------------------------------------------------------------------- helpers
def _run_config(args):
    """The RunConfig of `train`: the resumed run's config or the preset, with --set applied."""
    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .config import RunConfig, apply_overrides
    from .presets import get_preset

    if args.resume:
        cfg = RunConfig.from_dict(load_checkpoint(resolve_checkpoint(args.resume))["config"])
    else:
        cfg = get_preset(args.preset)
    return apply_overrides(cfg, args.set or [])


def _run_dir(args, cfg) -> Path:
    from .checkpoint import list_checkpoints, resolve_checkpoint

    if args.out:
        out = Path(args.out)
    elif args.resume:
        ck = resolve_checkpoint(args.resume)
        out = ck.parent.parent  # run/checkpoints/ckpt_N.pt -> run
    else:
        out = Path("runs") / cfg.preset.replace("/", "-")
    if not args.resume and list_checkpoints(out):
        raise ValueError(f"run directory {out} already has checkpoints: pass --resume {out} to continue it, "
                         f"or choose another --out")
    return out


def _print_summary(summary: dict) -> None:
    print(f"\nrun directory: {summary['run_dir']}")
    print(f"checkpoint:    {summary['checkpoint']}")
    for path in summary.get("grids", []):
        print(f"sample grid:   {path}")
    if summary.get("loss_curve"):
        print(f"loss curve:    {summary['loss_curve']}")
    if summary.get("samples_per_s"):
        print(f"throughput:    {summary['samples_per_s']:.1f} samples/s on {summary['device']} "
              f"({summary['threads']} threads), {summary['wall_s']:.0f} s")
    if "metrics" in summary:
        print("metrics:", json.dumps(_rounded(summary["metrics"]), indent=2, ensure_ascii=False))


def _rounded(obj):
    """Floats to 4 significant digits for the terminal (eval.json keeps full precision)."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


def _load_for_inference(path: str, which: str, device):
    """(model, config) of a checkpoint / run directory / exported .safetensors, in eval mode."""
    from .checkpoint import load_weights
    from .config import RunConfig
    from .train import build_model

    state_dict, cfg_dict, step = load_weights(path, which)
    cfg = RunConfig.from_dict(cfg_dict)
    shape, classes = _data_signature(cfg)
    model = build_model(cfg.model, shape, classes, device)
    model.load_state_dict(state_dict)
    return model.to(device).eval(), cfg, step


def _data_signature(cfg) -> tuple[tuple[int, ...], int]:
    """The data shape and class count the model was built for, without loading a large dataset when avoidable."""
    from .data import TOYS, dataset_from_config

    if cfg.data.name in TOYS:
        return (2,), 0
    if cfg.data.name == "mnist":
        return (1, 32, 32), 10
    if cfg.data.name == "digits":
        return (1, 8, 8), 10
    ds = dataset_from_config(cfg.data)
    return tuple(ds.data_shape), ds.num_classes


# ---------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from .config import describe_config

    cfg = _run_config(args)
    if args.help_config:
        print(describe_config(cfg))
        return 0
    from .train import Trainer, set_threads

    out = _run_dir(args, cfg)
    set_threads(cfg.train.threads)  # process-wide, so the entry point decides, not the library
    trainer = Trainer(cfg, out, resume=args.resume)
    print(f"{cfg.preset or 'run'}: {type(trainer.net).__name__} with "
          f"{sum(p.numel() for p in trainer.net.parameters()) / 1e6:.2f}M parameters on {trainer.dataset!r}, "
          f"device {trainer.device}, {trainer.threads} CPU threads, "
          f"{'resuming at step ' + str(trainer.step) if args.resume else 'from scratch'} -> {out}", flush=True)
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        last = trainer.last_checkpoint or "none yet"
        print(f"\ninterrupted at step {trainer.step}; last checkpoint: {last}. Continue with: "
              f"meanflow train --resume {out}", file=sys.stderr)
        return 130
    _print_summary(summary)
    return 0


def cmd_sample(args) -> int:
    import torch

    from .plotting import save_samples
    from .sample import draw_noise, sample
    from .train import resolve_device, set_threads

    device = resolve_device(args.device)
    set_threads(0)
    model, cfg, step = _load_for_inference(args.ckpt, args.weights, device)
    classes = model.num_classes
    labels = None
    if classes > 0:
        if args.labels:
            bad = [v for v in args.labels if not 0 <= v < classes]
            if bad:
                raise ValueError(f"--labels must lie in [0, {classes - 1}]; got {bad}")
            labels = torch.tensor(args.labels * (args.num // len(args.labels) + 1))[:args.num]
        else:
            labels = torch.arange(args.num) % classes
    elif args.labels:
        raise ValueError("the model is unconditional: --labels does not apply")
    noise = draw_noise(args.num, model.data_shape, seed=args.seed, device=device)
    x = sample(model, noise, labels.to(device) if labels is not None else None, steps=args.steps,
               midpoint=args.midpoint).float().cpu()
    kind = "points" if len(model.data_shape) == 1 else ("latent" if cfg.data.name == "latents" else "image")
    nrow = 10 if labels is not None and not args.labels and classes <= 10 else None
    save_samples(x, args.out, kind=kind, nrow=nrow, title=f"{args.steps}-step samples (step {step})")
    print(f"wrote {args.out} ({args.num} samples, {args.steps} step(s), {args.weights} weights of step {step})")
    return 0


def cmd_eval(args) -> int:
    from .config import apply_overrides
    from .evaluate import evaluate_model
    from .train import resolve_device, set_threads

    device = resolve_device(args.device)
    set_threads(0)
    model, cfg, step = _load_for_inference(args.ckpt, args.weights, device)
    cfg = apply_overrides(cfg, args.set or [])
    metrics = {"checkpoint": str(args.ckpt), "step": step, "weights": args.weights,
               **evaluate_model(model, cfg.data, cfg.eval, device)}
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def cmd_presets(args) -> int:
    from .config import describe_config
    from .presets import PRESETS

    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.summary}")
        if args.verbose:
            print("    " + describe_config(preset.build()).replace("\n", "\n    "))
    return 0


# ------------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="meanflow", description="Train, sample and evaluate MeanFlow models.",
                                 epilog="Examples:\n" + "\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tr = sub.add_parser("train", help="train a model from a preset (or resume a run)")
    tr.add_argument("--preset", default="mnist", help="preset name (see `meanflow presets`; default: mnist)")
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

    def add_ckpt_args(p):
        p.add_argument("--ckpt", required=True,
                       help="run directory, checkpoint file (.pt) or exported weights (.safetensors)")
        p.add_argument("--weights", default="ema",
                       help="'ema' (the first EMA, default), 'model' (raw weights) or an EMA decay such as 0.9999")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    sa = sub.add_parser("sample", help="draw a sample grid from a trained model")
    add_ckpt_args(sa)
    sa.add_argument("--steps", type=int, default=1, help="sampling steps (1 = one network evaluation)")
    sa.add_argument("--midpoint", type=float, default=None, help="the intermediate time of 2-step sampling (0.5)")
    sa.add_argument("--num", type=int, default=64, help="number of samples")
    sa.add_argument("--labels", type=int, nargs="+", help="class labels, repeated to --num (default: 0, 1, 2, ...)")
    sa.add_argument("--seed", type=int, default=0, help="noise seed")
    sa.add_argument("--out", default="samples.png", help="output PNG")
    sa.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="evaluate a trained model (sliced Wasserstein / digit classifier / FID)")
    add_ckpt_args(ev)
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="change config fields, e.g. --set eval.num_samples=5000 --set eval.inception=PATH "
                         "--set data.path=...")
    ev.add_argument("--out", help="also write the metrics JSON here")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("presets", help="list the presets")
    pr.add_argument("--verbose", "-v", action="store_true", help="also print every config field of each preset")
    pr.set_defaults(func=cmd_presets)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `meanflow` console script; errors print one clear line and exit with status 2 (usage)
    or 1 (a failed run). MEANFLOW_DEBUG=1 shows full tracebacks instead."""
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError

    if os.environ.get("MEANFLOW_DEBUG"):  # full tracebacks instead of one-line errors
        return args.func(args)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"meanflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"meanflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        from .train import NonFiniteLossError

        if isinstance(exc, NonFiniteLossError):
            print(f"meanflow {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
