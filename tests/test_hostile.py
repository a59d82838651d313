"""Every command against every kind of bad input a user can plausibly give.

The matrix is generated from the command table.  `leaf_commands` walks `build_parser()`; each
command's cases come from its options (every number gets out-of-range values, every ``--model``
the files that are not a checkpoint and the names that name nothing or weights not downloaded,
every ``--pretrained`` a tag that does not exist or goes with no architecture, every input file
and folder missing, empty, wrong-type and non-UTF-8 ones, every output a path under a regular
file) and from the hand-written cases of
`CASES` (contradictory options, an index queried with another model, very long inputs,
interrupted writes).  A command with no cases fails `test_every_command_has_cases`, so a new
command joins the matrix when it is registered, and a new option of a known kind brings its
cases with it.

Each case runs through ``main(argv)`` in this process and asserts:
- the exit status: 2 for bad input (argparse's refusals too); 0 for input a command recovers
  from (what an interrupted write leaves behind, an image that cannot be read, a text longer
  than the model reads);
- that stderr holds no traceback and that a refusal's last line is one short message naming
  the problem (``expect``: a file name, an option, the words of the check);
- that nothing already written was damaged: no file of the workspace (checkpoints, tokenizer,
  index, training run, result files) or of the case's own copies changed, appeared or vanished.
A sample runs through ``python -m clipforge.cli`` and ``python -m clipforge`` too.

Nothing is downloaded: the suite is offline (conftest's `loopback_only`), and here both download
caches are empty folders (`empty_caches`), so a name whose weights would need the network fails
at once with its one line, whatever the machine's own caches hold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.cli import _common as common
from clipforge.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
LONG = "a red " * 16_667  # 100,002 characters
TMP_CHUNK = ".00001.npy.k3j2h1.npy"  # a chunk's temporary name (`clipforge.search.store`), as a kill leaves it
# A refusal's last line, at most: a few terminal rows (a key-and-shape report fits; a 100,000-character
# input echoed back does not).
MAX_MESSAGE = 1000


# ----------------------------------------------------------------------------- the command table


def leaf_commands() -> dict[str, argparse.ArgumentParser]:
    """``{"eval zeroshot": its parser, ...}``: every command path that runs something."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and path:
            found[" ".join(path)] = parser
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, [*path, name])

    walk(build_parser(), [])
    return found


# A valid invocation of each command, which a case changes in one place: (positionals, options).
# ``{name}`` is a path of the workspace (see `workspace`); ``{case}`` the case's own folder.
BASE: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "eval zeroshot": ([], {"--model": ["{ckpt}"], "--data": ["imagefolder:{labelled}"], "--workers": ["0"],
                           "--batch-size": ["4"], "--quiet": [], "--out": ["{case}/result.json"]}),
    "eval retrieval": ([], {"--model": ["{ckpt}"], "--data": ["csv:{captions}"], "--workers": ["0"],
                            "--batch-size": ["4"], "--quiet": [], "--out": ["{case}/result.json"]}),
    "eval linear-probe": ([], {"--model": ["{ckpt}"], "--data": ["imagefolder:{labelled}"], "--split": ["0.5"],
                               "--workers": ["0"], "--batch-size": ["4"], "--quiet": [],
                               "--out": ["{case}/result.json"]}),
    "train": ([], {"--model": ["tiny"], "--tokenizer": ["{tok}"], "--data": ["pairs:{pairs}"], "--steps": ["1"],
                   "--batch-size": ["4"], "--warmup": ["0"], "--workers": ["0"], "--out": ["{case}/run"],
                   "--no-progress": []}),
    "demo": ([], {"--out": ["{case}/demo"], "--steps": ["1"], "--no-progress": []}),
    "report": (["{run}"], {}),
    "convert": (["{vit}", "{case}/converted"], {"--to": ["hf"]}),  # a ViT: a ResNet has no CLIPModel form
    "tokenizer train": (["{corpus}", "{case}/tok"], {"--vocab-size": ["600"], "--min-frequency": ["1"]}),
    "index build": ([], {"--model": ["{ckpt}"], "--data": ["pairs:{pairs}"], "--out": ["{case}/index"],
                         "--workers": ["0"], "--batch-size": ["4"], "--quiet": []}),
    "index add": (["{index}"], {"--data": ["pairs:{pairs}"], "--workers": ["0"], "--quiet": []}),
    "search": (["{index}", "a red image"], {"-k": ["3"]}),
    "serve": (["{index}"], {"--port": ["8123"]}),
    "score": ([], {"--model": ["{ckpt}"], "--images": ["{pairs}"], "--captions": ["{score_captions}"],
                   "--workers": ["0"], "--quiet": []}),
    "rerank": ([], {"--model": ["{ckpt}"], "--prompt": ["a red image"], "--images": ["{pairs}"], "--workers": ["0"],
                    "--quiet": []}),
    "generate": (["a red image"], {"--model": ["{ckpt}"], "--out": ["{case}/image.png"], "--steps": ["1"],
                                   "--cutouts": ["1"], "--quiet": []}),
    "models": (["ViT-B-32"], {}),
}


def invocation(command: str, *, positionals: dict[int, str] | None = None,
               options: dict[str, list[str] | None] | None = None) -> list[str]:
    """`BASE`'s argv for ``command`` with positionals replaced and options replaced, added or (None) removed."""
    base_positionals, base_options = BASE[command]
    args = list(base_positionals)
    for i, value in (positionals or {}).items():
        args[i] = value
    merged = {**base_options, **(options or {})}
    for flag, values in merged.items():
        if values is not None:
            args += [flag, *values]
    return [*command.split(), *args]


def given(command: str, flag: str, *values: str) -> list[str]:
    """`BASE`'s argv for ``command`` with the option ``flag`` given ``values``."""
    return invocation(command, options={flag: list(values)})


@dataclass(frozen=True)
class Case:
    command: str
    kind: str  # the class of bad input
    argv: list[str]
    expect: tuple[str, ...] = ()  # one of these appears in stderr's last line
    status: int = 2
    setup: Callable[[dict[str, str], Path], None] | None = None  # makes the case's own copies in {case}
    name: str = field(default="")

    @property
    def id(self) -> str:
        return f"{self.command}: {self.kind}{' ' + self.name if self.name else ''}"


# ----------------------------------------------------------------------------- cases from options

BAD_NUMBERS: dict[Callable, list[str]] = {
    common.positive_int: ["0", "-3", "x"],
    common.non_negative_int: ["-2"],
    common.positive_float: ["0", "-1", "nan"],
    common.non_negative_float: ["-1", "inf"],
    common.fraction: ["2", "0"],
    common.unit_fraction: ["1.5"],
    common.port_number: ["0", "70000"],
    common.size_in_bytes: ["nonsense", "0"],
    int: ["-1", "x"],  # train's: TrainConfig checks them
    float: ["-1", "nan"],
}

# Paths that are not what an input option wants, by class; the file name must appear in the message.
NOT_A_CHECKPOINT = {
    "missing": "{files}/missing.pt",
    "empty (zero-byte)": "{files}/empty",
    "wrong-type (a text file)": "{files}/text.txt",
    "non-UTF-8 (random bytes)": "{files}/binary.bin",
    "wrong-type (an empty folder)": "{files}/emptydir",
    "truncated": "{truncated}",
    "another architecture's weights": "{mixed}",
    "interrupted (a step-N.tmp checkpoint)": "{run_tmp}/checkpoints/step-0000003.tmp",
}
# Model names that name nothing, or weights that are not downloaded (the caches are empty and the
# suite offline): (name, words of the message).
NOT_A_NAME = {
    "unknown name (a misspelt tag)": ("ViT-B-32:opnai", ("did you mean openai",)),
    "unknown name (no such architecture)": ("ViT-B-23", ("did you mean ViT-B-32",)),
    "unknown name (OpenAI's spelling)": ("ViT-B/32", ("ViT-B-32:openai",)),
    "missing (released weights not downloaded, offline)": ("RN50:openai", ("resnet50_clip.openai",)),
    "missing (a Hub repository not downloaded, offline)": ("hf-hub:clipforge-tests/absent",
                                                           ("clipforge-tests/absent",)),
}
# --pretrained beside --model: (the options, words of the message).
NOT_PRETRAINED = {
    "contradictory (--pretrained with a checkpoint)": ({"--model": ["{ckpt}"], "--pretrained": ["openai"]},
                                                       ("goes with an architecture name",)),
    "unknown name (a tag the architecture lacks)": ({"--model": ["ViT-B-32"], "--pretrained": ["opnai"]},
                                                    ("did you mean openai",)),
    "unknown name (an architecture without released weights)": ({"--model": ["tiny"], "--pretrained": ["openai"]},
                                                                ("no released weights for tiny",)),
    "missing (a weights file)": ({"--model": ["tiny"], "--pretrained": ["{files}/missing.pt"]}, ("missing.pt",)),
}
NOT_A_FILE = {
    "missing": "{files}/missing.txt",
    "empty (zero-byte)": "{files}/empty",
    "non-UTF-8": "{files}/binary.bin",
    "wrong-type (a folder)": "{files}/emptydir",
}
NOT_A_FOLDER = {
    "missing": "{files}/missing",
    "wrong-type (a text file)": "{files}/text.txt",
    "empty folder": "{files}/emptydir",
    "non-UTF-8 (random bytes)": "{files}/binary.bin",
}
INPUT_FILES = {"classnames", "templates", "negatives", "captions", "refs", "image", "init", "config", "corpus",
               "src", "run", "index_dir", "images", "tokenizer", "judge_tokenizer"}
OUTPUTS = {"out", "json", "frames", "dst"}
# Options that replace part of `BASE`'s invocation: their cases start from this argv instead.
STANDALONE = {("search", "--image"): ["search", "{index}"]}
# Options that take effect only with another: their cases add it.
COMPANIONS: dict[tuple[str, str], dict[str, list[str] | None]] = {
    ("generate", "--judge-tokenizer"): {"--judge": ["{other}"]},
    ("eval linear-probe", "--train"): {"--data": None, "--split": None, "--test": ["imagefolder:{labelled}"]},
    ("eval linear-probe", "--test"): {"--data": None, "--split": None, "--train": ["imagefolder:{labelled}"]},
}
PROBE_TRAIN = COMPANIONS["eval linear-probe", "--test"]  # linear-probe's --train (and --test) instead of --data
# Data options (linear-probe's --train and --test too), and the commands whose data is labelled images.
DATA_OPTIONS = {"data", "train", "test"}
LABELLED = {"eval zeroshot", "eval linear-probe"}
# Inputs that may legitimately be empty files: an empty TOML run file has no keys, so the
# command line alone says what to run.
EMPTY_IS_VALID = {("train", "config")}


def expected_names(path: str) -> tuple[str, ...]:
    return (Path(path.replace("{", "").replace("}", "")).name,)


def option_cases(command: str, parser: argparse.ArgumentParser) -> list[Case]:
    """The cases each option of ``command`` brings by its kind."""
    cases: list[Case] = []
    positionals = [a for a in parser._actions if not a.option_strings]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = max(action.option_strings, key=len) if action.option_strings else None
        where = action.dest if flag is None else flag

        def replaced(value: str | list[str], action=action, flag=flag) -> list[str]:
            values = value if isinstance(value, list) else [value]
            if (command, flag) in STANDALONE:
                return [*STANDALONE[command, flag], flag, *values]
            if flag is None:
                return invocation(command, positionals={positionals.index(action): values[0]})
            return invocation(command, options={**COMPANIONS.get((command, flag), {}), flag: values})

        # Numbers out of range or not numbers at all.
        for bad in BAD_NUMBERS.get(action.type, []):
            count = action.nargs if isinstance(action.nargs, int) else 1
            cases.append(Case(command, "out-of-range", replaced([bad] * count), (where, action.dest),
                              name=f"{where} {bad}"))
        # A device this machine does not have, or no device at all.
        if action.dest == "device":
            for bad in ("cuda:99", "gpu"):
                cases.append(Case(command, "out-of-range", replaced(bad), (flag, "device"), name=f"--device {bad}"))
        # Models: everything that is not a checkpoint of the architecture its config names, and
        # names that name nothing or weights that are not here.
        if action.dest in ("model", "judge") and command != "train":
            for kind, path in NOT_A_CHECKPOINT.items():
                cases.append(Case(command, kind, replaced(path), expected_names(path), name=where))
        if action.dest in ("model", "judge") or (command == "convert" and action.dest == "src"):
            for kind, (name, expect) in NOT_A_NAME.items():
                cases.append(Case(command, kind, replaced(name), expect, name=where))
        if action.dest == "pretrained":
            for kind, (options, expect) in NOT_PRETRAINED.items():
                if command == "convert":  # SRC is the model: a positional
                    argv = [*invocation(command, positionals={0: options["--model"][0]}), "--pretrained",
                            *options["--pretrained"]]
                else:
                    argv = invocation(command, options=options)
                cases.append(Case(command, kind, argv, expect, name=flag))
        # Input files and folders.
        if action.dest in INPUT_FILES:
            wanted = NOT_A_FOLDER if action.metavar in ("DIR", "INDEX_DIR") or action.dest in (
                "images", "index_dir", "run", "tokenizer", "judge_tokenizer") else NOT_A_FILE
            for kind, path in wanted.items():
                status = 0 if kind.startswith("empty") and (command, action.dest) in EMPTY_IS_VALID else 2
                cases.append(Case(command, kind, replaced(path), expected_names(path), status=status, name=where))
        # Data sources: a missing, empty, wrong-type or non-UTF-8 file behind the URI.
        if action.dest in DATA_OPTIONS:
            scheme = "imagefolder" if command in LABELLED else "csv"
            bad_data = {"missing": f"{scheme}:{{files}}/missing.tsv", "empty (zero-byte)": f"{scheme}:{{files}}/empty",
                        "non-UTF-8": "csv:{files}/binary.bin", "wrong-type (a folder as csv)": "csv:{files}/emptydir",
                        "wrong-type (a file as a folder)": "imagefolder:{files}/text.txt",
                        "unknown scheme": "nonsense:{files}/text.txt"}
            for kind, uri in bad_data.items():
                cases.append(Case(command, kind, replaced(uri), (Path(uri.split(":", 1)[1]).name, "nonsense"),
                                  name=where))
        # Outputs: a path under a regular file (the parent cannot be made), whose content stays.
        if action.dest in OUTPUTS and action.nargs != 0:  # not a flag such as search's --json
            cases.append(Case(command, "wrong-type (an output under a regular file)",
                              replaced("{files}/results.json/sub/x.png"), ("results.json",), name=where))
    return cases


# ----------------------------------------------------------------------------- hand-written cases


def copy(name: str, to: str) -> Callable[[dict[str, str], Path], None]:
    """A setup that copies the workspace's ``name`` into the case folder as ``to``."""
    def setup(ws: dict[str, str], case: Path) -> None:
        shutil.copytree(ws[name], case / to, symlinks=True)
    return setup


def write(name: str, content: str | bytes) -> Callable[[dict[str, str], Path], None]:
    def setup(ws: dict[str, str], case: Path) -> None:
        data = content.format(**ws) if isinstance(content, str) else content
        (case / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def captioned(caption: str) -> Callable[[dict[str, str], Path], None]:
    """A copy of the pairs folder with image 0's caption replaced, and a csv file of it."""
    def setup(ws: dict[str, str], case: Path) -> None:
        shutil.copytree(ws["pairs"], case / "pairs")
        (case / "pairs" / "0.txt").write_text(caption, encoding="utf-8")
        pairs = [(p, p.with_suffix(".txt").read_text(encoding="utf-8")) for p in sorted((case / "pairs").glob("*.png"))]
        csv = "".join(f"{p}\t{text}\n" for p, text in pairs)
        (case / "captions.tsv").write_text("filepath\ttitle\n" + csv, encoding="utf-8")
        (case / "score.tsv").write_text("".join(f"{p.name}\t{text}\n" for p, text in pairs), encoding="utf-8")
    return setup


CASES: list[Case] = [
    # eval
    Case("eval zeroshot", "contradictory", given("eval zeroshot", "--data", "csv:{captions}"),
         ("cannot use", "labels", "class")),
    Case("eval zeroshot", "non-UTF-8", given("eval zeroshot", "--templates", "{files}/binary.bin"),
         ("binary.bin",), name="--templates"),
    Case("eval zeroshot", "wrong-type (not JSON)", given("eval zeroshot", "--templates", "{files}/text.txt"),
         ("text.txt",), name="--templates"),
    Case("eval zeroshot", "truncated (images)", given("eval zeroshot", "--data", "imagefolder:{broken_labelled}"),
         status=0),
    Case("eval zeroshot", "missing (a preset has no tokenizer)", given("eval zeroshot", "--model", "tiny"),
         ("--tokenizer",)),
    Case("eval retrieval", "contradictory", invocation("eval retrieval", options={
        "--data": ["shapes://?split=val&n=4&size=32"], "--image-key": ["x"]}), ("does not take",)),
    Case("eval retrieval", "truncated (images)", given("eval retrieval", "--data", "pairs:{broken}"),
         status=0),
    Case("eval retrieval", "very long caption", given("eval retrieval", "--data", "csv:{case}/captions.tsv"),
         status=0, setup=captioned(LONG)),
    Case("eval retrieval", "truncated (a csv cut mid-line)",
         given("eval retrieval", "--data", "csv:{case}/cut.tsv"), ("cut.tsv",),
         setup=write("cut.tsv", "filepath\ttitle\n{pairs}/0.png")),
    # eval linear-probe
    Case("eval linear-probe", "contradictory (--data and --train)",
         given("eval linear-probe", "--train", "imagefolder:{labelled}"), ("not both",)),
    Case("eval linear-probe", "missing (--data without --split)",
         invocation("eval linear-probe", options={"--split": None}), ("--split",)),
    Case("eval linear-probe", "missing (--train without --test)",
         invocation("eval linear-probe", options={**PROBE_TRAIN, "--test": None}), ("--test",)),
    Case("eval linear-probe", "out-of-range", given("eval linear-probe", "--split", "1"), ("--split",),
         name="--split 1"),
    Case("eval linear-probe", "out-of-range", given("eval linear-probe", "--val-proportion", "0"),
         ("--val-proportion",), name="--val-proportion 0"),
    Case("eval linear-probe", "contradictory (--weight-decay and --val-proportion)",
         invocation("eval linear-probe", options={"--weight-decay": ["0.1"], "--val-proportion": ["0.5"]}),
         ("not allowed with",)),
    Case("eval linear-probe", "wrong-type (captioned images, no labels)", given("eval linear-probe", "--data",
                                                                                "csv:{captions}"),
         ("captions.tsv", "label", "class")),
    Case("eval linear-probe", "truncated (test images)",
         invocation("eval linear-probe", options={**PROBE_TRAIN, "--test": ["imagefolder:{case}/test"]}),
         status=0, setup=lambda ws, case: (shutil.copytree(ws["labelled"], case / "test"),
                                           shutil.copytree(Path(ws["broken_labelled"]) / "red", case / "test" / "red",
                                                           dirs_exist_ok=True))),
    # models
    Case("models", "unknown name", invocation("models", positionals={0: "ViT-B-99"}), ("no pretrained model matches",)),
    Case("models", "contradictory (PATTERN and another --filter)", given("models", "--filter", "openai"),
         ("one pattern",)),
    # train (options contradicting each other or the checkpoint resumed)
    Case("train", "contradictory", invocation("train", options={"--lock-image": [], "--lock-text": []}), ("lock",)),
    Case("train", "contradictory", given("train", "--accum-steps", "3"), ("accum",),
         name="accum-steps not dividing the batch"),
    Case("train", "out-of-range", invocation("train", options={"--precision": ["fp16"], "--device": ["cpu"]}),
         ("fp16",), name="fp16 on a CPU"),
    Case("train", "wrong-type (not TOML)", given("train", "--config", "{files}/text.txt"),
         ("text.txt",), name="--config"),
    Case("train", "non-UTF-8", given("train", "--data", "csv:{files}/binary.bin"), ("binary.bin",)),
    Case("train", "not a checkpoint", given("train", "--model", "{files}/text.txt"), ("text.txt",)),
    Case("train", "another architecture's weights", given("train", "--model", "{mixed}"), ("mixed",)),
    Case("train", "contradictory (resume with fewer steps)",
         invocation("train", options={"--out": ["{case}/run"], "--resume": ["latest"], "--steps": ["1"],
                                      "--save-every": ["1"], "--log-every": ["1"]}),
         ("steps",), setup=copy("run", "run")),
    Case("train", "contradictory (resume with another batch size)",
         invocation("train", options={"--out": ["{case}/run"], "--resume": ["latest"], "--steps": ["2"],
                                      "--batch-size": ["2"], "--save-every": ["1"], "--log-every": ["1"]}),
         ("batch_size", "batch size", "--batch-size"), setup=copy("run", "run")),
    Case("train", "contradictory (resume with another model)",
         invocation("train", options={"--out": ["{case}/run"], "--resume": ["latest"], "--steps": ["2"],
                                      "--model": ["tiny-vit"], "--save-every": ["1"], "--log-every": ["1"]}),
         ("model", "tiny-vit"), setup=copy("run", "run")),
    Case("train", "missing", given("train", "--resume", "{files}/missing"), ("missing",),
         name="--resume"),
    Case("train", "interrupted (a step-N.tmp left behind)",
         invocation("train", options={"--out": ["{case}/run"], "--resume": ["latest"], "--steps": ["2"],
                                      "--save-every": ["1"], "--log-every": ["1"]}),
         status=0, setup=copy("run_tmp", "run")),
    # demo and report
    Case("demo", "wrong-type (a file as the run folder)", given("demo", "--out", "{files}/results.json"),
         ("results.json",)),
    Case("report", "wrong-type (a folder that is not a run)", invocation("report", positionals={0: "{ckpt}"}),
         ("ckpt",)),
    Case("report", "truncated (metrics.json cut)", invocation("report", positionals={0: "{case}/run"}),
         ("metrics.json",), setup=lambda ws, case: (copy("run", "run")(ws, case),
                                                    (case / "run" / "metrics.json").write_text('{"step": 2, "ev'))),
    Case("report", "interrupted (a step-N.tmp left behind)", invocation("report", positionals={0: "{case}/run"}),
         status=0, setup=copy("run_tmp", "run")),
    Case("train", "missing (released weights, no tokenizer of the preset's vocabulary)",
         invocation("train", options={"--model": ["tiny"], "--pretrained": ["{case}/w.safetensors"],
                                      "--tokenizer": None}),
         ("--tokenizer",), setup=lambda ws, case: shutil.copy(Path(ws["ckpt"]) / "model.safetensors",
                                                              case / "w.safetensors")),
    # convert and tokenizer train
    Case("convert", "wrong-type (a preset: random weights)", invocation("convert", positionals={0: "tiny"}),
         ("preset",)),
    Case("convert", "contradictory (the destination is the source)", invocation("convert", positionals={1: "{vit}"}),
         ("the source itself",)),
    Case("convert", "contradictory (an existing checkpoint as the destination)",
         invocation("convert", positionals={1: "{other}"}), ("other",)),
    Case("tokenizer train", "out-of-range", given("tokenizer train", "--vocab-size", "10"),
         ("vocab_size", "514")),
    Case("tokenizer train", "contradictory (a checkpoint's folder as the output)",
         invocation("tokenizer train", positionals={1: "{ckpt}"}), ("ckpt", "model.safetensors")),
    Case("tokenizer train", "very long line", invocation("tokenizer train", positionals={0: "{case}/long.txt"}),
         status=0, setup=write("long.txt", LONG + "\na blue square\n")),
    # index build and add
    Case("index build", "contradictory (an index already built there)",
         given("index build", "--out", "{index}"), ("already",)),
    Case("index build", "another model (an interrupted build of another model)",
         invocation("index build", options={"--out": ["{case}/index"], "--model": ["{other}"]}),
         ("never mixes models",), setup=copy("index_unfinished", "index")),
    Case("index build", "contradictory (another precision for an interrupted build)",
         invocation("index build", options={"--out": ["{case}/index"], "--precision": ["bf16"]}),
         ("precision",), setup=copy("index_unfinished", "index")),
    Case("index build", "interrupted (an unfinished build continued)",
         given("index build", "--out", "{case}/index"), status=0, setup=copy("index_unfinished", "index")),
    Case("index build", "interrupted (a half-written chunk left behind)",
         given("index build", "--out", "{case}/index"), status=0,
         setup=lambda ws, case: (copy("index_unfinished", "index")(ws, case),
                                 shutil.copy(Path(ws["index_tmpchunk"]) / "embeddings" / TMP_CHUNK,
                                             case / "index" / "embeddings"))),
    Case("index build", "truncated (images)", given("index build", "--data", "pairs:{broken}"), status=0),
    Case("index build", "very long caption", given("index build", "--data", "pairs:{case}/pairs"),
         status=0, setup=captioned(LONG)),
    Case("index build", "wrong-type (a preset: random weights)", given("index build", "--model", "tiny"),
         ("random weights",)),
    Case("index add", "another model", given("index add", "--model", "{other}"), ("never mixes models",)),
    Case("index add", "missing (--pretrained without --model)", given("index add", "--pretrained", "openai"),
         ("needs --model",)),
    Case("index add", "another architecture", given("index add", "--model", "{vit}"),
         ("never mixes models",)),
    Case("index add", "interrupted (a half-written chunk left behind)",
         invocation("index add", positionals={0: "{case}/index"}), status=0, setup=copy("index_tmpchunk", "index")),
    Case("index add", "truncated (a chunk cut short)", invocation("index add", positionals={0: "{index_badchunk}"}),
         ("00000",)),
    Case("index add", "truncated (manifest.json cut)", invocation("index add", positionals={0: "{index_badmanifest}"}),
         ("manifest.json",)),
    # search and serve
    Case("search", "another model", given("search", "--model", "{other}"), ("never mixes models",)),
    Case("search", "missing (--pretrained without --model)", given("search", "--pretrained", "openai"),
         ("needs --model",)),
    Case("serve", "another model", given("serve", "--model", "{other}"), ("never mixes models",)),
    Case("serve", "missing (--pretrained without --model)", given("serve", "--pretrained", "openai"),
         ("needs --model",)),
    Case("search", "another architecture", given("search", "--model", "{vit}"), ("never mixes models",)),
    Case("search", "contradictory (a text and --image)", given("search", "--image", "{pairs}/0.png"),
         ("either",)),
    Case("search", "missing (no query)", ["search", "{index}"], ("either",)),
    Case("search", "empty query", ["search", "{index}", "  "], ("empty",)),
    Case("search", "very long query", invocation("search", positionals={1: LONG}), status=0),
    Case("search", "wrong-type (a text file as --image)", ["search", "{index}", "--image", "{files}/text.txt"],
         ("text.txt",)),
    Case("search", "interrupted (an unfinished build)", invocation("search", positionals={0: "{index_unfinished}"}),
         ("did not finish",)),
    Case("search", "interrupted (a half-written chunk left behind)",
         invocation("search", positionals={0: "{index_tmpchunk}"}), status=0),
    Case("search", "truncated (a chunk cut short)", invocation("search", positionals={0: "{index_badchunk}"}),
         ("00000",)),
    Case("search", "truncated (the faiss index cut short)", invocation("search", positionals={0: "{index_badfaiss}"}),
         ("index.faiss",)),
    Case("search", "truncated (manifest.json cut)", invocation("search", positionals={0: "{index_badmanifest}"}),
         ("manifest.json",)),
    Case("serve", "truncated (the faiss index cut short)", invocation("serve", positionals={0: "{index_badfaiss}"}),
         ("index.faiss",)),
    Case("serve", "interrupted (an unfinished build)", invocation("serve", positionals={0: "{index_unfinished}"}),
         ("did not finish",)),
    # score and rerank
    Case("score", "missing (an image the captions name)", given("score", "--captions", "{case}/c.tsv"),
         status=0, setup=write("c.tsv", "0.png\ta red image\nnowhere.png\ta lost image\n")),
    Case("score", "truncated (images)",
         invocation("score", options={"--images": ["{broken}"], "--captions": ["{case}/c.tsv"]}),
         status=0, setup=write("c.tsv", "0.png\ta red image\n1.png\ta cut image\n2.png\tan empty file\n3.png\ttext\n")),
    Case("score", "wrong-type (no tab)", given("score", "--captions", "{files}/text.txt"), ("text.txt",)),
    Case("score", "contradictory (a reference for an image without a caption)",
         given("score", "--refs", "{case}/refs.tsv"), ("refs.tsv",),
         setup=write("refs.tsv", "0.png\ta red thing\n5.png\tnot captioned\n")),
    Case("score", "very long caption", given("score", "--captions", "{case}/score.tsv"), status=0,
         setup=captioned(LONG)),
    Case("score", "wrong-type (--out of another kind)", given("score", "--out", "{case}/scores.txt"),
         ("scores.txt",)),
    Case("rerank", "empty prompt", given("rerank", "--prompt", " "), ("prompt",)),
    Case("rerank", "very long prompt", given("rerank", "--prompt", LONG), status=0),
    Case("rerank", "truncated (images)", given("rerank", "--images", "{broken}"), status=0),
    # generate
    Case("generate", "contradictory (--strength without --init)", given("generate", "--strength", "0.5"),
         ("--init",)),
    Case("generate", "contradictory (--cut-scale low above high)",
         given("generate", "--cut-scale", "0.9", "0.2"), ("cut_scale",)),
    Case("generate", "contradictory (--out is the --init image)",
         invocation("generate", options={"--init": ["{pairs}/0.png"], "--out": ["{pairs}/0.png"]}), ("--init",)),
    Case("generate", "wrong-type (--out not a PNG)", given("generate", "--out", "{case}/image.jpg"),
         ("png",)),
    Case("generate", "wrong-type (a text file as --init)", given("generate", "--init", "{files}/text.txt"),
         ("text.txt",)),
    Case("generate", "contradictory (--judge-tokenizer without --judge)",
         given("generate", "--judge-tokenizer", "{tok}"), ("--judge",)),
    Case("generate", "empty prompt", invocation("generate", positionals={0: " "}), ("prompt",)),
    Case("generate", "very long prompt", invocation("generate", positionals={0: LONG}), status=0),
]


def all_cases() -> list[Case]:
    cases = [c for command, parser in leaf_commands().items() for c in option_cases(command, parser)]
    return cases + CASES


# ----------------------------------------------------------------------------- the workspace


def png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(np.array(colour) + np.random.default_rng(sum(colour)).integers(-20, 20, (24, 24, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, str]:
    """Everything a case reads: checkpoints, a tokenizer, images, caption files, an index, a
    training run, each also broken in the ways users meet (see the names)."""
    from clipforge.checkpoints import save
    from clipforge.model import CLIP
    from clipforge.model.config import get_config
    from clipforge.tokenizer import train_bpe
    from clipforge.train import train
    from clipforge.train.config import TrainConfig

    root = tmp_path_factory.mktemp("hostile")
    ws = {name: str(root / name) for name in ("tok", "ckpt", "other", "vit", "mixed", "truncated", "labelled",
                                             "broken_labelled", "pairs", "broken", "files", "run", "run_tmp",
                                             "index", "index_tmpchunk", "index_badchunk", "index_badmanifest",
                                             "index_unfinished", "index_badfaiss")}
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    captions = []
    for i, (name, rgb) in enumerate([*colours.items(), *colours.items()]):
        png(root / "pairs" / f"{i}.png", rgb)
        (root / "pairs" / f"{i}.txt").write_text(f"a {name} image", encoding="utf-8")
        captions.append((root / "pairs" / f"{i}.png", f"a {name} image"))
        png(root / "labelled" / name / f"{i}.png", rgb)
    csv = "".join(f"{p}\t{c}\n" for p, c in captions)
    (root / "captions.tsv").write_text("filepath\ttitle\n" + csv, encoding="utf-8")
    (root / "score.tsv").write_text("".join(f"{p.name}\t{c}\n" for p, c in captions), encoding="utf-8")
    ws |= {"captions": str(root / "captions.tsv"), "score_captions": str(root / "score.tsv")}
    corpus = [c for _, c in captions] * 5 + [f"a photo of a {n}." for n in colours] * 5
    (root / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    ws["corpus"] = str(root / "corpus.txt")

    # Images that cannot be read: cut short, zero bytes, text named .png.
    whole = (root / "pairs" / "0.png").read_bytes()
    for folder in (root / "broken", root / "broken_labelled" / "red"):
        folder.mkdir(parents=True)
        (folder / "0.png").write_bytes(whole)
        (folder / "1.png").write_bytes(whole[: len(whole) // 2])
        (folder / "2.png").write_bytes(b"")
        (folder / "3.png").write_text("not an image")
        for i in range(4):
            (folder / f"{i}.txt").write_text(f"picture {i}")
    png(root / "broken_labelled" / "blue" / "0.png", colours["blue"])

    # Checkpoints: the model; another of the same architecture; another architecture; a folder
    # whose config names one architecture and whose weights are another's; one cut short.
    tokenizer = train_bpe(corpus, 600, min_frequency=1, context_length=32)
    tokenizer.save(root / "tok")
    for name, preset, seed in (("ckpt", "tiny", 0), ("other", "tiny", 1), ("vit", "tiny-vit", 0)):
        torch.manual_seed(seed)
        save(CLIP(get_config(preset)), root / name, tokenizer=tokenizer)
    shutil.copytree(root / "ckpt", root / "mixed")
    shutil.copy(root / "vit" / "model.safetensors", root / "mixed" / "model.safetensors")
    shutil.copytree(root / "ckpt", root / "truncated")
    weights = (root / "ckpt" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    files = root / "files"
    files.mkdir()
    (files / "empty").write_bytes(b"")
    (files / "text.txt").write_text("hello\n")
    (files / "binary.bin").write_bytes(b"image\tcaption\n\xff\xfe\x00\x81 not text \x9c\n")
    (files / "emptydir").mkdir()
    (files / "results.json").write_text('{"metrics": {"acc1": 0.5}}\n')

    # A training run of 2 steps with a checkpoint at each; a copy with a third checkpoint
    # half-written (step-0000003.tmp: the config written, no weights yet).
    train(TrainConfig(model="tiny", tokenizer=str(root / "tok"), data=f"pairs:{root / 'pairs'}", out=str(root / "run"),
                      steps=2, batch_size=4, warmup=0, save_every=1, keep_last=3, log_every=1, progress=False,
                      workers=0))
    shutil.copytree(root / "run", root / "run_tmp")
    half = root / "run_tmp" / "checkpoints" / "step-0000003.tmp"
    half.mkdir()
    shutil.copy(root / "ckpt" / "config.json", half / "config.json")

    # An index, and copies broken as an interruption or a damaged disk leaves them.
    assert main(["index", "build", "--model", ws["ckpt"], "--data", f"pairs:{root / 'pairs'}", "--out", ws["index"],
                 "--workers", "0", "--quiet"]) == 0
    for name in ("index_tmpchunk", "index_badchunk", "index_badmanifest", "index_unfinished", "index_badfaiss"):
        shutil.copytree(root / "index", root / name)
    (root / "index_tmpchunk" / "embeddings" / TMP_CHUNK).write_bytes(b"\x93NUMPY\x01\x00")
    chunk = root / "index_badchunk" / "embeddings" / "00000.npy"
    chunk.write_bytes(chunk.read_bytes()[:100])
    manifest = root / "index_badmanifest" / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    unfinished = json.loads((root / "index_unfinished" / "manifest.json").read_text())
    (root / "index_unfinished" / "manifest.json").write_text(json.dumps({**unfinished, "index": None}))
    (root / "index_unfinished" / "index.faiss").unlink()
    faiss_file = root / "index_badfaiss" / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:40])
    return {**ws, "root": str(root)}


_digests: dict[tuple, str] = {}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: a folder by its name, a file by the SHA-256 of its
    content (computed again only when its size, time or inode changed)."""
    state: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        if path.is_dir():
            state[str(path)] = "folder"
            continue
        key = (str(path), info.st_size, info.st_mtime_ns, info.st_ino)
        if key not in _digests:
            _digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        state[str(path)] = _digests[key]
    return state


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("caches")


@pytest.fixture(autouse=True)
def empty_caches(caches, monkeypatch):
    """Both download caches empty and the Hub client offline: released weights are never here."""
    monkeypatch.setenv("CLIPFORGE_CACHE", str(caches / "clipforge"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(caches / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """`serve` must never start a server here: a case that gets that far fails loudly."""
    uvicorn = pytest.importorskip("uvicorn")

    def refuse(*args, **kwargs):
        raise AssertionError("serve got as far as starting the server")

    monkeypatch.setattr(uvicorn, "run", refuse)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_case(case: Case, ws: dict[str, str], folder: Path, capsys) -> tuple[int, str]:
    if case.setup is not None:
        case.setup(ws, folder)
    argv = [a.format(**ws, case=folder) for a in case.argv]
    before = snapshot(Path(ws["root"])) | snapshot(folder)
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's refusals (and --help)
        status = exit_.code
    err = capsys.readouterr().err
    after = snapshot(Path(ws["root"])) | {k: v for k, v in snapshot(folder).items() if k in before}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if case.status != 0:
        assert not changed, f"{case.id}: changed {changed}"
    else:  # a recovered run writes its own results, never into the workspace
        assert not [k for k in changed if k.startswith(ws["root"])], f"{case.id}: changed {changed}"
    return status, err


# ----------------------------------------------------------------------------- the matrix


def test_every_command_has_cases():
    cases = all_cases()
    commands = leaf_commands()
    assert set(BASE) == set(commands), "every command needs a valid invocation in BASE"
    for command in commands:
        kinds = {c.kind for c in cases if c.command == command}
        assert kinds, f"{command} has no hostile-input cases"
    for case in CASES:
        assert case.command in commands, case.id


def test_every_number_option_is_checked_when_parsed():
    """Every int or float option outside train's (which `TrainConfig` checks) has a range check."""
    for command, parser in leaf_commands().items():
        for action in parser._actions:
            if command != "train" and action.type in (int, float):
                raise AssertionError(f"clipforge {command} {action.option_strings}: a number without a range check")


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.id)
def test_hostile_input(case, workspace, tmp_path, capsys):
    status, err = run_case(case, workspace, tmp_path, capsys)
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if case.status == 0:
        assert status == 0, f"{case.id}: exit {status}; {last}"
        return
    assert status == 2, f"{case.id}: exit {status}; stderr ends {last!r}"
    assert last.startswith("clipforge ") and ": error: " in last, last
    assert len(last) <= MAX_MESSAGE, last[:MAX_MESSAGE]
    assert any(e in last for e in case.expect), f"{case.id}: none of {case.expect} in {last!r}"


# ----------------------------------------------------------------------------- through python -m


# A sample, each through one of the two entry points: (module, argv, words of the last line).
SUBPROCESS_SAMPLE = [
    ("clipforge.cli", ["eval", "zeroshot", "--model", "{files}/text.txt", "--data", "imagefolder:{labelled}"],
     "text.txt"),
    ("clipforge", ["search", "{index}", "a red image", "--model", "{other}"], "never mixes models"),
]


@pytest.mark.parametrize(("module", "argv", "expect"), SUBPROCESS_SAMPLE,
                         ids=[f"{m} {' '.join(a[:2])}" for m, a, _ in SUBPROCESS_SAMPLE])
def test_python_m_gives_the_same_one_line_errors(workspace, module, argv, expect):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    argv = [a.format(**workspace) for a in argv]
    before = snapshot(Path(workspace["root"]))
    done = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"clipforge {argv[0]}") and ": error: " in last and expect in last, last
    assert snapshot(Path(workspace["root"])) == before
