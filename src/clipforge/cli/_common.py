"""What the commands share: `CommandError`, the checks of option values, the options that load and
run a model, model loading for inference, input files, warnings, and table and JSON output.

Each option is declared here once, as a function that adds it to a parser; a command that runs a
model adds the ones it reads (`model_options` adds them all).  `load_model_for_command` reads
them back and loads through `clipforge.checkpoints.load_for_inference`, the library's one loader.

Every number a command takes is checked while the command line is parsed, by the ``type=``
functions below (`positive_int`, `fraction`, ...): a bad value ends the command with argparse's
usage line and one line naming the option and the value, exit status 2, before anything is
loaded or written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipforge.checkpoints import InferenceModel, load_for_inference
from clipforge.checkpoints.registry import resolve
from clipforge.devices import INFERENCE_PRECISIONS as PRECISIONS

__all__ = [
    "Clock", "CommandError", "available_cores", "batch_size_option", "check_output", "default_workers",
    "device_name", "device_option", "fmt", "fraction", "load_model", "load_model_for_command", "model_option",
    "model_options", "non_negative_float", "non_negative_int", "port_number", "positive_float", "positive_int",
    "precision_option", "quiet_option", "read_text_file", "run_options", "run_setup", "size_in_bytes",
    "skipped_report", "table", "tokenizer_option", "unit_fraction", "warn", "workers_option", "write_json",
]

SKIPPED_LISTED = 20  # skipped files named in the JSON; all are counted
DEFAULT_BATCH_SIZE = 256


class CommandError(Exception):
    """Bad input to a subcommand: `main` prints the message on one line and returns 2."""


def warn(command: str, text: str) -> None:
    """``clipforge COMMAND: warning: TEXT`` on stderr, on one line (how `main` shows library warnings too)."""
    flat = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    print(f"clipforge {command}: warning: {flat}", file=sys.stderr)


# ----------------------------------------------------------------------------- checks
# argparse ``type=`` functions.  argparse reports an ArgumentTypeError as "argument --flag: MESSAGE".


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1 (sizes, counts, k)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (worker processes: 0 works in the command's own process)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (weights, noise levels: 0 turns the term off)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]: a recall, a share of something that cannot be empty."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def unit_fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 1 to 65535."""
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {value}")
    return value


def size_in_bytes(text: str) -> int:
    """A memory size such as 4G, 512M or 1000000 (`clipforge.search.build.parse_size`'s forms)."""
    from clipforge.search.build import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def device_name(text: str) -> str:
    """A device this machine has (cpu, cuda, cuda:1, ...), kept as the text given."""
    from clipforge.devices import default_device

    try:
        default_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity masks
        return os.cpu_count() or 1


def default_workers(most: int) -> int:
    """``most`` decoding processes, fewer on a small machine: one core is left to the process that
    runs the model, so a 2-core machine decodes in 1 worker (more workers than cores only wait
    for each other, and PyTorch's DataLoader warns about them)."""
    return max(0, min(most, available_cores() - 1))


# ----------------------------------------------------------------------------- options


MODEL_HELP = ("a pretrained name (ViT-B-32:openai, hf-hub:ORG/NAME, ORG/NAME; `clipforge models` lists them), "
              "a checkpoint file or folder, or a preset name (random weights)")


def model_option(parser: argparse.ArgumentParser, *, flag: str = "--model", required: bool = True,
                 help: str = MODEL_HELP, metavar: str | None = None, pretrained: bool = False) -> None:
    """The model to load: any name `clipforge.load` takes (``flag`` for a second model, as
    ``--judge``); with ``pretrained``, also ``--pretrained TAG`` beside it, which
    `load_model_for_command` reads (``--model ViT-B-32 --pretrained openai``, OpenCLIP's pair)."""
    parser.add_argument(flag, required=required, metavar=metavar, help=help)
    if pretrained:
        parser.add_argument("--pretrained", metavar="TAG",
                            help="released weights for the architecture --model names (openai, laion2b_s34b_b79k, "
                                 "...; or a weights file); the same as --model ARCH:TAG")


def tokenizer_option(parser: argparse.ArgumentParser, *, flag: str = "--tokenizer",
                     help: str = "tokenizer folder, for checkpoints saved without one") -> None:
    """A tokenizer folder that replaces the checkpoint's own."""
    parser.add_argument(flag, metavar="DIR", help=help)


def device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_name, default=None,
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32, or bf16 autocast over fp32 weights (default: fp32)")


def batch_size_option(parser: argparse.ArgumentParser, *, default: int = DEFAULT_BATCH_SIZE,
                      what: str = "images or texts") -> None:
    parser.add_argument("--batch-size", type=positive_int, default=default,
                        help=f"{what} per forward pass (default: {default})")


def workers_option(parser: argparse.ArgumentParser, *, most: int) -> None:
    """``--workers``, by default `default_workers(most)`: what this machine's cores allow, up to ``most``."""
    default = default_workers(most)
    fits = f", the {available_cores()} cores this process may use less one, at most {most}" if most else ""
    parser.add_argument("--workers", type=non_negative_int, default=default,
                        help=f"image decoding processes; 0 decodes in this one (default: {default}{fits})")


def quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def model_options(parser: argparse.ArgumentParser, *, workers: int, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
    """Every option `load_model_for_command` reads, and how the images are run: the set shared by
    the commands that embed images and texts (eval, score, rerank); ``workers`` is the most
    decoding processes ``--workers`` defaults to (`default_workers`)."""
    model_option(parser, pretrained=True)
    tokenizer_option(parser)
    batch_size_option(parser, default=batch_size)
    device_option(parser)
    precision_option(parser)
    workers_option(parser, most=workers)
    quiet_option(parser)


# ----------------------------------------------------------------------------- loading


def _model_fields(name: str, pretrained: str | None) -> tuple[str, str]:
    """(model, pretrained) as CLIP_benchmark records them: a registered name's architecture and
    tag; a preset's name and "random-init"; an architecture and its weights file; a Hub name as
    given, twice (it is both); a checkpoint's file or folder name and its path."""
    where = resolve(name, pretrained)
    if where.kind == "pretrained":
        return where.entry.architecture, where.entry.tag
    if where.kind == "preset":
        return name, "random-init"
    if where.kind == "weights":
        return name, str(pretrained)
    if where.kind == "hub":
        return name, name
    return Path(name).stem, name


def run_setup(loaded: InferenceModel, *, name: str | None = None, pretrained: str | None = None) -> dict[str, Any]:
    """How a run is set up, as the commands print it and write it in their JSON: ``model`` and
    ``pretrained`` of the name the model was loaded by (``loaded.source`` when ``name`` is None;
    see `_model_fields`), the device and the precision."""
    model, weights = _model_fields(loaded.source if name is None else name, pretrained)
    return {
        "model": model,
        "pretrained": weights,
        "device": str(loaded.device),
        "precision": loaded.precision,
        "autocast_dtype": loaded.autocast_dtype,
    }


def run_options(args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    """How `clipforge.embed` runs the model, from ``--batch-size`` and ``--quiet`` and the `run_setup`."""
    return {"batch_size": args.batch_size, "device": setup["device"], "autocast_dtype": setup["autocast_dtype"],
            "progress": not args.quiet}


def load_model(source: str, *, tokenizer: str | None = None, device: str | None = None, precision: str = "fp32",
               pretrained: str | None = None, need_tokenizer: bool = True) -> tuple[Any, Callable, Any, dict[str, Any]]:
    """model, preprocess, tokenizer and `run_setup` of the model ``source`` (any name `clipforge.load`
    takes; ``pretrained`` is ``--pretrained``); with ``need_tokenizer`` False, as
    `load_for_inference`'s, the tokenizer may be None."""
    from clipforge.devices import check_precision, default_device

    try:  # a precision the device cannot run is the user's choice, refused before loading
        check_precision(precision, default_device(device))
    except ValueError as err:
        raise CommandError(str(err)) from None
    if tokenizer is not None and not Path(tokenizer).is_dir():  # named before a large model loads
        what = "a file, not a tokenizer folder" if Path(tokenizer).exists() else "no such tokenizer folder"
        raise CommandError(f"{tokenizer}: {what}")
    loaded = load_for_inference(source, pretrained=pretrained, tokenizer=tokenizer, device=device,
                                precision=precision, need_tokenizer=need_tokenizer)
    return loaded.model, loaded.preprocess, loaded.tokenizer, run_setup(loaded, name=source, pretrained=pretrained)


def load_model_for_command(args: argparse.Namespace, *,
                           need_tokenizer: bool = True) -> tuple[Any, Callable, Any, dict[str, Any]]:
    """`load_model` of the parsed ``--model``, ``--pretrained`` (where the command has it),
    ``--tokenizer``, ``--device`` and ``--precision``."""
    return load_model(args.model, tokenizer=args.tokenizer, device=args.device, precision=args.precision,
                      pretrained=getattr(args, "pretrained", None), need_tokenizer=need_tokenizer)


# ----------------------------------------------------------------------------- files


def read_text_file(path: str, *, option: str) -> str:
    """The UTF-8 text of the file an option names; a CommandError naming the option and the file
    when it is missing, a folder, unreadable or not UTF-8 (the data sources' reader: one message
    for one problem, whichever command meets it)."""
    from clipforge.data import DataError
    from clipforge.data.text import read_text

    try:
        return read_text(path, allow_empty=True)
    except DataError as err:
        raise CommandError(f"{option} {err}") from None


def check_output(path: str | None, *, option: str, folder: bool = False) -> None:
    """A CommandError unless ``path`` can be written as a file (a folder when ``folder``): checked
    before the work, so a long run does not end unable to write its result."""
    if path is None:
        return
    out = Path(path)
    if not folder and out.is_dir():
        raise CommandError(f"{option} {path}: a folder; give a file name")
    if folder and out.exists() and not out.is_dir():
        raise CommandError(f"{option} {path}: a file, not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CommandError(f"{option} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise CommandError(f"{option} {path}: cannot write in {parent}")
            break


# ----------------------------------------------------------------------------- output


class Clock:
    """Seconds spent in each named step of a command, for its JSON's timings."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now

    def timings(self) -> dict[str, float]:
        return {**self.laps, "total": round(time.perf_counter() - self.start, 3)}


def skipped_report(loader: Any) -> dict[str, Any]:
    """The JSON fields that count the images a loader skipped and name the first `SKIPPED_LISTED`."""
    return {
        "skipped_images": len(loader.skipped),
        "skipped_examples": [{"path": s.path, "reason": s.reason} for s in loader.skipped[:SKIPPED_LISTED]],
    }


def _dumps(value: Any, depth: int = 0) -> str:
    """JSON with one key per line, but each list on one line: a 1000-class confusion matrix
    stays 1000 lines, not a million."""
    if isinstance(value, dict) and value:
        pad = "  " * (depth + 1)
        items = [f"{pad}{json.dumps(str(k))}: {_dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * depth + "}"
    if isinstance(value, list) and value and isinstance(value[0], (list, dict)):
        pad = "  " * (depth + 1)
        return "[\n" + ",\n".join(pad + _dumps(v, depth + 1) for v in value) + "\n" + "  " * depth + "]"
    return json.dumps(value, allow_nan=False, ensure_ascii=False)


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """Writes ``result`` to ``path`` (nothing when None) and prints ``wrote PATH``."""
    if path is None:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_dumps(result) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def fmt(value: float | None) -> str:
    """A metric with four decimals; "n/a" for an undefined one."""
    return "n/a" if value is None else f"{value:.4f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: the first column (names) aligned left, the others (numbers) right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    cells = ([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))] for r in lines)
    return "\n".join("  ".join(row) for row in cells)
