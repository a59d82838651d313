"""Architectures described by OpenAI, OpenCLIP and Hugging Face files, as `CLIPConfig` and back.

    config = infer_config(state, act="quick_gelu")     # clipforge-named tensors, no config file
    config = config_from_hf(json_of_config, json_of_preprocessor, path)  # CLIPModel or SiglipModel
    open_clip_config_json = config_to_openclip(config)

Chinese-CLIP's ``ChineseCLIPModel`` (``model_type`` "chinese_clip": CLIP's ViT, a BERT text tower)
is read and written here as well; OpenCLIP has no such model.  SigLIP's files are read here too:
Hugging Face's ``SiglipModel`` (``model_type`` "siglip", which
SigLIP 2's fixed-resolution repositories also publish), ``Siglip2Model`` (``model_type`` "siglip2":
SigLIP 2's NaFlex models, whose grid of learned positions and patch budget become the
`VisionConfig`'s ``image_size`` and ``max_num_patches``) and OpenCLIP's ``ViT-*-SigLIP*`` configs,
whose image tower is a timm model known by name only (``timm_model_name``): its shapes come from
`TIMM_SIGLIP_TOWERS`, the towers timm registers for the released models.

A file without a config (OpenAI's releases, bare OpenCLIP state dicts) is described by its tensor
shapes, as OpenAI's ``build_model`` reads them (64-wide heads, except for a ViT shaped as one of
the presets, which takes that preset's heads); Hugging Face's and OpenCLIP's configs are
translated both ways, with their own defaults for absent keys.  An option clipforge's model
cannot express is a CheckpointError, never silently dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipforge.checkpoints._errors import CheckpointError
from clipforge.loss import CLIP_INIT_SCALE, SIGLIP_INIT_BIAS, SIGLIP_INIT_SCALE
from clipforge.model.config import (
    OPENAI_CONTEXT_LENGTH,
    OPENAI_VOCAB_SIZE,
    PRESETS,
    SIGLIP_CONTEXT_LENGTH,
    SIGLIP_MEAN,
    SIGLIP_STD,
    SIGLIP_VOCAB_SIZE,
    CLIPConfig,
    TextConfig,
    VisionConfig,
)
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

__all__ = [
    "HF_MODEL_TYPES", "NAFLEX_NOT_IN_OPENCLIP", "TIMM_SIGLIP_TOWERS", "config_from_hf", "config_from_openclip",
    "config_to_hf",
    "config_to_openclip", "infer_config", "preprocess_from_openclip", "timm_siglip_name",
]

# The Hugging Face model types read here: CLIPModel's, SiglipModel's, Siglip2Model's and ChineseCLIPModel's
# config.json (transformers' ChineseCLIPConfig.model_type is "chinese_clip", with an underscore).
HF_MODEL_TYPES = ("clip", "siglip", "siglip2", "chinese_clip")
# open_clip 3.3 has no NaFlex model (no model_config takes images at their own aspect ratio).
NAFLEX_NOT_IN_OPENCLIP = ("OpenCLIP has no SigLIP 2 NaFlex (variable-resolution) model; convert it to 'hf' "
                          "or 'clipforge' instead")


# ----------------------------------------------------------------------------- from tensor shapes
# BERT's LayerNorm eps (Chinese-CLIP's text tower; transformers' ChineseCLIPTextConfig), which no tensor shows.
_BERT_EPS = 1e-12
# SigLIP's LayerNorms (big_vision, transformers' SiglipConfig, timm's and OpenCLIP's SigLIP models);
# no tensor shows an eps, and every released SigLIP uses this one.
_SIGLIP_EPS = 1e-6


def _count_blocks(state: dict[str, Tensor], pattern: str) -> int:
    found = {m.group(1) for k in state if (m := re.match(pattern, k))}
    return len(found)


def _heads(width: int, what: str, path: Path) -> int:
    if width % 64:  # OpenAI's build_model: heads = width // 64
        raise CheckpointError(
            f"{path}: cannot infer the number of {what} heads from width {width} (not a multiple of 64); "
            "supply a config"
        )
    return width // 64


def _vit_heads(width: int, layers: int, patch: int, mlp_width: int, path: Path, pool: str = "class") -> int:
    """The heads of a ViT image tower known only by its shapes.

    OpenCLIP's larger ViTs have wider heads than OpenAI's 64 (ViT-H/14: 80, ViT-g/14: 88,
    ViT-bigG/14: 104; SigLIP's So400m: 72), which no tensor shape shows: a tower shaped as a
    preset's takes that preset's heads, any other one 64-wide heads.
    """
    for preset in PRESETS.values():
        v = preset.vision
        if not v.is_resnet and v.pool == pool and (v.width, v.layers, v.patch_size, v.mlp_width) == (
            width, layers, patch, mlp_width
        ):
            return v.heads
    return _heads(width, "vision", path)


def _text_heads(width: int, layers: int, mlp_width: int, pool: str, path: Path) -> int:
    """The heads of a text tower known only by its shapes: a preset's if shaped as one (SigLIP's
    So400m text tower: 16 of 72), else 64-wide, as OpenAI's ``build_model``."""
    for preset in PRESETS.values():
        t = preset.text
        if t.pool == pool and (t.width, t.layers, t.mlp_width) == (width, layers, mlp_width):
            return t.heads
    return _heads(width, "text", path)


def _shape(state: dict[str, Tensor], key: str, path: Path) -> torch.Size:
    if key not in state:
        raise CheckpointError(f"{path}: missing tensor {key!r}, needed to infer the architecture")
    return state[key].shape


def infer_config(state: dict[str, Tensor], *, act: str = "gelu", path: str | Path = "<state dict>") -> CLIPConfig:
    """The architecture of a clipforge-named state dict, read off its tensor shapes."""
    path = Path(path)
    if "visual.attn_pool.probe" in state:  # SigLIP's ViT
        width, _, patch, _ = _shape(state, "visual.conv1.weight", path)
        grid = round(_shape(state, "visual.positional_embedding", path)[0] ** 0.5)
        layers = _count_blocks(state, r"visual\.transformer\.resblocks\.(\d+)\.")
        mlp_width = _shape(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", path)[0]
        vision = VisionConfig(
            image_size=patch * grid,
            patch_size=patch,
            width=width,
            layers=layers,
            heads=_vit_heads(width, layers, patch, mlp_width, path, pool="map"),
            mlp_ratio=mlp_width / width,
            act=act,
            layer_norm_eps=_SIGLIP_EPS,
            mean=SIGLIP_MEAN,
            std=SIGLIP_STD,
            pool="map",
        )
    elif "visual.proj" in state:  # Vision Transformer
        width, _, patch, _ = _shape(state, "visual.conv1.weight", path)
        grid = round((_shape(state, "visual.positional_embedding", path)[0] - 1) ** 0.5)
        layers = _count_blocks(state, r"visual\.transformer\.resblocks\.(\d+)\.")
        mlp_width = _shape(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", path)[0]
        vision = VisionConfig(
            image_size=patch * grid,
            patch_size=patch,
            width=width,
            layers=layers,
            heads=_vit_heads(width, layers, patch, mlp_width, path),
            mlp_ratio=mlp_width / width,
            act=act,
        )
    else:  # modified ResNet
        width = _shape(state, "visual.layer1.0.conv1.weight", path)[0]
        spatial = round((_shape(state, "visual.attnpool.positional_embedding", path)[0] - 1) ** 0.5)
        vision = VisionConfig(
            image_size=spatial * 32,
            patch_size=None,
            width=width,
            layers=tuple(_count_blocks(state, rf"visual\.layer{i}\.(\d+)\.") for i in (1, 2, 3, 4)),
            heads=_heads(width * 32, "attention-pool", path),
            act=act,
        )
    if "text.token_type_embedding" in state:  # BERT: Chinese-CLIP's text tower
        return _bert_infer(state, vision, path)
    text_width = _shape(state, "text.ln_final.weight", path)[0]
    siglip_text = "text.text_projection.weight" in state  # a linear head: SigLIP's text tower
    text_layers = _count_blocks(state, r"text\.transformer\.resblocks\.(\d+)\.")
    text_mlp = _shape(state, "text.transformer.resblocks.0.mlp.c_fc.weight", path)[0]
    pool = "last" if siglip_text else "eot"
    text = TextConfig(
        context_length=_shape(state, "text.positional_embedding", path)[0],
        vocab_size=_shape(state, "text.token_embedding.weight", path)[0],
        width=text_width,
        heads=_text_heads(text_width, text_layers, text_mlp, pool, path),
        layers=text_layers,
        mlp_ratio=text_mlp / text_width,
        act=act,
        layer_norm_eps=_SIGLIP_EPS if siglip_text else 1e-5,
        pool=pool,
    )
    if siglip_text:
        embed_dim = _shape(state, "text.text_projection.weight", path)[0]
    else:
        embed_dim = _shape(state, "text.text_projection", path)[1]
    bias = state.get("logit_scale.bias")
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=vision,
        text=text,
        init_logit_scale=SIGLIP_INIT_SCALE if vision.pool == "map" else CLIP_INIT_SCALE,
        init_logit_bias=None if bias is None else float(bias),
    )


def _bert_infer(state: dict[str, Tensor], vision: VisionConfig, path: Path) -> CLIPConfig:
    """A Chinese-CLIP state dict's architecture: ``vision`` read as CLIP's, BERT's text tower off its shapes."""
    width = _shape(state, "text.ln_embed.weight", path)[0]
    layers = _count_blocks(state, r"text\.transformer\.resblocks\.(\d+)\.")
    mlp_width = _shape(state, "text.transformer.resblocks.0.mlp.c_fc.weight", path)[0]
    text = TextConfig(
        context_length=_shape(state, "text.positional_embedding", path)[0],
        vocab_size=_shape(state, "text.token_embedding.weight", path)[0],
        width=width,
        heads=_text_heads(width, layers, mlp_width, "cls", path),
        layers=layers,
        mlp_ratio=mlp_width / width,
        layer_norm_eps=_BERT_EPS,
        pool="cls",
        token_types=_shape(state, "text.token_type_embedding", path)[0],
    )
    return CLIPConfig(embed_dim=_shape(state, "text.text_projection", path)[1], vision=vision, text=text)


# ----------------------------------------------------------------------------- Hugging Face
# Hugging Face's defaults (CLIPTextConfig, CLIPVisionConfig) for the keys a config.json may omit: the
# shapes of OpenAI's ViT-B/32, its vocabulary included.
_HF_TEXT_DEFAULTS = {
    "vocab_size": OPENAI_VOCAB_SIZE, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": OPENAI_CONTEXT_LENGTH, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_HF_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
_HF_LOGIT_SCALE_INIT = 2.6592  # CLIPConfig.logit_scale_init_value's default, ~log(1/0.07)


# transformers' activation names (ACT2FN) for clipforge's; "gelu_new" computes the same tanh
# approximation by its formula, equal to PyTorch's within rounding.
_HF_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACT_NAMES = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _hf_act(name: Any, where: str, path: Path) -> str:
    if name not in _HF_ACTS:
        raise CheckpointError(f"{path}: {where}.hidden_act={name!r} is not supported "
                              f"(supported: {', '.join(_HF_ACTS)})")
    return _HF_ACTS[name]


def _hf_tower(c: dict[str, Any], where: str, path: Path) -> dict[str, Any]:
    """The `VisionConfig`/`TextConfig` fields both CLIPModel's and SiglipModel's tower configs give alike."""
    return {
        "width": c["hidden_size"],
        "layers": c["num_hidden_layers"],
        "heads": c["num_attention_heads"],
        "mlp_ratio": c["intermediate_size"] / c["hidden_size"],
        "act": _hf_act(c["hidden_act"], where, path),
        "layer_norm_eps": c["layer_norm_eps"],
    }


def _hf_text(t: dict[str, Any], path: Path) -> dict[str, Any]:
    return {"context_length": t["max_position_embeddings"], "vocab_size": t["vocab_size"],
            **_hf_tower(t, "text_config", path)}


def _hf_text_config(model_type: str, t: TextConfig) -> dict[str, Any]:
    """A text tower's config keys every transformers family writes alike (`_hf_text` reads them)."""
    return {"model_type": model_type, "vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": t.mlp_width, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length, "hidden_act": _HF_ACT_NAMES[t.act],
            "layer_norm_eps": t.layer_norm_eps}


def _hf_vision_config(model_type: str, v: VisionConfig) -> dict[str, Any]:
    """A ViT image tower's config keys every transformers family writes alike (`_hf_tower` reads them)."""
    return {"model_type": model_type, "hidden_size": v.width, "intermediate_size": v.mlp_width,
            "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "num_channels": 3,
            "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": _HF_ACT_NAMES[v.act],
            "layer_norm_eps": v.layer_norm_eps}


def _hf_pixels(v: VisionConfig) -> dict[str, Any]:
    """The image processors' shared last steps: RGB, scaled to [0, 1], normalised by the model's statistics."""
    return {"do_convert_rgb": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(v.mean), "image_std": list(v.std)}


def config_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None, path: Path) -> CLIPConfig:
    """A Hugging Face ``config.json`` (and ``preprocessor_config.json``) as a `CLIPConfig`:
    ``CLIPModel``'s, ``SiglipModel``'s when its ``model_type`` is "siglip", ``Siglip2Model``'s (NaFlex)
    when it is "siglip2", ``ChineseCLIPModel``'s when it is "chinese_clip"."""
    if hf.get("model_type") == "siglip":
        return _siglip_from_hf(hf, preprocessor, path)
    if hf.get("model_type") == "siglip2":
        return _siglip2_from_hf(hf, preprocessor, path)
    if hf.get("model_type") == "chinese_clip":
        return _chinese_clip_from_hf(hf, preprocessor, path)
    t = {**_HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if v["num_channels"] != 3:
        raise CheckpointError(f"{path}: vision_config.num_channels={v['num_channels']}; only RGB (3) is supported")
    pre = preprocessor or {}
    try:
        vision = VisionConfig(
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            mean=tuple(pre.get("image_mean", OPENAI_MEAN)),
            std=tuple(pre.get("image_std", OPENAI_STD)),
            **_hf_tower(v, "vision_config", path),
        )
        text = TextConfig(**_hf_text(t, path))
        return CLIPConfig(
            embed_dim=hf.get("projection_dim", 512),
            vision=vision,
            text=text,
            init_logit_scale=math.exp(hf.get("logit_scale_init_value", _HF_LOGIT_SCALE_INIT)),
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: unsupported Hugging Face CLIP config: {err}") from err


# SiglipTextConfig's and SiglipVisionConfig's defaults (transformers' configuration_siglip.py):
# SigLIP B/16 at 224 pixels with its 32,000-piece vocabulary and 64 positions.
_HF_SIGLIP_TEXT_DEFAULTS = {
    "vocab_size": SIGLIP_VOCAB_SIZE, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": SIGLIP_CONTEXT_LENGTH, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": _SIGLIP_EPS, "projection_size": None,
}
_HF_SIGLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": _SIGLIP_EPS, "vision_use_head": True,
}


def _square(value: Any, key: str, path: Path) -> Any:
    """An image or patch size given as one number or [height, width]: the number, if square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{path}: vision_config.{key}={list(value)} is not square; clipforge reads "
                                  "square images only")
        return value[0]
    return value


def _siglip_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None, path: Path) -> CLIPConfig:
    """A ``SiglipModel`` config.json as a `CLIPConfig`: both towers SigLIP's, the embedding the image width."""
    t = {**_HF_SIGLIP_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**_HF_SIGLIP_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if v["num_channels"] != 3:
        raise CheckpointError(f"{path}: vision_config.num_channels={v['num_channels']}; only RGB (3) is supported")
    if not v["vision_use_head"]:
        raise CheckpointError(f"{path}: vision_config.vision_use_head=false (no attention-pooling head) is not "
                              "supported: SiglipModel's image features come from that head")
    projection = t["projection_size"] if t["projection_size"] is not None else t["hidden_size"]
    if projection != v["hidden_size"]:
        raise CheckpointError(f"{path}: text_config.projection_size={projection} differs from "
                              f"vision_config.hidden_size={v['hidden_size']}: the two embeddings cannot be compared")
    pre = preprocessor or {}
    try:
        vision = VisionConfig(
            image_size=_square(v["image_size"], "image_size", path),
            patch_size=_square(v["patch_size"], "patch_size", path),
            mean=tuple(pre.get("image_mean", SIGLIP_MEAN)),
            std=tuple(pre.get("image_std", SIGLIP_STD)),
            pool="map",
            **_hf_tower(v, "vision_config", path),
        )
        text = TextConfig(pool="last", **_hf_text(t, path))
        # SiglipModel draws its scale and bias at random (no init value in its config): the paper's.
        return CLIPConfig(embed_dim=v["hidden_size"], vision=vision, text=text, init_logit_scale=SIGLIP_INIT_SCALE,
                          init_logit_bias=SIGLIP_INIT_BIAS)
    except ValueError as err:
        raise CheckpointError(f"{path}: unsupported Hugging Face SigLIP config: {err}") from err


def _siglip_to_hf(config: CLIPConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) for transformers' SiglipModel and SiglipImageProcessor."""
    v, t = config.vision, config.text
    if t.pool != "last":
        raise CheckpointError("Hugging Face's SiglipModel needs SigLIP's text tower (pool='last'); this model's "
                              "text tower is CLIP's")
    if config.init_logit_bias is None:
        raise CheckpointError("Hugging Face's SiglipModel needs the learned logit bias, which this model (trained "
                              "with the softmax loss) lacks; convert it to 'openclip' or 'clipforge'")
    text_config = {**_hf_text_config("siglip_text_model", t), "projection_size": config.embed_dim}
    vision_config = {**_hf_vision_config("siglip_vision_model", v), "vision_use_head": True}
    hf = {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text_config,
          "vision_config": vision_config}
    size = v.image_size
    preprocessor = {  # SiglipImageProcessor: a bicubic resize to the square, no crop (its default, Google's files)
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # bicubic, as clipforge resizes SigLIP's images
        **_hf_pixels(v),
    }
    return hf, preprocessor


# Siglip2VisionConfig's grid of learned positions (num_patches: 16 x 16) and Siglip2ImageProcessor's
# patch budget and patch side, for the keys a config may omit (transformers' configuration_siglip2.py,
# image_processing_siglip2.py); the rest of Siglip2Model's config is SiglipModel's.
_HF_SIGLIP2_NUM_PATCHES = 256
_HF_SIGLIP2_MAX_NUM_PATCHES = 256
_HF_SIGLIP2_PATCH = 16


def _siglip2_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None, path: Path) -> CLIPConfig:
    """A ``Siglip2Model`` (NaFlex) config.json as a `CLIPConfig`: SiglipModel's towers, the learned
    positions' grid as ``image_size`` (its side times the patch), the image processor's
    ``max_num_patches``."""
    v = dict(hf.get("vision_config") or {})
    num_patches = v.pop("num_patches", _HF_SIGLIP2_NUM_PATCHES)
    side = math.isqrt(num_patches) if isinstance(num_patches, int) and num_patches > 0 else 0
    if side * side != num_patches:
        raise CheckpointError(f"{path}: vision_config.num_patches={num_patches!r} is not a square grid of positions")
    patch = _square(v.get("patch_size", _HF_SIGLIP2_PATCH), "patch_size", path)
    pre = preprocessor or {}
    if pre.get("patch_size", patch) != patch:
        raise CheckpointError(f"{path}: the image processor's patch_size={pre['patch_size']!r} differs from "
                              f"vision_config.patch_size={patch!r}")
    config = _siglip_from_hf({**hf, "vision_config": {**v, "image_size": side * patch, "patch_size": patch}},
                             preprocessor, path)
    try:
        vision = replace(config.vision, max_num_patches=pre.get("max_num_patches", _HF_SIGLIP2_MAX_NUM_PATCHES))
    except ValueError as err:
        raise CheckpointError(f"{path}: unsupported Hugging Face SigLIP 2 config: {err}") from err
    return replace(config, vision=vision)


def _siglip2_to_hf(config: CLIPConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) for transformers' Siglip2Model and Siglip2ImageProcessor."""
    hf, _ = _siglip_to_hf(config)
    v = config.vision
    vision_config = {k: value for k, value in hf["vision_config"].items() if k != "image_size"}
    vision_config.update(model_type="siglip2_vision_model", num_patches=v.grid * v.grid)
    text_config = {**hf["text_config"], "model_type": "siglip2_text_model"}
    hf = {"architectures": ["Siglip2Model"], "model_type": "siglip2", "text_config": text_config,
          "vision_config": vision_config}
    preprocessor = {  # Siglip2ImageProcessor: resized to the patch budget, bilinear (its default and clipforge's)
        "image_processor_type": "Siglip2ImageProcessor",
        "do_resize": True,
        "resample": 2,
        **_hf_pixels(v),
        "patch_size": v.patch_size,
        "max_num_patches": v.max_num_patches,
    }
    return hf, preprocessor


# ChineseCLIPTextConfig's and ChineseCLIPVisionConfig's defaults (transformers' configuration_chinese_clip.py)
# for the keys a config.json may omit: BERT-base's text tower, CLIP's ViT-B/32.
_HF_BERT_DEFAULTS = {
    "vocab_size": 30522, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 512, "hidden_act": "gelu", "layer_norm_eps": _BERT_EPS,
    "pad_token_id": 0, "type_vocab_size": 2,
}
_HF_CHINESE_CLIP_VISION_DEFAULTS = {**_HF_VISION_DEFAULTS, "layer_norm_eps": 1e-5}


def _chinese_clip_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None, path: Path) -> CLIPConfig:
    """A ``ChineseCLIPModel`` config.json as a `CLIPConfig`: CLIP's ViT, BERT's text tower (pool "cls")."""
    t = {**_HF_BERT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**_HF_CHINESE_CLIP_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if v["num_channels"] != 3:
        raise CheckpointError(f"{path}: vision_config.num_channels={v['num_channels']}; only RGB (3) is supported")
    position = t.get("position_embedding_type", "absolute")
    if position != "absolute":  # older BERT configs name it; transformers' ChineseCLIP runs absolute positions only
        raise CheckpointError(f"{path}: text_config.position_embedding_type={position!r} is not supported "
                              "(ChineseCLIPModel's BERT adds absolute position embeddings)")
    pre = preprocessor or {}
    try:
        vision = VisionConfig(
            image_size=_square(v["image_size"], "image_size", path),
            patch_size=_square(v["patch_size"], "patch_size", path),
            mean=tuple(pre.get("image_mean", OPENAI_MEAN)),
            std=tuple(pre.get("image_std", OPENAI_STD)),
            **_hf_tower(v, "vision_config", path),
        )
        text = TextConfig(pool="cls", token_types=t["type_vocab_size"],
                          pad_token_id=0 if t["pad_token_id"] is None else t["pad_token_id"],
                          **_hf_text(t, path))
        return CLIPConfig(
            embed_dim=hf.get("projection_dim", 512),
            vision=vision,
            text=text,
            init_logit_scale=math.exp(hf.get("logit_scale_init_value", _HF_LOGIT_SCALE_INIT)),
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: unsupported Hugging Face Chinese-CLIP config: {err}") from err


def _chinese_clip_to_hf(config: CLIPConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) for transformers' ChineseCLIPModel and ChineseCLIPImageProcessor."""
    v, t = config.vision, config.text
    if v.is_resnet or v.pool != "class":
        raise CheckpointError("Hugging Face's ChineseCLIPModel needs CLIP's ViT image tower; this model's is "
                              + ("a ResNet" if v.is_resnet else "SigLIP's"))
    if config.init_logit_bias is not None:
        raise CheckpointError("Hugging Face's ChineseCLIPModel has no logit bias")
    text_config = {**_hf_text_config("chinese_clip_text_model", t), "type_vocab_size": t.token_types,
                   "pad_token_id": t.pad_token_id}
    vision_config = {**_hf_vision_config("chinese_clip_vision_model", v), "projection_dim": config.embed_dim}
    hf = {
        "architectures": ["ChineseCLIPModel"],
        "model_type": "chinese_clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": math.log(config.init_logit_scale),
        "text_config": text_config,
        "vision_config": vision_config,
    }
    return hf, _clip_preprocessor(v, "ChineseCLIPImageProcessor")


def config_to_hf(config: CLIPConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) for Hugging Face's CLIPModel and CLIPProcessor,
    SiglipModel and its image processor for a SigLIP image tower (Siglip2Model for a NaFlex one), or
    ChineseCLIPModel and its image processor for a BERT text tower."""
    if config.vision.naflex:
        return _siglip2_to_hf(config)
    if config.vision.pool == "map":
        return _siglip_to_hf(config)
    if config.text.pool == "cls":
        return _chinese_clip_to_hf(config)
    return _clip_to_hf(config)


def _clip_to_hf(config: CLIPConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) for Hugging Face's CLIPModel and CLIPProcessor."""
    v, t = config.vision, config.text
    if t.pool != "eot":
        raise CheckpointError("Hugging Face's CLIPModel has no SigLIP text tower; convert this model to 'openclip'")
    if v.is_resnet:
        raise CheckpointError("Hugging Face's CLIPModel has no ResNet image tower; convert ResNet models to 'openclip'")
    if config.init_logit_bias is not None:
        raise CheckpointError("Hugging Face's CLIPModel has no logit bias; convert this model to 'openclip'")
    text_config = {
        **_hf_text_config("clip_text_model", t),
        "projection_dim": config.embed_dim,
        # OpenAI's layout: start and end of text are the two largest ids, padding is 0.
        "bos_token_id": t.vocab_size - 2,
        "eos_token_id": t.vocab_size - 1,
        "pad_token_id": 0,
    }
    vision_config = {**_hf_vision_config("clip_vision_model", v), "projection_dim": config.embed_dim}
    hf = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": math.log(config.init_logit_scale),
        "text_config": text_config,
        "vision_config": vision_config,
    }
    return hf, _clip_preprocessor(v, "CLIPImageProcessor")


def _clip_preprocessor(v: VisionConfig, kind: str) -> dict[str, Any]:
    """preprocessor_config.json for CLIP's image processor (or Chinese-CLIP's, the same steps): clipforge's."""
    size = v.image_size
    return {
        "image_processor_type": kind,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        **_hf_pixels(v),
    }


# ----------------------------------------------------------------------------- OpenCLIP
# OpenCLIP options clipforge reads; any other one must be off (these values), else the model differs.
_OPENCLIP_USED = {
    "model_cfg": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"},
    "vision_cfg": {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "norm_kwargs"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs"},
}
_OPENCLIP_OFF = (None, False, 0, 0.0, "", "learnable", "tok", "argmax", "linear", "default", {})
# Options that do not change inference: tokenizer settings and training-only patch dropout.
_OPENCLIP_IGNORED = {"hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode", "patch_dropout", "output_tokens",
                     "pad_id", "eos_id", "custom_text", "cast_dtype", "output_dict"}


def _check_openclip_options(cfg: dict[str, Any], where: str, path: Path,
                            used: dict[str, set[str]] = _OPENCLIP_USED) -> None:
    for key, value in cfg.items():
        if key in used[where] or key in _OPENCLIP_IGNORED:
            continue
        if not any(value == off and type(value) is type(off) for off in _OPENCLIP_OFF):
            raise CheckpointError(f"{path}: OpenCLIP option {where}.{key}={value!r} is not supported")


def config_from_openclip(data: dict[str, Any], path: Path) -> CLIPConfig:
    """An OpenCLIP ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) as a `CLIPConfig`.

    Absent keys take OpenCLIP's defaults (``CLIPVisionCfg``, ``CLIPTextCfg`` and ``CLIP`` in
    open_clip/model.py): OpenAI's vocabulary, pixel statistics and initial temperature.
    """
    model, pre = data.get("model_cfg", data), data.get("preprocess_cfg", {})
    vc, tc = model.get("vision_cfg", {}), model.get("text_cfg", {})
    if vc.get("timm_model_name"):
        return _siglip_from_openclip(model, pre, path)
    for cfg, where in ((model, "model_cfg"), (vc, "vision_cfg"), (tc, "text_cfg")):
        _check_openclip_options(cfg, where, path)
    act = "quick_gelu" if model.get("quick_gelu") else "gelu"
    resnet = isinstance(vc.get("layers", 12), (list, tuple))
    width, head_width = vc.get("width", 768), vc.get("head_width", 64)
    try:
        vision = VisionConfig(
            image_size=vc.get("image_size", 224),
            patch_size=None if resnet else vc.get("patch_size", 16),
            width=width,
            layers=tuple(vc["layers"]) if resnet else vc.get("layers", 12),
            heads=(width * 32 if resnet else width) // head_width,  # OpenCLIP gives the head width
            mlp_ratio=vc.get("mlp_ratio", 4.0),
            act=act,
            layer_norm_eps=(vc.get("norm_kwargs") or {}).get("eps", 1e-5),
            mean=tuple(pre.get("mean", OPENAI_MEAN)),
            std=tuple(pre.get("std", OPENAI_STD)),
        )
        text = TextConfig(
            context_length=tc.get("context_length", OPENAI_CONTEXT_LENGTH),
            vocab_size=tc.get("vocab_size", OPENAI_VOCAB_SIZE),
            width=tc.get("width", 512),
            heads=tc.get("heads", 8),
            layers=tc.get("layers", 12),
            mlp_ratio=tc.get("mlp_ratio", 4.0),
            act=act,
            layer_norm_eps=(tc.get("norm_kwargs") or {}).get("eps", 1e-5),
        )
        return CLIPConfig(
            embed_dim=model.get("embed_dim", 512),
            vision=vision,
            text=text,
            init_logit_scale=math.exp(model.get("init_logit_scale", math.log(CLIP_INIT_SCALE))),
            init_logit_bias=model.get("init_logit_bias"),
        )
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: unsupported OpenCLIP config: {err}") from err


def preprocess_from_openclip(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The image geometry of an ``open_clip_config.json``'s ``preprocess_cfg`` (the statistics are
    in `config_from_openclip`): `clipforge.transforms.image_transform`'s ``resize_mode``,
    ``interpolation`` and ``fill``, with OpenCLIP's defaults (``PreprocessCfg`` in
    open_clip/transform.py).  As there, any interpolation but "bilinear" evaluates bicubic."""
    pre = data.get("preprocess_cfg", {})
    resize_mode, interpolation, fill = (pre.get("resize_mode", "shortest"), pre.get("interpolation", "bicubic"),
                                        pre.get("fill_color", 0))
    for key, value, kind in (("resize_mode", resize_mode, str), ("interpolation", interpolation, str),
                             ("fill_color", fill, int)):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: preprocess_cfg.{key} must be a {kind.__name__}, got {value!r}")
    return {"resize_mode": resize_mode, "interpolation": "bilinear" if interpolation == "bilinear" else "bicubic",
            "fill": fill}


def config_to_openclip(config: CLIPConfig) -> dict[str, Any]:
    """``open_clip_config.json`` contents: OpenCLIP's ``model_cfg`` and ``preprocess_cfg``."""
    v, t = config.vision, config.text
    if t.pool == "cls":
        raise CheckpointError("OpenCLIP has no Chinese-CLIP model (a BERT text tower); convert it to 'hf' or "
                              "'clipforge' instead")
    if v.naflex:
        raise CheckpointError(NAFLEX_NOT_IN_OPENCLIP)
    if v.pool == "map":
        return _siglip_to_openclip(config)
    if t.pool != "eot":
        raise CheckpointError("OpenCLIP has no SigLIP text tower beside a CLIP image tower")
    if v.act != t.act:
        raise CheckpointError(f"OpenCLIP has one activation for both towers; this model has {v.act!r} and {t.act!r}")
    vision_cfg: dict[str, Any] = {
        "image_size": v.image_size,
        "layers": list(v.layers) if v.is_resnet else v.layers,
        "width": v.width,
        "patch_size": v.patch_size,
        "head_width": (v.width * 32 if v.is_resnet else v.width) // v.heads,
        "mlp_ratio": v.mlp_ratio,
    }
    text_cfg: dict[str, Any] = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": t.mlp_ratio,
    }
    for cfg, eps in ((vision_cfg, v.layer_norm_eps), (text_cfg, t.layer_norm_eps)):
        if eps != 1e-5:
            cfg["norm_kwargs"] = {"eps": eps}
    model_cfg: dict[str, Any] = {
        "embed_dim": config.embed_dim,
        "quick_gelu": v.act == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        "init_logit_scale": math.log(config.init_logit_scale),  # OpenCLIP takes its logarithm
    }
    if config.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = config.init_logit_bias
    return {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(v.mean), "std": list(v.std)}}


# ----------------------------------------------------------------------------- OpenCLIP's SigLIP (timm)
def _timm_siglip_towers() -> dict[str, tuple[int, int, int, int, int, float, str]]:
    """timm's SigLIP image towers by name: (image size, patch, width, depth, heads, mlp_ratio, activation).

    From timm's models/vision_transformer.py (``vit_*_siglip_*``, ``class_token=False``,
    ``global_pool="map"``, LayerNorm eps 1e-6).  OpenCLIP builds them by name at the name's own
    resolution.  The towers first released with SigLIP keep timm's default exact GELU; those
    added for SigLIP 2 (B/32, L/16 at 512, So400m/16, giant-opt) use the tanh GELU.
    """
    families = (  # name stem, patch, width, depth, heads, mlp_ratio, {resolution: activation}
        ("vit_base_patch16_siglip", 16, 768, 12, 12, 4.0, {224: "gelu", 256: "gelu", 384: "gelu", 512: "gelu"}),
        ("vit_base_patch32_siglip", 32, 768, 12, 12, 4.0, {256: "gelu_tanh"}),
        ("vit_large_patch16_siglip", 16, 1024, 24, 16, 4.0, {256: "gelu", 384: "gelu", 512: "gelu_tanh"}),
        ("vit_so400m_patch14_siglip", 14, 1152, 27, 16, 3.7362, {224: "gelu", 378: "gelu", 384: "gelu"}),
        ("vit_so400m_patch16_siglip", 16, 1152, 27, 16, 3.7362, {256: "gelu_tanh", 384: "gelu_tanh",
                                                                 512: "gelu_tanh"}),
        ("vit_giantopt_patch16_siglip", 16, 1536, 40, 16, 4.0, {256: "gelu_tanh", 384: "gelu_tanh"}),
    )
    return {f"{stem}_{size}": (size, patch, width, depth, heads, ratio, act)
            for stem, patch, width, depth, heads, ratio, acts in families for size, act in acts.items()}


TIMM_SIGLIP_TOWERS = _timm_siglip_towers()
# The OpenCLIP options a SigLIP config uses beyond CLIP's (open_clip model_configs/ViT-*-SigLIP*.json).
_OPENCLIP_SIGLIP_USED = {
    "model_cfg": _OPENCLIP_USED["model_cfg"],
    "vision_cfg": {"image_size", "timm_model_name", "timm_pool", "timm_proj"},
    "text_cfg": _OPENCLIP_USED["text_cfg"] | {"no_causal_mask", "proj_bias", "pool_type", "act_kwargs", "proj_type"},
}
# Their values in every released SigLIP config: any other one builds another model.
_OPENCLIP_SIGLIP_FIXED = {
    ("vision_cfg", "timm_pool"): "map",
    ("vision_cfg", "timm_proj"): "none",
    ("text_cfg", "no_causal_mask"): True,
    ("text_cfg", "proj_bias"): True,
    ("text_cfg", "pool_type"): "last",
    ("text_cfg", "proj_type"): "linear",
}


def _siglip_from_openclip(model: dict[str, Any], pre: dict[str, Any], path: Path) -> CLIPConfig:
    """An OpenCLIP SigLIP ``model_cfg`` (a timm image tower, a custom text tower) as a `CLIPConfig`."""
    vc, tc = model.get("vision_cfg", {}), model.get("text_cfg", {})
    cfgs = {"model_cfg": model, "vision_cfg": vc, "text_cfg": tc}
    for where, cfg in cfgs.items():
        _check_openclip_options(cfg, where, path, used=_OPENCLIP_SIGLIP_USED)
    for (where, key), value in _OPENCLIP_SIGLIP_FIXED.items():
        found = cfgs[where].get(key, value if key == "proj_type" else None)
        if found != value:
            raise CheckpointError(f"{path}: OpenCLIP option {where}.{key}={found!r} is not supported with a timm "
                                  f"image tower (clipforge reads SigLIP's: {value!r})")
    name = vc["timm_model_name"]
    if name not in TIMM_SIGLIP_TOWERS:
        raise CheckpointError(f"{path}: OpenCLIP vision_cfg.timm_model_name={name!r} is not supported (clipforge "
                              f"reads timm's SigLIP towers: {', '.join(TIMM_SIGLIP_TOWERS)})")
    size, patch, width, depth, heads, ratio, act = TIMM_SIGLIP_TOWERS[name]
    if vc.get("image_size", size) != size:
        raise CheckpointError(f"{path}: vision_cfg.image_size={vc['image_size']} but {name} takes {size}-pixel images")
    act_kwargs = tc.get("act_kwargs") or {}
    if act_kwargs not in ({}, {"approximate": "tanh"}, {"approximate": "none"}):
        raise CheckpointError(f"{path}: OpenCLIP option text_cfg.act_kwargs={act_kwargs!r} is not supported")
    if model.get("quick_gelu"):
        text_act = "quick_gelu"  # OpenCLIP's quick_gelu reaches the text tower only; timm's keeps its own
    else:
        text_act = "gelu_tanh" if act_kwargs.get("approximate") == "tanh" else "gelu"
    try:
        vision = VisionConfig(image_size=size, patch_size=patch, width=width, layers=depth, heads=heads,
                              mlp_ratio=ratio, act=act, layer_norm_eps=_SIGLIP_EPS,
                              mean=tuple(pre.get("mean", SIGLIP_MEAN)), std=tuple(pre.get("std", SIGLIP_STD)),
                              pool="map")
        text = TextConfig(
            context_length=tc.get("context_length", OPENAI_CONTEXT_LENGTH),
            vocab_size=tc.get("vocab_size", OPENAI_VOCAB_SIZE),
            width=tc.get("width", 512),
            heads=tc.get("heads", 8),
            layers=tc.get("layers", 12),
            mlp_ratio=tc.get("mlp_ratio", 4.0),
            act=text_act,
            layer_norm_eps=(tc.get("norm_kwargs") or {}).get("eps", 1e-5),
            pool="last",
        )
        return CLIPConfig(
            embed_dim=model.get("embed_dim", 512),
            vision=vision,
            text=text,
            init_logit_scale=math.exp(model.get("init_logit_scale", math.log(CLIP_INIT_SCALE))),
            init_logit_bias=model.get("init_logit_bias"),
        )
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: unsupported OpenCLIP SigLIP config: {err}") from err


def timm_siglip_name(config: VisionConfig) -> str | None:
    """The timm model OpenCLIP would build for a SigLIP image tower, or None when timm has none of its shape."""
    for name, (size, patch, width, depth, heads, ratio, _) in TIMM_SIGLIP_TOWERS.items():
        shape = (size, patch, width, depth, heads, math.floor(width * ratio + 1e-6))
        if shape == (config.image_size, config.patch_size, config.width, config.layers, config.heads,
                     config.mlp_width):
            return name
    return None


def _siglip_to_openclip(config: CLIPConfig) -> dict[str, Any]:
    """``open_clip_config.json`` for a SigLIP model: timm's tower by name, OpenCLIP's custom text tower.

    timm fixes each tower's activation by its name (`TIMM_SIGLIP_TOWERS`); an image tower run
    with another one (SigLIP 1's towers loaded from Hugging Face, which runs them with the tanh
    GELU) is written all the same, as OpenCLIP's own SigLIP releases are: its features then
    differ by the two GELUs' difference.
    """
    v, t = config.vision, config.text
    name = timm_siglip_name(v)
    if name is None:
        raise CheckpointError(f"no timm SigLIP image tower has this shape (image {v.image_size}, patch {v.patch_size}, "
                              f"width {v.width}, depth {v.layers}, heads {v.heads}); OpenCLIP cannot build it")
    if v.layer_norm_eps != _SIGLIP_EPS:
        raise CheckpointError(f"timm's SigLIP towers use LayerNorm eps {_SIGLIP_EPS}; this one uses {v.layer_norm_eps}")
    if t.pool != "last":
        raise CheckpointError("OpenCLIP's SigLIP models need SigLIP's text tower (pool='last')")
    text_cfg: dict[str, Any] = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": t.mlp_ratio,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": t.layer_norm_eps},
    }
    if t.act == "gelu_tanh":
        text_cfg["act_kwargs"] = {"approximate": "tanh"}
    model_cfg: dict[str, Any] = {
        "embed_dim": config.embed_dim,
        "custom_text": True,
        "quick_gelu": t.act == "quick_gelu",
        "vision_cfg": {"image_size": v.image_size, "timm_model_name": name, "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": text_cfg,
        "init_logit_scale": math.log(config.init_logit_scale),
    }
    if config.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = config.init_logit_bias
    return {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(v.mean), "std": list(v.std)}}
