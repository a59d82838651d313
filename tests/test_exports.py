"""Exports that transformers and OpenCLIP load unchanged (`clipforge.checkpoints.export`).

tests/fixtures/make_export_fixtures.py, run where transformers and open_clip are installed, exported
the models of its `MODELS` with `convert`, loaded them with ``AutoModel``/``AutoProcessor`` and
``open_clip.create_model_and_transforms("local-dir:...")`` and recorded what those computed
(tests/fixtures/exports/).  Here the same models are rebuilt and exported, and the files are
checked to be what those libraries read (the ids of ``tokenizer.json`` through `tokenizers` alone,
the processor's settings), and clipforge's numbers, from the export, to equal theirs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.checkpoints import CheckpointError, convert, read_checkpoint, save
from clipforge.checkpoints.export import (
    OPENCLIP_NAMES,
    MissingTokenizerWarning,
    openclip_name,
    openclip_usage,
)
from clipforge.cli import main
from clipforge.model.config import PRESETS, get_config
from clipforge.tokenizer import Tokenizer, train_bpe
from clipforge.tokenizer._bpe_vocab import BPE_ENV, BPE_FILENAME

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import make_export_fixtures as fx  # noqa: E402

REFERENCE = json.loads((fx.OUT / "reference.json").read_text(encoding="utf-8"))
TENSORS = load_file(str(fx.OUT / "reference.safetensors"))
SHARED_BPE = Path(__file__).parents[2] / "shared" / "clip-bpe" / BPE_FILENAME
VITS = [name for name, spec in fx.MODELS.items() if spec.vision.patch_size is not None]
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def openai_bpe() -> Iterator[Path]:
    """OpenAI's vocabulary file, found through the environment (as users without open_clip find it)
    by every test that uses it, so that nothing is downloaded."""
    if not SHARED_BPE.is_file():
        pytest.skip(f"OpenAI's {BPE_FILENAME} not found at {SHARED_BPE}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BPE_ENV, str(SHARED_BPE))
        yield SHARED_BPE


@pytest.fixture(scope="module")
def exported(tmp_path_factory, openai_bpe) -> dict[str, dict[str, Path]]:
    """Each fixture model saved as clipforge does, then converted to "hf" (ViTs) and "openclip"."""
    root = tmp_path_factory.mktemp("exports")
    out: dict[str, dict[str, Path]] = {}
    for name in fx.MODELS:
        model, tokenizer = fx.build(name)
        saved = save(model, root / name / "ours", tokenizer=tokenizer)
        out[name] = {"ours": saved, "openclip": convert(saved, root / name / "openclip", to="openclip")}
        if name in VITS:
            out[name]["hf"] = convert(saved, root / name / "hf", to="hf")
    return out


def assert_features(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to float32 rounding: the features are of order 1 and the reference came from another torch."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@torch.no_grad()
def clipforge_features(directory: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """The export loaded back by clipforge and run the way clipforge runs: pixels, image and text
    features, and each caption's ids up to its end-of-text token."""
    model, preprocess, tokenizer = clipforge.load(directory)
    pixels = torch.stack([preprocess(image) for image in fx.images(model.config.vision.image_size)])
    tokens = tokenizer(fx.CAPTIONS)
    ids = [row[: row.index(tokenizer.eot_token_id) + 1] for row in tokens.tolist()]
    return pixels, model.encode_image(pixels), model.encode_text(tokens), ids


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("name", VITS)
def test_hf_tokenizer_files_give_transformers_ids(exported, name):
    directory = exported[name]["hf"]
    assert all((directory / f).is_file() for f in HF_TOKENIZER_FILES)
    recorded = REFERENCE["models"][name]["hf"]
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == recorded["processor"]["tokenizer_class"] == "CLIPTokenizer"
    assert config["model_max_length"] == recorded["processor"]["model_max_length"]
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    for token in ("bos", "eos", "pad"):
        assert vocab[config[f"{token}_token"]] == recorded["processor"][f"{token}_token_id"]
    ends = [recorded["processor"]["bos_token_id"], recorded["processor"]["eos_token_id"]]
    assert ends in recorded["ids"]  # the empty caption
    assert max(map(len, recorded["ids"])) == config["model_max_length"]  # a caption cut to the context length
    # tokenizer.json alone, through `tokenizers`, truncated as transformers truncates
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.enable_truncation(config["model_max_length"])
    assert [e.ids for e in backend.encode_batch(fx.CAPTIONS)] == recorded["ids"]
    # vocab.json + merges.txt, as clipforge (and older transformers) read them
    again = Tokenizer.from_dir(directory, context_length=config["model_max_length"])
    rows = again(fx.CAPTIONS).tolist()
    assert [r[: r.index(again.eot_token_id) + 1] for r in rows] == recorded["ids"]


@pytest.mark.parametrize("name", VITS)
def test_hf_processor_and_model_config_are_what_transformers_read(exported, name):
    directory = exported[name]["hf"]
    recorded = REFERENCE["models"][name]["hf"]["processor"]
    pre = json.loads((directory / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert pre["processor_class"] == "CLIPProcessor" and pre["image_processor_type"] == "CLIPImageProcessor"
    for key in ("size", "crop_size", "resample", "image_mean", "image_std"):
        assert pre[key] == recorded[key], key
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    assert config["text_config"]["eos_token_id"] == recorded["text_eos_token_id"]
    tokenizer = Tokenizer.from_dir(directory)
    assert recorded["text_eos_token_id"] == tokenizer.eot_token_id  # where transformers pools the text


@pytest.mark.parametrize("name", VITS)
def test_hf_export_gives_transformers_numbers(exported, name):
    """clipforge on its export equals transformers' AutoModel + AutoProcessor on it: pixels (Pillow
    backend), the ids of every caption, image and text features."""
    pixels, image, text, ids = clipforge_features(exported[name]["hf"])
    assert ids == REFERENCE["models"][name]["hf"]["ids"] == REFERENCE["models"][name]["clipforge_ids"]
    torch.testing.assert_close(pixels[:2], TENSORS[f"{name}.hf.pixel_values"], rtol=0, atol=1e-6)
    assert_features(image, TENSORS[f"{name}.hf.image_features"])
    assert_features(text, TENSORS[f"{name}.hf.text_features"])


# ----------------------------------------------------------------------------- OpenCLIP


@pytest.mark.parametrize("name", list(fx.MODELS))
def test_openclip_export_gives_openclip_numbers(exported, name):
    """clipforge on its OpenCLIP directory equals open_clip's local-dir: model, transforms and tokenizer."""
    directory = exported[name]["openclip"]
    pixels, image, text, ids = clipforge_features(directory)
    assert ids == REFERENCE["models"][name]["openclip"]["ids"]
    torch.testing.assert_close(pixels[:2], TENSORS[f"{name}.openclip.pixel_values"], rtol=0, atol=1e-6)
    assert_features(image, TENSORS[f"{name}.openclip.image_features"])
    assert_features(text, TENSORS[f"{name}.openclip.text_features"])
    text_cfg = json.loads((directory / "open_clip_config.json").read_text(encoding="utf-8"))["model_cfg"]["text_cfg"]
    if fx.MODELS[name].own_vocabulary:  # open_clip.get_tokenizer reads the folder's own files
        assert REFERENCE["models"][name]["openclip"]["tokenizer_class"] == "HFTokenizer"
        assert text_cfg["hf_tokenizer_name"] and (directory / "tokenizer.json").is_file()
    else:  # OpenAI's vocabulary: OpenCLIP's own tokenizer, which is OpenAI's
        assert REFERENCE["models"][name]["openclip"]["tokenizer_class"] == "SimpleTokenizer"
        assert "hf_tokenizer_name" not in text_cfg and not (directory / "tokenizer.json").exists()


def test_openclip_names_follow_the_presets_and_the_activation():
    for preset, has_quick in OPENCLIP_NAMES.items():
        if preset not in PRESETS:
            continue
        assert openclip_name(get_config(preset)) == preset
        assert openclip_name(get_config(preset + "-quickgelu")) == preset + "-quickgelu" * has_quick
    assert openclip_name(get_config("tiny")) is None and openclip_name(get_config("tiny-vit")) is None
    from dataclasses import replace

    b32 = get_config("ViT-B-32")
    assert openclip_name(replace(b32, vision=replace(b32.vision, mean=(0.5, 0.5, 0.5)))) is None  # preprocessing
    assert openclip_name(replace(b32, init_logit_bias=-10.0)) is None
    assert openclip_name(replace(b32, text=replace(b32.text, act="quick_gelu"))) is None  # mixed activations
    assert openclip_name(replace(b32, init_logit_scale=50.0)) == "ViT-B-32"  # an initial value, not the shape


def test_openclip_usage_names_the_call(tmp_path):
    quick = get_config("ViT-B-32-quickgelu")
    line = openclip_usage(quick, tmp_path / "w.safetensors")
    assert line == (f"in OpenCLIP: open_clip.create_model_and_transforms('ViT-B-32-quickgelu', "
                    f"pretrained={str(tmp_path / 'w.safetensors')!r})")
    if "ViT-g-14" in PRESETS:
        assert "force_quick_gelu=True" in openclip_usage(get_config("ViT-g-14-quickgelu"), tmp_path / "g.pt")
    assert "local-dir:" in openclip_usage(get_config("tiny"), tmp_path / "t.pt")
    assert openclip_usage(get_config("tiny"), tmp_path).endswith(f"create_model_and_transforms('local-dir:{tmp_path}')")


# ----------------------------------------------------------------------------- bad paths


@pytest.fixture
def own_vocabulary_model(tmp_path) -> Path:
    """A clipforge checkpoint of the model with its own vocabulary, saved without its tokenizer."""
    model, _ = fx.build("vit_gelu_own_vocabulary")
    return save(model, tmp_path / "no_tokenizer")


def test_own_vocabulary_without_tokenizer_warns_and_writes_the_model(own_vocabulary_model, tmp_path):
    with pytest.warns(MissingTokenizerWarning, match="vocabulary has 600 ids, not OpenAI's 49408.*--tokenizer DIR"):
        out = convert(own_vocabulary_model, tmp_path / "hf", to="hf")
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    assert not any((out / f).exists() for f in HF_TOKENIZER_FILES)
    with pytest.warns(MissingTokenizerWarning, match="open_clip.get_tokenizer"):
        convert(own_vocabulary_model, tmp_path / "openclip", to="openclip")
    # the folder given: its files written, the ids of the recorded processor
    given = convert(own_vocabulary_model, tmp_path / "hf_given", to="hf", tokenizer=fx.OWN_TOKENIZER)
    backend = tokenizers.Tokenizer.from_file(str(given / "tokenizer.json"))
    backend.enable_truncation(fx.MODELS["vit_gelu_own_vocabulary"].text.context_length)
    recorded = REFERENCE["models"]["vit_gelu_own_vocabulary"]["hf"]["ids"]
    assert [e.ids for e in backend.encode_batch(fx.CAPTIONS)] == recorded


def test_convert_cli_warns_on_one_line_and_takes_a_tokenizer(own_vocabulary_model, tmp_path, capsys):
    assert main(["convert", str(own_vocabulary_model), str(tmp_path / "hf"), "--to", "hf"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(tmp_path / "hf")
    [line] = printed.err.splitlines()
    assert line.startswith("clipforge convert: warning: no tokenizer files written: the model's vocabulary has 600")
    argv = ["convert", str(own_vocabulary_model), str(tmp_path / "oc"), "--to", "openclip",
            "--tokenizer", str(fx.OWN_TOKENIZER)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    load = f"open_clip.create_model_and_transforms('local-dir:{tmp_path / 'oc'}')"
    assert printed.err.strip() == f"note: in OpenCLIP: {load}"
    assert read_checkpoint(tmp_path / "oc").tokenizer_dir == tmp_path / "oc"


def test_a_tokenizer_larger_than_the_model_is_refused(own_vocabulary_model, tmp_path, capsys):
    words = [a + b + c for a in "abcdefgh" for b in "abcdefgh" for c in "abcdefgh"]
    big = train_bpe([" ".join(words[i: i + 8]) for i in range(0, len(words), 8)], 900, min_frequency=1)
    big.save(tmp_path / "big")
    assert big.vocab_size > 600
    with pytest.raises(CheckpointError, match=r"big: a tokenizer of \d+ ids, more than the model's vocab_size 600"):
        convert(own_vocabulary_model, tmp_path / "out", to="hf", tokenizer=tmp_path / "big")
    assert main(["convert", str(own_vocabulary_model), str(tmp_path / "out"), "--to", "hf",
                 "--tokenizer", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"clipforge convert: error: --tokenizer {tmp_path / 'nowhere'}: no such folder"


def test_convert_never_writes_into_a_non_empty_directory(own_vocabulary_model, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="taken: already exists; give a new path"):
        convert(own_vocabulary_model, taken, to="clipforge")
    with pytest.raises(CheckpointError, match="the source itself"):
        convert(own_vocabulary_model, own_vocabulary_model, to="hf")
    assert main(["convert", str(own_vocabulary_model), str(taken), "--to", "openclip"]) == 2
    assert capsys.readouterr().err.strip() == (f"clipforge convert: error: {taken}: already exists; give a new path "
                                               "(or an empty folder): convert never overwrites a checkpoint")
    assert (taken / "notes.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    with pytest.warns(MissingTokenizerWarning):
        assert convert(own_vocabulary_model, tmp_path / "empty", to="hf") == tmp_path / "empty"


def test_an_unknown_format_is_refused(own_vocabulary_model, tmp_path, capsys):
    with pytest.raises(ValueError, match="to must be 'clipforge', 'hf' or 'openclip', got 'onnx'"):
        convert(own_vocabulary_model, tmp_path / "out", to="onnx")
    with pytest.raises(SystemExit) as stop:
        main(["convert", str(own_vocabulary_model), str(tmp_path / "out"), "--to", "onnx"])
    assert stop.value.code == 2
    assert "argument --to: invalid choice: 'onnx'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_resnet_has_no_hugging_face_export(tmp_path):
    model, _ = fx.build("rn_gelu")
    saved = save(model, tmp_path / "rn")
    with pytest.raises(CheckpointError, match="no ResNet image tower; convert ResNet models to 'openclip'"):
        convert(saved, tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


def test_clipforge_format_keeps_a_tokenizer_transformers_reads(tmp_path):
    """`save` writes the tokenizer with Hugging Face's files (tokenizer.json, tokenizer_config.json)."""
    model, tokenizer = fx.build("vit_gelu_own_vocabulary")
    saved = save(model, tmp_path / "ours", tokenizer=tokenizer)
    config = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 16
    backend = tokenizers.Tokenizer.from_file(str(saved / "tokenizer.json"))
    backend.enable_truncation(16)
    recorded = REFERENCE["models"]["vit_gelu_own_vocabulary"]["hf"]["ids"]
    assert [e.ids for e in backend.encode_batch(fx.CAPTIONS)] == recorded
