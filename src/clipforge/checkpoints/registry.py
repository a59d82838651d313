"""Released weights by name: the registry of pretrained CLIP models, and what a model name means.

    entry = resolve("ViT-B-32", pretrained="openai").entry    # the same as resolve("ViT-B-32:openai")
    [e.name for e in list_pretrained("laion2b*")]               # `clipforge models` prints them

The grammar of a model name, as `clipforge.load`, `load_for_inference` and every ``--model``
option read it::

    NAME := PATH                          an existing file or folder, read as today
          | ARCH ":" TAG                  released weights: ``ViT-B-32:openai``; in Python also
                                          ``load("ViT-B-32", pretrained="openai")``, on the command
                                          line also ``--model ViT-B-32 --pretrained openai``
          | "hf-hub:" ORG "/" REPO [@REV] an OpenCLIP or timm repository on the Hugging Face Hub
                                          (``open_clip_config.json`` + OpenCLIP's weights file)
          | ORG "/" REPO [@REV]           a Hugging Face repository holding a transformers
                                          ``CLIPModel`` (``openai/clip-vit-base-patch32``); one
                                          holding only OpenCLIP's files is read as ``hf-hub:``
          | ARCH                          a preset: random weights, with a RandomWeightsWarning

``ARCH`` is a preset of `clipforge.model.config` (``ViT-B-32``), which may carry OpenCLIP's
``-quickgelu`` suffix; ``TAG`` is OpenCLIP's pretrained tag (``laion2b_s34b_b79k``; case and
``-``/``_`` do not matter); ``REV`` pins a branch, tag or commit of a Hub repository
(``hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K@main``).  ``pretrained=`` may also be the path
of a weights file, read with the architecture ``ARCH`` names, as OpenCLIP's ``pretrained=`` is.

Precedence, when a string could be several things: an existing local path first (a folder named
``openai/clip-vit-base-patch32`` is read, not downloaded), then a registry name (``ARCH:TAG`` or
a repository id listed here, whose entry sets the activation and preprocessing), then a preset,
then a repository id.  A string that is none of them is an `UnknownModelError` of one line with
the closest known names (`difflib.get_close_matches` over the architectures and tags).

Each entry (`Pretrained`) records what loading needs and what a user chooses by: the
architecture, the MLP activation (part of the identity: OpenAI's weights and OpenCLIP's
``-quickgelu`` tags use QuickGELU, and the other one costs accuracy without any error, so
loading applies the entry's), the preprocessing, the licence, the download size, the published
ImageNet zero-shot top-1 with its source, and where the weights are: a Hugging Face repository
(preferred, the mirrors current OpenCLIP uses) and a plain URL with its SHA-256 as a fallback.

SigLIP and SigLIP 2 are registered twice: by OpenCLIP's names (``ViT-B-16-SigLIP:webli``: OpenCLIP's
weights file in a ``timm/`` repository, run as OpenCLIP runs it, whose SigLIP image towers are
timm's, with exact GELU where timm's tower has it, and whose tokenizer files come from the
repository its config names) and by Google's transformers repositories
(``google/siglip-base-patch16-224``: their own config, the tanh GELU in both towers).
Chinese-CLIP's four releases are registered by their transformers repositories
(``OFA-Sys/chinese-clip-vit-base-patch16``): QuickGELU in the ViT, GELU in the BERT text tower.

Sources.  Addresses, tags, activations and preprocessing: OpenCLIP 3.3.0's ``pretrained.py`` and
``model_configs/`` (for SigLIP, as tests/fixtures/siglip/preset_shapes.json records them).
Top-1: OpenCLIP's ``docs/openclip_results.csv`` (CLIP_benchmark, ImageNet-1k zero-shot; its
rows for OpenAI's weights are OpenCLIP's measurements, within a point of the CLIP paper's; a
Google SigLIP repository shows OpenCLIP's figure for the same weights); None where that table
has no row (SigLIP 2).  Parameter counts: clipforge's own models of each
architecture (equal to OpenCLIP's ``docs/model_profile.csv``); download sizes are estimated from
them at 4 bytes a parameter (fp32), as the Hub's file sizes cannot be read offline.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from clipforge.checkpoints._errors import CheckpointError
from clipforge.model.config import ACTIVATIONS, PRESETS, QUICKGELU_SUFFIX
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

__all__ = [
    "HF_HUB_PREFIX", "REGISTRY", "Preprocessing", "Pretrained", "Resolved", "UnknownModelError", "architectures",
    "list_pretrained", "resolve", "tags",
]

HF_HUB_PREFIX = "hf-hub:"
# A Hub repository id: ORG/NAME of letters, digits, "-", "_" and "." (huggingface_hub's own rule,
# less its length limit), optionally pinned to a revision with "@".
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[\w./-]+))?")
_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json")
# OpenCLIP's constants.INCEPTION_MEAN/STD: the statistics some LAION runs were trained with.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
# OpenAI's own model names (clip.available_models()), which clipforge spells as OpenCLIP does.
OPENAI_NAMES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
                "ViT-L/14@336px": "ViT-L-14-336"}


class UnknownModelError(CheckpointError, FileNotFoundError):
    """A model name that is no existing path, registry name, preset nor repository id; the
    message names the closest known names.  A FileNotFoundError too, as a missing path was."""


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model (`clipforge.transforms.image_transform`'s arguments)."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resize_mode: str = "shortest"  # "shortest": resize the short side, centre-crop; "squash"; "longest"
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class Pretrained:
    """One released set of weights."""

    name: str  # what to type: "ViT-B-32:openai", or a repository id for a transformers CLIPModel
    architecture: str  # the clipforge preset that holds the weights ("ViT-B-32")
    tag: str  # OpenCLIP's pretrained tag: who trained it on what ("openai", "laion2b_s34b_b79k")
    activation: str  # "gelu", "quick_gelu" or "gelu_tanh": what the weights were trained with (both towers)
    preprocessing: Preprocessing
    licence: str
    params: int  # parameters of the architecture
    top1: float | None = None  # published ImageNet-1k zero-shot top-1, as a fraction
    top1_source: str | None = None  # where that number is published
    hub: str | None = None  # Hugging Face repository id
    filename: str | None = None  # the weights file in ``hub``; None: OpenCLIP's (safetensors, else .bin)
    layout: str = "openclip"  # "openclip": one weights file, read into ``architecture``; "hf": a CLIPModel repo
    revision: str | None = None  # a pinned Hub revision; None: the default branch
    url: str | None = None  # a plain address, the fallback
    sha256: str | None = None  # of the file at ``url``: all 64 hex digits, or the 8 its name carries
    size_bytes: int | None = None  # the download's size, where known; else estimated from ``params``
    notes: tuple[str, ...] = field(default=())
    text_activation: str | None = None  # the text tower's, where it differs from the image tower's
    tokenizer: str | None = None  # the Hub repository of its tokenizer files; None: OpenAI's vocabulary
    text_cleaning: str | None = None  # OpenCLIP's cleaning before that tokenizer ("canonicalize" for SigLIP)

    def __post_init__(self) -> None:
        for act in (self.activation, self.text_activation or self.activation):
            if act not in ACTIVATIONS:
                raise ValueError(f"{self.name}: activation must be one of {ACTIVATIONS}, got {act!r}")
        if self.layout not in ("openclip", "hf"):
            raise ValueError(f"{self.name}: layout must be 'openclip' or 'hf', got {self.layout!r}")
        if self.hub is None and self.url is None:
            raise ValueError(f"{self.name}: needs a hub repository or a url")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{8}|[0-9a-f]{64}", self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 8 or 64 lowercase hex digits, got {self.sha256!r}")

    @property
    def activations(self) -> str:
        """The activation, or "IMAGE / TEXT" where the towers differ (as `clipforge models` shows it)."""
        text = self.text_activation or self.activation
        return self.activation if text == self.activation else f"{self.activation} / {text}"

    @property
    def download_size(self) -> int:
        """Bytes to download: ``size_bytes``, else the parameters at 4 bytes each (fp32)."""
        return self.size_bytes if self.size_bytes is not None else 4 * self.params

    @property
    def size_note(self) -> str:
        """How `download_size` is known."""
        if self.size_bytes is not None:
            return "the file's size"
        return f"estimated: {self.params:,} parameters x 4 bytes (fp32)"


@dataclass(frozen=True)
class Resolved:
    """What a model name means (`resolve`)."""

    kind: str  # "path", "preset", "pretrained", "hub", or "weights" (an architecture + a weights file)
    name: str  # the name to report: the path, the preset, the entry's name, or the hub name as given
    path: Path | None = None  # "path" and "weights": the local file or folder
    entry: Pretrained | None = None  # "pretrained"
    repo_id: str | None = None  # "hub"
    revision: str | None = None  # "hub" and "pretrained": a pinned revision
    layout: str | None = None  # "hub": "openclip" (hf-hub:) or "auto" (a bare repository id)
    architecture: str | None = None  # "preset" and "weights": the preset name, suffix included


# ----------------------------------------------------------------------------- the entries

# clipforge's models of each architecture, counted on the meta device (tests/test_registry.py
# checks them against every preset that exists).
ARCHITECTURE_PARAMS = {
    "RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601, "RN50x16": 290_979_217,
    "RN50x64": 623_258_305, "ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737, "ViT-L-14": 427_616_513,
    "ViT-L-14-336": 427_944_193, "ViT-H-14": 986_109_441, "ViT-g-14": 1_366_678_273, "ViT-bigG-14": 2_539_567_105,
}
ARCHITECTURE_PARAMS |= {
    "ViT-B-16-SigLIP": 203_155_970, "ViT-B-16-SigLIP-256": 203_202_050, "ViT-B-16-SigLIP-384": 203_447_810,
    "ViT-B-16-SigLIP-512": 203_791_874, "ViT-L-16-SigLIP-256": 652_150_786, "ViT-L-16-SigLIP-384": 652_478_466,
    "ViT-SO400M-14-SigLIP": 877_360_306, "ViT-SO400M-14-SigLIP-378": 877_960_498,
    "ViT-SO400M-14-SigLIP-384": 877_960_498,
    "ViT-B-16-SigLIP2": 375_187_970, "ViT-B-16-SigLIP2-256": 375_234_050, "ViT-B-16-SigLIP2-384": 375_479_810,
    "ViT-B-16-SigLIP2-512": 375_823_874, "ViT-B-32-SigLIP2-256": 376_856_066,
    "ViT-L-16-SigLIP2-256": 881_526_786, "ViT-L-16-SigLIP2-384": 881_854_466, "ViT-L-16-SigLIP2-512": 882_313_218,
    "ViT-SO400M-14-SigLIP2": 1_135_463_602, "ViT-SO400M-14-SigLIP2-378": 1_136_008_498,
    "ViT-SO400M-16-SigLIP2-256": 1_135_670_962, "ViT-SO400M-16-SigLIP2-384": 1_136_039_602,
    "ViT-SO400M-16-SigLIP2-512": 1_136_555_698,
    # SigLIP 2's NaFlex towers: the 256-pixel models' shapes, 256 patches at any aspect ratio
    "ViT-B-16-SigLIP2-NaFlex": 375_234_050, "ViT-SO400M-16-SigLIP2-NaFlex": 1_135_670_962,
}
ARCHITECTURE_PARAMS |= {
    "CN-CLIP-ViT-B-16": 188_262_913, "CN-CLIP-ViT-L-14": 406_233_089, "CN-CLIP-ViT-L-14-336": 406_560_769,
    "CN-CLIP-ViT-H-14": 957_598_209,
}
IMAGE_SIZES = {"RN50x4": 288, "RN50x16": 384, "RN50x64": 448, "ViT-L-14-336": 336}  # others: 224

SIGLIP_LICENCE = "Apache-2.0 (Google's SigLIP and SigLIP 2 model cards)"
CHINESE_CLIP_LICENCE = "MIT (OFA-Sys/Chinese-CLIP)"
OPENAI_LICENCE = "MIT (github.com/openai/CLIP; its model card advises against deployed use)"
OPENCLIP_LICENCE = "MIT (OpenCLIP / LAION model cards)"
METACLIP_LICENCE = "CC-BY-NC-4.0 (non-commercial; MetaCLIP model cards)"
TOP1_SOURCE = "OpenCLIP docs/openclip_results.csv (CLIP_benchmark, ImageNet-1k zero-shot)"

_AZURE = "https://openaipublic.azureedge.net/clip/models"
_RELEASES = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights"
_METACLIP = "https://dl.fbaipublicfiles.com/MMPT/metaclip"

# OpenAI's nine releases: the timm mirror current OpenCLIP loads, and OpenAI's address, whose
# path carries the file's SHA-256 (clip/clip.py checks it so).
_OPENAI = {
    "RN50": ("timm/resnet50_clip.openai", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt"),
    "RN101": ("timm/resnet101_clip.openai",
              "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt"),
    "RN50x4": ("timm/resnet50x4_clip.openai",
               "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt"),
    "RN50x16": ("timm/resnet50x16_clip.openai",
                "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt"),
    "RN50x64": ("timm/resnet50x64_clip.openai",
                "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt"),
    "ViT-B-32": ("timm/vit_base_patch32_clip_224.openai",
                 "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"),
    "ViT-B-16": ("timm/vit_base_patch16_clip_224.openai",
                 "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt"),
    "ViT-L-14": ("timm/vit_large_patch14_clip_224.openai",
                 "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"),
    "ViT-L-14-336": ("timm/vit_large_patch14_clip_336.openai",
                     "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt"),
}

# (architecture, tag): (hub repository, url or None, activation, licence).  OpenCLIP's release
# files end in the first 8 hex digits of their SHA-256.
_OPENCLIP = {
    ("RN50", "yfcc15m"): ("timm/resnet50_clip.yfcc15m", f"{_RELEASES}/rn50-quickgelu-yfcc15m-455df137.pt",
                          "quick_gelu", OPENCLIP_LICENCE),
    ("RN50", "cc12m"): ("timm/resnet50_clip.cc12m", f"{_RELEASES}/rn50-quickgelu-cc12m-f000538c.pt",
                        "quick_gelu", OPENCLIP_LICENCE),
    ("RN101", "yfcc15m"): ("timm/resnet101_clip.yfcc15m", f"{_RELEASES}/rn101-quickgelu-yfcc15m-3e04b30e.pt",
                           "quick_gelu", OPENCLIP_LICENCE),
    ("ViT-B-32", "laion400m_e31"): ("timm/vit_base_patch32_clip_224.laion400m_e31",
                                    f"{_RELEASES}/vit_b_32-quickgelu-laion400m_e31-d867053b.pt", "quick_gelu",
                                    OPENCLIP_LICENCE),
    ("ViT-B-32", "laion400m_e32"): ("timm/vit_base_patch32_clip_224.laion400m_e32",
                                    f"{_RELEASES}/vit_b_32-quickgelu-laion400m_e32-46683a32.pt", "quick_gelu",
                                    OPENCLIP_LICENCE),
    ("ViT-B-32", "laion2b_e16"): ("timm/vit_base_patch32_clip_224.laion2b_e16",
                                  f"{_RELEASES}/vit_b_32-laion2b_e16-af8dbd0c.pth", "gelu", OPENCLIP_LICENCE),
    ("ViT-B-32", "laion2b_s34b_b79k"): ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None, "gelu", OPENCLIP_LICENCE),
    ("ViT-B-32", "datacomp_xl_s13b_b90k"): ("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", None, "gelu",
                                            OPENCLIP_LICENCE),
    ("ViT-B-32", "metaclip_400m"): ("timm/vit_base_patch32_clip_224.metaclip_400m", f"{_METACLIP}/b32_400m.pt",
                                    "quick_gelu", METACLIP_LICENCE),
    ("ViT-B-32", "metaclip_fullcc"): ("timm/vit_base_patch32_clip_224.metaclip_2pt5b",
                                      f"{_METACLIP}/b32_fullcc2.5b.pt", "quick_gelu", METACLIP_LICENCE),
    ("ViT-B-16", "laion400m_e31"): ("timm/vit_base_patch16_clip_224.laion400m_e31",
                                    f"{_RELEASES}/vit_b_16-laion400m_e31-00efa78f.pt", "gelu", OPENCLIP_LICENCE),
    ("ViT-B-16", "laion400m_e32"): ("timm/vit_base_patch16_clip_224.laion400m_e32",
                                    f"{_RELEASES}/vit_b_16-laion400m_e32-55e67d44.pt", "gelu", OPENCLIP_LICENCE),
    ("ViT-B-16", "laion2b_s34b_b88k"): ("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", None, "gelu", OPENCLIP_LICENCE),
    ("ViT-B-16", "datacomp_xl_s13b_b90k"): ("laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", None, "gelu",
                                            OPENCLIP_LICENCE),
    ("ViT-B-16", "datacomp_l_s1b_b8k"): ("laion/CLIP-ViT-B-16-DataComp.L-s1B-b8K", None, "gelu", OPENCLIP_LICENCE),
    ("ViT-B-16", "metaclip_400m"): ("timm/vit_base_patch16_clip_224.metaclip_400m", f"{_METACLIP}/b16_400m.pt",
                                    "quick_gelu", METACLIP_LICENCE),
    ("ViT-B-16", "metaclip_fullcc"): ("timm/vit_base_patch16_clip_224.metaclip_2pt5b",
                                      f"{_METACLIP}/b16_fullcc2.5b.pt", "quick_gelu", METACLIP_LICENCE),
    ("ViT-L-14", "laion400m_e31"): ("timm/vit_large_patch14_clip_224.laion400m_e31",
                                    f"{_RELEASES}/vit_l_14-laion400m_e31-69988bb6.pt", "gelu", OPENCLIP_LICENCE),
    ("ViT-L-14", "laion400m_e32"): ("timm/vit_large_patch14_clip_224.laion400m_e32",
                                    f"{_RELEASES}/vit_l_14-laion400m_e32-3d133497.pt", "gelu", OPENCLIP_LICENCE),
    ("ViT-L-14", "laion2b_s32b_b82k"): ("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", None, "gelu", OPENCLIP_LICENCE),
    ("ViT-L-14", "datacomp_xl_s13b_b90k"): ("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", None, "gelu",
                                            OPENCLIP_LICENCE),
    ("ViT-L-14", "metaclip_400m"): ("timm/vit_large_patch14_clip_224.metaclip_400m", f"{_METACLIP}/l14_400m.pt",
                                    "quick_gelu", METACLIP_LICENCE),
    ("ViT-L-14", "metaclip_fullcc"): ("timm/vit_large_patch14_clip_224.metaclip_2pt5b",
                                      f"{_METACLIP}/l14_fullcc2.5b.pt", "quick_gelu", METACLIP_LICENCE),
    ("ViT-H-14", "laion2b_s32b_b79k"): ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None, "gelu", OPENCLIP_LICENCE),
    ("ViT-H-14", "metaclip_fullcc"): ("timm/vit_huge_patch14_clip_224.metaclip_2pt5b",
                                      f"{_METACLIP}/h14_fullcc2.5b.pt", "quick_gelu", METACLIP_LICENCE),
    ("ViT-g-14", "laion2b_s12b_b42k"): ("laion/CLIP-ViT-g-14-laion2B-s12B-b42K", None, "gelu", OPENCLIP_LICENCE),
    ("ViT-g-14", "laion2b_s34b_b88k"): ("laion/CLIP-ViT-g-14-laion2B-s34B-b88K", None, "gelu", OPENCLIP_LICENCE),
    ("ViT-bigG-14", "laion2b_s39b_b160k"): ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None, "gelu",
                                           OPENCLIP_LICENCE),
    ("ViT-bigG-14", "metaclip_fullcc"): ("timm/vit_gigantic_patch14_clip_224.metaclip_2pt5b",
                                         f"{_METACLIP}/G14_fullcc2.5b.pt", "quick_gelu", METACLIP_LICENCE),
}

# Hugging Face repositories holding a transformers CLIPModel: (architecture, tag they equal).
_HF = {
    "openai/clip-vit-base-patch32": ("ViT-B-32", "openai"),
    "openai/clip-vit-base-patch16": ("ViT-B-16", "openai"),
    "openai/clip-vit-large-patch14": ("ViT-L-14", "openai"),
    "openai/clip-vit-large-patch14-336": ("ViT-L-14-336", "openai"),
    "laion/CLIP-ViT-B-32-laion2B-s34B-b79K": ("ViT-B-32", "laion2b_s34b_b79k"),
    "laion/CLIP-ViT-L-14-laion2B-s32B-b82K": ("ViT-L-14", "laion2b_s32b_b82k"),
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": ("ViT-H-14", "laion2b_s32b_b79k"),
    "laion/CLIP-ViT-g-14-laion2B-s12B-b42K": ("ViT-g-14", "laion2b_s12b_b42k"),
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": ("ViT-bigG-14", "laion2b_s39b_b160k"),
}

# ImageNet-1k zero-shot top-1 from TOP1_SOURCE; QuickGELU tags read off its "-quickgelu" rows,
# which are the activation they were trained with.
_TOP1 = {
    ("RN50", "openai"): 0.5982, ("RN50", "yfcc15m"): 0.3275, ("RN50", "cc12m"): 0.3647,
    ("RN101", "openai"): 0.6228, ("RN101", "yfcc15m"): 0.3487,
    ("RN50x4", "openai"): 0.6627, ("RN50x16", "openai"): 0.7072, ("RN50x64", "openai"): 0.7391,
    ("ViT-B-32", "openai"): 0.6332, ("ViT-B-32", "laion400m_e31"): 0.6294, ("ViT-B-32", "laion400m_e32"): 0.6293,
    ("ViT-B-32", "laion2b_e16"): 0.6565, ("ViT-B-32", "laion2b_s34b_b79k"): 0.6656,
    ("ViT-B-32", "datacomp_xl_s13b_b90k"): 0.6917, ("ViT-B-32", "metaclip_400m"): 0.6558,
    ("ViT-B-32", "metaclip_fullcc"): 0.6766,
    ("ViT-B-16", "openai"): 0.6834, ("ViT-B-16", "laion400m_e31"): 0.6698, ("ViT-B-16", "laion400m_e32"): 0.6705,
    ("ViT-B-16", "laion2b_s34b_b88k"): 0.7023, ("ViT-B-16", "datacomp_xl_s13b_b90k"): 0.7349,
    ("ViT-B-16", "datacomp_l_s1b_b8k"): 0.6310, ("ViT-B-16", "metaclip_400m"): 0.7080,
    ("ViT-B-16", "metaclip_fullcc"): 0.7212,
    ("ViT-L-14", "openai"): 0.7554, ("ViT-L-14", "laion400m_e31"): 0.7271, ("ViT-L-14", "laion400m_e32"): 0.7277,
    ("ViT-L-14", "laion2b_s32b_b82k"): 0.7525, ("ViT-L-14", "datacomp_xl_s13b_b90k"): 0.7921,
    ("ViT-L-14", "metaclip_400m"): 0.7620, ("ViT-L-14", "metaclip_fullcc"): 0.7917,
    ("ViT-L-14-336", "openai"): 0.7656,
    ("ViT-H-14", "laion2b_s32b_b79k"): 0.7796, ("ViT-H-14", "metaclip_fullcc"): 0.8051,
    ("ViT-g-14", "laion2b_s12b_b42k"): 0.7663, ("ViT-g-14", "laion2b_s34b_b88k"): 0.7847,
    ("ViT-bigG-14", "laion2b_s39b_b160k"): 0.8009,
}

# Trained with other statistics than OpenAI's (OpenCLIP's pretrained.py sets them per tag).
_MEAN_STD = {("ViT-L-14", "laion2b_s32b_b82k"): (INCEPTION_MEAN, INCEPTION_STD)}

# SigLIP and SigLIP 2, all trained on WebLI (OpenCLIP's tag "webli"), by OpenCLIP's name: the
# timm/ repository holding OpenCLIP's files (and the tokenizer's), where it is not "timm/" + the
# name.  OpenCLIP runs the 378-pixel So400m/14 on the 384-pixel weights (the same 27x27 grid).
_SIGLIP = {arch: f"timm/{arch}" for arch in (
    "ViT-B-16-SigLIP", "ViT-B-16-SigLIP-256", "ViT-B-16-SigLIP-384", "ViT-B-16-SigLIP-512", "ViT-L-16-SigLIP-256",
    "ViT-L-16-SigLIP-384", "ViT-SO400M-14-SigLIP", "ViT-SO400M-14-SigLIP-384",
    "ViT-B-16-SigLIP2", "ViT-B-16-SigLIP2-256", "ViT-B-16-SigLIP2-384", "ViT-B-16-SigLIP2-512",
    "ViT-B-32-SigLIP2-256", "ViT-L-16-SigLIP2-256", "ViT-L-16-SigLIP2-384", "ViT-L-16-SigLIP2-512",
    "ViT-SO400M-14-SigLIP2", "ViT-SO400M-14-SigLIP2-378", "ViT-SO400M-16-SigLIP2-256", "ViT-SO400M-16-SigLIP2-384",
    "ViT-SO400M-16-SigLIP2-512",
)} | {"ViT-SO400M-14-SigLIP-378": "timm/ViT-SO400M-14-SigLIP-384"}
# OpenCLIP's SigLIP 1 configs read the tokenizer of timm/ViT-B-16-SigLIP (one vocabulary for all).
_SIGLIP_TOKENIZER = {arch: "timm/ViT-B-16-SigLIP" for arch in _SIGLIP if "SigLIP2" not in arch}
# Google's transformers SiglipModel repositories: (the architecture, the OpenCLIP name of the same
# weights).  google/siglip2-so400m-patch14-384 has no 384-pixel SigLIP 2 preset here.
_HF_SIGLIP = {
    "google/siglip-base-patch16-224": "ViT-B-16-SigLIP", "google/siglip-base-patch16-256": "ViT-B-16-SigLIP-256",
    "google/siglip-base-patch16-384": "ViT-B-16-SigLIP-384", "google/siglip-base-patch16-512": "ViT-B-16-SigLIP-512",
    "google/siglip-large-patch16-256": "ViT-L-16-SigLIP-256", "google/siglip-large-patch16-384": "ViT-L-16-SigLIP-384",
    "google/siglip-so400m-patch14-224": "ViT-SO400M-14-SigLIP",
    "google/siglip-so400m-patch14-384": "ViT-SO400M-14-SigLIP-384",
    "google/siglip2-base-patch16-224": "ViT-B-16-SigLIP2", "google/siglip2-base-patch16-256": "ViT-B-16-SigLIP2-256",
    "google/siglip2-base-patch16-384": "ViT-B-16-SigLIP2-384",
    "google/siglip2-base-patch16-512": "ViT-B-16-SigLIP2-512",
    "google/siglip2-base-patch32-256": "ViT-B-32-SigLIP2-256",
    "google/siglip2-large-patch16-256": "ViT-L-16-SigLIP2-256",
    "google/siglip2-large-patch16-384": "ViT-L-16-SigLIP2-384",
    "google/siglip2-large-patch16-512": "ViT-L-16-SigLIP2-512",
    "google/siglip2-so400m-patch14-224": "ViT-SO400M-14-SigLIP2",
    "google/siglip2-so400m-patch16-256": "ViT-SO400M-16-SigLIP2-256",
    "google/siglip2-so400m-patch16-384": "ViT-SO400M-16-SigLIP2-384",
    "google/siglip2-so400m-patch16-512": "ViT-SO400M-16-SigLIP2-512",
}
# SigLIP 2's NaFlex (variable-resolution) releases, transformers' Siglip2Model: no preset here (their
# own config builds them), at most 256 patches of 16 pixels, resized bilinearly (Siglip2ImageProcessor).
_HF_NAFLEX = {
    "google/siglip2-base-patch16-naflex": "ViT-B-16-SigLIP2-NaFlex",
    "google/siglip2-so400m-patch16-naflex": "ViT-SO400M-16-SigLIP2-NaFlex",
}
# ImageNet-1k zero-shot top-1 of OpenCLIP's SigLIP runs (TOP1_SOURCE); its table has no SigLIP 2 rows.
_TOP1 |= {
    ("ViT-B-16-SigLIP", "webli"): 0.7604, ("ViT-B-16-SigLIP-256", "webli"): 0.7653,
    ("ViT-B-16-SigLIP-384", "webli"): 0.7849, ("ViT-B-16-SigLIP-512", "webli"): 0.7914,
    ("ViT-L-16-SigLIP-256", "webli"): 0.8045, ("ViT-L-16-SigLIP-384", "webli"): 0.8207,
    ("ViT-SO400M-14-SigLIP", "webli"): 0.8203, ("ViT-SO400M-14-SigLIP-384", "webli"): 0.8308,
}


def _siglip_activations(architecture: str) -> tuple[str, str]:
    """(image, text) activations of OpenCLIP's SigLIP model ``architecture``: its timm image tower's
    (`TIMM_SIGLIP_TOWERS`) and its text tower's (exact GELU in SigLIP 1's configs, the tanh GELU
    in SigLIP 2's ``act_kwargs``)."""
    from clipforge.checkpoints.configs import TIMM_SIGLIP_TOWERS, timm_siglip_name

    tower = timm_siglip_name(PRESETS[architecture].vision)
    assert tower is not None, architecture
    return TIMM_SIGLIP_TOWERS[tower][-1], "gelu_tanh" if "SigLIP2" in architecture else "gelu"


def _siglip_entries() -> list[Pretrained]:
    """OpenCLIP's SigLIP names (one weights file, read into the preset, with OpenCLIP's towers'
    activations) and Google's transformers repositories (their own config: the tanh GELU)."""
    squash = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD, "resize_mode": "squash"}
    entries = []
    for arch, hub in _SIGLIP.items():
        image_act, text_act = _siglip_activations(arch)
        top1 = _TOP1.get((arch, "webli"))
        entries.append(Pretrained(
            name=f"{arch}:webli", architecture=arch, tag="webli", activation=image_act,
            text_activation=text_act if text_act != image_act else None,
            tokenizer=_SIGLIP_TOKENIZER.get(arch, hub), text_cleaning="canonicalize",
            preprocessing=Preprocessing(PRESETS[arch].vision.image_size, **squash),
            licence=SIGLIP_LICENCE, params=ARCHITECTURE_PARAMS[arch], top1=top1,
            top1_source=TOP1_SOURCE if top1 is not None else None, hub=hub,
        ))
    # Google's repositories: the fixed-resolution ones at their preset's size, NaFlex's at its
    # 256-patch budget (resized bilinearly, as Siglip2ImageProcessor does).
    hf = [(repo, arch, Preprocessing(PRESETS[arch].vision.image_size, **squash)) for repo, arch in _HF_SIGLIP.items()]
    hf += [(repo, arch, Preprocessing(256, **squash, interpolation="bilinear")) for repo, arch in _HF_NAFLEX.items()]
    for repo, arch, preprocessing in hf:
        top1 = _TOP1.get((arch, "webli"))
        entries.append(Pretrained(
            name=repo, architecture=arch, tag="webli", activation="gelu_tanh", preprocessing=preprocessing,
            licence=SIGLIP_LICENCE, params=ARCHITECTURE_PARAMS[arch], top1=top1,
            top1_source=TOP1_SOURCE if top1 is not None else None, hub=repo, layout="hf",
        ))
    return entries


def _entry(name: str, architecture: str, tag: str, activation: str, licence: str, **where: str | None) -> Pretrained:
    mean, std = _MEAN_STD.get((architecture, tag), (OPENAI_MEAN, OPENAI_STD))
    top1 = _TOP1.get((architecture, tag))
    return Pretrained(
        name=name, architecture=architecture, tag=tag, activation=activation,
        preprocessing=Preprocessing(IMAGE_SIZES.get(architecture, 224), mean, std),
        licence=licence, params=ARCHITECTURE_PARAMS[architecture],
        top1=top1, top1_source=TOP1_SOURCE if top1 is not None else None, **where,
    )


# Chinese-CLIP's releases in transformers' ChineseCLIPModel form (OFA-Sys/Chinese-CLIP's model card):
# OpenAI's ViT with QuickGELU, a Chinese RoBERTa-wwm (BERT) text tower with GELU, OpenAI's pixel
# statistics, images resized to the square (cn_clip's transform).  Its RN50 has no transformers form.
_CHINESE_CLIP = {
    "OFA-Sys/chinese-clip-vit-base-patch16": "CN-CLIP-ViT-B-16",
    "OFA-Sys/chinese-clip-vit-large-patch14": "CN-CLIP-ViT-L-14",
    "OFA-Sys/chinese-clip-vit-large-patch14-336px": "CN-CLIP-ViT-L-14-336",
    "OFA-Sys/chinese-clip-vit-huge-patch14": "CN-CLIP-ViT-H-14",
}


def _chinese_clip_entries() -> list[Pretrained]:
    return [Pretrained(
        name=repo, architecture=arch, tag="chinese", activation="quick_gelu", text_activation="gelu",
        preprocessing=Preprocessing(PRESETS[arch].vision.image_size, OPENAI_MEAN, OPENAI_STD, resize_mode="squash"),
        licence=CHINESE_CLIP_LICENCE, params=ARCHITECTURE_PARAMS[arch], hub=repo, layout="hf",
    ) for repo, arch in _CHINESE_CLIP.items()]


def _build() -> dict[str, Pretrained]:
    entries = []
    for arch, (hub, path) in _OPENAI.items():
        entries.append(_entry(f"{arch}:openai", arch, "openai", "quick_gelu", OPENAI_LICENCE, hub=hub,
                              url=f"{_AZURE}/{path}", sha256=path.split("/")[0]))
    for (arch, tag), (hub, url, act, licence) in _OPENCLIP.items():
        sha = None
        if url is not None and url.startswith(_RELEASES):
            sha = Path(url).stem.rsplit("-", 1)[1]
        entries.append(_entry(f"{arch}:{tag}", arch, tag, act, licence, hub=hub, url=url, sha256=sha))
    for repo, (arch, tag) in _HF.items():
        act, licence = ("quick_gelu", OPENAI_LICENCE) if tag == "openai" else (_OPENCLIP[arch, tag][2:])
        entries.append(_entry(repo, arch, tag, act, licence, hub=repo, layout="hf"))
    entries += _siglip_entries() + _chinese_clip_entries()
    return {e.name: e for e in entries}


REGISTRY: dict[str, Pretrained] = _build()


# ----------------------------------------------------------------------------- looking up


def architectures() -> list[str]:
    """The architectures with released weights, in registry order."""
    return list(dict.fromkeys(e.architecture for e in REGISTRY.values()))


def tags(architecture: str) -> list[str]:
    """The pretrained tags of ``architecture`` (``ARCH:TAG`` names; repository ids are not tags)."""
    return [e.tag for e in REGISTRY.values()
            if e.architecture == architecture and e.name == f"{e.architecture}:{e.tag}"]


def list_pretrained(pattern: str | None = None) -> list[Pretrained]:
    """The entries whose name, architecture, tag or repository matches ``pattern``: a glob
    (``*``, ``?``, ``[``) or else a substring, case-insensitive; every entry when None."""
    if not pattern:
        return list(REGISTRY.values())
    needle = pattern.lower()
    glob = any(c in pattern for c in "*?[")

    def matches(text: str | None) -> bool:
        if text is None:
            return False
        return fnmatch.fnmatchcase(text.lower(), needle) if glob else needle in text.lower()

    return [e for e in REGISTRY.values() if any(matches(t) for t in (e.name, e.architecture, e.tag, e.hub))]


def _closest(word: str, candidates: list[str], n: int = 3) -> list[str]:
    """Close matches, compared without case."""
    lower = {c.lower(): c for c in candidates}
    return [lower[m] for m in difflib.get_close_matches(word.lower(), list(lower), n=n, cutoff=0.6)]


def _clean_tag(tag: str) -> str:
    return tag.strip().lower().replace("-", "_")  # as OpenCLIP normalises tags


def _split_quickgelu(arch: str) -> tuple[str, bool]:
    if arch.endswith(QUICKGELU_SUFFIX):
        return arch[: -len(QUICKGELU_SUFFIX)], True
    return arch, False


def _unknown_architecture(arch: str, given: str) -> UnknownModelError:
    known = list(dict.fromkeys([*architectures(), *PRESETS]))
    close = _closest(arch, known)
    hint = f"did you mean {', '.join(close)}?" if close else f"architectures: {', '.join(known)}"
    return UnknownModelError(f"{given!r}: unknown architecture {arch!r}; {hint}")


def _pretrained_entry(arch_given: str, tag_given: str, given: str) -> Pretrained:
    """The entry of ``ARCH:TAG``, or an UnknownModelError naming the closest architecture or tag."""
    arch, quick = _split_quickgelu(arch_given)
    tag = _clean_tag(tag_given)
    if arch not in architectures():
        if arch in PRESETS:
            raise UnknownModelError(f"{given!r}: no released weights for {arch} (architectures with weights: "
                                    f"{', '.join(architectures())}; `clipforge models` lists them)")
        raise _unknown_architecture(arch, given)
    entry = REGISTRY.get(f"{arch}:{tag}")
    known = tags(arch)
    if quick:  # OpenCLIP's "-quickgelu" names list only the tags trained with QuickGELU
        known = [t for t in known if REGISTRY[f"{arch}:{t}"].activation == "quick_gelu"]
        if entry is not None and entry.activation != "quick_gelu":
            raise UnknownModelError(f"{given!r}: {entry.name} was trained with GELU, not QuickGELU; drop the "
                                    f"{QUICKGELU_SUFFIX} suffix (act= forces an activation)")
    if entry is None:
        close = _closest(tag, known)
        guess = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownModelError(f"{given!r}: {arch_given} has no pretrained tag {tag_given!r}; {guess}"
                                f"(its tags: {', '.join(known)})")
    return entry


def _looks_like_path(text: str) -> bool:
    """Whether a string that names nothing on disk was meant as a path, not as a name."""
    return (text.startswith(("/", "./", "../", "~", "\\")) or "\\" in text or text.count("/") > 1
            or text.lower().endswith(_PATH_SUFFIXES))


def _repo(text: str, given: str) -> tuple[str, str | None]:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    match = _REPO_ID.fullmatch(text)
    if match is None:
        raise UnknownModelError(f"{given!r}: not a Hugging Face repository id; expected "
                                f"{HF_HUB_PREFIX}ORG/NAME or ORG/NAME, optionally @REVISION")
    try:
        validate_repo_id(match["repo"])  # the Hub's own rules: no "--" or "..", at most 96 characters
    except HFValidationError:
        shown = given if len(given) <= 80 else given[:77] + "..."
        raise UnknownModelError(f"{shown!r}: not a valid Hugging Face repository id (letters, digits, '-', '_' "
                                "and '.', no '--' or '..', at most 96 characters)") from None
    return match["repo"], match["revision"]


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def resolve(name: str | Path, pretrained: str | Path | None = None) -> Resolved:
    """What ``name`` (and ``pretrained``) mean, by the grammar and precedence of the module notes.

    Nothing is read or downloaded; an UnknownModelError (one line, with the closest names)
    for a name that means nothing.
    """
    text = str(name)
    if pretrained is not None and str(pretrained) == "":
        pretrained = None  # an empty --pretrained: none given (not the working directory)
    if pretrained is not None:
        arch, _ = _split_quickgelu(text)
        # with pretrained=, the name is an architecture: a folder named like one does not get in the way
        if Path(text).exists() and arch not in PRESETS:
            raise UnknownModelError(f"pretrained={str(pretrained)!r} goes with an architecture name such as "
                                    f"ViT-B-32; {text!r} is a file or folder, which carries its own weights")
        if Path(pretrained).is_file() or Path(pretrained).is_dir():
            if arch not in PRESETS:
                raise _unknown_architecture(arch, text)
            return Resolved("weights", f"{text}:{pretrained}", path=Path(pretrained), architecture=text)
        if Path(pretrained).suffix in _WEIGHT_SUFFIXES or any(sep in str(pretrained) for sep in ("/", "\\")):
            raise UnknownModelError(f"pretrained={str(pretrained)!r}: no such file (a weights file for {text}, "
                                    "or a pretrained tag; `clipforge models` lists the tags)")
        entry = _pretrained_entry(text, str(pretrained), f"{text} --pretrained {pretrained}")
        return Resolved("pretrained", entry.name, entry=entry)
    if Path(text).exists():
        return Resolved("path", text, path=Path(text))
    if text.startswith(HF_HUB_PREFIX):
        repo, revision = _repo(text[len(HF_HUB_PREFIX):], text)
        return Resolved("hub", text, repo_id=repo, revision=revision, layout="openclip")
    if text in REGISTRY:
        return Resolved("pretrained", text, entry=REGISTRY[text])
    if text in OPENAI_NAMES:
        raise UnknownModelError(f"{text!r} is OpenAI's name for it; clipforge's is {OPENAI_NAMES[text]}:openai")
    if ":" in text and not _looks_like_path(text):
        arch, _, tag = text.partition(":")
        if "@" in tag:
            raise UnknownModelError(f"{text!r}: a revision pin (@REVISION) applies to Hugging Face repository ids "
                                    f"only (ORG/NAME@REVISION), not to pretrained names such as {arch}:TAG")
        if not tag.strip():
            known = tags(_split_quickgelu(arch)[0])
            listed = f"its tags: {', '.join(known)}" if known else "`clipforge models` lists the names"
            raise UnknownModelError(f"{text!r}: no pretrained tag after the colon ({listed})")
        entry = _pretrained_entry(arch, tag, text)
        return Resolved("pretrained", entry.name, entry=entry)
    if _split_quickgelu(text)[0] in PRESETS:
        return Resolved("preset", text, architecture=text)
    if _looks_like_path(text):
        raise UnknownModelError(f"{text!r} is neither an existing file or directory nor a model name "
                                "(no such file or directory)")
    if "/" in text:
        try:
            repo, revision = _repo(text, text)
        except UnknownModelError as err:
            raise UnknownModelError(f"{err}; no local file or folder of that name either") from None
        if repo in REGISTRY:
            return Resolved("pretrained", text, entry=REGISTRY[repo], revision=revision)
        return Resolved("hub", text, repo_id=repo, revision=revision, layout="auto")
    known = list(dict.fromkeys([*PRESETS, *architectures(), *REGISTRY]))
    close = _closest(text, known)
    hint = (f"did you mean {', '.join(close)}?" if close
            else f"architectures: {', '.join(dict.fromkeys([*PRESETS, *architectures()]))}")
    raise UnknownModelError(f"{text!r} is neither an existing file or directory nor a known model name; {hint} "
                            "(`clipforge models` lists the pretrained names)")
