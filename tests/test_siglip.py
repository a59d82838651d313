"""Tests for SigLIP's towers (clipforge.model.siglip), presets and files (Hugging Face's SiglipModel,
OpenCLIP's ViT-*-SigLIP* with a timm image tower).

Parity: tiny random-weight models made in the reference environment by
tests/fixtures/make_siglip_fixtures.py (transformers' SiglipModel shaped as SigLIP and as SigLIP 2's
fixed-resolution models; OpenCLIP's CustomTextCLIP with a timm trunk) give the reference's image and
text features within 1e-5 in fp32, and its logits (scale * cos + bias) within 1e-5 per unit of scale.
Shapes: every SigLIP preset has the tensors, heads and parameter count of OpenCLIP's model of the
same name at full size (tests/fixtures/siglip/preset_shapes.json, built on the meta device), and
transformers' SiglipModel of the same sizes has as many parameters.  Neither library is needed here.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _preset_helpers import expand_blocks, meta_model
from clipforge.checkpoints import CheckpointError, load, load_model, read_checkpoint
from clipforge.checkpoints.configs import (
    TIMM_SIGLIP_TOWERS,
    config_from_hf,
    config_from_openclip,
    config_to_hf,
    config_to_openclip,
    infer_config,
)
from clipforge.checkpoints.names import from_hf, from_timm, to_clipforge_names, to_hf, to_openclip, to_timm
from clipforge.model import CLIP, CLIPConfig, TextConfig, VisionConfig, get_config, list_presets
from clipforge.model.siglip import SigLipTextTransformer

FIXTURES = Path(__file__).parent / "fixtures" / "siglip"
TOLERANCE = 1e-5  # fp32, as the CLIP fixtures (tests/test_checkpoints.py)
HF_FIXTURES = ("hf_siglip", "hf_siglip2")


def read_hf(directory: Path) -> CLIP:
    """A SiglipModel directory read as `read_checkpoint` reads a CLIPModel's: its config and
    preprocessor files through `config_from_hf`, its tensors renamed by `from_hf`."""
    config = json.loads((directory / "config.json").read_text())
    pre = json.loads((directory / "preprocessor_config.json").read_text())
    model = CLIP(config_from_hf(config, pre, directory / "config.json")).eval()
    model.load_state_dict({k: v.float() for k, v in from_hf(load_file(str(directory / "model.safetensors"))).items()})
    return model


def outputs(model: CLIP, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        image_features = model.encode_image(reference["images"])
        text_features = model.encode_text(reference["tokens"])
        return {"image_features": image_features, "text_features": text_features,
                "logits": model.logits(image_features, text_features)}


def assert_matches(name: str, model: CLIP, tolerance: float = TOLERANCE) -> None:
    reference = load_file(str(FIXTURES / f"{name}.expected.safetensors"))
    scale = float(model.logit_scale.log_scale.detach().exp())
    for key, value in outputs(model, reference).items():
        diff = (value - reference[key]).abs().max().item()
        # The logits are cosines times the scale (112 here): 1e-5 on the cosines.
        allowed = tolerance * scale if key == "logits" else tolerance
        assert diff <= allowed, f"{name} {key}: max abs diff {diff:.2e} > {allowed:.1e}"


# ----------------------------------------------------------------------------- parity with the references


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_hugging_face_siglip_matches_transformers(name):
    assert_matches(name, read_hf(FIXTURES / name))


def test_openclip_siglip_state_dict_matches_open_clip():
    model, preprocess, tokenizer = load(FIXTURES / "openclip_siglip.safetensors")
    assert_matches("openclip_siglip", model)
    assert tokenizer is None  # a 100-id vocabulary whose tokenizer is not stored with the weights


def test_fixtures_read_as_their_sources_built_them():
    v1 = read_hf(FIXTURES / "hf_siglip").config
    assert (v1.vision.pool, v1.text.pool, v1.vision.act, v1.text.act) == ("map", "last", "gelu_tanh", "gelu_tanh")
    assert (v1.vision.mean, v1.vision.std, v1.vision.layer_norm_eps) == ((0.5, 0.45, 0.4), (0.5, 0.55, 0.6), 1e-6)
    assert (v1.vision.heads, v1.vision.mlp_width, v1.embed_dim) == (4, 56, 32)
    v2 = read_hf(FIXTURES / "hf_siglip2").config
    assert (v2.vision.image_size, v2.vision.patch_size, v2.vision.grid) == (36, 8, 4)
    assert (v2.text.width, v2.embed_dim, v2.text.context_length, v2.text.vocab_size) == (48, 40, 12, 256)
    oc = read_checkpoint(FIXTURES / "openclip_siglip.safetensors")
    assert oc.format == "openclip"
    assert (oc.config.vision.act, oc.config.text.act) == ("gelu", "gelu")  # as OpenCLIP's ViT-B-16-SigLIP
    assert (oc.config.vision.heads, oc.config.text.heads, oc.config.vision.layer_norm_eps) == (1, 1, 1e-6)
    assert {v.dtype for v in oc.state_dict.values()} == {torch.float16}


def test_the_scale_above_clips_cap_is_kept():
    """SigLIP's learned scales exceed CLIP's cap of 100; the fixtures' 112 must come through unclamped."""
    model = read_hf(FIXTURES / "hf_siglip")
    with torch.no_grad():
        assert math.isclose(float(model.logit_scale()), 112.0, rel_tol=1e-6)
        assert math.isclose(float(model.logit_scale.bias), -12.5)


def test_parity_check_can_fail_with_exact_gelu():
    """transformers runs SigLIP with the tanh GELU: the exact one misses by more than the tolerance."""
    model = read_hf(FIXTURES / "hf_siglip")
    wrong = CLIP(model.config.with_activation("gelu")).eval()
    wrong.load_state_dict(model.state_dict())
    reference = load_file(str(FIXTURES / "hf_siglip.expected.safetensors"))
    ours = outputs(wrong, reference)
    for key in ("image_features", "text_features"):
        assert (ours[key] - reference[key]).abs().max() > 10 * TOLERANCE, key


def test_text_tower_reads_the_last_position_of_what_it_is_given():
    """Non-causal and read at the last row: the padding changes the features, unlike CLIP's."""
    model = read_hf(FIXTURES / "hf_siglip")
    tokens = load_file(str(FIXTURES / "hf_siglip.expected.safetensors"))["tokens"][1:2]  # 3 ids, then padding
    with torch.no_grad():
        full, cut = model.encode_text(tokens), model.encode_text(tokens[:, :8])
    assert (full - cut).abs().max() > 1e-3


def test_optimized_inference_matches_the_plain_towers():
    """The packed fp32 path (optimize_for_inference) on SigLIP's towers: every token through the
    image tower, a patch convolution with bias and a remainder, the tanh GELU unfused."""
    torch.manual_seed(0)
    common = dict(width=512, layers=2, heads=8, act="gelu_tanh", layer_norm_eps=1e-6)
    config = CLIPConfig(embed_dim=512, vision=VisionConfig(image_size=36, patch_size=8, pool="map", **common),
                        text=TextConfig(context_length=16, vocab_size=100, pool="last", **common))
    plain = CLIP(config).eval()
    fast = copy.deepcopy(plain).optimize_for_inference()
    images, tokens = torch.randn(3, 3, 36, 36), torch.randint(0, 100, (3, 13))
    with torch.no_grad():
        torch.testing.assert_close(fast.encode_image(images), plain.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(fast.encode_text(tokens), plain.encode_text(tokens), rtol=0, atol=1e-5)
    assert fast.visual.transformer._packed is not None and fast.visual._packed_patches is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = read_hf(FIXTURES / "hf_siglip").train()
    reference = load_file(str(FIXTURES / "hf_siglip.expected.safetensors"))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(image=checkpointing, text=checkpointing)
        image, text = model.encode_image(reference["images"]), model.encode_text(reference["tokens"][:3])
        model.logits(image, text).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert "visual.attn_pool.probe" in plain and "text.text_projection.bias" in plain
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- names, both ways


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_hugging_face_names_round_trip(name):
    theirs = load_file(str(FIXTURES / name / "model.safetensors"))
    ours, scheme = to_clipforge_names(theirs, FIXTURES / name)
    assert scheme == "hf" and "visual.attn_pool.attn.in_proj_weight" in ours
    back = to_hf(ours)
    assert sorted(back) == sorted(theirs)
    assert all(torch.equal(back[k], v) for k, v in theirs.items())


def test_openclip_timm_names_round_trip():
    theirs = load_file(str(FIXTURES / "openclip_siglip.safetensors"))
    ours = from_timm(theirs)
    assert not [k for k in ours if k.startswith("visual.trunk.")]
    back = to_openclip(ours)
    assert sorted(back) == sorted(theirs)
    assert all(torch.equal(back[k], v) for k, v in theirs.items())


def test_timm_and_hugging_face_attention_pools_stack_q_k_v_alike():
    """timm keeps the pool's query and key-value projections apart; both become one q, k, v in_proj."""
    ours = from_timm(load_file(str(FIXTURES / "openclip_siglip.safetensors")))
    timm = to_timm({k: v for k, v in ours.items() if k.startswith("visual.")})
    stacked = torch.cat([timm["visual.trunk.attn_pool.q.weight"], timm["visual.trunk.attn_pool.kv.weight"]])
    assert torch.equal(stacked, ours["visual.attn_pool.attn.in_proj_weight"])
    with pytest.raises(CheckpointError, match=r"visual\.trunk\.attn_pool: missing timm kv\.weight"):
        from_timm({k: v for k, v in to_openclip(ours).items() if k != "visual.trunk.attn_pool.kv.weight"})


def test_a_clip_model_with_a_bias_still_has_no_hugging_face_names():
    with torch.device("meta"):
        state = CLIP(replace(get_config("ViT-B-32"), init_logit_bias=-10.0)).state_dict()
    with pytest.raises(CheckpointError, match="no Hugging Face CLIPModel name for 'logit_scale.bias'"):
        to_hf(state)


# ----------------------------------------------------------------------------- the presets at full size


@cache
def openclip_models() -> dict[str, dict]:
    return json.loads((FIXTURES / "preset_shapes.json").read_text())["models"]


def test_fixture_covers_every_siglip_preset():
    assert set(openclip_models()) == set(list_presets("siglip"))
    assert not set(list_presets("siglip")) & set(list_presets())  # the default family is CLIP's


@pytest.mark.parametrize("name", list_presets("siglip"))
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
    assert model.num_params() == reference["params"] == reference["hf_params"]
    config = model.config
    assert {"visual": config.vision.heads, "text": config.text.heads} == reference["heads"]
    assert config.vision.image_size == reference["image_size"]
    assert (config.vision.mean, config.vision.std) == ((0.5,) * 3, (0.5,) * 3)
    assert all((cfg["mean"], cfg["std"]) == ([0.5] * 3, [0.5] * 3) for cfg in reference["pretrained"].values())


@pytest.mark.parametrize("name", list_presets("siglip"))
def test_openclip_config_reads_as_the_preset_with_openclips_activations(name):
    """OpenCLIP's model_cfg gives the preset's shapes; its activations are the ones OpenCLIP runs
    (timm's per tower; exact GELU in SigLIP 1's text towers), where the presets use the tanh GELU."""
    reference = openclip_models()[name]
    config = config_from_openclip({"model_cfg": reference["model_cfg"]}, Path(f"{name}.json"))
    assert (config.vision.act, config.text.act) == (reference["act"]["visual"], reference["act"]["text"])
    preset = get_config(name)
    assert config.with_activation("gelu_tanh") == replace(preset, init_logit_scale=config.init_logit_scale)
    written = config_to_openclip(preset)["model_cfg"]
    assert written["vision_cfg"]["timm_model_name"] == reference["model_cfg"]["vision_cfg"]["timm_model_name"]


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP-384", "ViT-SO400M-16-SigLIP2-512"])
def test_hugging_face_config_round_trips(name):
    preset = get_config(name)
    hf, pre = config_to_hf(preset)
    assert (hf["model_type"], hf["vision_config"]["hidden_act"], pre["size"]) == (
        "siglip", "gelu_pytorch_tanh", {"height": preset.vision.image_size, "width": preset.vision.image_size})
    back = config_from_hf(hf, pre, Path("config.json"))
    # Hugging Face stores the MLP's width, clipforge the ratio: the same width, the ratio read back as width / hidden.
    assert (back.vision.mlp_width, back.text.mlp_width) == (preset.vision.mlp_width, preset.text.mlp_width)
    assert replace(back, vision=replace(back.vision, mlp_ratio=preset.vision.mlp_ratio),
                   text=replace(back.text, mlp_ratio=preset.text.mlp_ratio)) == preset


def test_shapes_alone_give_so400ms_72_wide_heads():
    """A bare state dict of So400m/14 (no config): the preset's 16 heads of 72 in both towers."""
    state = {**meta_model("ViT-SO400M-14-SigLIP-384").state_dict(), "logit_scale.bias": torch.tensor(-10.0)}
    config = infer_config(state, act="gelu_tanh", path="so400m.safetensors")
    preset = get_config("ViT-SO400M-14-SigLIP-384")
    assert (config.vision.heads, config.text.heads) == (16, 16)
    # The shapes show a 27x27 grid of 14-pixel patches: 378 pixels, which the 384 preset crops to.
    assert config.vision.image_size == 378 and config.vision.grid == preset.vision.grid == 27
    assert config.vision.mlp_width == preset.vision.mlp_width == 4304
    assert replace(config.vision, image_size=384, mlp_ratio=preset.vision.mlp_ratio) == preset.vision
    assert replace(config.text, mlp_ratio=preset.text.mlp_ratio) == preset.text


def test_a_random_siglip_preset_loads_without_a_tokenizer():
    model = load_model("ViT-B-16-SigLIP")
    assert model.config.family == "siglip" and model.logit_scale.bias is not None
    assert model.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, 768)


# ----------------------------------------------------------------------------- errors, one line each


@pytest.mark.parametrize(("make", "message"), [
    (lambda: VisionConfig(pool="avg"), "VisionConfig.pool must be one of ('class', 'map'), got 'avg'"),
    (lambda: TextConfig(pool="first"), "TextConfig.pool must be one of ('eot', 'last', 'cls'), got 'first'"),
    (lambda: VisionConfig(patch_size=None, layers=(1, 1, 1, 1), pool="map"),
     "VisionConfig.pool='map' needs a ViT (patch_size), not a ResNet (patch_size=None)"),
    (lambda: VisionConfig(image_size=36, patch_size=8),
     "VisionConfig.image_size=36 must be a multiple of patch_size=8"),
    (lambda: VisionConfig(image_size=8, patch_size=14, pool="map"),
     "VisionConfig.image_size=8 is smaller than patch_size=14"),
    (lambda: CLIPConfig(embed_dim=512, vision=VisionConfig(pool="map")),
     "CLIPConfig.embed_dim=512 must equal vision.width=768: an attention-pooled image tower (pool='map') has no "
     "projection"),
    (lambda: list_presets("blip"), "unknown model family 'blip'; known: clip, siglip, chinese_clip"),
])
def test_invalid_siglip_configs_are_named(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value) == message


def test_too_long_captions_are_named():
    tower = SigLipTextTransformer(TextConfig(context_length=8, vocab_size=20, width=16, heads=2, layers=1,
                                             pool="last"), 16)
    with pytest.raises(ValueError, match=r"token ids of length 9 exceed the model's context_length=8 \(tokens of "
                                         r"shape \[2, 9\]\)"):
        tower(torch.zeros(2, 9, dtype=torch.long))


def hf_config(**changes: dict) -> dict:
    data = json.loads((FIXTURES / "hf_siglip" / "config.json").read_text())
    for tower, values in changes.items():
        data[tower].update(values)
    return data


@pytest.mark.parametrize(("data", "message"), [
    (hf_config(vision_config={"vision_use_head": False}), "vision_config.vision_use_head=false (no attention-pooling "
                                                          "head) is not supported"),
    (hf_config(text_config={"projection_size": 24}), "text_config.projection_size=24 differs from "
                                                     "vision_config.hidden_size=32"),
    (hf_config(vision_config={"image_size": [32, 48]}), "vision_config.image_size=[32, 48] is not square"),
    (hf_config(text_config={"hidden_act": "relu"}), "text_config.hidden_act='relu' is not supported (supported: "
                                                    "gelu, quick_gelu, gelu_pytorch_tanh, gelu_new)"),
    (hf_config(vision_config={"num_attention_heads": 5}), "unsupported Hugging Face SigLIP config: "
                                                          "VisionConfig.heads=5 must divide width=32"),
])
def test_unsupported_hugging_face_siglip_configs_are_named(data, message):
    path = Path("siglip/config.json")
    with pytest.raises(CheckpointError) as err:
        config_from_hf(data, None, path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def openclip_config(**changes: dict) -> dict:
    cfg = copy.deepcopy(openclip_models()["ViT-B-16-SigLIP"]["model_cfg"])
    for part, values in changes.items():
        cfg[part].update(values)
    return {"model_cfg": cfg}


@pytest.mark.parametrize(("data", "message"), [
    (openclip_config(vision_cfg={"timm_model_name": "vit_base_patch16_siglip_gap_224"}),
     "OpenCLIP vision_cfg.timm_model_name='vit_base_patch16_siglip_gap_224' is not supported (clipforge reads "
     "timm's SigLIP towers: vit_base_patch16_siglip_224,"),
    (openclip_config(vision_cfg={"timm_pool": "avg"}), "OpenCLIP option vision_cfg.timm_pool='avg' is not supported "
                                                        "with a timm image tower (clipforge reads SigLIP's: 'map')"),
    (openclip_config(text_cfg={"pool_type": "argmax"}), "OpenCLIP option text_cfg.pool_type='argmax' is not "
                                                         "supported with a timm image tower"),
    (openclip_config(vision_cfg={"image_size": 256}), "vision_cfg.image_size=256 but vit_base_patch16_siglip_224 "
                                                       "takes 224-pixel images"),
    (openclip_config(text_cfg={"act_kwargs": {"approximate": "sigmoid"}}),
     "OpenCLIP option text_cfg.act_kwargs={'approximate': 'sigmoid'} is not supported"),
    (openclip_config(text_cfg={"qk_norm": True}), "OpenCLIP option text_cfg.qk_norm=True is not supported"),
])
def test_unsupported_openclip_siglip_configs_are_named(data, message):
    path = Path("hub/open_clip_config.json")
    with pytest.raises(CheckpointError) as err:
        config_from_openclip(data, path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_timm_table_matches_the_fixture():
    """Each OpenCLIP SigLIP model names a timm tower the table knows, with the heads and activation timm builds."""
    for name, reference in openclip_models().items():
        timm_name = reference["model_cfg"]["vision_cfg"]["timm_model_name"]
        size, _, _, _, heads, _, act = TIMM_SIGLIP_TOWERS[timm_name]
        assert (size, heads, act) == (reference["image_size"], reference["heads"]["visual"],
                                      reference["act"]["visual"]), name


def test_base_size_record_shows_parity_with_both_references():
    """tests/fixtures/siglip/base_parity.json, written by make_siglip_fixtures.py --base in the reference
    environment: B/16 at 224 pixels, random weights, against transformers and OpenCLIP."""
    record = json.loads((FIXTURES / "base_parity.json").read_text())
    assert set(record["results"]) == {"transformers SiglipModel (B/16, 224)", "open_clip ViT-B-16-SigLIP"}
    assert {"torch", "transformers", "open_clip", "timm", "clipforge"} <= set(record["versions"]) and record["date"]
    for reference, result in record["results"].items():
        assert result["params"] == meta_model("ViT-B-16-SigLIP").num_params(), reference
        diffs = result["max_abs_diff"]
        assert max(diffs["image_features"], diffs["text_features"]) <= TOLERANCE, reference
        assert diffs["logits"] <= TOLERANCE * 112, reference


@pytest.mark.parametrize("name", ["hf_siglip", "hf_siglip2"])
def test_load_reads_a_hugging_face_siglip_directory(name):
    model, _, tokenizer = load(FIXTURES / name)
    assert_matches(name, model)
    assert tokenizer is None  # SigLIP's SentencePiece and SigLIP 2's Gemma vocabularies are not OpenAI's
