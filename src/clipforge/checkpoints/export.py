"""What `convert` writes beside the weights, so that transformers and OpenCLIP load an export unchanged.

    tokenizer = export_tokenizer(model.config, checkpoint.tokenizer_dir, to="hf")  # None: warned
    files = hf_extras(hf_config, preprocessor, tokenizer)    # {"config.json": ..., "preprocessor_config.json": ...}
    openclip_name(model.config)                               # "ViT-B-32-quickgelu", or None
    openclip_usage(model.config, "vit-b-32.safetensors")      # the OpenCLIP call that loads it

**Hugging Face** (``convert --to hf``): ``AutoModel.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)`` read the directory as it is.  Beside ``config.json`` and
the weights it holds the tokenizer's files (`clipforge.tokenizer.Tokenizer.save_hf`: vocab.json,
merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json) and
``preprocessor_config.json``: ``CLIPImageProcessor`` with clipforge's preprocessing (the short side
resized bicubic to the image size, a centred square crop, the model's mean and std).  The
tokenizer is the one the model uses: its own folder (the checkpoint's, or ``tokenizer=``), else
OpenAI's BPE when the vocabulary is OpenAI's 49,408 ids.  A model with another vocabulary and no
tokenizer folder is still converted, without tokenizer files, and a `MissingTokenizerWarning` says
so: its weights load in ``AutoModel``, its text needs the tokenizer it was trained with.

Two differences from clipforge's numbers are transformers' own, as for its copies of OpenAI's models:
its ``CLIPTokenizer`` does not clean text with ``ftfy`` and ``html.unescape`` (see `Tokenizer.save_hf`),
and its default image backend (torchvision) resizes tensors, a few grey levels off Pillow's
bicubic filter; ``AutoProcessor.from_pretrained(dir, backend="pil")`` resizes with Pillow as
clipforge does.

A Chinese-CLIP model becomes a ``ChineseCLIPModel`` directory: its BERT tokenizer's files
(`clipforge.tokenizer.wordpiece.WordPieceTokenizer.save_hf`: vocab.txt, tokenizer.json,
tokenizer_config.json naming ``BertTokenizer``) and ``ChineseCLIPImageProcessor``'s config.

**OpenCLIP** (``convert --to openclip``): a bare state dict (``.safetensors``, ``.pt``, ``.bin``)
loads with ``open_clip.create_model_and_transforms(NAME, pretrained=FILE)`` where NAME is
OpenCLIP's name for the architecture, QuickGELU included:

| clipforge preset | GELU weights | QuickGELU weights (OpenAI's, MetaCLIP's, DFN's) |
|---|---|---|
| RN50, RN101, RN50x4, RN50x16, RN50x64 | the same name | the name + ``-quickgelu`` |
| ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336 | the same name | the name + ``-quickgelu`` |
| ViT-H-14, ViT-bigG-14 | the same name | the name + ``-quickgelu`` |
| ViT-g-14 | ViT-g-14 | ViT-g-14 with ``force_quick_gelu=True`` (OpenCLIP has no ``-quickgelu`` config) |
| tiny, tiny-vit, any other shape, other mean/std, a logit bias | no name: write a directory | |

A directory (``open_clip_config.json`` and ``open_clip_model.safetensors``, OpenCLIP's hub layout)
loads whatever the architecture with ``open_clip.create_model_and_transforms("local-dir:DIR")``
(OpenCLIP 3.0 and later; ``"hf-hub:ORG/NAME"`` once uploaded).  A model with its own vocabulary
carries its tokenizer files there, and ``text_cfg.hf_tokenizer_name`` is set so that
``open_clip.get_tokenizer("local-dir:DIR")`` reads them; before uploading, set it to the
repository's id, as OpenCLIP's ``push_to_hf_hub --hf-tokenizer-self`` does.

A SigLIP model's directory names timm's image tower of its shape (only the released sizes have one,
`configs.timm_siglip_name`), which runs the activation timm gives that name, and carries the
tokenizer's own files (``spiece.model``, or Gemma's ``tokenizer.json``) without
``tokenizer_kwargs``: OpenCLIP's ``HFTokenizer`` then cleans text its "whitespace" way, the
closest of its cleanings to transformers' (SigLIP's OpenCLIP configs say "canonicalize", which
also lower-cases and drops punctuation).  Every cleaning there fixes text with ``ftfy`` and
``html.unescape`` and collapses whitespace, so captions with HTML entities (SigLIP 2: runs of
whitespace too) get other ids than transformers gives; clipforge reading the directory back
cleans as OpenCLIP does (tests/test_siglip_exports.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from clipforge.checkpoints._errors import CheckpointError
from clipforge.model.config import OPENAI_VOCAB_SIZE, PRESETS, QUICKGELU_SUFFIX, CLIPConfig
from clipforge.tokenizer import Tokenizer, load_tokenizer
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

__all__ = [
    "OPENCLIP_NAMES", "MissingTokenizerWarning", "check_destination", "export_tokenizer", "hf_extras",
    "openclip_name", "openclip_usage", "read_tokenizer",
]

# OpenCLIP's built-in model configs (open_clip/model_configs/*.json) with the shapes of the clipforge
# preset of the same name, OpenAI's pixel statistics and no logit bias; the value says whether a
# "-quickgelu" config exists too.  tests/fixtures/make_export_fixtures.py checks both against
# open_clip 3.3.
OPENCLIP_NAMES = {
    "RN50": True, "RN101": True, "RN50x4": True, "RN50x16": True, "RN50x64": True,
    "ViT-B-32": True, "ViT-B-16": True, "ViT-L-14": True, "ViT-L-14-336": True,
    "ViT-H-14": True, "ViT-g-14": False, "ViT-bigG-14": True,
}


class MissingTokenizerWarning(UserWarning):
    """An export was written without tokenizer files: the model's vocabulary is not OpenAI's and
    no tokenizer folder came with it."""


# ----------------------------------------------------------------------------- destination


def check_destination(src: str | Path, dst: str | Path) -> None:
    """A CheckpointError unless ``dst`` is a new path or an empty folder: `convert` never overwrites."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        same = Path(src).exists() and dst.resolve() == Path(src).resolve()
        raise CheckpointError(f"{dst}: " + ("the source itself" if same else "already exists") +
                              "; give a new path (or an empty folder): convert never overwrites a checkpoint")


# ----------------------------------------------------------------------------- tokenizer


def read_tokenizer(folder: str | Path, config: CLIPConfig) -> Tokenizer:
    """The tokenizer in ``folder``, for the model ``config`` describes: its context length, and a
    CheckpointError when its vocabulary has more ids than the model's embedding table."""
    tokenizer = Tokenizer.from_dir(folder, context_length=config.text.tokens)
    if tokenizer.vocab_size > config.text.vocab_size:
        raise CheckpointError(f"{folder}: a tokenizer of {tokenizer.vocab_size} ids, more than the model's "
                              f"vocab_size {config.text.vocab_size}; give the tokenizer the model was trained with")
    return tokenizer


def export_tokenizer(config: CLIPConfig, folder: str | Path | None, *, to: str) -> Tokenizer | None:
    """The tokenizer an export to ``to`` ("hf" or "openclip") carries: the one in ``folder``, else
    OpenAI's for OpenAI's vocabulary (its BPE file found as `clipforge.tokenizer.load_tokenizer`
    finds it), else None with a `MissingTokenizerWarning`.

    A CheckpointError when the folder's vocabulary has more ids than the model's embedding table.
    """
    text = config.text
    if folder is not None:
        return read_tokenizer(folder, config)
    if text.vocab_size == OPENAI_VOCAB_SIZE and text.pool != "cls":
        return load_tokenizer(context_length=text.context_length)
    home = "AutoProcessor" if to == "hf" else "open_clip.get_tokenizer"
    warnings.warn(
        f"no tokenizer files written: the model's vocabulary has {text.vocab_size} ids, not OpenAI's "
        f"{OPENAI_VOCAB_SIZE}, and no tokenizer folder comes with it, so {home} cannot encode text for it; "
        "give its tokenizer folder (--tokenizer DIR; tokenizer= in Python)",
        MissingTokenizerWarning,
        stacklevel=3,
    )
    return None


# ----------------------------------------------------------------------------- Hugging Face


def hf_extras(hf_config: dict[str, Any], preprocessor: dict[str, Any], tokenizer: Tokenizer | None
              ) -> dict[str, dict[str, Any]]:
    """``config.json`` and ``preprocessor_config.json`` as transformers' pipeline reads them.

    ``hf_config`` and ``preprocessor`` are `configs.config_to_hf`'s.  The text tower's start, end
    and pad ids become the tokenizer's (a trained vocabulary may be smaller than the embedding
    table, and transformers pools the text at the first ``eos_token_id``); the preprocessor names
    ``CLIPProcessor``, the class ``AutoProcessor`` builds from the directory.  A ``ChineseCLIPModel``
    takes the tokenizer's pad id (its BERT masks nothing by itself: the processor's attention mask
    does) and names ``ChineseCLIPProcessor``; a ``SiglipModel`` takes the tokenizer's own ids and
    names ``SiglipProcessor`` (a ``Siglip2Model``, ``Siglip2Processor``).
    """
    text_config = dict(hf_config["text_config"])
    if hf_config.get("model_type") == "chinese_clip":
        if tokenizer is not None:
            text_config["pad_token_id"] = tokenizer.pad_token_id
        return {
            "config.json": {**hf_config, "text_config": text_config},
            "preprocessor_config.json": {**preprocessor, "processor_class": "ChineseCLIPProcessor"},
        }
    if hf_config.get("model_type") in ("siglip", "siglip2"):  # it reads the last position: the ids only describe
        if tokenizer is not None:
            text_config.update(bos_token_id=tokenizer.sot_token_id, eos_token_id=tokenizer.eot_token_id,
                               pad_token_id=tokenizer.pad_token_id)
        processor = "Siglip2Processor" if hf_config["model_type"] == "siglip2" else "SiglipProcessor"
        return {
            "config.json": {**hf_config, "text_config": text_config},
            "preprocessor_config.json": {**preprocessor, "processor_class": processor},
        }
    if tokenizer is not None:
        text_config.update(bos_token_id=tokenizer.sot_token_id, eos_token_id=tokenizer.eot_token_id,
                           pad_token_id=tokenizer.eot_token_id)  # what its processor pads with
    return {
        "config.json": {**hf_config, "text_config": text_config},
        "preprocessor_config.json": {**preprocessor, "processor_class": "CLIPProcessor"},
    }


# ----------------------------------------------------------------------------- OpenCLIP


def _architecture(config: CLIPConfig) -> tuple:
    """What OpenCLIP's name fixes: shapes, activation, pixel statistics; not the initial temperature.

    MLP widths, not ratios: a ratio read back from tensor shapes (6144 / 1408) is not the ratio
    written in a config (4.3637), though both build the same layer.
    """
    v, t = config.vision, config.text
    vision = (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.is_resnet or v.mlp_width, v.layer_norm_eps,
              tuple(v.mean), tuple(v.std))
    text = (t.context_length, t.vocab_size, t.width, t.heads, t.layers, t.mlp_width, t.layer_norm_eps)
    return config.embed_dim, vision, text, config.init_logit_bias is None


def openclip_name(config: CLIPConfig) -> str | None:
    """OpenCLIP's built-in model name for ``config`` ("ViT-B-32-quickgelu"), or None when none fits.

    ViT-g-14 with QuickGELU comes back as "ViT-g-14": pass ``force_quick_gelu=True`` too
    (`openclip_usage` says so).
    """
    if config.vision.act != config.text.act:
        return None
    quick = config.vision.act == "quick_gelu"
    for name, has_quick in OPENCLIP_NAMES.items():
        preset = PRESETS.get(name)
        if preset is None or (preset.vision.mean, preset.vision.std) != (OPENAI_MEAN, OPENAI_STD):
            continue
        if _architecture(preset.with_activation(config.vision.act)) == _architecture(config):
            return name + QUICKGELU_SUFFIX if quick and has_quick else name
    return None


def openclip_usage(config: CLIPConfig, path: str | Path) -> str:
    """One line: the OpenCLIP call that loads ``path`` as `convert` wrote it (a file or a directory)."""
    path = Path(path)
    name = openclip_name(config)
    force = ", force_quick_gelu=True" if name in OPENCLIP_NAMES and config.vision.act == "quick_gelu" else ""
    by_name = f"open_clip.create_model_and_transforms({name!r}, pretrained={{file!r}}{force})"
    if path.is_dir():
        line = f"open_clip.create_model_and_transforms('local-dir:{path}')"
        if name is not None:
            line += " or " + by_name.format(file=str(path / "open_clip_model.safetensors"))
        return f"in OpenCLIP: {line}"
    if name is not None:
        return "in OpenCLIP: " + by_name.format(file=str(path))
    return (f"no OpenCLIP model name has this architecture, so OpenCLIP cannot load {path} by name; write a "
            "directory instead (convert --to openclip DIR) and load it with "
            "open_clip.create_model_and_transforms('local-dir:DIR')")
