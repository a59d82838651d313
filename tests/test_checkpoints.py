"""Tests for clipforge.checkpoints: parity with OpenCLIP / Hugging Face / OpenAI-style archives,
lossless conversion, and errors that name the file, the keys and the shapes.

The reference outputs in tests/fixtures/parity/ come from tests/fixtures/make_parity_fixtures.py,
run with open_clip and transformers installed; these tests need neither.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipforge.checkpoints import CheckpointError, convert, load, load_model, read_checkpoint, save
from clipforge.model import CLIP, get_config

PARITY = Path(__file__).parent / "fixtures" / "parity"
# name -> (checkpoint path in PARITY, (image tower act, text tower act))
FIXTURES = {
    "openclip_vit_gelu": ("openclip_vit_gelu", ("gelu", "gelu")),
    "openclip_vit_quickgelu": ("openclip_vit_quickgelu.pt", ("quick_gelu", "quick_gelu")),
    "openai_rn": ("openai_rn.pt", ("quick_gelu", "quick_gelu")),
    "hf_vit": ("hf_vit", ("quick_gelu", "gelu")),
}
TOLERANCE = 1e-5  # fp32


def outputs(model: CLIP, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        image_features, text_features, scale = model(images, tokens)
        logits = scale * image_features @ text_features.T
        if model.logit_scale.bias is not None:
            logits = logits + model.logit_scale.bias
        return {
            "image_features": model.encode_image(images),
            "text_features": model.encode_text(tokens),
            "logits": logits,
        }


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / f"{name}.expected.safetensors"))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", FIXTURES)
def test_outputs_match_reference_implementation(name):
    path, acts = FIXTURES[name]
    model, preprocess, tokenizer = load(PARITY / path)
    assert (model.config.vision.act, model.config.text.act) == acts
    assert callable(preprocess) and tokenizer is None  # custom vocabularies, no tokenizer files
    reference = expected(name)
    ours = outputs(model, reference["images"], reference["tokens"])
    for key, value in ours.items():
        diff = (value - reference[key]).abs().max().item()
        assert diff <= TOLERANCE, f"{name} {key}: max abs diff {diff:.2e}"


def test_parity_check_can_fail_with_the_wrong_activation():
    reference = expected("openclip_vit_quickgelu")
    model = load_model(PARITY / "openclip_vit_quickgelu.pt", act="gelu")
    ours = outputs(model, reference["images"], reference["tokens"])
    assert (ours["text_features"] - reference["text_features"]).abs().max() > 1e-3


def test_configs_read_from_each_format():
    gelu = read_checkpoint(PARITY / "openclip_vit_gelu").config
    assert (gelu.vision.heads, gelu.text.heads, gelu.init_logit_bias) == (4, 3, -5.0)
    assert gelu.vision.mean == (0.5, 0.5, 0.5) and gelu.vision.std == (0.25, 0.25, 0.25)
    hf = read_checkpoint(PARITY / "hf_vit")
    assert hf.format == "hf"
    assert (hf.config.vision.heads, hf.config.vision.mlp_ratio, hf.config.text.context_length) == (4, 2.0, 77)
    assert hf.config.vision.mean == (0.4, 0.45, 0.5)
    openai = read_checkpoint(PARITY / "openai_rn.pt")
    assert openai.format == "openai" and openai.config.vision.is_resnet
    assert openai.config.vision.layers == (1, 1, 1, 1) and openai.config.vision.image_size == 64
    assert {v.dtype for v in openai.state_dict.values()} >= {torch.float16, torch.float32}  # as OpenAI stores them


def test_dtype_and_device_arguments():
    model = load_model(PARITY / "openai_rn.pt", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training


# ----------------------------------------------------------------------------- conversion


def assert_same_checkpoint(a, b) -> None:
    """Same config and bit-identical tensors of the same dtypes.

    ``init_logit_scale`` is an initialisation value that Hugging Face stores as its logarithm, so
    exp(log(s)) may differ from s in the last bit.
    """
    assert math.isclose(a.config.init_logit_scale, b.config.init_logit_scale, rel_tol=1e-12)
    assert replace(a.config, init_logit_scale=1.0) == replace(b.config, init_logit_scale=1.0)
    assert sorted(a.state_dict) == sorted(b.state_dict)
    for key, value in a.state_dict.items():
        assert b.state_dict[key].dtype == value.dtype, key
        assert torch.equal(b.state_dict[key], value), key


def openclip_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clipforge names -> OpenAI/OpenCLIP names: the text tower at the top level."""
    renamed = {"logit_scale.log_scale": "logit_scale", "logit_scale.bias": "logit_bias"}
    return {renamed.get(k, k.removeprefix("text.")): v for k, v in state.items()}


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("to", ["clipforge", "openclip", "hf"])
def test_conversion_round_trip_is_lossless(tmp_path, name, to):
    source = PARITY / FIXTURES[name][0]
    original = read_checkpoint(source)
    if to == "hf" and (original.config.vision.is_resnet or original.config.init_logit_bias is not None):
        with pytest.raises(CheckpointError, match="Hugging Face"):
            convert(source, tmp_path / "out", to="hf")
        return
    if to == "openclip" and original.config.vision.act != original.config.text.act:
        with pytest.raises(CheckpointError, match="one activation for both towers"):
            convert(source, tmp_path / "out", to="openclip")
        return
    written = convert(source, tmp_path / "out", to=to)
    assert_same_checkpoint(original, read_checkpoint(written))
    again = convert(written, tmp_path / "again", to="clipforge")
    assert_same_checkpoint(original, read_checkpoint(again))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_conversion_to_a_bare_openclip_file(tmp_path, suffix):
    source = PARITY / "openai_rn.pt"
    original = read_checkpoint(source)
    written = convert(source, tmp_path / f"rn{suffix}", to="openclip")
    state = load_file(str(written)) if suffix == ".safetensors" else torch.load(written, weights_only=True)
    expected_state = openclip_names(original.state_dict)
    assert sorted(state) == sorted(expected_state)
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key
    # No config travels with a bare file: the shapes give it back, the activation must be named.
    assert_same_checkpoint(original, read_checkpoint(written, act="quick_gelu"))


def test_clipforge_format_keeps_the_tokenizer(tmp_path):
    from clipforge.tokenizer import train_bpe

    tokenizer = train_bpe(["a photo of a cat", "a photo of a dog"] * 20, 530, context_length=13)
    config = get_config("tiny")
    model = CLIP(config)
    save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    loaded, preprocess, loaded_tokenizer = load(tmp_path / "ckpt")
    assert loaded.config == config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded_tokenizer(["a photo of a cat"]).shape == (1, config.text.context_length)
    assert torch.equal(loaded_tokenizer(["a cat"]), tokenizer(["a cat"], config.text.context_length))
    from PIL import Image

    image = preprocess(Image.new("RGB", (90, 70), (200, 10, 10)))
    assert image.shape == (3, 64, 64)


def test_preset_names_give_random_models():
    model = load_model("tiny")
    assert model.config == get_config("tiny")
    assert load_model("tiny", act="quick_gelu").config.text.act == "quick_gelu"
    with pytest.raises(FileNotFoundError, match="ViT-B-32"):
        load_model("no-such-model")


# ----------------------------------------------------------------------------- errors


def clipforge_checkpoint(tmp_path: Path) -> Path:
    return convert(PARITY / "openclip_vit_quickgelu.pt", tmp_path / "ckpt", to="clipforge")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    directory = clipforge_checkpoint(tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    del state["text.ln_final.bias"]
    state["text.extra.weight"] = torch.zeros(2)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors") as err:
        load_model(directory)
    assert "missing keys: text.ln_final.bias" in str(err.value)
    assert "unexpected keys: text.extra.weight" in str(err.value)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    directory = clipforge_checkpoint(tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    state["visual.ln_post.weight"] = torch.ones(65)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"visual\.ln_post\.weight: checkpoint \[65\] vs model \[64\]"):
        load_model(directory)


def test_unknown_config_key_is_named(tmp_path):
    directory = clipforge_checkpoint(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model"]["vision"]["dropout"] = 0.1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'dropout'"):
        load_model(directory)


@pytest.mark.parametrize("source", ["openclip_vit_quickgelu.pt", "openclip_vit_gelu/open_clip_model.safetensors",
                                    "openai_rn.pt"])
def test_truncated_files_are_reported(tmp_path, source):
    data = (PARITY / source).read_bytes()
    broken = tmp_path / Path(source).name
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=broken.name):
        load_model(broken)


def test_foreign_files_are_reported(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_model(text)
    other = tmp_path / "resnet.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match="resnet.safetensors.*not a CLIP state dict.*conv.weight"):
        load_model(other)


class Payload:
    """Unpickling this would append to a list: proof that code ran."""

    ran: list[str] = []

    def __reduce__(self):
        return (Payload.ran.append, ("executed",))


def test_pickled_objects_are_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_model(path)
    assert Payload.ran == []


def test_torchscript_archive_with_foreign_globals_is_refused(tmp_path):
    path = tmp_path / "evil_script.pt"
    payload = pickle.dumps(Payload(), protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil_script/data.pkl", payload)
        archive.writestr("evil_script/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("evil_script/code/__torch__.py", "")
    with pytest.raises(CheckpointError, match="evil_script.pt.*refusing"):
        load_model(path)
    assert Payload.ran == []


def test_top_level_exports_resolve():
    import clipforge
    from clipforge import checkpoints

    assert clipforge.load_for_inference is checkpoints.load_for_inference and clipforge.load is checkpoints.load
    assert all(getattr(clipforge, name) is not None for name in clipforge.__all__)
