"""``clipforge train``, ``clipforge demo`` and ``clipforge report``: training runs.

    clipforge train --config run.toml --steps 300 --out runs/try
    clipforge train --model tiny --data shapes:// --batch-size 128 --precision bf16
    clipforge train --resume latest --out runs/try          # continue a run with its own settings
    clipforge demo                      # what `make demo` runs; writes runs/demo/
    clipforge demo --print-config       # the demo's run file, to copy as run.toml
    clipforge report runs/try           # report.md and figures for a run

Every `TrainConfig` field is an option (``--batch-size``, ``--lock-image``, ...); values
given on the command line override the file's, and a resumed run's settings default to its
checkpoint's.  Prints the progress bar and, at the end, the final metrics.  Stopped by SIGINT,
SIGTERM or SIGUSR1, a run writes a checkpoint, prints the command that resumes it and exits
with 128 + the signal's number (130, 143, 138).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from clipforge.cli._common import CommandError, positive_int
from clipforge.train.config import ConfigError, TrainConfig, load_toml

__all__ = ["add_parser", "config_from_args", "resume_command", "run_demo", "run_train"]

DESCRIPTION = """Train a CLIP model. Every TrainConfig key is an option; a TOML file (--config) holds
any of them, and options given here override it. With --resume, the settings not given default
to the checkpoint's. Ctrl-C (or SIGTERM, SIGUSR1) stops after the current step with a checkpoint
and prints the command that resumes."""


def _int_or_word(text: str) -> int | str:
    """An option that takes a number or a word (``--chunk-size none|auto|N``); `TrainConfig` validates it."""
    try:
        return int(text)
    except ValueError:
        return text


def add_parser(subparsers: Any) -> None:
    """Registers ``train``, ``demo`` and ``report``."""
    parser = subparsers.add_parser("train", help="train a CLIP model", description=DESCRIPTION)
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
    parser.add_argument("--extend-schedule", action="store_true",
                        help="with --resume and more --steps than the checkpoint's: re-plan the learning-rate "
                             "schedule to decay from where it stands to the new last step")
    parser.set_defaults(func=run_train)

    demo = subparsers.add_parser("demo", help="train the tiny preset on shapes://, evaluate and write a report")
    demo.add_argument("--out", help="run directory (default: the run file's, runs/demo)")
    demo.add_argument("--steps", type=positive_int, help="optimiser steps (default: the run file's, 750)")
    demo.add_argument("--resume", action="store_true", help="continue the run in --out")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    demo.add_argument("--print-config", action="store_true", help="print the demo's run file (TOML) and exit")
    demo.set_defaults(func=run_demo)
    report = subparsers.add_parser("report", help="write report.md and figures for a training run")
    report.add_argument("run", help="a run directory written by clipforge train")
    report.set_defaults(func=run_report)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The `TrainConfig` keys given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def _checkpoint_config(out: str, resume: str) -> dict[str, Any]:
    """The config of the checkpoint ``resume`` names ("latest" of the run ``out``, or a checkpoint's
    path); empty when there is none yet (a run that has saved none starts afresh)."""
    from clipforge.train.run_state import find_checkpoint, load_run_config

    checkpoint = find_checkpoint(Path(out), resume)
    return load_run_config(checkpoint) if checkpoint is not None else {}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The file's keys, then every option given on the command line; validated once, merged
    (a file need not be valid on its own when the command line completes it).

    A resumed run starts from its checkpoint's config instead of the defaults: ``clipforge train
    --resume latest --out RUN`` continues RUN as it was started, and a key given that contradicts
    the checkpoint is refused by `clipforge.train.train`.
    """
    data: dict[str, Any] = load_toml(args.config) if args.config else {}
    given = {**data, **_given(args)}
    base: dict[str, Any] = {}
    if given.get("resume"):
        default_out = TrainConfig().out
        saved = _checkpoint_config(given.get("out", default_out), given["resume"])
        known = {f.name for f in fields(TrainConfig)}
        # a checkpoint named by its path continues its own run, unless --out says otherwise
        base = {key: value for key, value in saved.items() if key in known}
        if given["resume"] == "latest":
            base.pop("out", None)  # the run found under the given (or default) --out
    return TrainConfig.from_dict({**base, **given}, source=args.config or "config")


def _program() -> str:
    """How this process was started, as a command to type: ``clipforge``, ``python -m clipforge.cli``
    or, under torchrun, ``torchrun ... -m clipforge.cli``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = f"--nnodes {world // per_node} " if world > per_node else ""
        return f"torchrun {nodes}--nproc-per-node {per_node} -m clipforge.cli"
    script = Path(sys.argv[0])
    if script.name == "__main__.py":  # python -m clipforge.cli, or python -m clipforge
        module = "clipforge.cli" if script.parent.name == "cli" else "clipforge"
        return f"{shlex.quote(sys.executable)} -m {module}"
    return "clipforge"


def _flag(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    if isinstance(value, list):
        return [flag, *map(str, value)]
    return [flag, "none" if value is None else str(value)]


def resume_command(args: argparse.Namespace, config: TrainConfig) -> str:
    """The command that resumes ``config``'s run: the options it was started with (``--config`` and
    those given on the command line), ``--resume latest`` and its ``--out``."""
    words = ["--config", args.config] if args.config else []
    for name, value in _given(args).items():
        if name not in ("resume", "out"):
            words += _flag(name, value)
    words += ["--resume", "latest", "--out", config.out]
    return f"{_program()} train " + " ".join(shlex.quote(w) for w in words)


def _run(config: TrainConfig, *, resume: str, extend_schedule: bool = False) -> dict[str, Any] | int:
    """`clipforge.train.train`; a refusal becomes a `CommandError`, and a stop by a signal an exit
    status, printed with the command that resumes (``resume``).  (A Ctrl-C before the run's own
    handlers are installed is `main`'s: nothing was trained yet.)"""
    from clipforge.train.interrupt import Interrupted
    from clipforge.train.loop import train

    try:
        return train(config, extend_schedule=extend_schedule)
    except ConfigError as err:
        raise CommandError(str(err)) from None
    except Interrupted as stop:
        if stop.main_process and stop.at_once:
            print(f"clipforge train: {stop.describe()}; resume from the last one with: {resume}", file=sys.stderr)
        elif stop.main_process:
            print(f"clipforge train: {stop.describe()}\nresume with: {resume}", file=sys.stderr)
        return stop.exit_status


def run_train(args: argparse.Namespace) -> int:
    """``clipforge train [--config TOML] [--OPTION VALUE ...]``: runs the training; prints the
    progress bar, then the final counts as JSON and one line of metrics per evaluation set."""
    try:
        config = config_from_args(args)
    except ValueError as err:  # an unknown key or a bad value: the user's input, not a bug
        raise CommandError(str(err)) from None
    final = _run(config, resume=resume_command(args, config), extend_schedule=args.extend_schedule)
    if isinstance(final, int):
        return final
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
    from clipforge.train.report import write_report
    from clipforge.train.run_state import list_checkpoints

    if args.print_config:
        print(DEMO_CONFIG.read_text(encoding="utf-8"), end="")
        return 0
    config = demo_config()
    changes: dict[str, Any] = {"resume": "latest" if args.resume else "", "progress": args.progress}
    if args.out is not None:
        changes["out"] = args.out
    if args.resume:  # the run's own steps (a demo run with --steps), unless given again
        changes["steps"] = _checkpoint_config(changes.get("out", config.out), "latest").get("steps", config.steps)
    if args.steps is not None:
        changes["steps"] = args.steps
    config = config.replace(**changes)
    resume = f"{_program()} demo --resume --out {shlex.quote(config.out)}"
    if args.steps is not None:
        resume += f" --steps {args.steps}"
    start = time.perf_counter()
    final = _run(config, resume=resume + ("" if args.progress else " --no-progress"))
    if isinstance(final, int):
        return final
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

    _check_run(Path(args.run))
    print(write_report(args.run))
    return 0


def _check_run(run: Path) -> None:
    """A CommandError naming what keeps ``run`` from being reported on (not a folder, not a run,
    a record cut short), raised before the report writes anything into it."""
    from clipforge.train.run_state import list_checkpoints

    if not run.is_dir():
        raise CommandError(f"{run}: " + ("no such folder" if not run.exists() else "a file, not a run folder"))
    for name in ("config.json", "metrics.json", "metrics.jsonl"):
        path = run / name
        if not path.is_file():
            raise CommandError(f"{run}: not a training run (no {name}); clipforge train writes one")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CommandError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        lines = name.endswith(".jsonl")  # a record per line
        for number, record in enumerate(text.splitlines() if lines else [text], 1):
            try:
                if record.strip():
                    json.loads(record)
            except json.JSONDecodeError as err:
                where = f"{path}:{number}" if lines else f"{path}"
                raise CommandError(f"{where}: not valid JSON (cut short or damaged): {err.msg}") from None
    if not list_checkpoints(run):
        raise CommandError(f"{run}: no complete checkpoint in {run / 'checkpoints'}")
