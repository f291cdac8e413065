"""How the protocol's call u(z, t, h | y) maps onto diffusers transformers (meanflow.models.wrapped.wrap uses these).

    adapter = adapter_for(diffusers_model)                # the adapter of its class (ADAPTERS)
    u = adapter(diffusers_model, z, t, h, y)              # the module's own call, in its own conventions
    model = build_diffusers("DiTTransformer2DModel", {"num_layers": 2}, data_shape=(1, 32, 32), num_classes=10)

Conventions, per class (ADAPTERS):
- time: the engine's t in [0, 1] (1 = noise) becomes the module's timestep `time_scale * t`: 1000 for DiT / SD3 /
  PixArt / Wan (timesteps in [0, 1000), high = noise), 1 for Flux (which multiplies by 1000 itself);
- h = t - r and iMF's conditions are added to the module's time embedding (its TimestepEmbedding modules named
  timestep_embedder / time_embedder) by zero-initialised embedders (meanflow.models.wrapped): the wrapped model starts
  as the original one;
- labels: DiT takes them as `class_labels` (label y = num_classes is the null class: diffusers' LabelEmbedding has that
  row when built with class_dropout_prob > 0, and its own random label dropout is switched off here because the
  objectives drop labels themselves); the text-conditioned models (SD3, Flux, Wan, PixArt) get `text_tokens` learned
  tokens per label (and a learned pooled vector where the model takes one) as `encoder_hidden_states`, one shared set
  when unconditional;
- layout: images (B, C, H, W) as they are (DiT, SD3, PixArt), packed into 2x2 patches of tokens for Flux (its
  in_channels is 4 C), as one-frame videos (B, C, 1, H, W) for Wan when the data are images;
- output: `return_dict=False`, the first element; its first C channels when the model predicts 2 C (learned sigma).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

TIME_EMBEDDER_NAMES = ("timestep_embedder", "time_embedder")


@dataclass(frozen=True)
class Convention:
    time_scale: float
    labels: str          # "class": class_labels=y; "text": learned tokens as encoder_hidden_states
    layout: str          # "image", "packed" (Flux), "video" (Wan)
    text_width: str = ""          # the config key of the text width
    pooled_width: str = ""        # the config key of the pooled-projection width ("" if none)


CONVENTIONS: dict[str, Convention] = {
    "DiTTransformer2DModel": Convention(1000.0, "class", "image"),
    "SD3Transformer2DModel": Convention(1000.0, "text", "image", "joint_attention_dim", "pooled_projection_dim"),
    "FluxTransformer2DModel": Convention(1.0, "text", "packed", "joint_attention_dim", "pooled_projection_dim"),
    "WanTransformer3DModel": Convention(1000.0, "text", "video", "text_dim"),
    "PixArtTransformer2DModel": Convention(1000.0, "text", "image", "caption_channels"),
}
ADAPTERS = tuple(CONVENTIONS)


class DiffusersAdapter(nn.Module):
    """Calls a diffusers transformer in its own conventions (module docstring). Holds the learned text tokens of the
    text-conditioned classes; h and the conditions enter through the wrapper's time-embedding hooks."""

    def __init__(self, module: nn.Module, data_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                 *, time_scale: float | None = None, text_tokens: int = 1):
        super().__init__()
        name = type(module).__name__
        if name not in CONVENTIONS:
            raise ValueError(f"no diffusers adapter for {name}; adapters exist for {list(ADAPTERS)}. Any other "
                             f"module: meanflow.models.wrap(module, call=..., data_shape=...) with your own call "
                             f"(docs/any_network.md)")
        self.convention = conv = CONVENTIONS[name]
        self.class_name = name
        cfg = module.config
        self.time_scale = float(conv.time_scale if time_scale is None else time_scale)
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0; got {time_scale}")
        self.data_shape = tuple(data_shape) if data_shape is not None else _default_data_shape(name, cfg)
        self.num_classes = _num_classes(name, module, num_classes)
        self._check_data_shape(cfg)
        if conv.labels == "class":
            _label_dropout_off(module, self.num_classes)
            self.text = self.pooled = None
        else:
            if text_tokens < 1:
                raise ValueError(f"text_tokens must be >= 1; got {text_tokens}")
            rows = self.num_classes + 1 if self.num_classes else 1
            self.text_tokens, self.text_width = text_tokens, int(cfg[conv.text_width])
            self.text = nn.Embedding(rows, text_tokens * self.text_width)
            nn.init.normal_(self.text.weight, std=0.02)
            self.pooled = nn.Embedding(rows, int(cfg[conv.pooled_width])) if conv.pooled_width else None
            if self.pooled is not None:
                nn.init.normal_(self.pooled.weight, std=0.02)

    def time_embedders(self, module: nn.Module) -> list[nn.Module]:
        """The modules whose output is the time embedding (h and the conditions are added there)."""
        found = [m for name, m in module.named_modules()
                 if type(m).__name__ == "TimestepEmbedding" and name.rsplit(".", 1)[-1] in TIME_EMBEDDER_NAMES]
        if not found:
            raise ValueError(f"{self.class_name}: no TimestepEmbedding named {TIME_EMBEDDER_NAMES} found")
        return found

    def shard_units(self, module: nn.Module) -> list[nn.Module]:
        """The blocks FSDP2 may shard one by one: each module of the block lists, except a block whose parts the
        root calls outside the block's forward (DiT's final layer takes block 0's time / label embedder), which
        stays with the root."""
        units = []
        for name in ("transformer_blocks", "single_transformer_blocks", "blocks"):
            found = getattr(module, name, None)
            if isinstance(found, nn.ModuleList):
                units += list(found)[1:] if (name, self.class_name) == ("transformer_blocks",
                                                                          "DiTTransformer2DModel") else list(found)
        return units

    # --------------------------------------------------------------------------------------------- the call
    def forward(self, module: nn.Module, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, y, **conditions):
        timestep = t * self.time_scale
        layout = self.convention.layout
        if self.convention.labels == "class":
            labels = y if y is not None else torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
            out = module(z, timestep=timestep, class_labels=labels, return_dict=False)[0]
            return self._first_channels(out, z)
        text, pooled = self._text(y, z)
        if self.class_name == "SD3Transformer2DModel":
            out = module(z, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
                         return_dict=False)[0]
        elif self.class_name == "PixArtTransformer2DModel":
            out = module(z, encoder_hidden_states=text, timestep=timestep,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        elif layout == "packed":
            out = self._flux(module, z, text, pooled, timestep)
        else:   # video
            video = z if z.dim() == 5 else z[:, :, None]
            out = module(video, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
            out = out if z.dim() == 5 else out[:, :, 0]
        return self._first_channels(out, z)

    def _text(self, y, z):
        rows = y if (y is not None and self.num_classes) else torch.zeros(z.shape[0], dtype=torch.long,
                                                                           device=z.device)
        text = self.text(rows).reshape(z.shape[0], self.text_tokens, self.text_width).to(z.dtype)
        pooled = self.pooled(rows).to(z.dtype) if self.pooled is not None else None
        return text, pooled

    def _flux(self, module, z, text, pooled, timestep):
        """Flux on images: 2x2 patches as tokens (its in_channels = 4 C), RoPE ids [0, row, col] / zeros for text."""
        b, c, hh, ww = z.shape
        tokens = z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, hh * ww // 4, c * 4)
        rows, cols = torch.meshgrid(torch.arange(hh // 2, device=z.device), torch.arange(ww // 2, device=z.device),
                                    indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(z.dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=z.device, dtype=z.dtype)
        guidance = torch.ones_like(timestep) if module.config.get("guidance_embeds", False) else None
        out = module(tokens, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return out.reshape(b, hh // 2, ww // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)

    @staticmethod
    def _first_channels(out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """A model that predicts 2 C channels (learned sigma): its first C, the velocity / noise prediction."""
        c = z.shape[1]
        if out.shape[1] == 2 * c and out.shape[2:] == z.shape[2:]:
            return out[:, :c]
        return out

    def _check_data_shape(self, cfg) -> None:
        shape, layout = self.data_shape, self.convention.layout
        need = {"image": (3,), "packed": (3,), "video": (3, 4)}[layout]
        if len(shape) not in need:
            raise ValueError(f"{self.class_name} takes data of {' or '.join(f'{n}-D' for n in need)} samples; got "
                             f"data_shape {shape}")
        c = shape[0]
        expected_in = 4 * c if layout == "packed" else c
        if int(cfg["in_channels"]) != expected_in:
            how = " (2x2 patches packed as tokens)" if layout == "packed" else ""
            raise ValueError(f"{self.class_name}: in_channels = {cfg['in_channels']} does not fit data of {c} "
                             f"channels: expected {expected_in}{how}")
        if layout == "packed" and (shape[1] % 2 or shape[2] % 2):
            raise ValueError(f"FluxTransformer2DModel on images packs 2x2 patches: height and width must be even; "
                             f"got {shape}")


def adapter_for(module: nn.Module, data_shape=None, num_classes=None, **options) -> DiffusersAdapter:
    return DiffusersAdapter(module, data_shape, num_classes, **options)


def _default_data_shape(name: str, cfg) -> tuple[int, ...]:
    c = int(cfg["in_channels"])
    if name == "FluxTransformer2DModel" or name == "WanTransformer3DModel":
        raise ValueError(f"{name} does not say its image size: pass data_shape (e.g. (C, H, W))")
    size = cfg["sample_size"]
    return (c, size, size) if isinstance(size, int) else (c, *size)


def _num_classes(name: str, module: nn.Module, num_classes: int | None) -> int:
    if CONVENTIONS[name].labels == "class":
        model_classes = int(module.config["num_embeds_ada_norm"])
        return model_classes if num_classes is None else int(num_classes)
    return int(num_classes or 0)


def _label_dropout_off(module: nn.Module, num_classes: int) -> None:
    """diffusers' LabelEmbedding drops labels at random in training mode: off (the objectives drop labels, with the
    null class = num_classes, the row diffusers adds when its dropout is > 0)."""
    for m in module.modules():
        if type(m).__name__ != "LabelEmbedding":
            continue
        if num_classes and m.embedding_table.num_embeddings < num_classes + 1:
            raise ValueError(f"the model's label embedding has {m.embedding_table.num_embeddings} rows; "
                             f"{num_classes} classes need {num_classes + 1} (the null class): build the model with "
                             f"class_dropout_prob > 0 (diffusers adds the null row only then)")
        m.dropout_prob = 0.0


# ================================================================================================ building
def load_config(text: str) -> dict[str, Any]:
    """model.config: a JSON file, or an inline JSON object ('{"num_layers": 2}'); '' is {}."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        return json.loads(text)
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"model.config must be a JSON file or an inline JSON object; {text!r} is neither")
    return json.loads(path.read_text())


def build_diffusers(class_name: str, config: dict, *, data_shape: tuple[int, ...], num_classes: int,
                    overrides: dict | None = None) -> nn.Module:
    """A diffusers transformer of `class_name` with `config`, sized by `overrides` (num_layers, num_attention_heads,
    attention_head_dim, patch_size) and fitted to the data (in / out channels, sample size, label count)."""
    import diffusers

    if class_name not in CONVENTIONS:
        raise ValueError(f"model.arch=diffusers:{class_name}: no adapter for it; adapters exist for {list(ADAPTERS)}")
    cls = getattr(diffusers, class_name)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}   # saved configs carry _class_name etc.
    cfg.update(overrides or {})
    c = data_shape[0]
    layout = CONVENTIONS[class_name].layout
    cfg["in_channels"] = 4 * c if layout == "packed" else c
    if class_name == "DiTTransformer2DModel":
        _square(class_name, data_shape)
        cfg["sample_size"], cfg["out_channels"] = data_shape[1], None
        cfg["num_embeds_ada_norm"] = max(num_classes, 1)
    elif class_name in ("SD3Transformer2DModel", "PixArtTransformer2DModel"):
        _square(class_name, data_shape)
        cfg["sample_size"], cfg["out_channels"] = data_shape[1], c
        if class_name == "SD3Transformer2DModel":
            patch = cfg.get("patch_size", 2)
            cfg["pos_embed_max_size"] = max(cfg.get("pos_embed_max_size", 96), data_shape[1] // patch)
    elif class_name == "WanTransformer3DModel":
        cfg["out_channels"] = c
    return cls(**cfg)


def _square(name: str, shape) -> None:
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"{name} takes square images (C, S, S) here (sample_size); got data of shape {shape}")


def size_overrides(class_name: str, *, hidden: int, depth: int, heads: int, patch: int, config: dict) -> dict:
    """model.hidden / depth / heads / patch (when > 0) as the class's config keys."""
    out: dict[str, Any] = {}
    if depth:
        out["num_layers"] = depth
    if heads:
        out["num_attention_heads"] = heads
    if hidden:
        n = heads or config.get("num_attention_heads")
        if not n or hidden % n:
            raise ValueError(f"model.hidden = {hidden} must divide by the attention heads ({n}); set model.heads")
        out["attention_head_dim"] = hidden // n
        if class_name == "SD3Transformer2DModel":
            out["caption_projection_dim"] = hidden
    if patch:
        if class_name == "WanTransformer3DModel":
            out["patch_size"] = (1, patch, patch)
        elif class_name == "FluxTransformer2DModel":
            raise ValueError("model.patch: Flux packs 2x2 patches itself (patch_size 1); leave model.patch at 0")
        else:
            out["patch_size"] = patch
    return out


__all__ = ["ADAPTERS", "CONVENTIONS", "DiffusersAdapter", "adapter_for", "build_diffusers", "load_config",
           "size_overrides"]
