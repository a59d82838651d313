"""Tests for the presets of released architectures (clipforge.model.config): OpenAI's nine models and
OpenCLIP's LAION-2B flagships ViT-H/14, ViT-g/14 and ViT-bigG/14.

Each preset has the tensors (names and shapes), heads and parameter count of OpenCLIP's model of the
same name, built at full size on the meta device, and OpenCLIP's input size and pixel statistics.  Tiny
models with the large ones' features (heads wider than 64, a non-integer MLP ratio, deep ResNet
stages) give OpenCLIP's outputs.  tests/fixtures/parity/preset_shapes.json and the openclip_vit_wide_heads
and openclip_rn_deep fixtures come from tests/fixtures/make_parity_fixtures.py, run with open_clip
installed; these tests need neither open_clip nor a network.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _preset_helpers import expand_blocks, meta_model
from clipforge.checkpoints import convert, load, load_model, read_checkpoint
from clipforge.checkpoints.configs import infer_config
from clipforge.checkpoints.names import to_openclip
from clipforge.model import CLIP, TextConfig, VisionConfig, get_config, list_presets

PARITY = Path(__file__).parent / "fixtures" / "parity"
TOLERANCE = 1e-5  # fp32, as tests/test_checkpoints.py
OPENAI_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
LAION_FLAGSHIPS = ("ViT-H-14", "ViT-g-14", "ViT-bigG-14")
# OpenCLIP tags whose pixel statistics differ from their architecture's (the registry entry carries them).
OWN_STATISTICS = {("ViT-L-14", "laion2b_s32b_b82k")}  # Inception's 0.5 / 0.5 (open_clip/pretrained.py)


@cache
def openclip_models() -> dict[str, dict]:
    return json.loads((PARITY / "preset_shapes.json").read_text())["models"]


# ----------------------------------------------------------------------------- full-size shapes


def test_fixture_covers_every_released_architecture():
    assert set(OPENAI_MODELS + LAION_FLAGSHIPS) <= set(list_presets())
    assert set(openclip_models()) == set(OPENAI_MODELS + LAION_FLAGSHIPS)


@pytest.mark.parametrize("name", OPENAI_MODELS + LAION_FLAGSHIPS)
def test_preset_has_the_tensors_heads_and_parameter_count_of_openclips_model(name):
    reference = openclip_models()[name]
    theirs = expand_blocks(reference["shapes"])
    assert len(theirs) == reference["tensors"]
    model = meta_model(name)
    ours = {k: list(v.shape) for k, v in to_openclip(model.state_dict()).items()}
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    assert not missing and not extra, f"{name}: missing {missing[:5]}, extra {extra[:5]}"
    wrong = [f"{k}: ours {ours[k]}, OpenCLIP {theirs[k]}" for k in theirs if ours[k] != theirs[k]]
    assert not wrong, f"{name}: {wrong[:5]}"
    assert model.num_params() == reference["params"]
    config = model.config
    assert {"visual": config.vision.heads, "text": config.text.heads} == reference["heads"]


@pytest.mark.parametrize("name", OPENAI_MODELS + LAION_FLAGSHIPS)
def test_preset_preprocessing_is_openclips(name):
    reference = openclip_models()[name]
    vision = get_config(name).vision
    assert vision.image_size == reference["image_size"]
    for tag, cfg in reference["pretrained"].items():
        if (name, tag) in OWN_STATISTICS:
            assert (list(vision.mean), list(vision.std)) != (cfg["mean"], cfg["std"])
            continue
        assert (list(vision.mean), list(vision.std)) == (cfg["mean"], cfg["std"]), tag


@pytest.mark.parametrize("name", OPENAI_MODELS + LAION_FLAGSHIPS)
def test_quickgelu_name_for_the_weights_trained_with_it(name):
    base = get_config(name)
    assert (base.vision.act, base.text.act) == ("gelu", "gelu")
    quick = get_config(f"{name}-quickgelu")
    assert quick == base.with_activation("quick_gelu")
    assert (quick.vision.act, quick.text.act) == ("quick_gelu", "quick_gelu")
    # Its tensors are the same: tests/test_model.py::test_state_dict_keys_are_openais.


@pytest.mark.parametrize("name", LAION_FLAGSHIPS)
def test_shapes_alone_give_the_flagships_wide_heads(name):
    """A bare state dict (no config) of ViT-H/g/bigG-14 gets the preset's 80/88/104-wide heads, not 64-wide."""
    state = meta_model(name).state_dict()
    config = infer_config(state, path=f"{name}.safetensors")
    preset = get_config(name)
    assert config.vision.width // config.vision.heads == preset.vision.width // preset.vision.heads > 64
    assert config.vision.mlp_width == preset.vision.mlp_width
    assert replace(config.vision, mlp_ratio=preset.vision.mlp_ratio) == preset.vision


def test_shapes_of_no_preset_keep_64_wide_heads():
    config = replace(get_config("ViT-H-14"), vision=replace(get_config("ViT-H-14").vision, layers=2))
    with torch.device("meta"):
        state = CLIP(config).state_dict()
    assert infer_config(state).vision.heads == 1280 // 64


# ----------------------------------------------------------------------------- the MLP's width


def test_mlp_width_truncates_as_openclip():
    # OpenCLIP builds int(width * mlp_ratio): ViT-g/14 1408 * 4.3637 = 6144.09, ViT-bigG/14 1664 * 4.9231 = 8192.04.
    assert get_config("ViT-g-14").vision.mlp_width == 6144
    assert get_config("ViT-bigG-14").vision.mlp_width == 8192
    assert TextConfig(width=40, heads=4, mlp_ratio=4.9231).mlp_width == 196  # 196.92: truncated, not rounded


def test_mlp_ratio_read_as_hidden_over_width_gives_the_hidden_width_back():
    # Hugging Face's intermediate_size / hidden_size, or c_fc's rows / width: (h / w) * w can fall just
    # under h in floating point (w=11, h=15 among many), which plain truncation would turn into h - 1.
    assert 11 * (15 / 11) < 15
    for width in range(1, 97):
        for hidden in range(width, 5 * width):
            assert TextConfig(width=width, heads=1, mlp_ratio=hidden / width).mlp_width == hidden


@pytest.mark.parametrize("make", [
    lambda: TextConfig(width=8, heads=2, mlp_ratio=0.05),
    lambda: VisionConfig(width=8, heads=2, patch_size=8, image_size=32, mlp_ratio=0.1),
])
def test_an_mlp_ratio_that_leaves_no_hidden_units_is_refused(make):
    with pytest.raises(ValueError, match=r"Config\.mlp_ratio=0\.\d+ gives the MLP int\(8 \* 0\.\d+\) = 0 hidden"):
        make()


# ----------------------------------------------------------------------------- tiny parity with OpenCLIP


def features(model: CLIP, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        image_features, text_features, scale = model(images, tokens)
        return {
            "image_features": model.encode_image(images),
            "text_features": model.encode_text(tokens),
            "logits": scale * image_features @ text_features.T,
        }


@pytest.mark.parametrize("name", ["openclip_vit_wide_heads", "openclip_rn_deep"])
def test_tiny_models_with_the_large_ones_features_match_openclip(name):
    model, _, _ = load(PARITY / name)
    reference = load_file(str(PARITY / f"{name}.expected.safetensors"))
    for key, value in features(model, reference["images"], reference["tokens"]).items():
        diff = (value - reference[key]).abs().max().item()
        assert diff <= TOLERANCE, f"{name} {key}: max abs diff {diff:.2e}"


def test_tiny_fixtures_read_as_the_large_models_are_built():
    wide = read_checkpoint(PARITY / "openclip_vit_wide_heads").config
    assert (wide.vision.heads, wide.vision.width // wide.vision.heads) == (4, 10)
    assert (wide.vision.mlp_width, wide.text.mlp_width) == (196, 139)  # int(), where round() gives 197 and 140
    assert (wide.vision.act, wide.text.layers, wide.vision.layers) == ("gelu", 3, 2)
    deep = read_checkpoint(PARITY / "openclip_rn_deep")
    assert deep.config.vision.layers == (3, 4, 9, 4) and deep.config.vision.heads == 2
    assert deep.config.vision.act == "quick_gelu"
    assert {v.dtype for v in deep.state_dict.values() if v.is_floating_point()} == {torch.float16}


def test_parity_check_can_fail_with_the_wrong_head_width():
    path = PARITY / "openclip_vit_wide_heads"
    checkpoint = read_checkpoint(path)
    model = load_model(path)
    wrong = CLIP(replace(checkpoint.config, vision=replace(checkpoint.config.vision, heads=2))).eval()
    wrong.load_state_dict(model.state_dict())
    reference = load_file(str(PARITY / "openclip_vit_wide_heads.expected.safetensors"))
    ours = features(wrong, reference["images"], reference["tokens"])
    assert (ours["image_features"] - reference["image_features"]).abs().max() > 1e-3


@pytest.mark.parametrize("to", ["hf", "openclip", "clipforge"])
def test_wide_heads_and_truncated_mlp_survive_conversion(tmp_path, to):
    """Hugging Face stores the MLP's width and the head count, OpenCLIP the ratio and the head width."""
    source = read_checkpoint(PARITY / "openclip_vit_wide_heads")
    back = read_checkpoint(convert(PARITY / "openclip_vit_wide_heads", tmp_path / "out", to=to))
    for tower in ("vision", "text"):
        ours, theirs = getattr(source.config, tower), getattr(back.config, tower)
        assert (theirs.heads, theirs.mlp_width) == (ours.heads, ours.mlp_width), tower
    assert sorted(back.state_dict) == sorted(source.state_dict)
    assert all(torch.equal(back.state_dict[k], v) for k, v in source.state_dict.items())
