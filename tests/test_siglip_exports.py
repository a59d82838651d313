"""SigLIP and SigLIP 2 exports that transformers and OpenCLIP load unchanged (`convert --to hf/openclip`).

tests/fixtures/make_siglip_export_fixtures.py, run where transformers and open_clip are installed,
exported two small seeded models (SigLIP's SentencePiece vocabulary, SigLIP 2's Gemma one) with
``convert(..., to="hf", tokenizer=...)``, loaded them with ``AutoModel``/``AutoProcessor`` and
recorded what transformers read, computed and wrote back (tests/fixtures/siglip/exports/).  Here
the same models are rebuilt (bit for bit: the state dict's digest is recorded) and exported, and
clipforge's ids, pixels and features, from the export, must equal transformers'.  OpenCLIP builds
SigLIP image towers only by timm's names at full size: the base-size comparison ran there and
only its record is checked here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import clipforge
from clipforge.checkpoints import CheckpointError, convert, save
from clipforge.checkpoints.configs import TIMM_SIGLIP_TOWERS, config_to_openclip, timm_siglip_name
from clipforge.model.config import get_config
from clipforge.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import make_siglip_export_fixtures as fx  # noqa: E402

REFERENCE = json.loads((fx.OUT / "reference.json").read_text(encoding="utf-8"))
TENSORS = load_file(str(fx.OUT / "reference.safetensors"))
OPENCLIP_CHECK = json.loads((fx.OUT / "openclip_base_check.json").read_text(encoding="utf-8"))
NAMES = list(fx.MODELS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Each small model saved as clipforge does, then converted to "hf" with its tokenizer folder."""
    root = tmp_path_factory.mktemp("siglip_exports")
    out = {}
    for name in NAMES:
        saved = save(fx.build(name), root / name / "ours")
        out[name] = convert(saved, root / name / "hf", to="hf", tokenizer=fx.TOKENIZERS / name)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_the_seeded_models_are_the_recorded_ones(name):
    """numpy draws the weights, so torch here builds what the reference environment's torch built."""
    model = fx.build(name)
    assert fx.state_sha256(model) == REFERENCE["models"][name]["state_sha256"]
    assert model.config.text.vocab_size == REFERENCE["models"][name]["text_config"]["vocab_size"]


@pytest.mark.parametrize("name", NAMES)
def test_hf_export_files_are_what_transformers_reads_and_writes(exported, name):
    directory, recorded = exported[name], REFERENCE["models"][name]
    assert sorted(p.name for p in directory.iterdir()) == recorded["files"]
    assert all(not keys for keys in recorded["loading_info"].values())  # no missing, unexpected or mismatched keys
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == recorded["model_type"] == "siglip"
    assert config["architectures"] == recorded["architectures"] == ["SiglipModel"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size"):
        assert config["text_config"].get(key) == recorded["text_config"][key], key
    pre = json.loads((directory / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert pre["image_processor_type"] == "SiglipImageProcessor"
    assert pre["processor_class"] == recorded["processor"]["processor_class"] == "SiglipProcessor"
    for key in ("size", "resample", "image_mean", "image_std"):
        assert pre[key] == recorded["processor"][key], key
    # the weights under the names and shapes transformers' save_pretrained writes for the same model
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        written = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert written == recorded["weights"]


@pytest.mark.parametrize("name", NAMES)
def test_hf_export_gives_transformers_numbers(exported, name):
    """clipforge's `load` of the export equals transformers' AutoModel + AutoProcessor on it: the
    padded ids of every caption (cased, punctuated, empty, cut to the context length), the
    pixels (Pillow backend) and the image and text features."""
    model, preprocess, tokenizer = clipforge.load(exported[name])
    assert tokenizer(fx.CAPTIONS).tolist() == REFERENCE["models"][name]["ids"]
    pixels = torch.stack([preprocess(image) for image in fx.images(model.config.vision.image_size)])
    # Both resize with Pillow's bicubic filter to the same bytes (recorded difference 0); the
    # rescale and normalisation then run in float32, numpy there and torch here, which may round
    # the last bit apart: values of order 1, so 1e-6.
    torch.testing.assert_close(pixels, TENSORS[f"{name}.pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(tokenizer(fx.CAPTIONS))
    # features of order 1 from another torch: equal to float32 rounding
    torch.testing.assert_close(image, TENSORS[f"{name}.image_features"], rtol=0, atol=1e-5)
    torch.testing.assert_close(text, TENSORS[f"{name}.text_features"], rtol=0, atol=1e-5)


def test_hf_recorded_differences_are_small():
    """What the fixture script measured against clipforge's own pipeline in the reference environment."""
    for name in NAMES:
        diff = REFERENCE["models"][name]["max_abs_diff"]
        assert diff["pixels_pil"] <= 1e-6 and diff["image"] < 1e-5 and diff["text"] < 1e-5, name


def test_a_small_siglip_model_has_no_openclip_export(exported, tmp_path):
    saved = save(fx.build("siglip"), tmp_path / "ours")
    with pytest.raises(CheckpointError, match="no timm SigLIP image tower has this shape .image 32, patch 8, width 32"):
        convert(saved, tmp_path / "openclip", to="openclip")
    assert not (tmp_path / "openclip").exists()


@pytest.mark.parametrize("preset", ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2"])
def test_openclip_base_size_export_gave_clipforge_numbers(preset):
    """open_clip on the export of a base-size model (local-dir: and by name with pretrained=FILE)
    gave clipforge's ids and features, the towers run with the activations OpenCLIP's config names."""
    record = OPENCLIP_CHECK["models"][preset]
    local, named = record["local_dir"], record["by_name_pretrained_file"]
    assert local["ids_equal_clipforge_on_export"] and local["tokenizer_class"] == "HFTokenizer"
    assert local["max_abs_pixels"] <= 1e-6
    for key in ("max_abs_image", "max_abs_text", "max_abs_image_vs_source", "max_abs_text_vs_source_same_ids"):
        assert local[key] < 1e-5, key
    # the source model's ids differ only where OpenCLIP's own cleaning (ftfy, HTML entities,
    # whitespace; no tokenizer_kwargs in the export: "whitespace") changes the text
    folder = fx.TOKENIZERS / ("siglip2" if preset.endswith("SigLIP2") else "siglip")
    plain, cleaned = Tokenizer.from_dir(folder, context_length=64), Tokenizer.from_dir(folder, context_length=64)
    cleaned.clean_as("whitespace")
    changed = [c for c, a, b in zip(fx.CAPTIONS, plain(fx.CAPTIONS).tolist(), cleaned(fx.CAPTIONS).tolist()) if a != b]
    assert OPENCLIP_CHECK["captions"] == fx.CAPTIONS
    assert local["captions_with_other_ids_than_source"] == changed and "fish &amp; chips" in changed
    assert named["name"] == preset and named["max_abs_image"] < 1e-5 and named["max_abs_text"] < 1e-5
    # timm's tower of that name runs the activation clipforge's table gives it; the export names that tower
    config = get_config(preset)
    tower = timm_siglip_name(config.vision)
    assert tower == config_to_openclip(config)["model_cfg"]["vision_cfg"]["timm_model_name"]
    assert record["activations"]["vision"] == TIMM_SIGLIP_TOWERS[tower][6] == "gelu"
    text_cfg = config_to_openclip(config)["model_cfg"]["text_cfg"]
    assert text_cfg.get("act_kwargs") == {"approximate": "tanh"}  # the preset's text activation, written out
    # the preset as it is (tanh GELU) on the same weights differs by the two GELUs' difference only
    tanh = record["preset_tanh_gelu_on_the_same_weights"]
    assert 1e-5 < max(tanh.values()) < 0.05 * max(record["feature_scale"].values())
