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


# ----------------------------------------------------------------------------- files that are not checkpoints


def _half(path: Path, out: Path) -> Path:
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def _safetensors_cut_in_header(tmp_path: Path) -> Path:
    whole = PARITY / "openclip_vit_gelu" / "open_clip_model.safetensors"
    out = tmp_path / "cut.safetensors"
    out.write_bytes(whole.read_bytes()[:40])  # the length field and the start of the JSON header
    return out


def _hf_directory_of(tmp_path: Path, model_type: str) -> Path:
    directory = tmp_path / model_type
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": model_type, "vision_config": {}}))
    save_file({"w": torch.zeros(2)}, str(directory / "model.safetensors"))
    return directory


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


# Each maker writes one thing a user might pass as a checkpoint; the phrase must be in the message.
NOT_CHECKPOINTS = {
    "text": (lambda t: _write(t, "x.pt", b"hello\n"), "a 6-byte text file, not a checkpoint (expected"),
    "random bytes": (lambda t: _write(t, "rnd.pt", bytes(torch.randint(0, 256, (4000,), dtype=torch.uint8,
                                                                      generator=torch.Generator().manual_seed(3)))),
                     "a 4,000-byte file of unrecognised binary data"),
    "zero bytes": (lambda t: _write(t, "zero.pt", b""), "an empty (0-byte) file"),
    "json named .pt": (lambda t: _write(t, "j.pt", b'{"model": "ViT-B-32"}'), "a 21-byte JSON file"),
    "html page": (lambda t: _write(t, "w.pt", b"<!DOCTYPE html><html>Not Found</html>"), "HTML page"),
    "git lfs pointer": (lambda t: _write(t, "l.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n"),
                        "a Git LFS pointer"),
    "plain pickle": (lambda t: _write(t, "p.pkl", pickle.dumps({"w": [1, 2]}, protocol=4)),
                     "Python pickle not written by torch.save; clipforge does not unpickle"),
    "zip of other files": (lambda t: _zip_of_text(t / "photos.zip"), "a zip archive without data.pkl"),
    "truncated zip": (lambda t: _half(PARITY / "openclip_vit_quickgelu.pt", t / "half.pt"),
                      "a truncated or damaged zip archive"),
    "truncated legacy pickle": (lambda t: _legacy_cut(t), "a truncated PyTorch checkpoint"),
    "truncated safetensors data": (lambda t: _half(PARITY / "openclip_vit_gelu" / "open_clip_model.safetensors",
                                                   t / "half.safetensors"), "a truncated safetensors file (holds"),
    "truncated safetensors header": (_safetensors_cut_in_header, "a truncated safetensors file (its header alone"),
    "directory without config": (lambda t: _downloads(t), "not a checkpoint directory (no config.json or "
                                 "open_clip_config.json; it holds 2 entries (ViT.pt, notes.txt)); give a weights file"),
    "directory of another model": (lambda t: _hf_directory_of(t, "bert"), "describes a Hugging Face 'bert' model"),
    "directory of BLIP": (lambda t: _hf_directory_of(t, "blip"), "'blip' model (its model_type), not CLIP or SigLIP"),
}


def _downloads(tmp_path: Path) -> Path:
    directory = tmp_path / "downloads"
    directory.mkdir()
    (directory / "notes.txt").write_text("hello")
    (directory / "ViT.pt").write_bytes((PARITY / "openai_rn.pt").read_bytes())
    return directory


def _zip_of_text(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    return path


def _legacy_cut(tmp_path: Path) -> Path:
    whole = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(64)}, whole, _use_new_zipfile_serialization=False)
    return _half(whole, tmp_path / "legacy_half.pt")


@pytest.mark.parametrize("case", NOT_CHECKPOINTS)
def test_what_is_not_a_checkpoint_is_named_in_one_line(tmp_path, case):
    make, phrase = NOT_CHECKPOINTS[case]
    bad = make(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_model(bad)
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and phrase in message, message
    assert "weights_only" not in message  # PyTorch's advice to unpickle anything is never passed on
    assert err.value.__cause__ is None  # nor is PyTorch's message chained under ours


def test_torch_file_holding_other_objects_names_them_without_unsafe_advice(tmp_path):
    import numpy as np

    path = tmp_path / "with_numpy.pt"
    torch.save({"w": torch.zeros(2), "stats": np.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"with_numpy.pt: holds objects other than tensors \(numpy\..*"
                                              r"clipforge does not unpickle them") as err:
        load_model(path)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("command", ["eval", "train"])
@pytest.mark.parametrize("case", ["text", "random bytes", "directory of another model"])
def test_commands_given_a_non_checkpoint_exit_2_with_one_line(tmp_path, capsys, command, case):
    from clipforge.cli import main

    bad = NOT_CHECKPOINTS[case][0](tmp_path)
    if command == "eval":
        argv = ["eval", "zeroshot", "--model", str(bad), "--data", "shapes://?n=8", "--quiet"]
    else:
        argv = ["train", "--model", str(bad), "--data", "shapes://", "--steps", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(bad) in err, err


# ----------------------------------------------------------------------------- names without weights


def test_an_architecture_name_warns_once_that_its_weights_are_random(tmp_path):
    import warnings

    from clipforge.checkpoints import RandomWeightsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load("tiny")
    assert [w.category for w in caught] == [RandomWeightsWarning]
    assert "'tiny'" in str(caught[0].message) and "random" in str(caught[0].message)
    assert caught[0].filename == __file__  # attributed to the caller's line, not clipforge's

    save(load_model("tiny"), tmp_path / "ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(tmp_path / "ckpt")
        load_model("tiny")  # building a model to train or save asks for random weights: no warning
    assert not [w for w in caught if issubclass(w.category, RandomWeightsWarning)]


def test_load_for_inference_warns_for_a_name_and_not_for_a_checkpoint(tmp_path):
    import warnings

    from clipforge.checkpoints import RandomWeightsWarning, load_for_inference
    from clipforge.tokenizer import train_bpe

    tokenizer = train_bpe(["a photo of a cat", "a photo of a dog"] * 20, 530, context_length=13)
    tokenizer.save(tmp_path / "tok")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_for_inference("tiny", tokenizer=tmp_path / "tok", device="cpu")
    assert [w.category for w in caught] == [RandomWeightsWarning]
    save(load_model("tiny"), tmp_path / "ckpt", tokenizer=tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_for_inference(tmp_path / "ckpt", device="cpu")
    assert not [w for w in caught if issubclass(w.category, RandomWeightsWarning)]


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


def test_dir_lists_the_lazily_imported_names():
    import clipforge

    listed = dir(clipforge)
    assert set(clipforge.__all__) <= set(listed)
    assert {"load", "load_for_inference", "CLIP", "Tokenizer", "RandomWeightsWarning"} <= set(listed)
    assert listed == sorted(listed)
