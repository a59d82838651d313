"""Pretrained names through every command that takes a model: ``eval zeroshot``, ``eval
linear-probe``, ``index build`` (then ``search``, ``serve`` and ``index add`` without ``--model``),
``score``, ``rerank``, ``generate``, ``convert`` and ``train``.

The registry gets two test entries for the same random tiny-vit weights, trained (says the
entry) with QuickGELU and pixel statistics of 0.5 and 0.25: ``tiny-vit:test``, OpenCLIP's weights
file in a Hub repository, and ``org/tiny-hf``, a repository holding a transformers CLIPModel.
Both sit in a Hugging Face cache laid out in tmp_path, with the Hub offline.  Each command runs
with ``--model tiny-vit:test``, ``--model tiny-vit --pretrained test`` and ``--model org/tiny-hf``,
and must give what it gives for a checkpoint saved from ``load_model`` of the same name: the
same numbers, so the weights, the entry's activation and its statistics were all applied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipforge.checkpoints import convert, load_model, registry, save
from clipforge.checkpoints.names import to_openclip
from clipforge.checkpoints.registry import Preprocessing, Pretrained
from clipforge.cli import main
from clipforge.model import CLIP, get_config
from clipforge.tokenizer import train_bpe
from test_download import cache_repo, files_of

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
ENTRY = Pretrained(name="tiny-vit:test", architecture="tiny-vit", tag="test", activation="quick_gelu",
                   preprocessing=Preprocessing(64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), licence="MIT",
                   params=1, hub="org/tiny-test")
HF_ENTRY = Pretrained(**{**ENTRY.__dict__, "name": "org/tiny-hf", "hub": "org/tiny-hf", "layout": "hf"})
# How a command is told the model: (the --model/--pretrained words, the name the run records).
FORMS = {
    "ARCH:TAG": (["--model", "tiny-vit:test"], "tiny-vit:test"),
    "--pretrained TAG": (["--model", "tiny-vit", "--pretrained", "test"], "tiny-vit:test"),
    "registered repo id": (["--model", "org/tiny-hf"], "org/tiny-hf"),
}
# What a run records for each name, as CLIP_benchmark does: (model, pretrained) = the entry's
# architecture and tag.
FIELDS = {"tiny-vit:test": ("tiny-vit", "test"), "org/tiny-hf": ("tiny-vit", "test")}


def png(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(-25, 25, (24, 24, 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Images (labelled, captioned, more captioned ones), a tokenizer, and the Hugging Face cache
    holding the weights as OpenCLIP's file (org/tiny-test) and as a CLIPModel (org/tiny-hf)."""
    root = tmp_path_factory.mktemp("names")
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 4):
        png(root / "labelled" / name / f"{i}.png", rgb, i)
        folder = root / ("pairs" if i < 6 else "more")
        png(folder / f"{i}.png", rgb, 100 + i)
        (folder / f"{i}.txt").write_text(f"a {name} image", encoding="utf-8")
    (root / "captions.tsv").write_text("".join(f"{i}.png\ta {n} image\n" for i, n in enumerate(COLOURS)),
                                       encoding="utf-8")
    tokenizer = train_bpe([f"a {n} image" for n in COLOURS] * 10, 530, min_frequency=1, context_length=32)
    tokenizer.save(root / "tok")

    torch.manual_seed(0)
    model = CLIP(get_config("tiny-vit"))
    save_file({k: v.contiguous() for k, v in to_openclip(model.state_dict()).items()}, root / "w.safetensors")
    save(model, root / "raw", tokenizer=tokenizer)
    convert(root / "raw", root / "hf", to="hf")
    cache_repo(root / "hf-cache", "org/tiny-test", {"open_clip_model.safetensors": root / "w.safetensors"})
    cache_repo(root / "hf-cache", "org/tiny-hf", files_of(root / "hf"))
    return {name: root / name for name in ("labelled", "pairs", "more", "captions.tsv", "tok", "hf-cache")}


@pytest.fixture
def ws(files, tmp_path, monkeypatch) -> dict[str, Any]:
    """The two test entries registered, both caches in tmp_path (the Hub offline), and a
    checkpoint saved from each name as `load_model` loads it."""
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "clipforge-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(files["hf-cache"]))
    monkeypatch.setitem(registry.REGISTRY, ENTRY.name, ENTRY)
    monkeypatch.setitem(registry.REGISTRY, HF_ENTRY.name, HF_ENTRY)
    checkpoints = {}
    for name in (ENTRY.name, HF_ENTRY.name):
        checkpoints[name] = save(load_model(name), tmp_path / "ckpt" / name.replace("/", "_").replace(":", "_"))
        shutil.copytree(files["tok"], checkpoints[name], dirs_exist_ok=True)
    model = checkpoints[ENTRY.name]
    assert load_model(model).config.vision.act == "quick_gelu" and load_model(model).config.vision.mean == (0.5,) * 3
    return {**files, "ckpt": checkpoints, "tmp": tmp_path}


def run(argv: list[str]) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def read(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def assert_close(got: Any, expected: Any, where: str = "") -> None:
    """Equal structures, with numbers equal to float32 rounding: a model loaded by name may hold
    a tensor in another memory layout than the same tensor read from a file, which changes the
    order of a sum in its last bits."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and torch.allclose(got, expected, rtol=1e-4, atol=1e-6), where
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), where  # JSON keeps 6 decimals at times
    else:
        assert got == expected, where


# ----------------------------------------------------------------------------- the commands
# Each runs one command with the model words ``model`` and returns (what must equal the saved
# checkpoint's result, the (model, pretrained) the command recorded).


def eval_zeroshot(ws: dict, model: list[str], out: Path) -> tuple[Any, Any]:
    run(["eval", "zeroshot", *model, "--tokenizer", ws["tok"], "--data", f"imagefolder:{ws['labelled']}",
         "--workers", "0", "--quiet", "--out", out / "r.json"])
    result = read(out / "r.json")
    return result["clipforge"]["metrics"], (result["model"], result["pretrained"])


def eval_linear_probe(ws: dict, model: list[str], out: Path) -> tuple[Any, Any]:
    run(["eval", "linear-probe", *model, "--tokenizer", ws["tok"], "--data", f"imagefolder:{ws['labelled']}",
         "--split", "0.5", "--epochs", "2", "--workers", "0", "--quiet", "--out", out / "r.json"])
    result = read(out / "r.json")
    return (result["metrics"], result["clipforge"]["metrics"]), (result["model"], result["pretrained"])


def score(ws: dict, model: list[str], out: Path) -> tuple[Any, Any]:
    run(["score", *model, "--tokenizer", ws["tok"], "--images", ws["pairs"], "--captions", ws["captions.tsv"],
         "--workers", "0", "--quiet", "--out", out / "s.json"])
    result = read(out / "s.json")
    return [row["cosine"] for row in result["per_image"]], (result["model"], result["pretrained"])


def rerank(ws: dict, model: list[str], out: Path) -> tuple[Any, Any]:
    run(["rerank", *model, "--tokenizer", ws["tok"], "--prompt", "a red image", "--images", ws["pairs"],
         "--workers", "0", "--quiet", "--out", out / "r.json"])
    result = read(out / "r.json")
    return {row["image"]: row["cosine"] for row in result["ranking"]}, (result["model"], result["pretrained"])


def generate(ws: dict, model: list[str], out: Path) -> tuple[Any, Any]:
    run(["generate", "a red image", *model, "--tokenizer", ws["tok"], "--out", out / "g.png", "--steps", "2",
         "--cutouts", "1", "--size", "32", "--quiet", "--json", out / "g.json"])
    result = read(out / "g.json")
    return (result["losses"], result["score"]["cosine"]), (result["score"]["name"], result["score"]["pretrained"])


def convert_to_clipforge(ws: dict, model: list[str], out: Path) -> tuple[Any, Any]:
    run(["convert", model[1], out / "converted", "--to", "clipforge", *model[2:]])
    converted = load_model(out / "converted")
    return (converted.state_dict(), converted.config.to_dict()), ""


def train(ws: dict, model: list[str], out: Path) -> tuple[Any, Any]:
    run(["train", *model, "--tokenizer", ws["tok"], "--data", f"pairs:{ws['pairs']}", "--steps", "1",
         "--batch-size", "4", "--warmup", "0", "--workers", "0", "--no-progress", "--out", out / "run"])
    trained = load_model(out / "run" / "checkpoints" / "step-0000001")
    config = read(out / "run" / "config.json")
    where = registry.resolve(config["model"], config["pretrained"])  # train records the words it was given
    recorded = (where.entry.architecture, where.entry.tag) if where.kind == "pretrained" else config["model"]
    return trained.state_dict(), recorded


COMMANDS = {f.__name__: f for f in (eval_zeroshot, eval_linear_probe, score, rerank, generate, convert_to_clipforge,
                                    train)}


# What each command gives for the checkpoint saved from a name: the same for both forms of the name.
_BY_PATH: dict[tuple[str, str], tuple[Any, str]] = {}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_name_gives_what_its_saved_checkpoint_gives(ws, command, form):
    words, name = FORMS[form]
    got, recorded = COMMANDS[command](ws, words, ws["tmp"] / "by-name")
    if (command, name) not in _BY_PATH:
        _BY_PATH[command, name] = COMMANDS[command](ws, ["--model", ws["ckpt"][name]], ws["tmp"] / "by-path")
    expected, recorded_for_path = _BY_PATH[command, name]
    assert_close(got, expected)
    if command != "convert_to_clipforge":
        assert recorded == FIELDS[name] != recorded_for_path  # the result names the weights, never a cache path


def test_a_random_preset_gives_other_numbers(ws):
    """The comparison above can fail: the same architecture with random weights scores otherwise."""
    by_name, _ = score(ws, ["--model", "tiny-vit:test"], ws["tmp"] / "name")
    random, recorded = score(ws, ["--model", "tiny-vit"], ws["tmp"] / "preset")
    assert recorded == ("tiny-vit", "random-init") and random != by_name


# ----------------------------------------------------------------------------- search


@pytest.mark.parametrize("form", FORMS)
def test_an_index_records_the_name_and_reloads_it(ws, form, capsys, monkeypatch):
    """index build records the name, not a cache path; search, serve and index add reload the
    model from it, with the entry's activation (the fingerprint equals the saved checkpoint's)."""
    pytest.importorskip("faiss")
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    words, name = FORMS[form]
    indexes = {}
    for key, model in (("name", words), ("path", ["--model", ws["ckpt"][name]])):
        indexes[key] = ws["tmp"] / f"index-{key}"
        run(["index", "build", *model, "--tokenizer", ws["tok"], "--data", f"pairs:{ws['pairs']}",
             "--out", indexes[key], "--workers", "0", "--quiet"])
    recorded = read(indexes["name"] / "manifest.json")["model"]
    assert recorded["source"] == name and "pretrained" not in recorded
    assert recorded["fingerprint"] == read(indexes["path"] / "manifest.json")["model"]["fingerprint"]

    capsys.readouterr()
    results = {}
    for key, index in indexes.items():  # no --model: the recorded one
        run(["search", index, "a blue image", "-k", "3", "--json"])
        results[key] = json.loads(capsys.readouterr().out)["results"]
    assert len(results["name"]) == 3
    assert_close(results["name"], results["path"])
    run(["search", indexes["name"], "a blue image", "-k", "3", "--json", *words])  # the name given again
    assert_close(json.loads(capsys.readouterr().out)["results"], results["name"])

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # serve's --threads: kept as the suite has it
    run(["serve", indexes["name"], "--port", "8123"])
    with TestClient(apps[0]) as client:
        served = client.get("/search", params={"q": "a blue image", "k": 3}).json()["results"]
    assert_close([(h["id"], h["score"]) for h in served], [(h["id"], h["score"]) for h in results["name"]])

    run(["index", "add", indexes["name"], "--data", f"pairs:{ws['more']}", "--workers", "0", "--quiet"])
    assert "added to" in capsys.readouterr().out
    assert read(indexes["name"] / "manifest.json")["count"] == 12


def test_an_index_of_an_architecture_and_a_weights_file_records_both(ws, files, capsys):
    """OpenCLIP's pretrained=FILE: the index keeps the architecture and the file, and reloads both."""
    pytest.importorskip("faiss")
    weights = files["hf-cache"].parent / "w.safetensors"
    index = ws["tmp"] / "index"
    run(["index", "build", "--model", "tiny-vit-quickgelu", "--pretrained", weights, "--tokenizer", ws["tok"],
         "--data", f"pairs:{ws['pairs']}", "--out", index, "--workers", "0", "--quiet"])
    recorded = read(index / "manifest.json")["model"]
    assert (recorded["source"], recorded["pretrained"]) == ("tiny-vit-quickgelu", str(weights))
    capsys.readouterr()
    run(["search", index, "a red image", "-k", "1", "--json"])
    assert len(json.loads(capsys.readouterr().out)["results"]) == 1


# ----------------------------------------------------------------------------- training


def test_fine_tuning_from_a_name_records_it_and_resume_keeps_it(ws, capsys):
    out = ws["tmp"] / "run"
    run(["train", "--model", "tiny-vit", "--pretrained", "test", "--tokenizer", ws["tok"], "--data",
         f"pairs:{ws['pairs']}", "--steps", "2", "--batch-size", "4", "--warmup", "0", "--workers", "0",
         "--no-progress", "--save-every", "1", "--out", out])
    config = read(out / "config.json")
    assert (config["model"], config["pretrained"]) == ("tiny-vit", "test")
    last = out / "checkpoints" / "step-0000002"
    uninterrupted = load_model(last)
    assert uninterrupted.config.vision.act == "quick_gelu" and uninterrupted.config.vision.std == (0.25,) * 3

    # As if stopped after step 1: the resumed run takes its weights from the checkpoint and its
    # settings, the names included, from the checkpoint's config; a contradicting --pretrained is refused.
    shutil.rmtree(last)
    capsys.readouterr()
    assert main(["train", "--resume", "latest", "--out", str(out), "--pretrained", "other"]) == 2
    assert "pretrained is 'test' in the checkpoint, 'other' now" in capsys.readouterr().err
    run(["train", "--resume", "latest", "--out", out, "--no-progress"])
    config = read(out / "config.json")
    assert (config["model"], config["pretrained"]) == ("tiny-vit", "test")
    assert_close(load_model(last).state_dict(), uninterrupted.state_dict())
