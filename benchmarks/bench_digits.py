"""Train the tiny preset on digits:// captions, then score it zero-shot and with a linear probe.

    python benchmarks/bench_digits.py [--steps 400] [--out runs/digits]

The model sees only captions ("a handwritten seven", "the digit 7", ...), never labels;
zero-shot classification then names each test image by comparing it with prompts for the
ten digits.  Beside it, a supervised linear probe on the frozen image features of the
training split shows how much the features know: `clipforge.evaluate.evaluate_linear_probe`
with its defaults (CLIP_benchmark's method: AdamW, lr 0.1, 10 epochs, batches of 64, no
weight decay), the number ``clipforge eval linear-probe --model CHECKPOINT --train
digits://?split=train --test digits://?split=test`` prints.  Prints a table and writes
benchmarks/results/bench_digits.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

from _timing import cpu_record  # benchmarks/_timing.py

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="runs/digits")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_digits.json")
    args = parser.parse_args(argv)

    import torch

    from clipforge.checkpoints import load
    from clipforge.data import open_data
    from clipforge.evaluate import evaluate_linear_probe
    from clipforge.train import TrainConfig, train
    from clipforge.train.run_state import list_checkpoints

    config = TrainConfig(
        model="tiny", data="digits://?split=train", out=args.out, steps=args.steps, batch_size=128, lr=5e-4,
        warmup=50, weight_decay=0.1, vocab_size=600, save_every=args.steps, log_every=20, eval_samples=512,
        eval_zeroshot=["digits://?split=test"],
    )
    start = time.perf_counter()
    final = train(config)
    seconds = time.perf_counter() - start
    zeroshot = final["eval"]["digits://?split=test"]

    model, preprocess, _ = load(list_checkpoints(Path(args.out))[-1])
    probe = evaluate_linear_probe(model, preprocess, open_data("digits://?split=train"),
                                  open_data("digits://?split=test"))

    rows = {"zero-shot top-1": zeroshot["acc1"], "zero-shot top-5": zeroshot["acc5"],
            "linear probe top-1": probe.metrics["acc1"]}
    print(f"digits:// test split ({probe.test_images} images), tiny preset, {args.steps} steps of 128, "
          f"trained in {seconds / 60:.1f} min")
    for name, value in rows.items():
        print(f"  {name:<20} {value:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "command": f"python benchmarks/bench_digits.py --steps {args.steps}", "train_seconds": seconds,
            "linear_probe": "clipforge.evaluate.evaluate_linear_probe, default settings (CLIP_benchmark's method)",
            "torch_threads": torch.get_num_threads(), "cpu": cpu_record()}
    args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
