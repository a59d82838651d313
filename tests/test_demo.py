"""``clipforge demo``: the shipped run file, and the command run end to end through ``main([...])``
on a micro recipe (its run file swapped for a tiny one), then resumed."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
import sys
from pathlib import Path

import pytest

import clipforge
from clipforge.cli import main
from clipforge.data import open_data
from clipforge.evaluate import evaluate_zeroshot
from clipforge.train import config as train_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The demo's recipe, as docs/benchmarks.md ("The demo") describes it and its measurements used it.
RECIPE = {
    "model": "tiny",
    "data": "shapes://?n=200000",
    "steps": 750,
    "batch_size": 128,
    "lr": 1e-3,
    "warmup": 50,
    "weight_decay": 0.1,
    "vocab_size": 1024,
    "save_every": 375,
    "log_every": 10,
    "eval_every": 375,
    "eval_samples": 512,
    "eval_zeroshot": ["shapes://?split=seen", "shapes://?split=heldout"],
    "eval_retrieval": "shapes://?split=val",
}

MICRO = """\
model = "tiny"
data = "shapes://?n=256&size=32"
out = "runs/micro"
steps = 4
batch_size = 32
lr = 1e-3
warmup = 1
vocab_size = 600
save_every = 2
log_every = 1
eval_samples = 32
eval_zeroshot = ["shapes://?split=seen&size=32", "shapes://?split=heldout&size=32"]
eval_retrieval = "shapes://?split=val&size=32&n=48"
"""


def test_print_config_prints_the_shipped_run_file(capsys):
    assert main(["demo", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed == importlib.resources.files("clipforge.train").joinpath("demo.toml").read_text(encoding="utf-8")
    recipe = tomllib.loads(printed)
    defaults = train_config.demo_config().to_dict()
    assert set(recipe) <= set(defaults)
    assert recipe == {key: defaults[key] for key in recipe}
    assert recipe == {**RECIPE, "out": "runs/demo"}


def scores(out: str) -> dict[str, tuple[str, ...]]:
    """The scores ``clipforge demo`` printed: set -> the numbers as printed."""
    found = {}
    for name, acc1 in re.findall(r"^  zero-shot top-1 on (\S+): (\d\.\d{3})$", out, flags=re.M):
        found[name] = (acc1,)
    for name, r1, r5 in re.findall(r"^  text→image R@1 on (\S+): (\d\.\d{3}), R@5: (\d\.\d{3})$", out, flags=re.M):
        found[name] = (r1, r5)
    return found


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_demo_trains_evaluates_reports_and_resumes(tmp_path, monkeypatch, capsys):
    run_file = tmp_path / "micro.toml"
    run_file.write_text(MICRO)
    monkeypatch.setattr(train_config, "DEMO_CONFIG", run_file)
    recipe = tomllib.loads(MICRO)
    out = tmp_path / "run"

    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    final = json.loads((out / "metrics.json").read_text())
    assert final["step"] == 4
    assert set(final["eval"]) == {*recipe["eval_zeroshot"], recipe["eval_retrieval"]}
    expected = {}
    for name, metrics in final["eval"].items():
        keys = ("acc1",) if name in recipe["eval_zeroshot"] else ("text_to_image_R@1", "text_to_image_R@5")
        expected[name] = tuple(f"{metrics[k]:.3f}" for k in keys)
    assert scores(printed) == expected
    assert f"report: {out / 'report.md'}" in printed
    report = (out / "report.md").read_text()
    assert f"for 4 steps of 32 pairs; checkpoint `{out / 'checkpoints' / 'step-0000004'}`" in report

    # The last checkpoint, the one the command names, loads for use and holds the evaluated model.
    last = out / "checkpoints" / "step-0000004"
    assert f"clipforge.load('{last}')" in printed
    model, preprocess, tokenizer = clipforge.load(last)
    heldout = recipe["eval_zeroshot"][1]
    result = evaluate_zeroshot(model, preprocess, tokenizer, open_data(heldout), limit=recipe["eval_samples"])
    assert result.metrics["acc1"] == pytest.approx(final["eval"][heldout]["acc1"], abs=1e-12)

    # Resuming a finished run trains nothing and prints the same scores.
    before = {p.name: digest(p) for p in (out / "checkpoints").iterdir()}
    assert main(["demo", "--out", str(out), "--no-progress", "--resume"]) == 0
    again = capsys.readouterr().out
    assert f"resumed from {last} at step 4" in again
    assert scores(again) == expected
    assert {p.name: digest(p) for p in (out / "checkpoints").iterdir()} == before
    assert json.loads((out / "metrics.json").read_text())["eval"] == final["eval"]
