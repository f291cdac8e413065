"""The run configuration: one dataclass per concern (model, data, loss, train, eval), every field with a help line.

A run is `RunConfig(model=..., data=..., loss=MeanFlowConfig(...), train=..., eval=...)`. Presets (presets.py) are
RunConfigs; the command line changes single fields with dotted keys:

    apply_overrides(cfg, ["loss.omega=0.5", "model.name=DiT-S/2", "train.steps=100", "train.betas=0.9,0.99"])
    apply_overrides(cfg, ["loss.objective=imf", "loss.omega_max=4"])     # another objective, then its knobs

Values are parsed by the field's declared type and checked against the field's rule (validation.py); an unknown key is
an error that lists the valid ones. The loss section IS the objective's own config (meanflow.objectives:
MeanFlowConfig, IMFConfig, SCMConfig, AlphaFlowConfig, FlowMatchingConfig, picked by its `objective` field), so every
objective knob is settable and validated by its own `__post_init__`. `loss.objective=NAME` is applied before the other
overrides and starts from that objective's defaults.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..objectives.meanflow import MeanFlowConfig
from ..objectives.registry import CONFIGS, ObjectiveConfigs, config_from_dict, default_config
from .validation import check_field


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field carrying its help line (shown by `--help-config` and `meanflow presets --verbose`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    arch: str = _f("dit", "network: 'dit' (images / latents) or 'mlp' (2-D toys)")
    name: str = _f("DiT-Tiny/4", "DiT registry name (meanflow.DIT_MODELS, e.g. DiT-B/2); hidden/depth/heads/patch "
                                 "below override its sizes when > 0")
    hidden: int = _f(0, "hidden width (0: from `name` for DiT, 256 for the MLP)")
    depth: int = _f(0, "number of blocks / layers (0: from `name` for DiT, 4 for the MLP)")
    heads: int = _f(0, "attention heads (0: from `name`)")
    patch: int = _f(0, "patch size (0: from `name`)")
    mlp_ratio: float = _f(4.0, "DiT MLP hidden size / width")
    v_depth: int = _f(0, "iMF's v-branch: blocks (DiT) / layers (MLP) forking before the last ones (0: auto = "
                         "min(8, depth // 2) for DiT, depth // 2 for the MLP); only built for loss.objective=imf")
    backend: str = _f("auto", "JVP backend: 'autograd', 'explicit', 'fused', or 'auto' (fused on CUDA, explicit on CPU)")
    config: str = _f("", "arch=diffusers:<ClassName>: the model's config, a JSON file or an inline JSON object "
                         "(hidden/depth/heads/patch above override its sizes when > 0; docs/any_network.md)")
    time_scale: float = _f(0.0, "arch=diffusers:<ClassName>: the module's timestep is time_scale * t (0: the "
                                "adapter's default, 1000 for DiT / SD3 / Wan / PixArt, 1 for Flux)")


@dataclass
class DataConfig:
    name: str = _f("mnist", "dataset: checkerboard | moons | 8gaussians | digits | mnist | folder | latents")
    path: str = _f("", "folder of class sub-folders (folder) or of latent shards / a manifest (latents)")
    image_size: int = _f(32, "image side for 'folder' (resize the short side, then center-crop)")
    latent_scale: float = _f(0.18215, "latents are multiplied by this (0.18215: SD-VAE); shards written by "
                                      "`meanflow prepare-latents` hold unscaled latents")
    vae: str = _f("", "local diffusers AutoencoderKL folder that decodes 'latents' data to images (sample grids, "
                      "`meanflow sample`); empty: grids show raw latent channels")
    split: str = _f("train", "which split to train on for mnist/digits: train | test | all (test = every 10th "
                             "example, held out for evaluation)")
    toy_scale: float = _f(1.0, "multiplies 2-D toy samples")
    num_classes: int = _f(0, "classes of 'latents' data (0: from the manifest, else the largest label + 1)")
    workers: int = _f(0, "image-folder decoding threads (0: decode in the training loop)")


@dataclass
class TrainConfig:
    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(64, "samples per optimizer step: the GLOBAL batch (all micro-batches of all ranks together)")
    grad_accum: int = _f(1, "micro-batches per optimizer step (batch_size must divide by it)")
    lr: float = _f(1e-4, "AdamW learning rate (constant after warmup)")
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW betas, e.g. train.betas=0.9,0.95")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear learning-rate warmup steps (0: none)")
    grad_clip: float = _f(0.0, "clip the gradient norm to this (0: no clipping; the norm is logged either way)")
    ema_decays: tuple[float, ...] = _f((0.9999,), "EMA decays; the first one samples grids and evaluates")
    seed: int = _f(0, "seed of the model init, data order, noise and times")
    init_from: str = _f("", "start from these weights (run dir, checkpoint or .safetensors: its EMA) instead of a "
                            "random init, e.g. sCM from a flow-matching run of the same network (weights the source "
                            "lacks, such as a logvar head, keep their init); ignored on --resume")
    precision: str = _f("auto", "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or 'bf16'")
    device: str = _f("auto", "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ... (under torchrun: "
                             "cuda:LOCAL_RANK or cpu)")
    parallel: str = _f("ddp", "with several processes (torchrun): 'ddp' (replicated weights) or 'fsdp' (FSDP2, "
                              "weights / optimizer / EMA sharded per DiT block); ignored in one process")
    cuda_graphs: bool = _f(False, "replay the training call (forward + JVP + backward) from CUDA graphs: CUDA, one "
                                  "process or DDP (not FSDP); removes the host overhead of small models "
                                  "(meanflow/training/cuda_graphs.py)")
    compile: bool = _f(False, "torch.compile the model (fullgraph): the whole model in one process and under DDP, "
                              "each block under FSDP2 (meanflow/training/compile.py)")
    compile_mode: str = _f("default", "torch.compile mode with train.compile: default | max-autotune-no-cudagraphs | "
                                      "reduce-overhead (CUDA graphs; not with FSDP) | max-autotune")
    compile_backend: str = _f("inductor", "torch.compile backend with train.compile: inductor | aot_eager | eager "
                                          "(the last two for debugging and CPU tests)")
    threads: int = _f(0, "CPU threads (0: auto = cores not busy with other processes); the count a run used is saved "
                         "in its checkpoints and reused by --resume unless this is set (bit-exact resume needs the "
                         "same count)")
    log_every: int = _f(50, "steps between metrics.jsonl lines")
    sample_every: int = _f(0, "steps between sample grids (0: only at the end)")
    ckpt_every: int = _f(0, "steps between checkpoints (0: none by step count; see ckpt_minutes)")
    ckpt_minutes: float = _f(5.0, "minutes between checkpoints (0: none by time); SIGINT / SIGTERM also checkpoint "
                                  "the step they interrupt, and the end of a run always does")
    keep_ckpts: int = _f(2, "checkpoints kept on disk, the newest ones (0: all)")
    grid_size: int = _f(0, "samples per grid (0: 10 per class for <= 10 classes, else 64)")
    progress: bool = _f(True, "show a tqdm progress bar")


@dataclass
class EvalConfig:
    enabled: bool = _f(True, "evaluate at the end of training")
    num_samples: int = _f(1000, "generated samples per evaluation (per step count)")
    steps: tuple[int, ...] = _f((1, 2), "sampling step counts to evaluate")
    batch_size: int = _f(250, "sampling batch size")
    sw_projections: int = _f(1024, "random projections of the sliced Wasserstein distance (toys)")
    inception: str = _f("", "TorchScript Inception feature extractor for FID (e.g. pt_inception-2015-12-05.pt); "
                            "also $MEANFLOW_INCEPTION")
    fid_ref: str = _f("", ".npz with reference FID statistics (mu, sigma); empty: computed from the dataset")
    seed: int = _f(1234, "seed of the evaluation noise and labels")


@dataclass
class RunConfig:
    preset: str = _f("", "the preset this run started from")
    description: str = _f("", "one line about the run")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: ObjectiveConfigs = field(default_factory=MeanFlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """Inverse of to_dict (checkpoints store the dict); unknown keys are errors, missing ones take defaults."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            if f.name == "loss":
                kwargs[f.name] = _loss_from_dict(value)
            else:
                kwargs[f.name] = _section_from_dict(_section_types()[f.name], value, f.name) \
                    if f.name in _section_types() else value
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _section_types() -> dict[str, type]:
    return {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _loss_from_dict(d: dict):
    """The loss section: the config class of its 'objective' (MeanFlow when absent: configs saved before objectives)."""
    cls = CONFIGS.get(d.get("objective", "meanflow"))
    if cls is None:
        return config_from_dict(d)  # raises: unknown objective
    hints = typing.get_type_hints(cls)
    return config_from_dict({k: _coerce_loaded(v, hints[k]) if k in hints else v for k, v in d.items()})


# Help lines for the core's MeanFlowConfig fields (that dataclass documents them in comments only).
def field_help(section_cls: type, f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _section_from_dict(cls: type, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in config section {where!r}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce_loaded(v, hints[k]) for k, v in d.items()})


def _coerce_loaded(value, tp):
    """JSON / checkpoints turn tuples into lists; give tuples back so configs compare equal after a round trip."""
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


# ------------------------------------------------------------------------------------------------ --set key=value
def valid_keys(cfg: RunConfig) -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
        else:
            keys.append(f.name)
    return keys


def parse_value(text: str, tp, key: str):
    """Parse a command-line string by the declared type (bool, int, float, str, tuples, Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(text, inner[0], key)
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").replace(" ", "").split(",") if p]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(p, args[0], key) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"{key} takes {len(args)} comma-separated values; got {text!r}")
        return tuple(parse_value(p, a, key) for p, a in zip(parts, args))
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} takes a boolean (true/false); got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{key} takes {'an integer' if tp is int else 'a number'}; got {text!r}") from None
    return text


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A new RunConfig with each 'section.key=value' applied; sections re-validate through their constructors."""
    cfg = RunConfig.from_dict(cfg.to_dict())  # a deep copy
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set takes key=value (e.g. train.steps=100); got {item!r}")
    # the objective first: its knobs are only keys once the loss section is its config
    overrides = sorted(overrides, key=lambda item: item.split("=", 1)[0].strip() != "loss.objective")
    for item in overrides:
        key, text = item.split("=", 1)
        key = key.strip()
        if key == "loss.objective":
            if text.strip() != cfg.loss.objective:
                cfg.loss = default_config(text.strip())  # the new objective's defaults (its official settings)
            continue
        if key not in valid_keys(cfg):
            raise ValueError(_unknown_key_message(cfg, key))
        if "." not in key:
            setattr(cfg, key, text)
            continue
        section_name, name = key.split(".", 1)
        section = getattr(cfg, section_name)
        value = parse_value(text, typing.get_type_hints(type(section))[name], key)
        check_field(key, value)
        # dataclasses.replace re-runs __post_init__, so the section (e.g. the objective's config) validates the value
        setattr(cfg, section_name, dataclasses.replace(section, **{name: value}))
    return cfg


def _unknown_key_message(cfg: RunConfig, key: str) -> str:
    if key.startswith("loss."):
        name = key.split(".", 1)[1]
        owners = [obj for obj, cls in CONFIGS.items() if name in {f.name for f in dataclasses.fields(cls)}]
        if owners:
            return (f"{key} is a knob of objective {' / '.join(owners)}; this run's objective is "
                    f"{cfg.loss.objective!r} (set loss.objective={owners[0]} as well)")
    import difflib

    keys = valid_keys(cfg)
    tail = key.rsplit(".", 1)[-1]
    # a right field in the wrong section (train.hidden) or with its section left out (steps); else a misspelling
    close = [k for k in keys if k.rsplit(".", 1)[-1] == tail][:3] or difflib.get_close_matches(key, keys, n=3,
                                                                                               cutoff=0.75)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint} (`meanflow train --help-config` lists every key with its value)"


def describe_config(cfg: RunConfig) -> str:
    """Every field as 'key = value  # help', section by section (for --help-config)."""
    lines = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            lines.append(f"{f.name} = {section!r}  # {field_help(RunConfig, f)}")
            continue
        lines.append(f"[{f.name}]")
        for g in dataclasses.fields(section):
            value = getattr(section, g.name)
            lines.append(f"  {f.name}.{g.name} = {_show(value)}  # {field_help(type(section), g)}")
    return "\n".join(lines)


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)
