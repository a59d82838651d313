"""``clipforge train``, ``clipforge demo`` and ``clipforge report``: training runs.

    clipforge train --config run.toml --steps 300 --out runs/try
    clipforge train --model tiny --data shapes:// --batch-size 128 --precision bf16
    clipforge demo                      # what `make demo` runs; writes runs/demo/
    clipforge demo --print-config       # the demo's run file, to copy as run.toml
    clipforge report runs/try           # report.md and figures for a run

Every `TrainConfig` field is an option (``--batch-size``, ``--lock-image``, ...); values
given on the command line override the file's.  Prints the progress bar and, at the end,
the final metrics.
"""

from __future__ import annotations

import argparse
import json
import time
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from clipforge.cli._common import CommandError
from clipforge.train.config import TrainConfig, load_toml

__all__ = ["add_parser", "config_from_args", "run_demo", "run_train"]


def _int_or_word(text: str) -> int | str:
    """An option that takes a number or a word (``--chunk-size none|auto|N``); `TrainConfig` validates it."""
    try:
        return int(text)
    except ValueError:
        return text


def add_parser(subparsers: Any) -> None:
    """Registers ``train``, ``demo`` and ``report``."""
    parser = subparsers.add_parser("train", help="train a CLIP model", description=__doc__.split("\n")[0])
    parser.add_argument("--config", metavar="TOML", help="a TOML file of TrainConfig keys (top level or [train])")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kind = hints[f.name]
        text = f"{f.metadata['help']} (default: {default!r})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind == list[str]:
            parser.add_argument(flag, dest=f.name, nargs="*", default=None, metavar="URI", help=text)
        elif kind in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)
        else:  # a union such as chunk_size's int | "auto" | "none"
            parser.add_argument(flag, dest=f.name, type=_int_or_word, default=None, help=text)
    parser.set_defaults(func=run_train)

    demo = subparsers.add_parser("demo", help="train the tiny preset on shapes://, evaluate and write a report")
    demo.add_argument("--out", help="run directory (default: the run file's, runs/demo)")
    demo.add_argument("--steps", type=int, help="optimiser steps (default: the run file's, 750)")
    demo.add_argument("--resume", action="store_true", help="continue the run in --out")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    demo.add_argument("--print-config", action="store_true", help="print the demo's run file (TOML) and exit")
    demo.set_defaults(func=run_demo)
    report = subparsers.add_parser("report", help="write report.md and figures for a training run")
    report.add_argument("run", help="a run directory written by clipforge train")
    report.set_defaults(func=run_report)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The file's keys, then every option given on the command line; validated once, merged
    (a file need not be valid on its own when the command line completes it)."""
    data: dict[str, Any] = load_toml(args.config) if args.config else {}
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    return TrainConfig.from_dict({**data, **overrides}, source=args.config or "config")


def run_train(args: argparse.Namespace) -> int:
    """``clipforge train [--config TOML] [--OPTION VALUE ...]``: runs the training; prints the
    progress bar, then the final counts as JSON and one line of metrics per evaluation set."""
    from clipforge.train.loop import train

    try:
        config = config_from_args(args)
    except ValueError as err:  # an unknown key or a bad value: the user's input, not a bug
        raise CommandError(str(err)) from None
    final = train(config)
    shown = {k: v for k, v in final.items() if k != "eval"}
    print(json.dumps(shown))
    for name, metrics in final.get("eval", {}).items():
        short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if not isinstance(v, list)}
        print(f"{name}: {json.dumps(short)}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``clipforge demo``: trains the tiny preset on ``shapes://`` on the CPU, evaluates zero-shot
    colour+shape classification (64 classes) on the 48 seen pairs and on the 16 pairs never shown
    in training, and text↔image retrieval, then writes ``runs/demo/`` (checkpoints,
    ``metrics.json``, ``report.md`` with figures) and prints the scores and how to use the model."""
    from clipforge.train.config import DEMO_CONFIG, demo_config
    from clipforge.train.loop import train
    from clipforge.train.report import write_report
    from clipforge.train.run_state import list_checkpoints

    if args.print_config:
        print(DEMO_CONFIG.read_text(encoding="utf-8"), end="")
        return 0
    config = demo_config()
    changes: dict[str, Any] = {"resume": "latest" if args.resume else "", "progress": args.progress}
    if args.out is not None:
        changes["out"] = args.out
    if args.steps is not None:
        changes["steps"] = args.steps
    config = config.replace(**changes)
    start = time.perf_counter()
    final = train(config)
    report = write_report(config.out)
    minutes = (time.perf_counter() - start) / 60
    print(f"\ntrained and evaluated in {minutes:.1f} min; report: {report}")
    for name, metrics in final.get("eval", {}).items():
        if "acc1" in metrics:
            print(f"  zero-shot top-1 on {name}: {metrics['acc1']:.3f}")
        if "text_to_image_R@1" in metrics:
            r1, r5 = metrics["text_to_image_R@1"], metrics["text_to_image_R@5"]
            print(f"  text→image R@1 on {name}: {r1:.3f}, R@5: {r5:.3f}")
    ckpt = list_checkpoints(Path(config.out))[-1]
    print(f"""
Use the model:
  python -c "import clipforge; m, pre, tok = clipforge.load('{ckpt}')"
  clipforge eval zeroshot --model {ckpt} --data imagefolder:DIR
  clipforge eval retrieval --model {ckpt} --data csv:FILE
  clipforge train --model {ckpt} --data csv:FILE --steps 1000 --out runs/finetune
""")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """``clipforge report RUN``: writes RUN/report.md and its figures, prints the path."""
    from clipforge.train.report import write_report

    print(write_report(args.run))
    return 0
