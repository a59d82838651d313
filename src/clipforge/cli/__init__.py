"""The ``clipforge`` command: subcommands gathered from the modules that implement them.

    clipforge eval zeroshot --model tiny --data imagefolder:val/ --tokenizer tok/
    clipforge eval retrieval --model ckpt/ --data csv:captions.tsv --out result.json
    clipforge index build --model ckpt/ --data imagefolder:photos/ --out photos.index
    clipforge search photos.index "a red star"

Adding a subcommand: write a module with ``add_parser(subparsers)`` that adds its parser with
``subparsers.add_parser(name, ...)`` and sets ``func`` (a function of the parsed arguments that
returns an exit status) through ``set_defaults``; then list the module in `COMMANDS`.  The
modules hold the work; this one only parses and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from clipforge.cli._common import CommandError

__all__ = ["COMMANDS", "CommandError", "build_parser", "main"]

# Modules that each define add_parser(subparsers), in the order `clipforge --help` lists them.
COMMANDS: list[str] = [
    "clipforge.cli.eval",
    "clipforge.cli.train",
    "clipforge.cli.convert",
    "clipforge.cli.search",
    "clipforge.cli.score",
    "clipforge.cli.generate",
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, every module in `COMMANDS` registered."""
    from clipforge import __version__

    parser = argparse.ArgumentParser(prog="clipforge", description="CLIP: evaluation, training and tools.")
    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``clipforge COMMAND ...``: runs a subcommand, which prints its own results; returns the exit status.

    Errors in the user's input (`CommandError`, a missing file, a malformed data line, an
    unreadable checkpoint) print one line on stderr and return 2 instead of a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CommandError, OSError, ValueError) as err:
        from clipforge.checkpoints import CheckpointError
        from clipforge.data import DataError

        if not isinstance(err, (CommandError, FileNotFoundError, DataError, CheckpointError)):
            raise  # a bug, not bad input: keep the traceback
        print(f"clipforge {args.command}: error: {err}", file=sys.stderr)
        return 2

