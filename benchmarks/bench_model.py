"""Inference throughput of clipforge's CLIP, side by side with OpenCLIP on the same weights.

    PYTHONPATH=src python benchmarks/bench_model.py                      # clipforge alone
    PYTHONPATH=src /work/parity/venv/bin/python benchmarks/bench_model.py  # with OpenCLIP

Prints a table of images/s and texts/s for each model (ViT-B-32, tiny-vit), batch size (1, 32) and
precision (fp32, bf16 autocast), with OpenCLIP's numbers and the speed-up where open_clip is
importable, and writes it to benchmarks/results/bench_model.json.  fp32 rows also time
`CLIP.optimize_for_inference()` (the packed oneDNN path; its outputs are checked against the
plain path first); under autocast that path steps aside, so bf16 rows time the plain model only.
Captions are typical ones:
10-20 tokens (mean 15) padded to the model's context.  Both libraries run interleaved in one
process (clipforge, OpenCLIP, clipforge, ...) so a noisy shared CPU affects both alike; each
cell reports the fastest of its timed calls, the least disturbed by other processes.  Weights
are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from _timing import cpu_record  # benchmarks/_timing.py
from clipforge.checkpoints.configs import config_to_openclip
from clipforge.checkpoints.names import to_openclip
from clipforge.model import CLIP, get_config

RESULTS = Path(__file__).resolve().parent / "results" / "bench_model.json"


def caption_tokens(batch: int, context_length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[sot, ids, eot, 0 ...] rows of 10-20 tokens (mean 15), eot the largest id as in OpenAI's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, context_length, dtype=torch.long)
    for row in range(batch):
        n = min(int(torch.randint(10, 21, (1,), generator=g)), context_length)
        tokens[row, :n] = torch.randint(1, vocab_size - 2, (n,), generator=g)
        tokens[row, 0], tokens[row, n - 1] = vocab_size - 2, vocab_size - 1
    return tokens


def openclip_twin(model: CLIP) -> torch.nn.Module | None:
    """OpenCLIP's CLIP holding ``model``'s weights, or None when open_clip is not installed."""
    try:
        from open_clip.model import CLIP as OpenCLIP
    except ImportError:
        return None
    twin = OpenCLIP(**config_to_openclip(model.config)["model_cfg"])
    twin.load_state_dict(to_openclip(model.state_dict()), strict=True)
    return twin.eval()


def time_interleaved(fns: dict[str, Callable[[], object]], *, reps: int, min_seconds: float) -> dict[str, float]:
    """Fastest seconds per call of each function, calls interleaved round-robin after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while min(len(t) for t in times.values()) < reps or (
        time.perf_counter() - start < min_seconds and min(len(t) for t in times.values()) < 50
    ):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def bench(name: str, batch: int, precision: str, *, reps: int, min_seconds: float) -> list[dict]:
    torch.manual_seed(0)
    model = CLIP(get_config(name)).eval()
    twin = openclip_twin(model)
    optimized = copy.deepcopy(model).optimize_for_inference() if precision == "fp32" else None
    config = model.config
    images = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size)
    tokens = caption_tokens(batch, config.text.context_length, config.text.vocab_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    rows = []
    for modality, data in (("image", images), ("text", tokens)):
        fns = {}
        for impl, m in (("clipforge", model), ("optimized", optimized), ("open_clip", twin)):
            if m is None:
                continue
            encode = m.encode_image if modality == "image" else m.encode_text
            if impl == "optimized":
                with torch.inference_mode():
                    reference = model.encode_image(data) if modality == "image" else model.encode_text(data)
                    error = (encode(data) - reference).abs().max().item()
                if error > 1e-5:
                    raise AssertionError(f"optimized path differs from the plain one by {error:.2e}")

            def call(encode=encode, data=data) -> object:
                with torch.inference_mode(), autocast:
                    return encode(data)

            fns[impl] = call
        seconds = time_interleaved(fns, reps=reps, min_seconds=min_seconds)
        row = {
            "model": name,
            "batch": batch,
            "precision": precision,
            "modality": modality,
            "clipforge_per_s": batch / seconds["clipforge"],
        }
        if "optimized" in seconds:
            row["optimized_per_s"] = batch / seconds["optimized"]
            row["optimized_max_abs_error"] = error
        if "open_clip" in seconds:
            row["open_clip_per_s"] = batch / seconds["open_clip"]
            row["speedup"] = seconds["open_clip"] / seconds["clipforge"]
            if "optimized" in seconds:
                row["optimized_speedup"] = seconds["open_clip"] / seconds["optimized"]
        rows.append(row)
    return rows


HEADER = (
    f"{'model':10} {'batch':>5} {'prec':>5} {'what':>6} {'clipforge/s':>12} {'optimized/s':>12} "
    f"{'open_clip/s':>12} {'speed-up':>9} {'optimized':>9}"
)


def format_row(r: dict) -> str:
    def cell(key: str, width: int, fmt: str, suffix: str = "") -> str:
        return f"{r[key]:{width - len(suffix)}{fmt}}{suffix}" if key in r else f"{'-':>{width}}"

    return (
        f"{r['model']:10} {r['batch']:5d} {r['precision']:>5} {r['modality']:>6} "
        f"{cell('clipforge_per_s', 12, '.1f')} {cell('optimized_per_s', 12, '.1f')} "
        f"{cell('open_clip_per_s', 12, '.1f')} {cell('speedup', 9, '.2f', 'x')} "
        f"{cell('optimized_speedup', 9, '.2f', 'x')}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "tiny-vit"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--reps", type=int, default=3, help="timed calls per library and cell, at least")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="keep timing a cell at least this long")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    for name in args.models:
        for batch in args.batches:
            for precision in args.precisions:
                for row in bench(name, batch, precision, reps=args.reps, min_seconds=args.min_seconds):
                    print(format_row(row), flush=True)
                    rows.append(row)
    try:
        import open_clip

        open_clip_version = open_clip.__version__
    except ImportError:
        open_clip_version = None
    result = {
        "date": dt.date.today().isoformat(),
        "command": "python " + shlex.join(["benchmarks/bench_model.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "open_clip": open_clip_version,
        "threads": torch.get_num_threads(),
        "cpu": cpu_record(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
