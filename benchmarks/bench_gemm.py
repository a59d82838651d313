"""How fast this CPU multiplies ViT-B-32's matrices in fp32: what bounds the model's fp32 speed.

    python benchmarks/bench_gemm.py                 # one thread
    python benchmarks/bench_gemm.py --threads 2

For the 48 weight matrices of ViT-B-32's image Transformer (12 blocks of q/k/v 2304×768, out
768×768, fc 3072×768, proj 768×3072; 340 MB, so they stream from memory as in a forward pass),
GFLOP/s of ``x @ W.T + b`` at the row counts of a batch-1 caption (20 rows), a batch-1 image (50)
and a batch of 32 images (1,600), with MKL (``F.linear``, what both clipforge's plain path and
OpenCLIP call) and with oneDNN on weights packed once (``torch.ops.mkldnn._linear_pointwise``,
clipforge's `CLIP.optimize_for_inference`); beside them one 4096 × 4096 × 4096 product as this
machine's practical fp32 peak.  Then the share of ViT-B-32's fp32 image forward (clipforge,
random weights) spent in matrix multiplies, from ``torch.profiler``.

Prints tables and writes benchmarks/results/bench_gemm.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from _timing import cpu_record, fastest  # benchmarks/_timing.py

RESULTS = Path(__file__).resolve().parent / "results" / "bench_gemm.json"
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise",
              "mkldnn::_linear_pointwise.binary", "aten::mkldnn_convolution", "aten::convolution")


def layer_shapes(width: int = 768, layers: int = 12) -> list[tuple[int, int]]:
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)] * layers


def gemm_rates(rows: int, reps: int) -> dict[str, float]:
    shapes = layer_shapes()
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=g) * 0.02 for o, i in shapes]
    biases = [torch.zeros(o) for o, _ in shapes]
    inputs = {i: torch.randn(rows, i, generator=g) for _, i in shapes}
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in weights]
    flops = sum(2 * rows * o * i for o, i in shapes)

    def mkl() -> None:
        for w, b in zip(weights, biases):
            F.linear(inputs[w.shape[1]], w, b)

    def onednn() -> None:
        for w, p, b in zip(weights, packed, biases):
            torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, b, "none", [], "")

    return {"MKL": flops / fastest(mkl, reps) / 1e9, "oneDNN packed": flops / fastest(onednn, reps) / 1e9}


def peak(reps: int) -> float:
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    return 2 * 4096**3 / fastest(lambda: a @ b, reps) / 1e9


def matmul_share(batch: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    from clipforge.model import CLIP, get_config

    model = CLIP(get_config("ViT-B-32")).eval()
    images = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model.encode_image(images)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.encode_image(images)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per cell, fastest kept")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    practical_peak = peak(args.reps)
    rates = {rows: gemm_rates(rows, args.reps) for rows in (20, 50, 1600)}
    shares = {batch: matmul_share(batch) for batch in (1, 32)}
    print(f"{torch.get_num_threads()} thread(s); 4096^3 product: {practical_peak:.1f} GFLOP/s")
    print(f"{'rows':>6} {'MKL GFLOP/s':>12} {'oneDNN packed':>14}")
    for rows, r in rates.items():
        print(f"{rows:>6} {r['MKL']:12.1f} {r['oneDNN packed']:14.1f}")
    for batch, share in shares.items():
        print(f"ViT-B-32 fp32 image forward, batch {batch}: {share:.0%} of the time in matrix multiplies")
    result = {
        "meta": {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "cpu": cpu_record()},
        "peak_gflops": practical_peak,
        "layer_gflops": {str(rows): r for rows, r in rates.items()},
        "matmul_share": {str(batch): s for batch, s in shares.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
