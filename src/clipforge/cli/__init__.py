"""The ``clipforge`` command: subcommands gathered from the modules that implement them.

    clipforge eval zeroshot --model tiny --data imagefolder:val/ --tokenizer tok/
    clipforge eval retrieval --model ckpt/ --data csv:captions.tsv --out result.json
    clipforge index build --model ckpt/ --data folder:photos/ --out photos.index
    clipforge search photos.index "a red star"
    clipforge models laion2b                          # the pretrained names --model takes

Adding a subcommand: write a module with ``add_parser(subparsers)`` that adds its parser with
``subparsers.add_parser(name, ...)`` and sets ``func`` (a function of the parsed arguments that
returns an exit status) through ``set_defaults``; then list the module in `COMMANDS`.  The
modules hold the work; this one only parses and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from clipforge.cli._common import CommandError, warn

__all__ = ["COMMANDS", "CommandError", "build_parser", "main"]

# Modules that each define add_parser(subparsers), in the order `clipforge --help` lists them.
COMMANDS: list[str] = [
    "clipforge.cli.eval",
    "clipforge.cli.train",
    "clipforge.cli.convert",
    "clipforge.cli.search",
    "clipforge.cli.score",
    "clipforge.cli.generate",
    "clipforge.cli.models",
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
    unreadable checkpoint, a path that cannot be written) print one line on stderr and return 2
    instead of a traceback; an option value out of range is argparse's: its usage line, one line
    naming the option, and SystemExit(2).  Warnings, the library's and PyTorch's, print as one
    line ``clipforge COMMAND: warning: ...`` while the command runs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restores Python's own format when the command ends
        warnings.showwarning = _warning_printer(args.command)
        try:
            return int(args.func(args) or 0)
        except (CommandError, OSError, ValueError) as err:
            message = _user_error(err)
            if message is None:
                raise  # a bug, not bad input: keep the traceback
            print(f"clipforge {args.command}: error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"clipforge {args.command}: interrupted", file=sys.stderr)
            return 130  # 128 + SIGINT, as shells report a process that Ctrl-C ended


def _warning_printer(command: str) -> Callable[..., None]:
    """A `warnings.showwarning` that prints ``clipforge COMMAND: warning: MESSAGE``, without
    Python's file:line and source line, which name the library's code, not the user's input."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        warn(command, str(message))

    return show


def _user_error(err: Exception) -> str | None:
    """The one-line message for an error in the user's input; None for a bug."""
    from clipforge.checkpoints import CheckpointError
    from clipforge.data import DataError
    from clipforge.model.clip import VocabularyError

    if isinstance(err, (CommandError, DataError, CheckpointError, VocabularyError)):
        return str(err)
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        # A path the user named that cannot be read or written (missing, a file where a folder
        # should be, no permission): Python's own words, without the errno.
        paths = f"{err.filename} → {err.filename2}" if err.filename2 is not None else f"{err.filename}"
        return f"{paths}: {err.strerror}"
    if isinstance(err, FileNotFoundError):
        return str(err)
    return None
