"""``clipforge models`` (the registry as a table and as JSON, filtered, with its cached column) and
pretrained names through the commands' ``--model`` and ``--pretrained``.

The registry is replaced by a few test entries where the cache matters; their weights sit in a
Hugging Face cache and a clipforge cache laid out in tmp_path, with the Hub offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipforge.checkpoints import load_model, registry, save
from clipforge.checkpoints.names import to_openclip
from clipforge.checkpoints.registry import Preprocessing, Pretrained
from clipforge.cli import main
from clipforge.model import CLIP, get_config
from clipforge.tokenizer import train_bpe
from test_download import cache_repo


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Both caches in tmp_path, the Hub offline."""
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "clipforge-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    return {"hf": tmp_path / "hf", "clipforge": tmp_path / "clipforge-cache"}


def test_the_table_lists_every_entry(caches, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "architecture", "tag", "activation", "image", "params", "download", "licence",
                              "top-1", "cached"]
    names = [line.split()[0] for line in out[2:-1]]
    assert names == list(registry.REGISTRY)
    vit = next(line for line in out if line.startswith("ViT-B-32:openai "))
    assert vit.split()[1:5] == ["ViT-B-32", "openai", "quick_gelu", "224"] and "63.3%" in vit and vit.endswith("no")
    assert out[-1].startswith(f"{len(registry.REGISTRY)} models, 0 cached")


def test_a_filter_picks_entries_by_substring_or_glob(caches, capsys):
    assert main(["models", "laion2b_s3"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines()[2:-1]}
    assert "ViT-H-14:laion2b_s32b_b79k" in names and not [n for n in names if "openai" in n]
    assert main(["models", "--filter", "ViT-L-14:*"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines()[2:-1]}
    assert names == {f"ViT-L-14:{t}" for t in registry.tags("ViT-L-14")}


def test_no_match_is_one_line(caches, capsys):
    assert main(["models", "nothing-like-this"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge models: error: no pretrained model matches 'nothing-like-this'")
    assert len(err.strip().splitlines()) == 1


def test_json_carries_every_field_and_its_sources(caches, capsys):
    assert main(["models", "ViT-B-32:openai", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["ViT-B-32:openai"]
    row = rows[0]
    assert row["activation"] == "quick_gelu" and row["params"] == 151_277_313 and row["cached"] is False
    assert row["download_bytes"] == 4 * row["params"] and "estimated" in row["download_bytes_source"]
    assert row["imagenet_top1"] == 0.6332 and "openclip_results.csv" in row["imagenet_top1_source"]
    assert row["hub"] == "timm/vit_base_patch32_clip_224.openai" and row["sha256"] in row["url"]


# ----------------------------------------------------------------------------- test entries


def tiny_entry(**fields) -> Pretrained:
    base = dict(architecture="tiny-vit", tag="test", activation="quick_gelu", preprocessing=Preprocessing(64),
                licence="MIT", params=2_248_705)
    return Pretrained(**{**base, **fields})


@pytest.fixture
def entries(caches, tmp_path, monkeypatch) -> dict[str, Pretrained]:
    """A registry of three tiny-vit entries: on the Hub and cached, at an address and cached
    in clipforge's cache, and on the Hub but not cached."""
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in to_openclip(CLIP(get_config("tiny-vit")).state_dict()).items()},
              weights)
    cache_repo(caches["hf"], "org/tiny", {"open_clip_model.safetensors": weights})
    caches["clipforge"].mkdir(parents=True)
    (caches["clipforge"] / "tiny.safetensors").write_bytes(weights.read_bytes())
    test = {
        "tiny-vit:test": tiny_entry(name="tiny-vit:test", hub="org/tiny"),
        "tiny-vit:address": tiny_entry(name="tiny-vit:address", tag="address",
                                       url="http://127.0.0.1:9/tiny.safetensors"),
        "tiny-vit:elsewhere": tiny_entry(name="tiny-vit:elsewhere", tag="elsewhere", hub="org/elsewhere"),
    }
    monkeypatch.setattr(registry, "REGISTRY", test)
    return {"weights": weights, **test}


def test_the_cached_column_reads_both_caches(entries, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    cached = {line.split()[0]: line.split()[-1] for line in out[2:-1]}
    assert cached == {"tiny-vit:test": "yes", "tiny-vit:address": "yes", "tiny-vit:elsewhere": "no"}
    assert out[-1].startswith("3 models, 2 cached")
    assert main(["models", "--json"]) == 0
    assert [r["cached"] for r in json.loads(capsys.readouterr().out)] == [True, True, False]


@pytest.fixture
def tokenizer_dir(tmp_path) -> Path:
    train_bpe(["a red circle", "a blue square", "a green triangle"] * 20, 530, context_length=32).save(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.mark.parametrize("model, name", [  # name: the (model, pretrained) recorded, CLIP_benchmark's fields
    (["tiny-vit", "--pretrained", "test"], ("tiny-vit", "test")),
    (["tiny-vit:test"], ("tiny-vit", "test")),
    (["tiny-vit", "--pretrained", "ADDRESS"], ("tiny-vit", "address")),
    (["tiny-vit-quickgelu", "--pretrained", "{weights}"], ("tiny-vit-quickgelu", "{weights}")),  # pretrained=FILE
])
def test_commands_take_pretrained_names(entries, tokenizer_dir, tmp_path, capsys, model, name):
    out = tmp_path / "result.json"
    model = [m.format(weights=entries["weights"]) for m in model]
    argv = ["eval", "zeroshot", "--model", *model, "--tokenizer", str(tokenizer_dir), "--data",
            "shapes://?split=heldout&n=6", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err  # no RandomWeightsWarning: these weights are not random
    result = json.loads(out.read_text())
    assert (result["model"], result["pretrained"]) == (name[0], name[1].format(weights=entries["weights"]))


@pytest.mark.parametrize("model, message", [
    (["tiny-vit", "--pretrained", "tset"], "'tiny-vit --pretrained tset': tiny-vit has no pretrained tag 'tset'; "
                                          "did you mean test?"),
    (["tiny-vit:elsewhere"], "org/elsewhere: open_clip_model.safetensors is not in the Hugging Face cache"),
    (["ViT-B/32"], "'ViT-B/32' is OpenAI's name for it; clipforge's is ViT-B-32:openai"),
    (["{ckpt}", "--pretrained", "test"], "goes with an architecture name"),
])
def test_bad_names_are_one_line(entries, tokenizer_dir, tmp_path, capsys, model, message):
    save(load_model("tiny-vit"), tmp_path / "ckpt")
    model = [m.format(ckpt=tmp_path / "ckpt") for m in model]
    argv = ["eval", "zeroshot", "--model", *model, "--tokenizer", str(tokenizer_dir), "--data",
            "shapes://?split=heldout&n=6", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge eval: error: ") and len(err.strip().splitlines()) == 1
    assert message in err, err


def test_a_long_pattern_that_matches_nothing_is_shortened_in_the_message(caches, capsys):
    assert main(["models", "x" * 1200]) == 2
    err = capsys.readouterr().err.strip()
    assert "no pretrained model matches 'xxx" in err and "..." in err and len(err) < 250


def test_one_entry_is_one_model_and_text_columns_align_left(caches, capsys):
    assert main(["models", "RN50:openai"]) == 0
    header, _, row, last = capsys.readouterr().out.splitlines()
    assert last.startswith("1 model, 0 cached;")
    for column in ("architecture", "tag", "activation", "licence"):  # the value starts under its heading
        at = header.index(column)
        assert row[at] != " " and (at == 0 or row[at - 1] == " "), column
    assert row.startswith("RN50:openai ")


def test_a_reader_that_stops_early_ends_it_quietly(caches, monkeypatch, capsys):
    """``clipforge models --json | head``: no BrokenPipeError traceback, the SIGPIPE status."""
    import os
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone: every write fails with EPIPE
    out = open(write, "w")  # noqa: SIM115 - closed below, after the command has written to it
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert main(["models", "--json"]) == 141
        out.close()  # what is left in its buffer goes to the null device: no second error
    finally:
        monkeypatch.undo()
    assert capsys.readouterr().err == ""
