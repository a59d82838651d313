"""Reading, loading, writing and converting CLIP checkpoints: OpenAI, OpenCLIP, Hugging Face and clipforge's own.

    model, preprocess, tokenizer = load("ViT-B-32", pretrained="openai")  # released weights, downloaded once
    model, preprocess, tokenizer = load("ViT-B-32.pt")   # OpenAI's release, a TorchScript archive
    model = load_model("clip-vit-base-patch32/")           # a Hugging Face directory
    ready = load_for_inference("ViT-B-32.pt", precision="bf16")  # + device, tokenizer: for eval, search, ...
    convert("ViT-B-32.pt", "vit-b-32-hf/", to="hf")

What `load` accepts (`convert` writes the last three formats, and OpenCLIP's bare state dicts):

| source | weights | architecture from |
|---|---|---|
| a preset name (``"ViT-B-32"``, ``"tiny"``) | random (`load` warns) | the preset |
| a pretrained name (``"ViT-B-32:openai"``, ``pretrained="openai"``) | downloaded | the preset; the entry's activation |
| ``"hf-hub:ORG/NAME[@REV]"`` (an OpenCLIP/timm Hub repository) | downloaded | ``open_clip_config.json`` |
| ``"ORG/NAME[@REV]"`` (a Hub repository holding a transformers ``CLIPModel``) | downloaded | ``config.json`` |
| OpenAI ``.pt`` (TorchScript archive or state dict) | read | tensor shapes; QuickGELU |
| OpenCLIP ``.pt``/``.bin``/``.safetensors`` (bare, under ``state_dict``, ``module.``) | read | tensor shapes |
| OpenCLIP hub directory (``open_clip_config.json``) | read | the config |
| Hugging Face CLIP directory (``config.json`` + weights) | read | the config |
| clipforge directory (``config.json`` + ``model.safetensors`` + tokenizer) | read | the config |

Without a config the architecture is read off the tensor shapes as OpenAI's ``build_model``
does, which assumes 64-wide attention heads.  The activation cannot be seen in the weights:
OpenAI's TorchScript archives and files whose name contains "quickgelu" get QuickGELU, others
GELU; ``act=`` overrides.  Nothing but tensors is ever unpickled.

`load` reads a checkpoint in three steps, each in its own module, then builds the model here:

1. the file's tensors under its own names (`_files`, which first tells by its bytes what the file is, so
   that anything else is refused with a line saying what it is; OpenAI's archives in `torchscript`);
2. the tensors renamed to clipforge's names (`names`);
3. the architecture, from the file's config or the tensors' shapes (`configs`).

`_errors` holds `CheckpointError`, which every step raises with the file's name in the message.

Names are resolved in one place, `registry.resolve` (its notes give the grammar and the
precedence: an existing path, then a registry name, then a preset, then a Hub repository id);
`download` fetches what a name needs into the Hugging Face cache or clipforge's own
(``CLIPFORGE_CACHE``); `_read_source` below reads it.  A registry entry's activation and
preprocessing are applied over whatever its files say; ``act=`` overrides both.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipforge.checkpoints._errors import CheckpointError, few
from clipforge.checkpoints._files import read_json, read_tensors, write_tensors
from clipforge.checkpoints.configs import (
    HF_MODEL_TYPES,
    NAFLEX_NOT_IN_OPENCLIP,
    config_from_hf,
    config_from_openclip,
    config_to_hf,
    config_to_openclip,
    infer_config,
    preprocess_from_openclip,
)
from clipforge.checkpoints.download import DownloadError, fetch_entry, fetch_repo, fetch_tokenizer
from clipforge.checkpoints.names import from_hf, to_clipforge_names, to_hf, to_openclip
from clipforge.checkpoints.registry import Preprocessing, Pretrained, UnknownModelError, resolve
from clipforge.devices import check_precision, default_device
from clipforge.model.clip import CLIP
from clipforge.model.config import OPENAI_VOCAB_SIZE, PRESETS, QUICKGELU_SUFFIX, CLIPConfig, get_config

__all__ = [
    "Checkpoint", "CheckpointError", "DownloadError", "InferenceModel", "RandomWeightsWarning", "UnknownModelError",
    "convert", "is_preset", "load", "load_for_inference", "load_model", "read_checkpoint", "save",
]

PathLike = str | os.PathLike[str]
CONFIG_FILE = "config.json"  # clipforge and Hugging Face directories
WEIGHTS_FILE = "model.safetensors"
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """A checkpoint read from disk: architecture, clipforge-named tensors, where it came from."""

    config: CLIPConfig
    state_dict: dict[str, Tensor]
    source: Path
    format: str  # "clipforge", "hf", "openclip" (OpenCLIP's names, also OpenAI's) or "openai" (TorchScript)
    tokenizer_dir: Path | None = None  # a directory holding tokenizer files, if any
    text_cleaning: str | None = None  # OpenCLIP's cleaning before a Hugging Face tokenizer, for OpenCLIP's models


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():  # sharded: {"weight_map": {tensor name: shard file}}
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_tensors(directory / shard)[0])
        return state
    for name in HF_WEIGHTS:
        if (directory / name).is_file():
            return read_tensors(directory / name)[0]
    raise CheckpointError(f"{directory}: Hugging Face directory without {' or '.join(HF_WEIGHTS)}")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "spiece.model", "vocab.txt")) or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    )


def _not_a_checkpoint_directory(directory: Path) -> CheckpointError:
    """The error for a directory without a config: what it holds, and the weights file in it, if
    one is there, to give instead."""
    names = sorted(p.name for p in directory.iterdir())
    held = f"{len(names)} {'entry' if len(names) == 1 else 'entries'} ({few(names, 4)})" if names else "nothing"
    weights = [n for n in names if n.endswith(WEIGHTS_SUFFIXES)]
    hint = f"; give a weights file itself, such as {directory / weights[0]}" if weights else ""
    return CheckpointError(f"{directory}: not a checkpoint directory (no {CONFIG_FILE} or {OPENCLIP_CONFIG}; "
                           f"it holds {held}){hint}")


def _read_directory(directory: Path) -> Checkpoint:
    tokenizer_dir = directory if _has_tokenizer(directory) else None
    if (directory / OPENCLIP_CONFIG).is_file():
        config = config_from_openclip(read_json(directory / OPENCLIP_CONFIG), directory / OPENCLIP_CONFIG)
        weights = next((directory / n for n in OPENCLIP_WEIGHTS if (directory / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{directory}: OpenCLIP directory without {' or '.join(OPENCLIP_WEIGHTS)}")
        state, _ = to_clipforge_names(read_tensors(weights)[0], weights)
        return Checkpoint(config, state, weights, "openclip", tokenizer_dir)
    if not (directory / CONFIG_FILE).is_file():
        raise _not_a_checkpoint_directory(directory)
    data = read_json(directory / CONFIG_FILE)
    model_type = data.get("model_type")
    if isinstance(model_type, str) and model_type not in HF_MODEL_TYPES:  # BLIP, ... also have a vision_config
        raise CheckpointError(f"{directory / CONFIG_FILE}: describes a Hugging Face {model_type!r} model "
                              "(its model_type), not CLIP or SigLIP or Chinese-CLIP, the models clipforge reads")
    if data.get("format") == "clipforge":
        try:
            config = CLIPConfig.from_dict(data["model"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{directory / CONFIG_FILE}: invalid clipforge config: {err}") from err
        state = read_tensors(directory / WEIGHTS_FILE)[0]
        return Checkpoint(config, state, directory / WEIGHTS_FILE, "clipforge", tokenizer_dir)
    if model_type in HF_MODEL_TYPES or "vision_config" in data:
        config = config_from_hf(data, _hf_image_processor(directory)[0], directory / CONFIG_FILE)
        state = from_hf(_read_hf_weights(directory))
        return Checkpoint(config, state, directory, "hf", tokenizer_dir)
    raise CheckpointError(f"{directory / CONFIG_FILE}: neither a clipforge nor a Hugging Face CLIP config")


def read_checkpoint(path: PathLike, *, act: str | None = None) -> Checkpoint:
    """Reads any supported checkpoint file or directory into clipforge's names.

    ``act`` sets the activation of weights that come without a config (see the module notes).
    """
    path = Path(path)
    if path.is_dir():
        checkpoint = _read_directory(path)
        if act is not None:
            checkpoint.config = checkpoint.config.with_activation(act)
        return checkpoint
    raw, torchscript = read_tensors(path)
    state, naming = to_clipforge_names(raw, path)
    if act is None:
        quick = torchscript or "quickgelu" in path.name.lower().replace("_", "")
        act = "quick_gelu" if quick else "gelu"
    try:
        config = infer_config(state, act=act, path=path)
    except CheckpointError:
        raise
    except ValueError as err:
        raise CheckpointError(f"{path}: tensor shapes do not form a supported CLIP: {err}") from err
    return Checkpoint(config, state, path, "openai" if torchscript else naming)


# ----------------------------------------------------------------------------- loading


def _load_weights(model: CLIP, state: dict[str, Tensor], source: Path) -> None:
    """Loads ``state`` into ``model``, or raises a CheckpointError naming every misfit."""
    expected = model.state_dict()
    # BatchNorm's batch counter only matters for momentum=None; OpenAI's files may lack it.
    state = dict(state)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value, device="cpu")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {few(mismatched)}")
    if problems:
        raise CheckpointError(f"{source}: does not fit the model it describes; " + "; ".join(problems))
    model.load_state_dict(state, assign=True)


def _assemble(checkpoint: Checkpoint) -> CLIP:
    """A model holding the checkpoint's tensors as they are (dtype included), after checking them."""
    with torch.device("meta"):  # no random init for weights about to be replaced
        model = CLIP(checkpoint.config)
    _load_weights(model, checkpoint.state_dict, checkpoint.source)
    return model


class RandomWeightsWarning(UserWarning):
    """`load` or `load_for_inference` was given an architecture name: the model's weights are random."""


def is_preset(name_or_path: PathLike) -> bool:
    """Whether ``name_or_path`` names a preset (random weights) rather than an existing file or folder."""
    if Path(name_or_path).exists():
        return False
    return str(name_or_path).removesuffix(QUICKGELU_SUFFIX) in PRESETS


def _warn_if_random(name_or_path: PathLike, *, stacklevel: int, pretrained: PathLike | None = None) -> None:
    """Says that a preset name without ``pretrained`` gives random weights; ``stacklevel`` 2
    names the caller's caller."""
    if pretrained is None and is_preset(name_or_path):
        warnings.warn(
            f"{str(name_or_path)!r} is an architecture name, so its weights are random (untrained); "
            "give a pretrained name (`clipforge models` lists them) or a checkpoint for trained weights",
            RandomWeightsWarning,
            stacklevel=stacklevel + 1,
        )


def _preset_config(architecture: str, name: str) -> CLIPConfig:
    """The preset ``architecture`` (``-quickgelu`` suffix included), or a CheckpointError naming
    ``name`` when this version of clipforge does not define it."""
    try:
        return get_config(architecture)
    except ValueError:
        raise CheckpointError(f"{name}: needs the {architecture} architecture, which this version of clipforge "
                              f"does not define (presets: {', '.join(PRESETS)})") from None


def _weights_into(config: CLIPConfig, path: Path) -> Checkpoint:
    """The tensors of a weights file (or a checkpoint folder) for the architecture ``config``."""
    if path.is_dir():
        state = read_checkpoint(path).state_dict
    else:
        state = to_clipforge_names(read_tensors(path)[0], path)[0]
    return Checkpoint(config, state, path, "openclip")


def _with_entry(config: CLIPConfig, entry: Pretrained, act: str | None, source: Path) -> CLIPConfig:
    """``config`` with the entry's activation (or ``act``) and pixel statistics, after checking
    that its image size is the entry's."""
    pre = entry.preprocessing
    if config.vision.image_size != pre.image_size:
        raise CheckpointError(f"{source}: images of {config.vision.image_size} pixels, but {entry.name} is "
                              f"registered at {pre.image_size}")
    config = replace(config, vision=replace(config.vision, mean=pre.mean, std=pre.std))
    if act:
        return config.with_activation(act)
    return replace(config, vision=replace(config.vision, act=entry.activation),
                   text=replace(config.text, act=entry.text_activation or entry.activation))


HF_PREPROCESSOR = "preprocessor_config.json"
HF_PROCESSOR = "processor_config.json"  # transformers 5 saves a processor's image settings here


def _hf_image_processor(directory: Path) -> tuple[dict[str, Any] | None, Path]:
    """A transformers folder's image processor settings and the file holding them: ``preprocessor_config.json``,
    else the ``image_processor`` of ``processor_config.json`` (as transformers 5 saves a processor); None if neither."""
    if (directory / HF_PREPROCESSOR).is_file():
        return read_json(directory / HF_PREPROCESSOR), directory / HF_PREPROCESSOR
    processor = read_json(directory / HF_PROCESSOR) if (directory / HF_PROCESSOR).is_file() else {}
    nested = processor.get("image_processor")
    return (nested if isinstance(nested, dict) else None), directory / HF_PROCESSOR
# transformers' image processors that never crop (SigLIP's); CLIPImageProcessor and
# ChineseCLIPImageProcessor crop unless ``do_center_crop`` is false.
_SQUASHING_PROCESSORS = ("SiglipImageProcessor", "SiglipImageProcessorFast")
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's filter numbers, as transformers writes ``resample``


def _hf_geometry(directory: Path) -> dict[str, Any]:
    """The resize of a transformers folder's image processor (`_hf_image_processor`): a
    ``size`` of height and width without a centre crop squashes to the square (SigLIP's processor;
    Chinese-CLIP's releases, ``do_center_crop: false``), else the short side is resized and the
    centre cropped (CLIP's); ``resample`` picks bicubic or bilinear."""
    data, path = _hf_image_processor(directory)
    if data is None:
        return {}
    geometry: dict[str, Any] = {}
    size = data.get("size")
    crops = data.get("do_center_crop", data.get("image_processor_type") not in _SQUASHING_PROCESSORS)
    if isinstance(size, dict) and "height" in size and "width" in size and not crops:
        geometry["resize_mode"] = "squash"  # resized to the square (SigLIP's; Chinese-CLIP's releases too)
    if "resample" in data:
        if data["resample"] not in _PIL_RESAMPLE:
            raise CheckpointError(f"{path}: resample={data['resample']!r} is not supported; clipforge resizes "
                                  "with bilinear (2) or bicubic (3) filters")
        geometry["interpolation"] = _PIL_RESAMPLE[data["resample"]]
    return geometry


def _openclip_text_cfg(checkpoint: Checkpoint) -> tuple[Path, dict[str, Any]]:
    """(the ``open_clip_config.json`` beside an OpenCLIP checkpoint, its ``model_cfg.text_cfg``);
    an empty ``text_cfg`` where there is no such file, or for another format."""
    config_file = checkpoint.source.parent / OPENCLIP_CONFIG
    if checkpoint.format != "openclip" or not config_file.is_file():
        return config_file, {}
    model_cfg = read_json(config_file).get("model_cfg", {})
    text_cfg = model_cfg.get("text_cfg", {}) if isinstance(model_cfg, dict) else {}
    return config_file, text_cfg if isinstance(text_cfg, dict) else {}


def _openclip_cleaning(checkpoint: Checkpoint) -> str | None:
    """OpenCLIP's text cleaning for a folder read by its ``open_clip_config.json`` whose text tower
    takes a Hugging Face tokenizer (``tokenizer_kwargs.clean``, OpenCLIP's "whitespace" when
    absent); None for other checkpoints, which clean text as their tokenizer's own library does."""
    from clipforge.tokenizer.siglip import OPENCLIP_CLEANING

    config_file, text_cfg = _openclip_text_cfg(checkpoint)
    if not text_cfg.get("hf_tokenizer_name"):
        return None
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    cleaning = kwargs.get("clean", "whitespace") if isinstance(kwargs, dict) else "whitespace"
    if cleaning not in OPENCLIP_CLEANING:
        raise CheckpointError(f"{config_file}: text_cfg.tokenizer_kwargs.clean is {cleaning!r}; OpenCLIP's cleanings "
                              f"are {', '.join(OPENCLIP_CLEANING)}")
    return cleaning


def _hub_tokenizer(checkpoint: Checkpoint, repo: str, revision: str | None) -> Path | None:
    """The tokenizer files of an OpenCLIP Hub repository whose ``open_clip_config.json`` names a
    Hugging Face tokenizer (``hf_tokenizer_name``: SigLIP's, its own repository's or another's);
    None for one that names none (OpenAI's vocabulary)."""
    named = _openclip_text_cfg(checkpoint)[1].get("hf_tokenizer_name")
    if not isinstance(named, str) or named.count("/") != 1 or named.startswith(("/", ".", "~")) or ":" in named:
        return None  # none, or a local folder (as `convert` writes it): the snapshot's own files, if any
    return fetch_tokenizer(named, revision=revision if named == repo else None)


def _read_source(
    name_or_path: PathLike, *, pretrained: PathLike | None, act: str | None
) -> tuple[CLIPConfig, Checkpoint | None, Preprocessing | None, str]:
    """What a model name holds, downloaded if needed: (architecture, checkpoint or None for a
    preset, the registry's preprocessing or None, the name to report it by)."""
    where = resolve(name_or_path, None if pretrained is None else str(pretrained))
    if where.kind == "preset":
        config = _preset_config(str(where.architecture), where.name)
        return (config.with_activation(act) if act else config), None, None, where.name
    if where.kind == "weights":  # an architecture + a weights file, as OpenCLIP's pretrained=FILE
        config = _preset_config(str(where.architecture), where.name)
        checkpoint = _weights_into(config.with_activation(act) if act else config, where.path)
        return checkpoint.config, checkpoint, None, where.name
    if where.kind == "path":
        checkpoint = read_checkpoint(where.path, act=act)
        return checkpoint.config, checkpoint, None, where.name
    if where.kind == "hub":
        checkpoint = read_checkpoint(fetch_repo(where.repo_id, revision=where.revision, layout=where.layout), act=act)
        if checkpoint.tokenizer_dir is None and checkpoint.format == "openclip":
            checkpoint.tokenizer_dir = _hub_tokenizer(checkpoint, where.repo_id, where.revision)
        return checkpoint.config, checkpoint, None, where.name
    entry = where.entry
    if entry.layout == "hf":  # a CLIPModel repository: its own config
        checkpoint = read_checkpoint(fetch_entry(entry, revision=where.revision))
    else:  # one weights file: the registered architecture, checked before anything is downloaded
        config = _preset_config(entry.architecture, entry.name)
        checkpoint = _weights_into(config, fetch_entry(entry, revision=where.revision))
        if entry.tokenizer is not None:  # its vocabulary is not OpenAI's: the files of its repository
            pin = where.revision if entry.tokenizer == entry.hub else None
            checkpoint.tokenizer_dir = fetch_tokenizer(entry.tokenizer, revision=pin)
            checkpoint.text_cleaning = entry.text_cleaning
    checkpoint.config = _with_entry(checkpoint.config, entry, act, checkpoint.source)
    return checkpoint.config, checkpoint, entry.preprocessing, where.name


def _load(
    name_or_path: PathLike, *, pretrained: PathLike | None, device: str | torch.device, dtype: torch.dtype | None,
    act: str | None,
) -> tuple[CLIP, Path | None, Preprocessing | None, str]:
    """The model, the directory holding its tokenizer files if there is one, the registry's
    preprocessing if it is a registered model, and the name to report it by."""
    config, checkpoint, preprocessing, name = _read_source(name_or_path, pretrained=pretrained, act=act)
    if checkpoint is None:
        model, tokenizer_dir = CLIP(config), None
    else:
        model, tokenizer_dir = _assemble(checkpoint), checkpoint.tokenizer_dir
    return model.to(device=device, dtype=dtype or torch.float32).eval(), tokenizer_dir, preprocessing, name


def load_model(
    name_or_path: PathLike,
    *,
    pretrained: PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    act: str | None = None,
) -> CLIP:
    """A `CLIP` in eval mode: a preset with random weights, or released or saved weights (the
    names of `load`).

    Floating-point weights are cast to ``dtype`` (float32 when None, whatever the file holds);
    ``act`` ("gelu" or "quick_gelu") overrides the activation.  A preset name builds a fresh
    model without a warning: this is the call that makes a model to train or save, where random
    weights are what is asked for (`load` warns).
    """
    return _load(name_or_path, pretrained=pretrained, device=device, dtype=dtype, act=act)[0]


def _lowercase_as_siglip2(tokenizer: Any) -> None:
    """Lower-cases text before a Gemma tokenizer, as transformers' ``Siglip2Tokenizer`` does.

    transformers' AutoTokenizer reads the tokenizer of every ``Siglip2Model`` folder (model_type
    "siglip2": the NaFlex models) as Siglip2Tokenizer, whatever class its tokenizer_config.json names
    (Google's NaFlex repositories name GemmaTokenizer; transformers lists siglip2 among the models whose
    Hub tokenizer class is wrong).
    """
    if hasattr(tokenizer, "lower_case"):
        tokenizer.lower_case()


def _load_with_tools(
    name_or_path: PathLike, *, pretrained: PathLike | None, device: str | torch.device, dtype: torch.dtype | None,
    act: str | None, with_tokenizer: bool = True,
) -> tuple[CLIP, Callable, Any, str]:
    from clipforge.tokenizer import Tokenizer, load_tokenizer
    from clipforge.transforms import image_transform, naflex_transform

    config, checkpoint, pre, name = _read_source(name_or_path, pretrained=pretrained, act=act)
    model = CLIP(config) if checkpoint is None else _assemble(checkpoint)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    tokenizer_dir = None if checkpoint is None else checkpoint.tokenizer_dir
    vision, text = model.config.vision, model.config.text
    geometry: dict[str, Any] = {}
    # A folder read by its open_clip_config.json (a path or a Hub snapshot, not a weights file
    # given alone): its preprocess_cfg's geometry, beside the statistics the config already holds.
    config_file = None if checkpoint is None else checkpoint.source.parent / OPENCLIP_CONFIG
    if (pre is None and config_file is not None and pretrained is None and not Path(name_or_path).is_file()
            and checkpoint.format == "openclip" and config_file.is_file()):
        geometry = preprocess_from_openclip(read_json(config_file), config_file)
    if pre is None and checkpoint is not None and checkpoint.format == "hf":
        geometry = _hf_geometry(checkpoint.source)
    pre = pre or Preprocessing(vision.image_size, vision.mean, vision.std)
    options = {"resize_mode": pre.resize_mode, "interpolation": pre.interpolation, **geometry}
    if vision.naflex:  # SigLIP 2 NaFlex: each image at its own grid, bilinear unless its processor says otherwise
        interpolation = geometry.get("interpolation", "bilinear")
        preprocess: Callable = naflex_transform(vision.patch_size, vision.max_num_patches, mean=vision.mean,
                                                std=vision.std, interpolation=interpolation)
    else:
        try:
            preprocess = image_transform(pre.image_size, mean=pre.mean, std=pre.std, **options)
        except ValueError as err:  # only a config's preprocess_cfg can hold an unknown mode
            raise CheckpointError(f"{config_file}: preprocess_cfg: {err}") from None
    if not with_tokenizer:
        tokenizer = None
    elif tokenizer_dir is not None:  # the model's own: trusted as transformers trusts it (ids are checked on use)
        tokenizer = Tokenizer.from_dir(tokenizer_dir, context_length=text.tokens)
        cleaning = checkpoint.text_cleaning or _openclip_cleaning(checkpoint)
        if cleaning is not None and hasattr(tokenizer, "clean_as"):  # a Hugging Face tokenizer run as OpenCLIP runs it
            tokenizer.clean_as(cleaning)
        if vision.naflex:
            _lowercase_as_siglip2(tokenizer)
    elif text.vocab_size == OPENAI_VOCAB_SIZE and text.pool != "cls":
        tokenizer = load_tokenizer(context_length=text.context_length)
    else:
        tokenizer = None
    return model, preprocess, tokenizer, name


def load(
    name_or_path: PathLike,
    *,
    pretrained: PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    act: str | None = None,
) -> tuple[CLIP, Callable, Any]:
    """(model, preprocess, tokenizer) for a model name or a checkpoint; the model as `load_model`'s.

        load("ViT-B-32", pretrained="openai")               # OpenCLIP's pair; also "ViT-B-32:openai"
        load("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")  # an OpenCLIP Hub repository (@REV pins one)
        load("openai/clip-vit-base-patch32")                 # a Hub repository holding a CLIPModel
        load("ckpt/")                                        # a file or folder; "ViT-B-32" alone: random

    The names, in full (`clipforge.checkpoints.registry`): an existing path first; then a registry
    name, ``ARCH:TAG`` (``pretrained=TAG``) or a registered repository id, whose entry sets the
    activation and the preprocessing; then a preset, with random weights and a
    `RandomWeightsWarning`; then ``hf-hub:ORG/NAME`` or ``ORG/NAME``, optionally ``@REVISION``.
    ``pretrained`` may also be a weights file for the architecture ``name_or_path`` names.
    Downloads go to the Hugging Face cache (Hub repositories) or ``CLIPFORGE_CACHE`` (plain
    addresses), once (`clipforge.checkpoints.download`).  An unknown name is an
    `UnknownModelError`, a failed download a `DownloadError`: one line each, saying what to do.

    ``preprocess`` maps a PIL image to the model's input tensor.  The tokenizer is the one
    stored with the checkpoint, else OpenAI's when the vocabulary is OpenAI's 49,408 ids, else
    None (a custom vocabulary whose tokenizer was not saved with the weights).
    """
    model, preprocess, tokenizer, _ = _load_with_tools(name_or_path, pretrained=pretrained, device=device,
                                                       dtype=dtype, act=act)
    _warn_if_random(name_or_path, stacklevel=2, pretrained=pretrained)
    return model, preprocess, tokenizer


# ----------------------------------------------------------------------------- for inference

@dataclass
class InferenceModel:
    """A model ready to embed images and texts: what `load_for_inference` returns."""

    model: CLIP  # in eval mode, on ``device``, fp32 weights
    preprocess: Callable  # PIL image -> the model's input tensor
    tokenizer: Any  # list of texts -> token ids [B, L]
    device: torch.device
    precision: str  # "fp32" or "bf16" (autocast)
    source: str  # the name or path it was loaded from

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype to autocast to (`clipforge.embed`'s ``autocast_dtype``), None for fp32."""
        return torch.bfloat16 if self.precision == "bf16" else None


def load_for_inference(
    name_or_path: PathLike,
    *,
    pretrained: PathLike | None = None,
    tokenizer: PathLike | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    need_tokenizer: bool = True,
) -> InferenceModel:
    """The one way to load a model for use (evaluation, search, scoring, generation, serving).

    ``name_or_path`` and ``pretrained`` take the names `load` takes (``"ViT-B-32:openai"``,
    ``hf-hub:...``, a repository id, a path); ``tokenizer`` is a tokenizer folder that replaces
    the checkpoint's own; ``device`` None picks CUDA when available (`default_device`);
    ``precision`` is "fp32" or "bf16" (autocast over fp32 weights).  A CheckpointError when the
    model comes without a tokenizer and none is given; with ``need_tokenizer`` False (image
    features only, as a linear probe uses) none is looked for, and the result's ``tokenizer`` is
    None unless ``tokenizer`` is given.  A `RandomWeightsWarning` for a preset name, as from `load`.
    The result's ``source`` is the name as the registry spells it.
    """
    run_on = default_device(device)
    note = check_precision(precision, run_on)
    if note:
        warnings.warn(note, stacklevel=2)
    model, preprocess, loaded_tokenizer, source = _load_with_tools(name_or_path, pretrained=pretrained,
                                                                   device=run_on, dtype=None, act=None,
                                                                   with_tokenizer=need_tokenizer)
    if tokenizer is not None:
        from clipforge.checkpoints.export import read_tokenizer

        loaded_tokenizer = read_tokenizer(tokenizer, model.config)
        if model.config.vision.naflex:
            _lowercase_as_siglip2(loaded_tokenizer)
    if loaded_tokenizer is None and need_tokenizer:
        raise CheckpointError(
            f"{source}: no tokenizer comes with this model (its vocabulary has "
            f"{model.config.text.vocab_size} ids, not OpenAI's); give its tokenizer folder "
            "(--tokenizer DIR; tokenizer= in Python)"
        )
    _warn_if_random(name_or_path, stacklevel=2, pretrained=pretrained)  # after the checks: a failed load says why
    return InferenceModel(model, preprocess, loaded_tokenizer, run_on, precision, source)


# ----------------------------------------------------------------------------- writing


def save(model: CLIP, directory: PathLike, *, tokenizer: Any = None) -> Path:
    """Writes clipforge's format: ``config.json``, ``model.safetensors`` and the tokenizer's files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": "clipforge", "version": FORMAT_VERSION, "model": model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_tensors(model.state_dict(), directory / WEIGHTS_FILE)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def convert(src: PathLike | Checkpoint, dst: PathLike, *, to: str, act: str | None = None,
            tokenizer: PathLike | None = None) -> Path:
    """Rewrites the checkpoint ``src`` in another format; every tensor is kept bit for bit.

    ``to``: "clipforge" (a directory), "hf" (a Hugging Face directory: ``CLIPModel`` weights and
    config, the tokenizer's files and ``preprocessor_config.json``, which ``AutoModel`` and
    ``AutoProcessor`` load as they are) or "openclip" (OpenCLIP's hub layout, a directory with
    ``open_clip_config.json``, or a bare state dict when ``dst`` ends in ``.safetensors``, ``.pt``
    or ``.bin``; `export.openclip_usage` names the OpenCLIP call that loads it).  Weights keep the
    dtype they were stored in.  ``tokenizer`` is a tokenizer folder to write instead of the
    checkpoint's own; without either, exports carry OpenAI's for OpenAI's vocabulary (see
    `clipforge.checkpoints.export`).  ``dst`` must be a new path or an empty folder.  ``src`` may
    be a `Checkpoint` already read (``act`` then has no effect).
    """
    from clipforge.checkpoints.export import check_destination, export_tokenizer, hf_extras, read_tokenizer

    if to not in ("clipforge", "hf", "openclip"):
        raise ValueError(f"to must be 'clipforge', 'hf' or 'openclip', got {to!r}")
    checkpoint = src if isinstance(src, Checkpoint) else None
    check_destination(checkpoint.source if checkpoint else src, dst)
    checkpoint = checkpoint or read_checkpoint(src, act=act)
    if to == "openclip" and checkpoint.config.family == "chinese_clip":
        raise CheckpointError(f"{checkpoint.source}: OpenCLIP has no Chinese-CLIP model (a BERT text tower); "
                              "convert it to 'hf' or 'clipforge' instead")
    if to == "openclip" and checkpoint.config.vision.naflex:
        raise CheckpointError(f"{checkpoint.source}: {NAFLEX_NOT_IN_OPENCLIP}")
    model = _assemble(checkpoint)
    folder = tokenizer if tokenizer is not None else checkpoint.tokenizer_dir
    dst = Path(dst)
    if to == "clipforge":
        return save(model, dst, tokenizer=None if folder is None else read_tokenizer(folder, model.config))
    state = model.state_dict()
    if to == "openclip" and dst.suffix in (".safetensors", ".pt", ".bin"):
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(to_openclip(state), dst)
        return dst
    if to == "openclip":
        configs = {OPENCLIP_CONFIG: config_to_openclip(model.config)}
        weights, weights_file = to_openclip(state), OPENCLIP_WEIGHTS[0]
        own = None  # OpenAI's vocabulary needs no files: OpenCLIP's own tokenizer is OpenAI's, exactly
        if folder is not None or model.config.text.vocab_size != OPENAI_VOCAB_SIZE:
            own = export_tokenizer(model.config, folder, to=to)
        if own is not None and model.config.text.vocab_size != OPENAI_VOCAB_SIZE:
            # open_clip.get_tokenizer("local-dir:DIR") then reads the directory's tokenizer files.
            configs[OPENCLIP_CONFIG]["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = str(dst)
    else:
        hf, preprocessor = config_to_hf(model.config)
        hf["torch_dtype"] = str(state["visual.conv1.weight"].dtype).removeprefix("torch.")
        own = export_tokenizer(model.config, folder, to=to)
        configs = hf_extras(hf, preprocessor, own)
        weights, weights_file = to_hf(state, patch_linear=model.config.vision.naflex), WEIGHTS_FILE
    dst.mkdir(parents=True, exist_ok=True)
    for name, content in configs.items():
        (dst / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    write_tensors(weights, dst / weights_file)
    if own is not None:
        own.save_hf(dst)
    return dst
