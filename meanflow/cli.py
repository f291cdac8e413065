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
import json
import os
import sys
from pathlib import Path

# Light imports only at module level: `meanflow presets` and `--help` should answer instantly.


# ------------------------------------------------------------------------------------------------- helpers
def _run_config(args):
    """The RunConfig of `train`: the resumed run's config or the preset, with --set applied."""
    from .training.checkpoint import load_checkpoint, resolve_checkpoint
    from .training.config import RunConfig, apply_overrides
    from .training.presets import get_preset

    if args.resume:
        cfg = RunConfig.from_dict(load_checkpoint(resolve_checkpoint(args.resume))["config"])
    else:
        cfg = get_preset(args.preset)
    return apply_overrides(cfg, args.set or [])


def _run_dir(args, cfg) -> Path:
    from .training.checkpoint import list_checkpoints, resolve_checkpoint

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
    from .training.checkpoint import load_weights
    from .training.config import RunConfig
    from .models.registry import build_model

    state_dict, cfg_dict, step = load_weights(path, which)
    cfg = RunConfig.from_dict(cfg_dict)
    shape, classes = _data_signature(cfg)
    model = build_model(cfg.model, shape, classes, device)
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

    cfg = _run_config(args)
    if args.help_config:
        print(describe_config(cfg))
        return 0
    from .runtime import distributed
    from .runtime.host import set_threads
    from .training.trainer import Trainer

    out = _run_dir(args, cfg)
    # process-wide, so the entry point decides, not the library; the ranks of a node share its cores
    set_threads(cfg.train.threads, share=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    trainer = Trainer(cfg, out, resume=args.resume)
    try:
        if trainer.is_main:
            n_params = sum(p.numel() for p in trainer.ema.models[next(iter(trainer.ema.models))].parameters())
            ranks = (f", {trainer.world_size} ranks ({trainer.parallel}, {trainer.dist.backend})"
                     if trainer.world_size > 1 else "")
            arch = type(trainer.net).__name__.removeprefix("FSDP")  # fully_shard renames the class
            print(f"{cfg.preset or 'run'}: {arch} with {n_params / 1e6:.2f}M parameters on "
                  f"{trainer.dataset!r}, device {trainer.device}{ranks}, {trainer.threads} CPU threads, "
                  f"{'resuming at step ' + str(trainer.step) if args.resume else 'from scratch'} -> {out}",
                  flush=True)
        try:
            summary = trainer.train()
        except KeyboardInterrupt:
            last = trainer.last_checkpoint or "none yet"
            if trainer.is_main:
                launcher = "torchrun ... -m meanflow" if trainer.world_size > 1 else "meanflow"
                print(f"\ninterrupted at step {trainer.step}; last checkpoint: {last}. Continue with: "
                      f"{launcher} train --resume {out}", file=sys.stderr)
            return 130
        if trainer.is_main:
            _print_summary(summary)
        return 0
    finally:
        distributed.cleanup(trainer.dist)


def _label_mode(values: list[str] | None):
    """--labels: None, 'uniform', 'balanced' or a list of ints."""
    if not values:
        return None
    if len(values) == 1 and values[0] in ("uniform", "balanced"):
        return values[0]
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--labels takes class numbers, 'uniform' or 'balanced'; got {' '.join(values)}") from None


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


def cmd_sample(args) -> int:
    import contextlib

    import torch

    from .runtime import distributed
    from .evaluation.plotting import save_samples
    from .evaluation.sampling import draw_noise, generate_uint8, sample, sample_labels, save_npz
    from .runtime.host import set_threads

    ctx = distributed.setup(args.device)
    try:
        set_threads(0, share=ctx.local_world_size)
        device = ctx.device
        model, cfg, step = _load_for_inference(args.ckpt, args.weights, device)
        classes, mode = model.num_classes, _label_mode(args.labels)
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
                                    world_size=ctx.world_size, log=print if ctx.is_main else None)
            if ctx.is_main:
                save_npz(args.out, images, labels)
                print(f"wrote {args.out}: arr_0 {images.dtype} {tuple(images.shape)}"
                      + (", arr_1 labels" if labels is not None else "")
                      + f" ({args.steps} step(s), {args.weights} weights of step {step}, seed {args.seed}"
                      + (f", {ctx.world_size} ranks" if ctx.distributed else "") + ")")
            distributed.barrier()
            return 0
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
        save_samples(x.cpu(), args.out, kind=kind, nrow=nrow, title=f"{args.steps}-step samples (step {step})")
        print(f"wrote {args.out} ({args.num} samples, {args.steps} step(s), {args.weights} weights of step {step})")
        return 0
    finally:
        distributed.cleanup(ctx)


def cmd_eval(args) -> int:
    from .training.config import apply_overrides
    from .evaluation.evaluate import evaluate_model, fid_of_samples
    from .runtime.host import resolve_device, set_threads

    device = resolve_device(args.device)
    set_threads(0)
    if args.samples:  # FID of a sample batch (.npz) against reference statistics or images
        if args.ckpt:
            raise ValueError("pass --ckpt (evaluate a model) or --samples (FID of an image batch), not both")
        metrics = fid_of_samples(args.samples, args.fid_ref, args.inception, batch_size=args.batch_size,
                                 device=device, save_stats=args.save_stats)
        text = json.dumps(metrics, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    if not args.ckpt:
        raise ValueError("meanflow eval needs --ckpt RUN (evaluate a model) or --samples X.npz (FID of samples)")
    if args.fid_ref or args.inception or args.save_stats:
        raise ValueError("--fid-ref / --inception / --save-stats go with --samples; for a model use --set "
                         "eval.fid_ref=... --set eval.inception=...")
    model, cfg, step = _load_for_inference(args.ckpt, args.weights, device)
    cfg = apply_overrides(cfg, args.set or [])
    metrics = {"checkpoint": str(args.ckpt), "step": step, "weights": args.weights,
               **evaluate_model(model, cfg.data, cfg.eval, device)}
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def cmd_prepare_latents(args) -> int:
    from .data.latents import prepare_latents
    from .runtime.host import set_threads

    set_threads(0, share=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    prepare_latents(args.images, args.vae, args.out, image_size=args.image_size, flip=args.flip,
                    batch_size=args.batch_size, shard_size=args.shard_size, posterior=args.posterior, seed=args.seed,
                    fmt=args.format, dtype=args.dtype, workers=args.workers, device=args.device)
    return 0


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

    def add_ckpt_args(p, required=True):
        p.add_argument("--ckpt", required=required,
                       help="run directory, checkpoint (ckpt_N.pt file or ckpt_N/ directory) or exported weights "
                            "(.safetensors)")
        p.add_argument("--weights", default="ema",
                       help="'ema' (the first EMA, default), 'model' (raw weights) or an EMA decay such as 0.9999")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    sa = sub.add_parser("sample", help="draw a sample grid (.png) or a sample batch for FID (.npz, torchrun-ready)")
    add_ckpt_args(sa)
    sa.add_argument("--steps", type=int, default=1, help="sampling steps (1 = one network evaluation)")
    sa.add_argument("--midpoint", type=float, default=None, help="the intermediate time of 2-step sampling (0.5)")
    sa.add_argument("--num", "--num-samples", dest="num", type=int, default=64,
                    help="number of samples (under torchrun spell it --num-samples: torchrun's own parser reads "
                         "--num as an abbreviation of its --numa-binding)")
    sa.add_argument("--labels", nargs="+", metavar="LABEL",
                    help="class labels repeated to --num, or 'uniform' (seeded i.i.d. labels: the .npz default) or "
                         "'balanced' (0, 1, 2, ...: the .png default)")
    sa.add_argument("--seed", type=int, default=0, help="noise (and uniform label) seed")
    sa.add_argument("--out", default="samples.png",
                    help="output: X.png (a grid) or X.npz (arr_0 uint8 N x H x W x C, arr_1 labels; the ADM "
                         "convention; under torchrun the ranks share the work and rank 0 writes)")
    sa.add_argument("--batch-size", type=int, default=250, help="samples per forward pass and rank (.npz)")
    sa.add_argument("--vae", default="", help="local diffusers AutoencoderKL folder that decodes a latent model's "
                                              "samples to images (default: the run's data.vae)")
    sa.add_argument("--decode-batch-size", type=int, default=64, help="latents per VAE decoder call")
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
    ev.add_argument("--batch-size", type=int, default=250, help="images per Inception call (--samples)")
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
    pl.add_argument("--image-size", type=int, default=256, help="resize the short side, center-crop to this square")
    pl.add_argument("--flip", action="store_true", help="also encode a horizontally mirrored copy of every image")
    pl.add_argument("--batch-size", type=int, default=64, help="images per VAE encoder call")
    pl.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    pl.add_argument("--posterior", default="sample", choices=("sample", "mean"),
                    help="store a posterior sample (mean + std * eps, seeded per image; the official recipe) or the "
                         "mean")
    pl.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    pl.add_argument("--format", default="npy", choices=("npy", "safetensors", "npz"),
                    help="shard format (npy: memory-mapped when training, shared by a node's ranks)")
    pl.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored latent dtype")
    pl.add_argument("--workers", type=int, default=4, help="image decoding threads")
    pl.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)")
    pl.set_defaults(func=cmd_prepare_latents)

    pr = sub.add_parser("presets", help="list the presets")
    pr.add_argument("--verbose", "-v", action="store_true", help="also print every config field of each preset")
    pr.set_defaults(func=cmd_presets)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `meanflow` console script; errors print one clear line and exit with status 2 (usage)
    or 1 (a failed run). MEANFLOW_DEBUG=1 shows full tracebacks instead."""
    args = build_parser().parse_args(argv)
    from .training.checkpoint import CheckpointError

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
        from .training.trainer import NonFiniteLossError

        if isinstance(exc, NonFiniteLossError):
            print(f"meanflow {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
