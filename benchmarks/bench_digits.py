"""Train the tiny preset on digits:// captions, then score it zero-shot and with a linear probe.

    python benchmarks/bench_digits.py [--steps 400] [--out runs/digits]

The model sees only captions ("a handwritten seven", "the digit 7", ...), never labels;
zero-shot classification then names each test image by comparing it with prompts for the
ten digits.  Beside it, a supervised linear probe (scikit-learn's logistic regression on
the frozen image features of the training split) shows how much the features know.  Prints
a table and writes benchmarks/results/bench_digits.json.
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
    from sklearn.linear_model import LogisticRegression

    from clipforge.checkpoints import load
    from clipforge.data import open_data
    from clipforge.embed import embed_images
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
    features = {}
    for split in ("train", "test"):
        source = open_data(f"digits://?split={split}")
        images = [preprocess(source.image(k)) for k in range(len(source))]
        features[split] = (embed_images(model, images, progress=False).numpy(), source.labels())
    probe = LogisticRegression(max_iter=2000, C=10.0).fit(*features["train"])
    probe_acc = float((probe.predict(features["test"][0]) == features["test"][1]).mean())

    rows = {"zero-shot top-1": zeroshot["acc1"], "zero-shot top-5": zeroshot["acc5"], "linear probe top-1": probe_acc}
    print(f"digits:// test split ({len(features['test'][1])} images), tiny preset, {args.steps} steps of 128, "
          f"trained in {seconds / 60:.1f} min")
    for name, value in rows.items():
        print(f"  {name:<20} {value:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "command": f"python benchmarks/bench_digits.py --steps {args.steps}", "train_seconds": seconds,
            "torch_threads": torch.get_num_threads(), "cpu": cpu_record()}
    args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
