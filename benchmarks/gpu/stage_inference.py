"""The GPU check's inference stage: encode_image and encode_text throughput of ViT-B-32, against OpenCLIP.

    python3 benchmarks/gpu/stage_inference.py --rows rows.jsonl [--deadline T] [--dry-run]

Run by benchmarks/gpu_check.py.  Both models hold the same weights (as in the training stage)
and run in eval mode under ``torch.inference_mode``: fp32 (TF32 off for matmuls and convolutions)
and bf16 (the weights and inputs cast to bfloat16).  One row per tower, precision and
implementation: items/s, the fastest of up to five timed batches after a warm-up.
"""

from __future__ import annotations

import sys

import _stage  # benchmarks/gpu/_stage.py
import torch
from stage_train import DRY_MODEL, MODEL, batch, openclip_model, seeded_weights  # benchmarks/gpu/stage_train.py

BATCH, DRY_BATCH = 256, 8
PRECISIONS = ("fp32", "bf16")
IMPLEMENTATIONS = ("clipforge", "OpenCLIP")


def encoders(model, pixels: torch.Tensor, tokens: torch.Tensor) -> dict:
    return {"image": lambda: model.encode_image(pixels), "text": lambda: model.encode_text(tokens)}


def main() -> int:
    args = _stage.parse(__doc__.split("\n")[0])
    rows = _stage.Rows(args.rows, args.deadline)
    dev = _stage.device(args.dry_run)
    name, size = (DRY_MODEL, DRY_BATCH) if args.dry_run else (MODEL, BATCH)
    config, state = seeded_weights(name)
    from clipforge.model import CLIP

    images, tokens = batch(config, size, dev)
    for precision in PRECISIONS:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for impl in IMPLEMENTATIONS:
            base = dict(kind="inference", model=name, impl=impl, precision=precision, batch=size)
            if rows.out_of_time():
                for tower in ("image", "text"):
                    rows.add(**base, tower=tower, status="skipped: time box")
                continue
            try:
                if impl == "clipforge":
                    model = CLIP(config)
                    model.load_state_dict(state)
                else:
                    model = openclip_model(config, state)
                model = model.to(dev, dtype).eval()
            except Exception as err:  # an OpenCLIP that does not import is this row's result
                for tower in ("image", "text"):
                    rows.add(**base, tower=tower, status=f"unavailable: {type(err).__name__}: {str(err)[:200]}")
                continue
            pixels = images.to(dtype)
            for tower, fn in encoders(model, pixels, tokens).items():
                if rows.out_of_time():
                    rows.add(**base, tower=tower, status="skipped: time box")
                    continue
                try:
                    with torch.inference_mode(), _stage.matmul_precision(precision):
                        fn()  # warm-up
                        seconds = min(_stage.timed(fn, dev, reps=5, max_seconds=2.0))
                    rows.add(**base, tower=tower, status="ok", seconds=seconds, items_per_s=size / seconds)
                except Exception as err:  # out of memory is a result
                    status = _stage.failure(err)
                    del err
                    rows.add(**base, tower=tower, status=status)
            model = pixels = None
            _stage.free(dev)

    return rows.exit_status()  # 1 when one of clipforge's own cases failed


if __name__ == "__main__":
    sys.exit(main())
