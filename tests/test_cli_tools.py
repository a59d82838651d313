"""``clipforge convert`` and ``clipforge tokenizer train`` through the command line."""

from __future__ import annotations

import torch

from clipforge.checkpoints import load, load_model, save
from clipforge.cli import main
from clipforge.tokenizer import Tokenizer


def test_tokenizer_train_cli(tmp_path, capsys):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("star", "box", "disc")) * 5 + "\n\n")
    assert main(["tokenizer", "train", str(corpus), str(tmp_path / "tok"), "--vocab-size", "600", "--context-length", "16"]) == 0
    tok = Tokenizer.from_dir(tmp_path / "tok")
    ids = tok(["a red star"])
    assert ids.shape == (1, 16) and int(ids[0, 0]) == tok.sot_token_id
    assert tok.decode(tok.encode("a red star")).strip() == "a red star"


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
