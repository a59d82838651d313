"""The ``clipforge`` command as a whole: the ``python -m`` entry points, every ``--help``, and the
success paths of ``convert --to hf``, ``index add`` and ``serve`` through ``main([...])``.

``serve`` runs without a server: `uvicorn.run` is replaced by a recorder, and the app the command
would serve is driven with FastAPI's TestClient.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from _search_helpers import collection, write_pairs
from clipforge.checkpoints import load_model, save
from clipforge.cli import build_parser, main
from clipforge.data.shapes import ShapesDataset

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- entry points


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


@pytest.mark.parametrize("module", ["clipforge", "clipforge.cli"])
def test_python_m_runs_the_clipforge_command(module, tmp_path):
    version = run_module(module, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"clipforge {clipforge.__version__}"

    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red star\na blue box\n" * 20, encoding="utf-8")
    trained = run_module(module, "tokenizer", "train", str(corpus), str(tmp_path / "tok"), "--vocab-size", "520")
    assert trained.returncode == 0, trained.stderr
    assert f"520 ids; saved to {tmp_path / 'tok'}" in trained.stdout
    assert (tmp_path / "tok" / "tokenizer.json").is_file()

    refused = run_module(module, "convert", str(tmp_path / "nothing"), str(tmp_path / "out"), "--to", "hf")
    assert refused.returncode == 2 and refused.stderr.startswith("clipforge convert: error: ")
    assert len(refused.stderr.strip().splitlines()) == 1


def subcommands(parser) -> list[list[str]]:
    """Every command path (``["eval", "zeroshot"]``, ...) of an argparse parser."""
    import argparse

    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append([name])
                paths += [[name, *rest] for rest in subcommands(sub)]
    return paths


def test_every_command_has_help(capsys):
    paths = subcommands(build_parser())
    for expected in (["eval", "zeroshot"], ["index", "add"], ["serve"], ["tokenizer", "train"], ["generate"]):
        assert expected in paths
    for path in [[], *paths]:
        with pytest.raises(SystemExit) as exit_:
            main([*path, "--help"])
        assert exit_.value.code == 0, path
        printed = capsys.readouterr().out
        assert printed.startswith("usage: clipforge " + " ".join(path)), path


# ----------------------------------------------------------------------------- defaults and warnings


def parsed_defaults(argv: list[str]):
    """The options ``argv`` parses to, the parser built afresh (defaults read the machine then)."""
    return build_parser().parse_args(argv)


@pytest.mark.parametrize(("cores", "eval_workers", "index_workers"), [(1, 0, 0), (2, 1, 1), (3, 2, 2), (64, 4, 2)])
def test_workers_default_to_what_the_machine_has(monkeypatch, capsys, cores, eval_workers, index_workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    evaluate = parsed_defaults(["eval", "zeroshot", "--model", "m", "--data", "d"])
    build = parsed_defaults(["index", "build", "--model", "m", "--data", "d", "--out", "o"])
    score = parsed_defaults(["score", "--model", "m", "--images", "i", "--captions", "c"])
    assert (evaluate.workers, build.workers, score.workers) == (eval_workers, index_workers, 0)
    assert parsed_defaults(["eval", "zeroshot", "--model", "m", "--data", "d", "--workers", "3"]).workers == 3

    with pytest.raises(SystemExit):
        main(["eval", "retrieval", "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    assert f"(default: {eval_workers}, the {cores} cores this process may use less one, at most 4)" in helped


@pytest.fixture
def warning_command(monkeypatch):
    """A command ``warns`` that issues the warnings its ``--text`` options give, then succeeds."""
    import types
    import warnings

    import clipforge.cli as cli

    module = types.ModuleType("clipforge_test_warns")

    def run(args) -> int:
        for text in args.text:
            warnings.warn(text, stacklevel=1)
        print("done")
        return 0

    def add_parser(subparsers) -> None:
        parser = subparsers.add_parser("warns")
        parser.add_argument("--text", action="append", default=[])
        parser.set_defaults(func=run)

    module.add_parser = add_parser
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, module.__name__])


def test_warnings_print_as_one_line_naming_the_command(warning_command, capsys):
    import warnings

    before = warnings.showwarning
    assert main(["warns", "--text", "first", "--text", "a warning\n  over two lines"]) == 0
    printed = capsys.readouterr()
    assert printed.out == "done\n"
    assert printed.err.splitlines() == ["clipforge warns: warning: first",
                                        "clipforge warns: warning: a warning over two lines"]
    assert warnings.showwarning is before  # Python's own format is back once the command ends

    # Each run of a command shows its warnings, even where Python would show one only once.
    assert main(["warns", "--text", "first"]) == 0
    assert capsys.readouterr().err == "clipforge warns: warning: first\n"


def test_a_library_warning_reaches_the_user_as_one_line(monkeypatch, capsys, tmp_path):
    import clipforge.devices
    from clipforge.tokenizer import train_bpe

    monkeypatch.setattr(clipforge.devices, "native_cpu_bf16", lambda: False)  # as on an AVX2-only CPU
    torch.manual_seed(0)
    tokenizer = train_bpe(["a red circle", "a blue square"] * 5, 600, min_frequency=1, context_length=32)
    save(load_model("tiny"), tmp_path / "model", tokenizer=tokenizer)
    code = main(["eval", "zeroshot", "--model", str(tmp_path / "model"), "--data", "shapes://?split=heldout&n=4&size=32",
                 "--limit", "4", "--device", "cpu", "--precision", "bf16", "--workers", "0", "--quiet"])
    assert code == 0
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("clipforge eval: warning: precision bf16 on this CPU (") and "is emulated" in line


# ----------------------------------------------------------------------------- convert


def test_convert_to_hf_writes_a_directory_that_loads_to_the_same_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = load_model("tiny-vit")
    save(model, tmp_path / "ours")
    out = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "ours"), str(out), "--to", "hf"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert {"text_config", "vision_config"} <= set(config)  # Hugging Face's layout, not clipforge's

    back, _, _ = clipforge.load(out)
    assert list(back.state_dict()) == list(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    model, _, _ = clipforge.load(tmp_path / "ours")  # the source as loaded for use, the same inference path
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    texts = torch.randint(1, 4000, (3, model.context_length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back.encode_image(images), model.encode_image(images))
        assert torch.equal(back.encode_text(texts), model.encode_text(texts))


# ----------------------------------------------------------------------------- index add and serve


def build_small_index(c, root: Path) -> tuple[Path, Path]:
    """The first 100 images of the shared collection copied to ``root/images`` and indexed there by
    ``clipforge index build``; returns the image folder and the index directory."""
    images, index = root / "images", root / "index"
    shutil.copytree(c.images, images, ignore=lambda _, names: [n for n in names if n >= "00100"])
    code = main(["index", "build", "--model", str(c.model), "--data", f"pairs:{images}", "--out", str(index),
                 "--quiet", "--workers", "0"])
    assert code == 0
    return images, index


def test_index_add_embeds_only_the_new_images(tmp_path_factory, tmp_path, capsys):
    pytest.importorskip("faiss")
    from clipforge.search.index import Index
    from clipforge.search.store import Store

    c = collection(tmp_path_factory)
    images, index = build_small_index(c, tmp_path)
    assert "100 image(s) embedded, 0 already there, 100 in the index" in capsys.readouterr().out
    before = Store.open(index).all_vectors().copy()

    # The folder now holds the 100 indexed images and 10 new ones.
    new = write_pairs(images, ShapesDataset(split="seen", size=32, n=2000, seed=7), range(1990, 2000))
    assert main(["index", "add", str(index), "--data", f"pairs:{images}", "--quiet", "--workers", "0"]) == 0
    assert "10 image(s) embedded, 100 already there, 110 in the index" in capsys.readouterr().out

    store = Store.open(index)
    vectors = store.all_vectors()
    assert len(vectors) == 110 and np.array_equal(vectors[:100], before)  # the indexed rows were not rewritten
    assert [chunk["rows"] for chunk in store.manifest["chunks"]][-1] == 10
    paths = store.metadata()["path"].to_pylist()
    assert sorted(Path(p).name for p in paths[100:]) == sorted(new)

    # The new rows are the model's own embeddings of the new images (a plain forward pass).
    model, preprocess, _ = clipforge.load(c.model)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[100:]])
        expected = torch.nn.functional.normalize(model.eval().encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(vectors[100:], expected, atol=1e-5)

    searched = Index.load(index)
    assert len(searched) == 110
    for name in sorted(new)[:3]:
        hit = searched.search_image(images / name, k=1)[0]
        assert hit.path == str(images / name) and hit.id >= 100

    # Nothing new: nothing embedded, the index unchanged.
    assert main(["index", "add", str(index), "--data", f"pairs:{images}", "--quiet", "--workers", "0"]) == 0
    assert "0 image(s) embedded, 110 already there, 110 in the index" in capsys.readouterr().out
    assert np.array_equal(Store.open(index).all_vectors(), vectors)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An index for `serve` to serve, and a noisy PNG of about 50 KB to upload."""
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    c = collection(tmp_path_factory)
    root = tmp_path_factory.mktemp("serve")
    images, index = build_small_index(c, root)
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    return {"index": index, "images": images, "big_png": buffer.getvalue()}


@pytest.fixture
def uvicorn_runs(monkeypatch):
    """What `uvicorn.run` is called with, in place of running a server; torch's thread count,
    which `serve` sets, restored afterwards."""
    uvicorn = pytest.importorskip("uvicorn")

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


def test_serve_enforces_max_upload_mb(served, uvicorn_runs, capsys):
    from fastapi.testclient import TestClient

    big = served["big_png"]
    small = (served["images"] / "00007.png").read_bytes()
    limit_mb = 0.03
    assert len(small) < limit_mb * (1 << 20) - 1024 < len(big)  # room for the multipart headers

    def upload(client, data: bytes) -> int:
        return client.post("/search/image", params={"k": 1}, files={"file": ("q.png", data, "image/png")}).status_code

    assert main(["serve", str(served["index"]), "--port", "8123", "--max-upload-mb", str(limit_mb)]) == 0
    out, err = capsys.readouterr()
    assert f"serving {served['index']} (100 images) on http://127.0.0.1:8123/" in out and err == ""
    call = uvicorn_runs[-1]
    assert (call["host"], call["port"]) == ("127.0.0.1", 8123)
    with TestClient(call["app"]) as client:
        assert upload(client, big) == 413
        response = client.post("/search/image", params={"k": 1}, files={"file": ("q.png", small, "image/png")})
        assert response.status_code == 200
        assert response.json()["results"][0]["path"] == str(served["images"] / "00007.png")

    # The same upload under a larger limit is searched.
    assert main(["serve", str(served["index"]), "--max-upload-mb", "1"]) == 0
    with TestClient(uvicorn_runs[-1]["app"]) as client:
        assert upload(client, big) == 200
    assert len(uvicorn_runs) == 2


def test_serve_warns_about_a_non_local_host(served, uvicorn_runs, capsys):
    assert main(["serve", str(served["index"]), "--host", "0.0.0.0", "--port", "9000"]) == 0
    [warning] = capsys.readouterr().err.splitlines()
    assert warning.startswith("clipforge serve: warning: serving on 0.0.0.0: anyone who can reach this address")
    assert (uvicorn_runs[-1]["host"], uvicorn_runs[-1]["port"]) == ("0.0.0.0", 9000)


@pytest.mark.parametrize(("extra", "message"), [
    (["--threads", "0"], "argument --threads: must be a positive integer, got 0"),
    (["--max-upload-mb", "0"], "argument --max-upload-mb: must be positive, got 0"),
    (["--host", "0.0.0.0", "--threads", "-2"], "argument --threads: must be a positive integer, got -2"),
    (["--port", "70000"], "argument --port: must be a port number from 1 to 65535, got 70000"),
])
def test_serve_refuses_bad_options_in_one_line(served, uvicorn_runs, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(served["index"]), *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"clipforge serve: error: {message}" and err.startswith("usage: clipforge serve")
    assert uvicorn_runs == []


def test_serve_refuses_a_missing_index(tmp_path, uvicorn_runs, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "not an index directory" in capsys.readouterr().err and uvicorn_runs == []
