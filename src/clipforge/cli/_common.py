"""What the commands share: `CommandError`, the model options and their loading, tables and JSON output."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Clock", "CommandError", "fmt", "load_model_for_command", "model_options", "skipped_report", "table",
    "write_json",
]

SKIPPED_LISTED = 20  # skipped files named in the JSON; all are counted


class CommandError(Exception):
    """Bad input to a subcommand: `main` prints the message on one line and returns 2."""


def model_options(parser: argparse.ArgumentParser, *, workers: int) -> None:
    """The options `load_model_for_command` reads, and how the images are run: shared by the commands that embed images."""
    parser.add_argument("--model", required=True, help="a preset name (random weights) or a checkpoint file/folder")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder, for checkpoints saved without one")
    parser.add_argument("--batch-size", type=int, default=256, help="images or texts per forward pass (default: 256)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast over fp32 weights (default: fp32)")
    parser.add_argument("--workers", type=int, default=workers, help=f"image decoding processes (default: {workers})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------- shared steps


class Clock:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now

    def timings(self) -> dict[str, float]:
        return {**self.laps, "total": round(time.perf_counter() - self.start, 3)}


def load_model_for_command(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    """model, preprocess, tokenizer, and how the run is set up."""
    from clipforge.checkpoints import load

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, tokenizer = load(args.model, device=device)
    if args.tokenizer:
        from clipforge.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(args.tokenizer, context_length=model.context_length)
    if tokenizer is None:
        raise CommandError(
            f"{args.model}: no tokenizer comes with this model (its vocabulary has "
            f"{model.config.text.vocab_size} ids, not OpenAI's); pass --tokenizer DIR"
        )
    is_path = Path(args.model).exists()
    setup = {
        "model": Path(args.model).stem if is_path else args.model,
        "pretrained": str(args.model) if is_path else "random-init",
        "device": device,
        "precision": args.precision,
        "autocast_dtype": torch.bfloat16 if args.precision == "bf16" else None,
    }
    return model, preprocess, tokenizer, setup


def skipped_report(loader: Any) -> dict[str, Any]:
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
    if path is None:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_dumps(result) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    # The first column (names) aligned left, the numbers right.
    cells = ([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))] for r in lines)
    return "\n".join("  ".join(row) for row in cells)


