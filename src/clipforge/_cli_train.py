"""``clipforge train``: a training run from a TOML file and command-line overrides.

    clipforge train --config configs/demo.toml --steps 300 --out runs/try
    clipforge train --model tiny --data shapes:// --batch-size 128 --precision bf16

Every `TrainConfig` field is an option (``--batch-size``, ``--lock-image``, ...); values
given on the command line override the file's.  Prints the progress bar and, at the end,
the final metrics.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, fields
from typing import Any

from clipforge.train_config import TrainConfig, load_toml

__all__ = ["add_parser", "config_from_args"]


def _field_help() -> dict[str, str]:
    """Each field's trailing comment in train_config.py, as its --help text."""
    import inspect

    from clipforge import train_config

    helps = {}
    for line in inspect.getsource(train_config.TrainConfig).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            helps[name] = rest.split("#", 1)[1].strip()
    return helps


def add_parser(subparsers: Any) -> None:
    """Registers ``train``."""
    parser = subparsers.add_parser("train", help="train a CLIP model", description=__doc__.split("\n")[0])
    parser.add_argument("--config", metavar="TOML", help="a TOML file of TrainConfig keys (top level or [train])")
    helps = _field_help()
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kind = hints[f.name]
        text = f"{helps.get(f.name, '')} (default: {default!r})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind == list[str]:
            parser.add_argument(flag, dest=f.name, nargs="*", default=None, metavar="URI", help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)
    parser.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The file's keys, then every option given on the command line; validated once, merged
    (a file need not be valid on its own when the command line completes it)."""
    data: dict[str, Any] = load_toml(args.config) if args.config else {}
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    return TrainConfig.from_dict({**data, **overrides}, source=args.config or "config")


def run_train(args: argparse.Namespace) -> int:
    from clipforge.cli import CommandError
    from clipforge.train import train

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
