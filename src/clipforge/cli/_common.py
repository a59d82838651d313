"""What the commands share: `CommandError`, the options that load and run a model, model loading
for inference, and table and JSON output.

Each option is declared here once, as a function that adds it to a parser; a command that runs a
model adds the ones it reads (`model_options` adds them all).  `load_model_for_command` reads
them back and loads through `clipforge.checkpoints.load_for_inference`, the library's one loader.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipforge.checkpoints import InferenceModel, is_preset, load_for_inference
from clipforge.devices import INFERENCE_PRECISIONS as PRECISIONS

__all__ = [
    "Clock", "CommandError", "batch_size_option", "device_option", "fmt", "load_model", "load_model_for_command",
    "model_option", "model_options", "precision_option", "quiet_option", "run_options", "run_setup", "skipped_report",
    "table", "tokenizer_option", "workers_option", "write_json",
]

SKIPPED_LISTED = 20  # skipped files named in the JSON; all are counted
DEFAULT_BATCH_SIZE = 256


class CommandError(Exception):
    """Bad input to a subcommand: `main` prints the message on one line and returns 2."""


# ----------------------------------------------------------------------------- options


def model_option(parser: argparse.ArgumentParser, *, flag: str = "--model", required: bool = True,
                 help: str = "a preset name (random weights) or a checkpoint file/folder",
                 metavar: str | None = None) -> None:
    """The model to load: a preset name or a checkpoint (``flag`` for a second model, as ``--judge``)."""
    parser.add_argument(flag, required=required, metavar=metavar, help=help)


def tokenizer_option(parser: argparse.ArgumentParser, *, flag: str = "--tokenizer",
                     help: str = "tokenizer folder, for checkpoints saved without one") -> None:
    """A tokenizer folder that replaces the checkpoint's own."""
    parser.add_argument(flag, metavar="DIR", help=help)


def device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32, or bf16 autocast over fp32 weights (default: fp32)")


def batch_size_option(parser: argparse.ArgumentParser, *, default: int = DEFAULT_BATCH_SIZE,
                      what: str = "images or texts") -> None:
    parser.add_argument("--batch-size", type=int, default=default, help=f"{what} per forward pass (default: {default})")


def workers_option(parser: argparse.ArgumentParser, *, default: int) -> None:
    parser.add_argument("--workers", type=int, default=default, help=f"image decoding processes (default: {default})")


def quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def model_options(parser: argparse.ArgumentParser, *, workers: int, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
    """Every option `load_model_for_command` reads, and how the images are run: the set shared by
    the commands that embed images and texts (eval, score, rerank)."""
    model_option(parser)
    tokenizer_option(parser)
    batch_size_option(parser, default=batch_size)
    device_option(parser)
    precision_option(parser)
    workers_option(parser, default=workers)
    quiet_option(parser)


# ----------------------------------------------------------------------------- loading


def run_setup(loaded: InferenceModel) -> dict[str, Any]:
    """How a run is set up, as the commands print it and write it in their JSON: the model's name
    (a preset's, or the checkpoint's file or folder name), where its weights come from
    ("random-init" for a preset), the device and the precision."""
    preset = is_preset(loaded.source)
    return {
        "model": loaded.source if preset else Path(loaded.source).stem,
        "pretrained": "random-init" if preset else loaded.source,
        "device": str(loaded.device),
        "precision": loaded.precision,
        "autocast_dtype": loaded.autocast_dtype,
    }


def run_options(args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    """How `clipforge.embed` runs the model, from ``--batch-size`` and ``--quiet`` and the `run_setup`."""
    return {"batch_size": args.batch_size, "device": setup["device"], "autocast_dtype": setup["autocast_dtype"],
            "progress": not args.quiet}


def load_model(source: str, *, tokenizer: str | None = None, device: str | None = None,
               precision: str = "fp32") -> tuple[Any, Callable, Any, dict[str, Any]]:
    """model, preprocess, tokenizer and `run_setup` of the model ``source`` (a preset or a checkpoint)."""
    loaded = load_for_inference(source, tokenizer=tokenizer, device=device, precision=precision)
    return loaded.model, loaded.preprocess, loaded.tokenizer, run_setup(loaded)


def load_model_for_command(args: argparse.Namespace) -> tuple[Any, Callable, Any, dict[str, Any]]:
    """`load_model` of the parsed ``--model``, ``--tokenizer``, ``--device`` and ``--precision``."""
    return load_model(args.model, tokenizer=args.tokenizer, device=args.device, precision=args.precision)


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
