"""``clipforge demo``: the main job on built-in data — train, evaluate, report.

    clipforge demo                      # what `make demo` runs; writes runs/demo/

Trains the ``tiny`` preset on ``shapes://`` on the CPU, evaluates zero-shot colour+shape
classification (64 classes) on the 48 seen pairs and on the 16 pairs never shown in
training, and text↔image retrieval, then writes ``runs/demo/`` (checkpoints,
``metrics.json``, ``report.md`` with figures) and prints how to use the model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from clipforge.train_config import TrainConfig

__all__ = ["DEMO", "add_parser", "run_demo"]

# The recipe measured on this project's 2-core CPU (docs/benchmarks.md#training records it).
DEMO = TrainConfig(
    model="tiny",
    data="shapes://?n=200000",
    out="runs/demo",
    steps=750,
    batch_size=128,
    lr=1e-3,
    warmup=50,
    weight_decay=0.1,
    vocab_size=1024,
    save_every=375,
    log_every=10,
    eval_every=375,
    eval_samples=512,
    eval_zeroshot=["shapes://?split=seen", "shapes://?split=heldout"],
    eval_retrieval="shapes://?split=val",
)


def add_parser(subparsers: Any) -> None:
    """Registers ``demo`` and ``report``."""
    demo = subparsers.add_parser("demo", help="train the tiny preset on shapes://, evaluate and write a report")
    demo.add_argument("--out", default=DEMO.out, help=f"run directory (default: {DEMO.out})")
    demo.add_argument("--steps", type=int, default=DEMO.steps, help=f"optimiser steps (default: {DEMO.steps})")
    demo.add_argument("--resume", action="store_true", help="continue the run in --out")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    demo.set_defaults(func=run_demo)
    report = subparsers.add_parser("report", help="write report.md and figures for a training run")
    report.add_argument("run", help="a run directory written by clipforge train")
    report.set_defaults(func=_run_report)


def run_demo(args: Any) -> int:
    from clipforge.report import write_report
    from clipforge.train import train

    config = DEMO.replace(out=args.out, steps=args.steps, resume="latest" if args.resume else "", progress=args.progress)
    start = time.perf_counter()
    final = train(config)
    report = write_report(config.out)
    minutes = (time.perf_counter() - start) / 60
    evals = final.get("eval", {})
    print(f"\ntrained and evaluated in {minutes:.1f} min; report: {report}")
    for name, metrics in evals.items():
        if "acc1" in metrics:
            print(f"  zero-shot top-1 on {name}: {metrics['acc1']:.3f}")
        else:
            print(f"  text→image R@1 on {name}: {metrics['text_to_image_R@1']:.3f}, R@5: {metrics['text_to_image_R@5']:.3f}")
    from clipforge._run_state import list_checkpoints

    ckpt = list_checkpoints(Path(config.out))[-1]
    print(f"""
Use the model:
  python -c "import clipforge; m, pre, tok = clipforge.load('{ckpt}')"
  clipforge eval zeroshot --model {ckpt} --data imagefolder:DIR
  clipforge eval retrieval --model {ckpt} --data csv:FILE
  clipforge train --model {ckpt} --data csv:FILE --steps 1000 --out runs/finetune
""")
    return 0


def _run_report(args: Any) -> int:
    from clipforge.report import write_report

    print(write_report(args.run))
    return 0
