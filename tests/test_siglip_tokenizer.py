"""SigLIP's and SigLIP 2's tokenizers against transformers' ids, and their loading with a checkpoint.

The vocabularies and ids are made by tests/fixtures/make_siglip_tokenizer_fixtures.py in the
reference environment: small SentencePiece and Gemma-style models saved by transformers' own
tokenizer classes, and the ids transformers gives with SigLIP's processor settings.
"""

from __future__ import annotations

import json
import shutil
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch

from clipforge.checkpoints import load, load_for_inference
from clipforge.tokenizer import Tokenizer
from clipforge.tokenizer.siglip import GemmaTokenizer, SentencePieceTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "siglip_tokenizers"
KINDS = {"siglip": SentencePieceTokenizer, "siglip2": GemmaTokenizer, "siglip2_lower": GemmaTokenizer}


@cache
def recorded() -> dict:
    return json.loads((FIXTURES / "ids.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(KINDS))
def test_ids_equal_transformers(name):
    tokenizer = Tokenizer.from_dir(FIXTURES / name)
    assert isinstance(tokenizer, KINDS[name])
    assert tokenizer.context_length == recorded()["max_length"]
    expected = recorded()[name]["ids"]
    got = tokenizer(recorded()["captions"])
    assert got.dtype == torch.long and got.shape == (len(expected), recorded()["max_length"])
    for caption, row, want in zip(recorded()["captions"], got.tolist(), expected):
        assert row == want, caption
    # one at a time gives the same rows as the batch
    assert tokenizer(recorded()["captions"][3]).tolist() == [expected[3]]


def test_fixture_covers_the_cases_that_differ():
    """The recorded ids exercise padding, truncation and lower case, where the tokenizers differ."""
    ids, captions = recorded(), recorded()["captions"]
    long_row = ids["siglip"]["ids"][captions.index("x" * 300)]
    assert long_row[-1] == 1 and 1 not in long_row[:-1]  # cut, end token kept last
    assert ids["siglip2"]["ids"][0][0] == 0 and ids["siglip2"]["ids"][0][-1] == 1  # Gemma pads on the left
    upper = captions.index("A Photo Of A CAT")
    assert ids["siglip2"]["ids"][upper] != ids["siglip2"]["ids"][0]
    assert ids["siglip2_lower"]["ids"][upper] == ids["siglip2_lower"]["ids"][0]
    assert ids["siglip"]["ids"][upper] == ids["siglip"]["ids"][0]  # SigLIP lower-cases


def test_truncate_false_and_context_length(tmp_path):
    tokenizer = Tokenizer.from_dir(FIXTURES / "siglip", context_length=8)
    assert tokenizer(["a photo of a cat"]).shape == (1, 8)
    assert tokenizer(["a cat"], context_length=5).tolist()[0][-1] == tokenizer.pad_token_id
    with pytest.raises(ValueError, match=r"text 'a photo of a dog .*' has \d+ tokens including the end token, "
                                         r"more than context_length=8"):
        tokenizer(["a photo of a dog playing in the snow"], truncate=False)
    gemma = Tokenizer.from_dir(FIXTURES / "siglip2", context_length=4)
    assert gemma(["a photo of a dog playing in the snow"]).tolist()[0][-1] == gemma.eot_token_id


def test_save_round_trip(tmp_path):
    for name in ("siglip", "siglip2"):
        tokenizer = Tokenizer.from_dir(FIXTURES / name)
        again = Tokenizer.from_dir(tokenizer.save(tmp_path / name))
        assert torch.equal(again(recorded()["captions"]), tokenizer(recorded()["captions"]))


def checkpoint_with_tokenizer(model: str, tokenizer: str, tmp_path: Path) -> Path:
    folder = shutil.copytree(Path(__file__).parent / "fixtures" / "siglip" / model, tmp_path / model)
    for source in (FIXTURES / tokenizer).iterdir():
        shutil.copyfile(source, folder / source.name)
    return folder


def test_load_gives_siglip_tokenizer(tmp_path):
    folder = checkpoint_with_tokenizer("hf_siglip", "siglip", tmp_path)
    model, _, tokenizer = load(folder)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    tokens = tokenizer(["a photo of a cat", "a dog"])
    assert tokens.shape == (2, model.config.text.context_length)
    assert tokens.max() < model.config.text.vocab_size  # these captions' ids fit the small model
    assert model.encode_text(tokens).shape[0] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ready = load_for_inference(folder)
    assert isinstance(ready.tokenizer, SentencePieceTokenizer)


def test_load_gives_siglip2_tokenizer(tmp_path):
    folder = checkpoint_with_tokenizer("hf_siglip2", "siglip2", tmp_path)
    model, _, tokenizer = load(folder)
    assert isinstance(tokenizer, GemmaTokenizer)
    assert tokenizer(["a cat"]).shape == (1, model.config.text.context_length)
    assert isinstance(load_for_inference(folder).tokenizer, GemmaTokenizer)


def test_corrupt_spiece_model(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"^\S+spiece\.model: not a SentencePiece model \(.+\)$"):
        Tokenizer.from_dir(tmp_path)


def test_tokenizer_json_of_another_type(tmp_path):
    shutil.copyfile(FIXTURES / "siglip2" / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    data = json.loads((FIXTURES / "siglip2" / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"] = {"type": "WordPiece", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer\.json: holds a WordPiece model, not the byte-fallback BPE "
                                         r"of Gemma's tokenizer \(SigLIP 2's\)$"):
        Tokenizer.from_dir(tmp_path)


def test_special_token_missing_from_vocabulary(tmp_path):
    shutil.copyfile(FIXTURES / "siglip" / "spiece.model", tmp_path / "spiece.model")
    config = {"tokenizer_class": "SiglipTokenizer", "eos_token": "<end>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=r"spiece\.model: the eos_token '<end>' of tokenizer_config\.json is not "
                                         r"a piece of the model$"):
        Tokenizer.from_dir(tmp_path)
