"""``clipforge convert`` and ``clipforge tokenizer train`` through the command line."""

from __future__ import annotations

import random
import string

import pytest
import torch

from clipforge.checkpoints import load, load_model, save
from clipforge.cli import main
from clipforge.tokenizer import Tokenizer


def word_corpus(lines: int, *, seed: int = 0) -> str:
    """Captions of 8 words drawn from 400 random 3-9 letter words: enough distinct pairs, each seen
    often enough, for a vocabulary of well over a thousand ids."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    return "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(lines)) + "\n\n"


@pytest.mark.parametrize("vocab_size", [600, 1000])
def test_tokenizer_train_cli_gives_the_vocabulary_size_asked(tmp_path, capsys, vocab_size):
    corpus = tmp_path / "captions.txt"
    corpus.write_text(word_corpus(3000), encoding="utf-8")
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", str(corpus), str(out), "--vocab-size", str(vocab_size), "--context-length", "16"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == f"trained a BPE vocabulary of {vocab_size} ids; saved to {out}"
    assert printed.err == ""
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == vocab_size and tok.eot_token_id == vocab_size - 1
    text = corpus.read_text().splitlines()[0]
    ids = tok([text])
    assert ids.shape == (1, 16) and int(ids[0, 0]) == tok.sot_token_id
    assert tok.decode(tok.encode(text)).strip() == text


def test_tokenizer_train_cli_says_when_the_corpus_is_too_small(tmp_path, capsys):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("star", "box", "disc")) * 5)
    assert main(["tokenizer", "train", str(corpus), str(tmp_path / "tok"), "--vocab-size", "4096"]) == 0
    printed = capsys.readouterr()
    size = Tokenizer.from_dir(tmp_path / "tok").vocab_size
    assert 514 < size < 600 and f"vocabulary of {size} ids" in printed.out
    [note] = printed.err.splitlines()
    assert f"filled {size} of the 4096 ids asked" in note


def test_convert_cli_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    model = load_model("tiny")
    save(model, tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "oc.safetensors"), "--to", "openclip"]) == 0
    assert str(tmp_path / "oc.safetensors") in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "oc.safetensors"), str(tmp_path / "back"), "--to", "clipforge"]) == 0
    back, _, _ = load(tmp_path / "back")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_convert_cli_names_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["convert", str(bad), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "junk.pt" in capsys.readouterr().err
