"""Where the demo's training time goes: one step of the `make demo` recipe, piece by piece.

    python benchmarks/bench_demo_step.py
    python benchmarks/bench_demo_step.py --threads 1 --reps 10

For one batch of the demo recipe (`clipforge/train/demo.toml`: the ``tiny`` preset, 128 pairs of
``shapes://``): drawing and preprocessing the images, tokenizing the captions, and the
training step (`clipforge.train.train_step`: both towers forward and backward, the loss,
clipping and the fused AdamW update) with the ResNet image tower in channels-last layout
(the default on the CPU, `ModifiedResNet.channels_last`) and in the plain NCHW layout; and
BatchNorm forward and backward at each of the tower's input shapes in both layouts.  The
two layouts run interleaved in one process, each from the same weights, and each cell
reports the fastest of its calls (the least disturbed by other processes); both layouts'
image features are compared before anything is timed.

Prints a table and writes benchmarks/results/bench_demo_step.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import torch

from _timing import cpu_record, fastest  # benchmarks/_timing.py

RESULTS = Path(__file__).resolve().parent / "results" / "bench_demo_step.json"


def batchnorm_layouts(tower: torch.nn.Module, images: torch.Tensor, reps: int) -> list[dict]:
    """Forward + backward time of each distinct BatchNorm2d input shape of ``tower`` on ``images``,
    in NCHW and in channels-last (NHWC) layout."""
    shapes: dict[tuple[int, ...], torch.nn.Module] = {}

    def record(norm: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        shapes.setdefault(tuple(inputs[0].shape), norm)

    hooks = [m.register_forward_hook(record) for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        tower(images)
    for hook in hooks:
        hook.remove()
    rows = []
    for shape, norm in shapes.items():
        norm = copy.deepcopy(norm).train()
        row = {"input": "x".join(map(str, shape))}
        for name, layout in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
            x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
            grad = torch.randn(shape).contiguous(memory_format=layout)
            row[f"{name}_ms"] = fastest(lambda norm=norm, x=x, grad=grad: norm(x).backward(grad), reps) * 1000
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=8, help="timed calls per cell")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from clipforge.data import open_data
    from clipforge.data.batches import MicroBatch
    from clipforge.train import build_model, build_optimizer, train_step
    from clipforge.train.config import demo_config

    config = demo_config()
    source = open_data(config.data)
    model, preprocess, tokenizer = build_model(config, source)
    batch = config.batch_size
    samples = [source[k] for k in range(batch)]

    def draw() -> torch.Tensor:
        return torch.stack([preprocess(source[k][0]) for k in range(batch)])

    def tokenize() -> torch.Tensor:
        return tokenizer([caption for _, caption in samples])

    images, tokens = draw(), tokenize()
    micro = [MicroBatch(images, tokens, list(range(batch)))]
    layouts = {}
    for name, channels_last in (("channels-last", True), ("NCHW", False)):
        twin = copy.deepcopy(model)
        twin.visual.channels_last = channels_last
        layouts[name] = (twin, twin, build_optimizer(twin, config))
    with torch.no_grad():
        a, b = (layouts[n][0].eval().encode_image(images) for n in layouts)
        difference = float((a - b).abs().max())
    for twin, _, _ in layouts.values():
        twin.train()

    def step(name: str):
        _, forward, optimizer = layouts[name]
        return lambda: train_step(forward, micro, optimizer, config=config)

    times = {"draw + preprocess": fastest(draw, args.reps), "tokenize": fastest(tokenize, args.reps)}
    for name in layouts:  # warm-up both, then interleave
        step(name)()
    best = {name: float("inf") for name in layouts}
    for _ in range(args.reps):
        for name in layouts:
            start = time.perf_counter()
            step(name)()
            best[name] = min(best[name], time.perf_counter() - start)
    times.update({f"train step, {name}": t for name, t in best.items()})

    print(f"one batch of {batch} (demo recipe), {torch.get_num_threads()} threads, fastest of {args.reps}:")
    print(f"{'part':<28} {'ms':>8} {'samples/s':>10}")
    for name, seconds in times.items():
        print(f"{name:<28} {seconds * 1000:8.1f} {batch / seconds:10.0f}")
    speedup = best["NCHW"] / best["channels-last"]
    print(f"channels-last step speed-up: {speedup:.2f}x; image features max |difference| {difference:.2e}")
    batchnorm = batchnorm_layouts(model.visual, images, args.reps)
    print("BatchNorm forward + backward at the tower's shapes, ms (why the narrow stem stays NCHW):")
    print(f"{'input':<18} {'NCHW':>7} {'NHWC':>7}")
    for row in batchnorm:
        print(f"{row['input']:<18} {row['NCHW_ms']:7.2f} {row['NHWC_ms']:7.2f}")
    result = {
        "meta": {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "batch": batch, "reps": args.reps, "cpu": cpu_record()},
        "ms": {name: seconds * 1000 for name, seconds in times.items()},
        "channels_last_speedup": speedup,
        "max_feature_difference": difference,
        "batchnorm": batchnorm,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
