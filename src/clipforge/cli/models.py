"""``clipforge models``: the registry of released weights, and which are already downloaded.

    clipforge models                    # every entry, as a table
    clipforge models laion2b            # those whose name, architecture, tag or repository contains it
    clipforge models 'ViT-L-14:*' --json

Each row gives the name to pass to ``--model`` (or `clipforge.load`), the architecture, the
pretrained tag, the activation the weights were trained with, the input size, the parameters
and the download's size, the licence, the published ImageNet zero-shot top-1 and whether the
weights are in a cache already (the Hugging Face cache or clipforge's; no network is used).
``--json`` prints every field, with the sources of the sizes and the top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from clipforge.cli._common import CommandError, table

__all__ = ["add_parser", "run_models"]


def add_parser(subparsers: Any) -> None:
    """Registers ``models``."""
    parser = subparsers.add_parser("models", help="list the pretrained models clipforge can download by name")
    parser.add_argument("pattern", nargs="?", metavar="PATTERN",
                        help="show only entries whose name, architecture, tag or repository contains PATTERN "
                             "(a glob when it has * ? or [; case-insensitive)")
    parser.add_argument("--filter", metavar="PATTERN", help="the same as PATTERN")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_models)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _row(entry: Any, cached: bool) -> dict[str, Any]:
    pre = entry.preprocessing
    return {
        "name": entry.name,
        "architecture": entry.architecture,
        "tag": entry.tag,
        "activation": entry.activations,
        "image_size": pre.image_size,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "resize_mode": pre.resize_mode,
        "interpolation": pre.interpolation,
        "params": entry.params,
        "download_bytes": entry.download_size,
        "download_bytes_source": entry.size_note,
        "licence": entry.licence,
        "imagenet_top1": entry.top1,
        "imagenet_top1_source": entry.top1_source,
        "hub": entry.hub,
        "hub_layout": entry.layout,
        "url": entry.url,
        "sha256": entry.sha256,
        "cached": cached,
    }


def run_models(args: argparse.Namespace) -> int:
    """``clipforge models [PATTERN] [--json]``: prints the registry's entries that match, as a
    table (or JSON), and a line counting them and the cached ones."""
    from clipforge.checkpoints.download import is_cached
    from clipforge.checkpoints.registry import list_pretrained

    if args.pattern and args.filter and args.pattern != args.filter:
        raise CommandError(f"give one pattern, PATTERN or --filter, not both ({args.pattern!r}, {args.filter!r})")
    pattern = args.pattern or args.filter
    entries = list_pretrained(pattern)
    if not entries:
        shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
        raise CommandError(f"no pretrained model matches {shown!r}; `clipforge models` lists them all")
    rows = [_row(e, is_cached(e)) for e in entries]
    try:
        _print(rows, as_json=args.json)
        sys.stdout.flush()
    except BrokenPipeError:  # `clipforge models | head`: the reader has gone, and nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the final flush at exit goes nowhere, quietly
        os.close(devnull)
        return 141  # as a shell reports a command ended by SIGPIPE
    return 0


_TEXT_COLUMNS = (1, 2, 3, 7)  # architecture, tag, activation, licence: aligned left like the name


def _print(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    header = ["name", "architecture", "tag", "activation", "image", "params", "download", "licence", "top-1",
              "cached"]
    cells = [[r["name"], r["architecture"], r["tag"], r["activation"], str(r["image_size"]),
              f"{r['params'] / 1e6:.0f}M", f"~{_size(r['download_bytes'])}", r["licence"].split(" (")[0],
              "n/a" if r["imagenet_top1"] is None else f"{100 * r['imagenet_top1']:.1f}%",
              "yes" if r["cached"] else "no"] for r in rows]
    for i in _TEXT_COLUMNS:  # padded here, so that the table's right alignment leaves them as they are
        width = max(len(row[i]) for row in [header, *cells])
        for row in [header, *cells]:
            row[i] = row[i].ljust(width)
    print(table(header, cells))
    cached = sum(r["cached"] for r in rows)
    print(f"{len(rows)} model{'' if len(rows) == 1 else 's'}, {cached} cached; download sizes are estimates (fp32 "
          "parameters); top-1: ImageNet zero-shot, OpenCLIP's results table (--json gives the sources)")
