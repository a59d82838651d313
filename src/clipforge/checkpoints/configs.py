"""Architectures described by OpenAI, OpenCLIP and Hugging Face files, as `CLIPConfig` and back.

    config = infer_config(state, act="quick_gelu")     # clipforge-named tensors, no config file
    config = config_from_hf(json_of_config, json_of_preprocessor, path)
    open_clip_config_json = config_to_openclip(config)

A file without a config (OpenAI's releases, bare OpenCLIP state dicts) is described by its tensor
shapes, as OpenAI's ``build_model`` reads them (64-wide heads, except for a ViT shaped as one of
the presets, which takes that preset's heads); Hugging Face's and OpenCLIP's configs are
translated both ways, with their own defaults for absent keys.  An option clipforge's model
cannot express is a CheckpointError, never silently dropped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipforge.checkpoints._errors import CheckpointError
from clipforge.loss import CLIP_INIT_SCALE
from clipforge.model.config import (
    OPENAI_CONTEXT_LENGTH,
    OPENAI_VOCAB_SIZE,
    PRESETS,
    CLIPConfig,
    TextConfig,
    VisionConfig,
)
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

__all__ = ["config_from_hf", "config_from_openclip", "config_to_hf", "config_to_openclip", "infer_config"]


# ----------------------------------------------------------------------------- from tensor shapes


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


def _vit_heads(width: int, layers: int, patch: int, mlp_width: int, path: Path) -> int:
    """The heads of a ViT image tower known only by its shapes.

    OpenCLIP's larger ViTs have wider heads than OpenAI's 64 (ViT-H/14: 80, ViT-g/14: 88,
    ViT-bigG/14: 104), which no tensor shape shows: a tower shaped as a preset's takes that
    preset's heads, any other one 64-wide heads.
    """
    for preset in PRESETS.values():
        v = preset.vision
        if not v.is_resnet and (v.width, v.layers, v.patch_size, v.mlp_width) == (width, layers, patch, mlp_width):
            return v.heads
    return _heads(width, "vision", path)


def _shape(state: dict[str, Tensor], key: str, path: Path) -> torch.Size:
    if key not in state:
        raise CheckpointError(f"{path}: missing tensor {key!r}, needed to infer the architecture")
    return state[key].shape


def infer_config(state: dict[str, Tensor], *, act: str = "gelu", path: str | Path = "<state dict>") -> CLIPConfig:
    """The architecture of a clipforge-named state dict, read off its tensor shapes."""
    path = Path(path)
    if "visual.proj" in state:  # Vision Transformer
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
    text_width = _shape(state, "text.ln_final.weight", path)[0]
    text = TextConfig(
        context_length=_shape(state, "text.positional_embedding", path)[0],
        vocab_size=_shape(state, "text.token_embedding.weight", path)[0],
        width=text_width,
        heads=_heads(text_width, "text", path),
        layers=_count_blocks(state, r"text\.transformer\.resblocks\.(\d+)\."),
        mlp_ratio=_shape(state, "text.transformer.resblocks.0.mlp.c_fc.weight", path)[0] / text_width,
        act=act,
    )
    bias = state.get("logit_scale.bias")
    return CLIPConfig(
        embed_dim=_shape(state, "text.text_projection", path)[1],
        vision=vision,
        text=text,
        init_logit_bias=None if bias is None else float(bias),
    )


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


def config_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None, path: Path) -> CLIPConfig:
    """A Hugging Face ``config.json`` (and ``preprocessor_config.json``) as a `CLIPConfig`."""
    t = {**_HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if v["num_channels"] != 3:
        raise CheckpointError(f"{path}: vision_config.num_channels={v['num_channels']}; only RGB (3) is supported")
    pre = preprocessor or {}
    try:
        vision = VisionConfig(
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            width=v["hidden_size"],
            layers=v["num_hidden_layers"],
            heads=v["num_attention_heads"],
            mlp_ratio=v["intermediate_size"] / v["hidden_size"],
            act=v["hidden_act"],
            layer_norm_eps=v["layer_norm_eps"],
            mean=tuple(pre.get("image_mean", OPENAI_MEAN)),
            std=tuple(pre.get("image_std", OPENAI_STD)),
        )
        text = TextConfig(
            context_length=t["max_position_embeddings"],
            vocab_size=t["vocab_size"],
            width=t["hidden_size"],
            heads=t["num_attention_heads"],
            layers=t["num_hidden_layers"],
            mlp_ratio=t["intermediate_size"] / t["hidden_size"],
            act=t["hidden_act"],
            layer_norm_eps=t["layer_norm_eps"],
        )
        return CLIPConfig(
            embed_dim=hf.get("projection_dim", 512),
            vision=vision,
            text=text,
            init_logit_scale=math.exp(hf.get("logit_scale_init_value", _HF_LOGIT_SCALE_INIT)),
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: unsupported Hugging Face CLIP config: {err}") from err


def config_to_hf(config: CLIPConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) for Hugging Face's CLIPModel and CLIPProcessor."""
    v, t = config.vision, config.text
    if v.is_resnet:
        raise CheckpointError("Hugging Face's CLIPModel has no ResNet image tower; convert ResNet models to 'openclip'")
    if config.init_logit_bias is not None:
        raise CheckpointError("Hugging Face's CLIPModel has no logit bias; convert this model to 'openclip'")
    text_config = {
        "model_type": "clip_text_model",
        "vocab_size": t.vocab_size,
        "hidden_size": t.width,
        "intermediate_size": t.mlp_width,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "max_position_embeddings": t.context_length,
        "hidden_act": t.act,
        "layer_norm_eps": t.layer_norm_eps,
        "projection_dim": config.embed_dim,
        # OpenAI's layout: start and end of text are the two largest ids, padding is 0.
        "bos_token_id": t.vocab_size - 2,
        "eos_token_id": t.vocab_size - 1,
        "pad_token_id": 0,
    }
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": v.width,
        "intermediate_size": v.mlp_width,
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "num_channels": 3,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": v.act,
        "layer_norm_eps": v.layer_norm_eps,
        "projection_dim": config.embed_dim,
    }
    hf = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": math.log(config.init_logit_scale),
        "text_config": text_config,
        "vision_config": vision_config,
    }
    size = v.image_size
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(v.mean),
        "image_std": list(v.std),
    }
    return hf, preprocessor


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


def _check_openclip_options(cfg: dict[str, Any], where: str, path: Path) -> None:
    for key, value in cfg.items():
        if key in _OPENCLIP_USED[where] or key in _OPENCLIP_IGNORED:
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


def config_to_openclip(config: CLIPConfig) -> dict[str, Any]:
    """``open_clip_config.json`` contents: OpenCLIP's ``model_cfg`` and ``preprocess_cfg``."""
    v, t = config.vision, config.text
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
