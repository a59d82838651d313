"""Model configurations: dataclasses validated on construction, and the named presets.

A `CLIPConfig` holds an image-tower config (`VisionConfig`: a Vision Transformer, or OpenAI's
modified ResNet when ``patch_size`` is None), a text-tower config (`TextConfig`) and the size
of the shared embedding.  Each tower comes in two families, chosen by its ``pool``: CLIP's
(a ViT read at its class token; a causal text tower read at the end-of-text token) and
SigLIP's (a ViT without class token, pooled by a multi-head attention-pooling head; a
non-causal text tower read at its last position), as `clipforge.model.siglip` builds them; SigLIP 2's
NaFlex image tower is SigLIP's with ``max_num_patches`` set (images at their own aspect ratio).
Chinese-CLIP pairs CLIP's ViT with a BERT text tower (``pool="cls"``, `clipforge.model.bert`).
``to_dict``/``from_dict`` round-trip through JSON and reject unknown keys by name.

The presets carry the published shapes of OpenAI's nine CLIP models (Radford et al., 2021,
Tables 19-20; github.com/openai/CLIP ``clip/model.py`` ``build_model``) and of OpenCLIP's
LAION-2B flagships ViT-H/14, ViT-g/14 and ViT-bigG/14 (open_clip ``model_configs/``): the
same tensor names and shapes as OpenCLIP's model of the same name.  The SigLIP and SigLIP 2
presets (Zhai et al., 2023; Tschannen et al., 2025) carry the shapes of OpenCLIP's
``ViT-*-SigLIP*`` models of the same name, whose tensors `clipforge.checkpoints.names` renames.
The Chinese-CLIP presets (``CN-CLIP-*``; Yang et al., 2022) carry the shapes of the released
``OFA-Sys/chinese-clip-vit-*`` models (transformers' ``ChineseCLIPModel``).

OpenAI's vocabulary size (``OPENAI_VOCAB_SIZE``) is defined here; its pixel statistics, the
default ``mean`` and ``std``, come from `clipforge.transforms` (``OPENAI_MEAN``, ``OPENAI_STD``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from clipforge.loss import CLIP_INIT_SCALE, SIGLIP_INIT_BIAS, SIGLIP_INIT_SCALE
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "FAMILIES",
    "TEXT_POOLS",
    "VISION_POOLS",
    "CHINESE_CLIP_CONTEXT_LENGTH",
    "CHINESE_CLIP_VOCAB_SIZE",
    "OPENAI_CONTEXT_LENGTH",
    "OPENAI_VOCAB_SIZE",
    "QUICKGELU_SUFFIX",
    "SIGLIP_CONTEXT_LENGTH",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "SIGLIP_VOCAB_SIZE",
    "SIGLIP2_VOCAB_SIZE",
    "VisionConfig",
    "TextConfig",
    "CLIPConfig",
    "PRESETS",
    "check_image_shape",
    "get_config",
    "list_presets",
]

# MLP activations: exact (erf) GELU, OpenAI's QuickGELU x*sigmoid(1.702x), and GELU's tanh
# approximation (Hendrycks & Gimpel, 2016, section 2), SigLIP's (big_vision trains with
# jax.nn.gelu, tanh by default; transformers calls it "gelu_pytorch_tanh", timm "gelu_tanh").
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")
# How each tower reads one vector out of its tokens, and with it the tower's family:
# "class": OpenAI's ViT (class token, ln_pre, bias-free patch convolution, projection);
# "map": SigLIP's ViT (no class token, no ln_pre, patch convolution with bias, attention-pooling head, no projection).
VISION_POOLS = ("class", "map")
# "eot": causal, read at the end-of-text token, projection matrix (CLIP);
# "last": non-causal, read at the last position, linear head with bias (SigLIP);
# "cls": BERT's post-LayerNorm encoder, padding masked, read at its first ([CLS]) token, projection
# matrix (Chinese-CLIP: transformers' ChineseCLIPModel.get_text_features).
TEXT_POOLS = ("eot", "last", "cls")
# The model families, as `list_presets` groups them: CLIP's towers, SigLIP's towers, and Chinese-CLIP's
# (CLIP's ViT beside a BERT text tower).
FAMILIES = ("clip", "siglip", "chinese_clip")
# Token ids of OpenAI's BPE (clip/simple_tokenizer.py): 256 byte symbols, the same with "</w>",
# 48,894 merges, start and end of text; the vocab_size of every OpenAI text tower (build_model).
OPENAI_VOCAB_SIZE = 49408
# Text positions of every OpenAI CLIP model: 75 tokens between start and end of text.
OPENAI_CONTEXT_LENGTH = 77
# OpenCLIP's suffix for a model's QuickGELU variant ("ViT-B-32-quickgelu").
QUICKGELU_SUFFIX = "-quickgelu"
# SigLIP's text: a 32,000-piece SentencePiece vocabulary and 64 positions (big_vision's SigLIP
# configs; open_clip model_configs/ViT-B-16-SigLIP.json); SigLIP 2 uses Gemma's 256,000 pieces
# (model_configs/ViT-B-16-SigLIP2.json).
SIGLIP_VOCAB_SIZE = 32000
SIGLIP2_VOCAB_SIZE = 256000
SIGLIP_CONTEXT_LENGTH = 64
# Chinese-CLIP's text: the 21,128-piece WordPiece vocabulary of Chinese BERT / RoBERTa-wwm-ext
# (OFA-Sys/chinese-clip-vit-*: text_config.vocab_size), 512 positions, of which its captions use 52
# tokens ([CLS] and [SEP] included: cn_clip.clip.tokenize's context_length, the training scripts'
# max_txt_length).
CHINESE_CLIP_VOCAB_SIZE = 21128
CHINESE_CLIP_CONTEXT_LENGTH = 52
# SigLIP's pixels are scaled to [-1, 1]: mean and std 0.5 per channel (open_clip's pretrained
# configs for its SigLIP models, transformers' SiglipImageProcessor).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def _mlp_width(width: int, mlp_ratio: float) -> int:
    """The MLP's hidden width: ``int(width * mlp_ratio)``, truncated as OpenCLIP builds it.

    OpenCLIP (open_clip/transformer.py) truncates, so ViT-g/14's ratio 4.3637 gives 1408 -> 6144
    and ViT-bigG/14's 4.9231 gives 1664 -> 8192.  A ratio read back as hidden / width (Hugging Face's
    intermediate_size, a tensor's shape) can land a hair below the integer it came from, so a
    product within 1e-6 of the next integer counts as that integer.
    """
    return math.floor(width * mlp_ratio + 1e-6)


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _positive_float(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{owner}.{name} must be a positive finite number, got {value!r}")


def _check_activation(owner: str, value: Any) -> None:
    if value not in ACTIVATIONS:
        raise ValueError(f"{owner}.act must be one of {ACTIVATIONS}, got {value!r}")


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


def _check_mlp_width(owner: str, width: int, mlp_ratio: float) -> None:
    if _mlp_width(width, mlp_ratio) < 1:
        raise ValueError(
            f"{owner}.mlp_ratio={mlp_ratio!r} gives the MLP int({width} * {mlp_ratio!r}) = 0 hidden units; "
            "it needs at least 1"
        )


def _from_dict(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) for {cls.__name__}: {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(known))})"
        )
    return dict(data)


@dataclass(frozen=True)
class VisionConfig:
    """The image tower: a Vision Transformer, or OpenAI's modified ResNet if ``patch_size`` is None."""

    image_size: int = 224  # input side in pixels (square images)
    patch_size: int | None = 32  # ViT patch side; None selects the modified ResNet
    width: int = 768  # ViT: residual stream width; ResNet: channels after the stem
    layers: int | tuple[int, int, int, int] = 12  # ViT: blocks; ResNet: Bottlenecks per stage
    heads: int = 12  # ViT: attention heads; ResNet: heads of the attention pool
    mlp_ratio: float = 4.0  # ViT MLP hidden width / width (HF: intermediate_size / hidden_size)
    act: str = "gelu"  # ViT MLP activation: "gelu" or OpenAI's "quick_gelu", x*sigmoid(1.702x)
    layer_norm_eps: float = 1e-5  # every LayerNorm of the tower (1e-5 in OpenAI, OpenCLIP, HF)
    mean: tuple[float, float, float] = OPENAI_MEAN  # preprocessing: per-channel mean
    std: tuple[float, float, float] = OPENAI_STD  # preprocessing: per-channel std
    pool: str = "class"  # ViT family (VISION_POOLS): "class" OpenAI's, "map" SigLIP's attention-pooled
    # SigLIP 2 NaFlex (variable resolution; pool "map" only): each image is resized to at most this
    # many patches at its own aspect ratio, and the learned image_size/patch_size grid of positions
    # is resized to its grid (transformers' Siglip2Model).  None: fixed-resolution images.
    max_num_patches: int | None = None

    def __post_init__(self) -> None:
        owner = "VisionConfig"
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        _positive_int(owner, "image_size", self.image_size)
        _positive_int(owner, "width", self.width)
        _positive_int(owner, "heads", self.heads)
        _positive_float(owner, "mlp_ratio", self.mlp_ratio)
        _positive_float(owner, "layer_norm_eps", self.layer_norm_eps)
        _check_activation(owner, self.act)
        _check_choice(owner, "pool", self.pool, VISION_POOLS)
        if self.patch_size is None:  # modified ResNet
            if self.pool != "class":
                raise ValueError(f"{owner}.pool={self.pool!r} needs a ViT (patch_size), not a ResNet (patch_size=None)")
            if not (isinstance(self.layers, tuple) and len(self.layers) == 4):
                raise ValueError(
                    f"{owner}.layers must be 4 stage depths for a ResNet (patch_size=None), "
                    f"got {self.layers!r}"
                )
            for depth in self.layers:
                _positive_int(owner, "layers[i]", depth)
            if self.image_size % 32:
                raise ValueError(
                    f"{owner}.image_size must be a multiple of 32 for a ResNet (it downsamples "
                    f"32x), got {self.image_size}"
                )
            if (self.width * 32) % self.heads:
                raise ValueError(
                    f"{owner}.heads={self.heads} must divide the attention-pool width "
                    f"32*width={self.width * 32}"
                )
        else:
            _positive_int(owner, "patch_size", self.patch_size)
            _positive_int(owner, "layers", self.layers)
            # SigLIP's so400m/14 at 384 pixels (google/siglip-so400m-patch14-384) sees a 27x27 grid:
            # its convolution drops the last 384 - 27*14 = 6 rows and columns, as in transformers and timm.
            if self.pool == "class" and self.image_size % self.patch_size:
                raise ValueError(
                    f"{owner}.image_size={self.image_size} must be a multiple of "
                    f"patch_size={self.patch_size}"
                )
            if self.image_size < self.patch_size:
                raise ValueError(f"{owner}.image_size={self.image_size} is smaller than patch_size={self.patch_size}")
            if self.width % self.heads:
                raise ValueError(f"{owner}.heads={self.heads} must divide width={self.width}")
            _check_mlp_width(owner, self.width, self.mlp_ratio)
        if self.max_num_patches is not None:
            _positive_int(owner, "max_num_patches", self.max_num_patches)
            if self.pool != "map" or self.patch_size is None:
                raise ValueError(f"{owner}.max_num_patches (NaFlex) needs SigLIP's ViT (pool='map'), got "
                                 f"pool={self.pool!r}, patch_size={self.patch_size!r}")
            if self.image_size % self.patch_size:
                raise ValueError(f"{owner}.image_size={self.image_size} must be a multiple of "
                                 f"patch_size={self.patch_size} for NaFlex: it sets the grid of learned positions")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                raise ValueError(f"{owner}.{name} must be 3 numbers (RGB), got {value!r}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"{owner}.std must be positive, got {self.std!r}")

    @property
    def is_resnet(self) -> bool:
        return self.patch_size is None

    @property
    def naflex(self) -> bool:
        """Whether the tower takes NaFlex inputs (`clipforge.transforms.naflex_transform`), not fixed-size images."""
        return self.max_num_patches is not None

    @property
    def grid(self) -> int:
        """Patches along each side of a ViT's input (the convolution drops any remainder)."""
        if self.patch_size is None:
            raise ValueError("a ResNet image tower has no patch grid")
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return _mlp_width(self.width, self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("layers", "mean", "std"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        if self.max_num_patches is None:  # NaFlex's field, absent from fixed-resolution files (from_dict's default)
            del d["max_num_patches"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        return cls(**_from_dict(cls, data))


@dataclass(frozen=True)
class TextConfig:
    """The text tower: a causal Transformer read out at the end-of-text token (CLIP), a
    non-causal one read out at its last position (SigLIP), or BERT read out at its [CLS] token
    (Chinese-CLIP)."""

    context_length: int = OPENAI_CONTEXT_LENGTH  # positions, start and end of text included
    vocab_size: int = OPENAI_VOCAB_SIZE  # token ids; the end-of-text id must be the largest one used
    width: int = 512  # residual stream width
    heads: int = 8  # attention heads
    layers: int = 12  # transformer blocks
    mlp_ratio: float = 4.0  # MLP hidden width / width
    act: str = "gelu"  # MLP activation: "gelu" or "quick_gelu"
    layer_norm_eps: float = 1e-5  # every LayerNorm of the tower
    pool: str = "eot"  # family (TEXT_POOLS): "eot" CLIP's, "last" SigLIP's, "cls" BERT's (Chinese-CLIP)
    token_types: int = 2  # BERT (pool "cls"): rows of the token-type (segment) table; captions use row 0
    pad_token_id: int = 0  # BERT (pool "cls"): the padding id, masked out of attention ([PAD] = 0)

    def __post_init__(self) -> None:
        owner = "TextConfig"
        for name in ("context_length", "vocab_size", "width", "heads", "layers", "token_types"):
            _positive_int(owner, name, getattr(self, name))
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) or not (
            0 <= self.pad_token_id < self.vocab_size
        ):
            raise ValueError(f"{owner}.pad_token_id must be an id below vocab_size={self.vocab_size}, "
                             f"got {self.pad_token_id!r}")
        _positive_float(owner, "mlp_ratio", self.mlp_ratio)
        _positive_float(owner, "layer_norm_eps", self.layer_norm_eps)
        _check_activation(owner, self.act)
        _check_choice(owner, "pool", self.pool, TEXT_POOLS)
        if self.width % self.heads:
            raise ValueError(f"{owner}.heads={self.heads} must divide width={self.width}")
        _check_mlp_width(owner, self.width, self.mlp_ratio)

    @property
    def mlp_width(self) -> int:
        return _mlp_width(self.width, self.mlp_ratio)

    @property
    def tokens(self) -> int:
        """How many tokens a caption is padded or cut to: ``context_length``, except for a BERT
        tower (pool "cls"), whose 512 positions hold Chinese-CLIP's 52-token captions."""
        if self.pool == "cls":
            return min(self.context_length, CHINESE_CLIP_CONTEXT_LENGTH)
        return self.context_length

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.pool != "cls":  # BERT's fields, absent from other towers' files (from_dict's defaults)
            del d["token_types"], d["pad_token_id"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextConfig:
        return cls(**_from_dict(cls, data))


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP model: both towers, the joint embedding and the logit scale's initial value."""

    embed_dim: int = 512  # joint image-text embedding size
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = CLIP_INIT_SCALE  # 1/0.07: CLIP's initial temperature (clipforge.loss)
    init_logit_bias: float | None = None  # a learnable logit bias (SigLIP) when set

    def __post_init__(self) -> None:
        owner = "CLIPConfig"
        _positive_int(owner, "embed_dim", self.embed_dim)
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionConfig.from_dict(self.vision))
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", TextConfig.from_dict(self.text))
        if not isinstance(self.vision, VisionConfig):
            raise ValueError(f"{owner}.vision must be a VisionConfig, got {type(self.vision).__name__}")
        if not isinstance(self.text, TextConfig):
            raise ValueError(f"{owner}.text must be a TextConfig, got {type(self.text).__name__}")
        _positive_float(owner, "init_logit_scale", self.init_logit_scale)
        if self.init_logit_bias is not None and not (
            isinstance(self.init_logit_bias, (int, float)) and math.isfinite(self.init_logit_bias)
        ):
            raise ValueError(f"{owner}.init_logit_bias must be a finite number or None")
        if self.vision.pool == "map" and self.embed_dim != self.vision.width:
            raise ValueError(
                f"{owner}.embed_dim={self.embed_dim} must equal vision.width={self.vision.width}: an "
                "attention-pooled image tower (pool='map') has no projection"
            )

    @property
    def family(self) -> str:
        """"siglip" for SigLIP's attention-pooled image tower, "chinese_clip" for a BERT text
        tower, else "clip" (`FAMILIES`)."""
        if self.vision.pool == "map":
            return "siglip"
        return "chinese_clip" if self.text.pool == "cls" else "clip"

    def to_dict(self) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            "vision": self.vision.to_dict(),
            "text": self.text.to_dict(),
            "init_logit_scale": self.init_logit_scale,
            "init_logit_bias": self.init_logit_bias,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        data = _from_dict(cls, data)
        for key, sub in (("vision", VisionConfig), ("text", TextConfig)):
            if key in data:
                data[key] = sub.from_dict(data[key])
        return cls(**data)

    def with_activation(self, act: str) -> CLIPConfig:
        """The same config with both towers' MLP activation set to ``act``; a BERT text tower
        keeps its own (its GELU is BERT's, whatever the image tower was trained with)."""
        text = self.text if self.text.pool == "cls" else replace(self.text, act=act)
        return replace(self, vision=replace(self.vision, act=act), text=text)


def check_image_shape(images: Tensor, image_size: int) -> None:
    """Raise a ValueError unless ``images`` is [B, 3, image_size, image_size] (either image tower's input)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (image_size, image_size):
        raise ValueError(
            f"expected images of shape [B, 3, {image_size}, {image_size}], "
            f"got {list(images.shape)}"
        )


def _openai_text(width: int, layers: int = 12) -> TextConfig:
    # OpenAI's text towers: 64-wide heads, 77 positions, 49,408-token BPE vocabulary; 12 layers in
    # OpenAI's models, more in OpenCLIP's larger ones.
    return TextConfig(width=width, heads=width // 64, layers=layers)


def _vit(embed_dim: int, image: int, patch: int, width: int, layers: int, text_width: int, *,
         head_width: int = 64, mlp_ratio: float = 4.0, text_layers: int = 12) -> CLIPConfig:
    # OpenCLIP gives the ViT's head width (default 64, as OpenAI's build_model), not the head count.
    vision = VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers,
                          heads=width // head_width, mlp_ratio=mlp_ratio)
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=_openai_text(text_width, text_layers))


def _resnet(embed_dim: int, image: int, layers: tuple[int, int, int, int], width: int, text_width: int) -> CLIPConfig:
    # The attention pool works on 32*width channels with 64-wide heads (build_model: width*32 // 64).
    vision = VisionConfig(image_size=image, patch_size=None, width=width, layers=layers, heads=width * 32 // 64)
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=_openai_text(text_width))


def _siglip(image: int, patch: int, width: int, layers: int, heads: int, *, mlp_ratio: float = 4.0,
            vocab_size: int = SIGLIP_VOCAB_SIZE, context_length: int = SIGLIP_CONTEXT_LENGTH) -> CLIPConfig:
    # SigLIP's text tower has its image tower's width, depth, heads and MLP (big_vision's "So400m"
    # and B/L configs; open_clip model_configs/ViT-*-SigLIP*.json), LayerNorm eps 1e-6 and the
    # tanh GELU in both towers, as trained in big_vision and run by transformers (OpenCLIP's
    # SigLIP 1 configs run exact GELU instead; an OpenCLIP directory loads with its own config).
    # Initial scale and bias: the SigLIP paper's (clipforge.loss).
    common = dict(width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio, act="gelu_tanh", layer_norm_eps=1e-6)
    vision = VisionConfig(image_size=image, patch_size=patch, mean=SIGLIP_MEAN, std=SIGLIP_STD, pool="map", **common)
    text = TextConfig(context_length=context_length, vocab_size=vocab_size, pool="last", **common)
    return CLIPConfig(embed_dim=width, vision=vision, text=text, init_logit_scale=SIGLIP_INIT_SCALE,
                      init_logit_bias=SIGLIP_INIT_BIAS)


def _chinese_clip(embed_dim: int, image: int, patch: int, width: int, layers: int, *, head_width: int = 64,
                  large_text: bool = False) -> CLIPConfig:
    # Chinese-CLIP (Yang et al., 2022; github.com/OFA-Sys/Chinese-CLIP, cn_clip/clip/model_configs/):
    # OpenAI's ViT with QuickGELU (transformers' ChineseCLIPVisionConfig.hidden_act) beside
    # RoBERTa-wwm-ext-base (768 wide, 12 layers, 12 heads) or, for ViT-H/14, -large (1024, 24, 16):
    # BERT's 512 positions, 2 token types, exact GELU and LayerNorm eps 1e-12.
    vision = VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers, heads=width // head_width,
                          act="quick_gelu")
    text_width, text_layers = (1024, 24) if large_text else (768, 12)
    text = TextConfig(context_length=512, vocab_size=CHINESE_CLIP_VOCAB_SIZE, width=text_width,
                      heads=text_width // 64, layers=text_layers, layer_norm_eps=1e-12, pool="cls")
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)


def _chinese_clip_presets() -> dict[str, CLIPConfig]:
    """Chinese-CLIP's released ViT sizes, as OFA-Sys/chinese-clip-vit-* publish them for transformers
    (the ResNet-50 model, with a 3-layer RBT3 text tower, has no ChineseCLIPModel form)."""
    return {
        "CN-CLIP-ViT-B-16": _chinese_clip(512, 224, 16, 768, 12),
        "CN-CLIP-ViT-L-14": _chinese_clip(768, 224, 14, 1024, 24),
        "CN-CLIP-ViT-L-14-336": _chinese_clip(768, 336, 14, 1024, 24),
        "CN-CLIP-ViT-H-14": _chinese_clip(1024, 224, 14, 1280, 32, head_width=80, large_text=True),
    }


def _siglip_presets() -> dict[str, CLIPConfig]:
    """SigLIP's released sizes (OpenCLIP's names and model_configs/, timm's vit_*_siglip_* towers).

    B/16 (12 heads of 64), L/16 (16 of 64) and So400m/14 (16 of 72, MLP ratio 3.7362 -> 4304), each
    at the resolutions released; SigLIP 2's fixed-resolution models have the same towers with
    Gemma's vocabulary (and so400m/16, B/32 sizes).  So400m/14 at 224 reads 16 text positions.
    """
    b16, l16 = (16, 768, 12, 12), (16, 1024, 24, 16)
    so14, so16 = (14, 1152, 27, 16), (16, 1152, 27, 16)
    so = {"mlp_ratio": 3.7362}
    v2 = {"vocab_size": SIGLIP2_VOCAB_SIZE}
    presets = {"ViT-B-16-SigLIP": _siglip(224, *b16)}
    presets |= {f"ViT-B-16-SigLIP-{size}": _siglip(size, *b16) for size in (256, 384, 512)}
    presets |= {f"ViT-L-16-SigLIP-{size}": _siglip(size, *l16) for size in (256, 384)}
    presets["ViT-SO400M-14-SigLIP"] = _siglip(224, *so14, context_length=16, **so)
    presets |= {f"ViT-SO400M-14-SigLIP-{size}": _siglip(size, *so14, **so) for size in (378, 384)}
    presets["ViT-B-16-SigLIP2"] = _siglip(224, *b16, **v2)
    presets |= {f"ViT-B-16-SigLIP2-{size}": _siglip(size, *b16, **v2) for size in (256, 384, 512)}
    presets["ViT-B-32-SigLIP2-256"] = _siglip(256, 32, 768, 12, 12, **v2)
    presets |= {f"ViT-L-16-SigLIP2-{size}": _siglip(size, *l16, **v2) for size in (256, 384, 512)}
    presets["ViT-SO400M-14-SigLIP2"] = _siglip(224, *so14, **so, **v2)
    presets["ViT-SO400M-14-SigLIP2-378"] = _siglip(378, *so14, **so, **v2)
    presets |= {f"ViT-SO400M-16-SigLIP2-{size}": _siglip(size, *so16, **so, **v2) for size in (256, 384, 512)}
    return presets


PRESETS: dict[str, CLIPConfig] = {
    # A few million parameters for CPU training on 64x64 images and short captions.  The image
    # tower is OpenAI's modified ResNet at width 8: on shapes:// it learns to tell shapes apart
    # within a few hundred steps, where a ViT of the same cost still tells only colours
    # (docs/benchmarks.md#training).  Its BatchNorm normalises each micro-batch (each rank) by
    # its own statistics; `tiny-vit` is the same model with a ViT, free of BatchNorm, for runs
    # that must equal one large batch exactly.
    "tiny": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=None, width=8, layers=(1, 1, 1, 1), heads=4),
        text=TextConfig(context_length=32, vocab_size=4096, width=128, heads=2, layers=4),
    ),
    "tiny-vit": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=16, width=128, layers=4, heads=2),
        text=TextConfig(context_length=32, vocab_size=4096, width=128, heads=2, layers=4),
    ),
    # OpenAI's nine released models (build_model; sizes as OpenCLIP's model_configs/ give them).
    "ViT-B-32": _vit(512, 224, 32, 768, 12, 512),
    "ViT-B-16": _vit(512, 224, 16, 768, 12, 512),
    "ViT-L-14": _vit(768, 224, 14, 1024, 24, 768),
    "ViT-L-14-336": _vit(768, 336, 14, 1024, 24, 768),
    "RN50": _resnet(1024, 224, (3, 4, 6, 3), 64, 512),
    "RN101": _resnet(512, 224, (3, 4, 23, 3), 64, 512),
    "RN50x4": _resnet(640, 288, (4, 6, 10, 6), 80, 640),
    "RN50x16": _resnet(768, 384, (6, 8, 18, 8), 96, 768),
    "RN50x64": _resnet(1024, 448, (3, 15, 36, 10), 128, 1024),
    # OpenCLIP's LAION-2B flagships (model_configs/ViT-H-14.json, ViT-g-14.json, ViT-bigG-14.json):
    # 80-, 88- and 104-wide heads (16 each), non-integer MLP ratios for g and bigG, 24- and 32-layer
    # text towers.  LAION's weights use GELU; MetaCLIP's H/14 and bigG/14 and DFN's H/14 use QuickGELU
    # (open_clip/pretrained.py), hence the "-quickgelu" names.
    "ViT-H-14": _vit(1024, 224, 14, 1280, 32, 1024, head_width=80, text_layers=24),
    "ViT-g-14": _vit(1024, 224, 14, 1408, 40, 1024, head_width=88, mlp_ratio=4.3637, text_layers=24),
    "ViT-bigG-14": _vit(1280, 224, 14, 1664, 48, 1280, head_width=104, mlp_ratio=4.9231, text_layers=32),
    **_siglip_presets(),
    **_chinese_clip_presets(),
}


def list_presets(family: str = "clip") -> list[str]:
    """The preset names of one model family (`FAMILIES`: "clip", "siglip" or "chinese_clip").

    Each CLIP preset also exists with a ``-quickgelu`` suffix (OpenCLIP's naming); every name
    here is also a key of `PRESETS`, which holds both families.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return [name for name, config in PRESETS.items() if config.family == family]


def get_config(name: str) -> CLIPConfig:
    """The preset called ``name``; a ``-quickgelu`` suffix switches both towers to QuickGELU.

    CLIP presets use GELU (faster, and what OpenCLIP trains with); OpenAI's released weights were
    trained with QuickGELU, which loading those weights sets by itself.  SigLIP presets use the
    tanh GELU their weights were trained with.
    """
    base = name.removesuffix(QUICKGELU_SUFFIX)
    if base not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[base].with_activation("quick_gelu") if base != name else PRESETS[base]
