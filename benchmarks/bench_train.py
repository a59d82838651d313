"""Training-step throughput: clipforge against OpenCLIP on the same architecture and batch.

    PYTHONPATH=src <venv with open_clip>/bin/python benchmarks/bench_train.py
    python benchmarks/bench_train.py            # clipforge alone when open_clip is absent

One step = forward of both towers, the CLIP loss, backward, AdamW update, on random images
and 15-token captions padded to the context length; each library's optimizer is the one its
trainer builds (clipforge: fused AdamW; OpenCLIP's training script: PyTorch's default AdamW).
Both libraries build the model from
the same config (OpenCLIP's model is created from clipforge's config and gets clipforge's
weights), run interleaved in one process, and report samples/s (best of the timed steps).
Prints a table and writes benchmarks/results/bench_train.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch

from _timing import cpu_record, fastest  # benchmarks/_timing.py

RESULTS = Path(__file__).resolve().parent / "results"


def _batch(model_cfg, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model_cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    ctx, vocab = model_cfg.text.context_length, model_cfg.text.vocab_size
    tokens = torch.zeros(batch, ctx, dtype=torch.long)
    tokens[:, 0] = vocab - 2
    tokens[:, 1:14] = torch.randint(1, vocab - 2, (batch, 13), generator=g)
    tokens[:, 14] = vocab - 1  # end of text: the largest id
    return images, tokens


def _step_fn(model, loss_fn, images, tokens, precision):
    opt = loss_fn.optimizer(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            img, txt, scale = loss_fn.features(model, images, tokens)
        loss = loss_fn(img.float(), txt.float(), scale)
        loss.backward()
        opt.step()

    return step


class _Ours:
    def __init__(self) -> None:
        from clipforge.loss import ClipLoss

        self.loss = ClipLoss()

    @staticmethod
    def features(model, images, tokens):
        return model(images, tokens)

    def __call__(self, img, txt, scale):
        return self.loss(img, txt, scale)

    @staticmethod
    def optimizer(model):
        """The trainer's own: `clipforge.train.build_optimizer` (fused AdamW over decay groups)."""
        from clipforge.train import build_optimizer
        from clipforge.train.config import TrainConfig

        return build_optimizer(model, TrainConfig(lr=1e-5))


class _Theirs:
    def __init__(self) -> None:
        from open_clip.loss import ClipLoss

        self.loss = ClipLoss()

    @staticmethod
    def features(model, images, tokens):
        out = model(images, tokens)
        if isinstance(out, dict):
            return out["image_features"], out["text_features"], out["logit_scale"]
        return out[0], out[1], out[2]

    def __call__(self, img, txt, scale):
        return self.loss(img, txt, scale)

    @staticmethod
    def optimizer(model):
        """What OpenCLIP's training script builds: AdamW over two groups (no decay on gains
        and biases), PyTorch's default implementation."""
        exempt = [
            p
            for n, p in model.named_parameters()
            if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        ]
        rest = [p for n, p in model.named_parameters() if not any(p is q for q in exempt)]
        return torch.optim.AdamW(
            [{"params": exempt, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.2}],
            lr=1e-5,
            betas=(0.9, 0.98),
            eps=1e-6,
        )


def _openclip_model(ours):
    """OpenCLIP's CLIP for clipforge's config, with clipforge's weights."""
    import open_clip

    from clipforge.checkpoints.configs import config_to_openclip
    from clipforge.checkpoints.names import to_openclip

    cfg = config_to_openclip(ours.config)["model_cfg"]
    model = open_clip.model.CLIP(**{k: v for k, v in cfg.items()})
    model.load_state_dict(to_openclip(ours.state_dict()))
    return model


def _rate(step, batch: int, steps: int) -> float:
    return batch / fastest(step, steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny-vit,ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_train.json")
    args = parser.parse_args(argv)

    from clipforge.model import CLIP, get_config

    try:
        import open_clip  # noqa: F401

        have_openclip = True
    except ImportError:
        have_openclip = False
    rows = []
    print(f"{'model':<10} {'prec':<5} {'clipforge/s':>12} {'open_clip/s':>12} {'speed-up':>9}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        ours = CLIP(get_config(name)).train()
        theirs = _openclip_model(ours).train() if have_openclip else None
        images, tokens = _batch(ours.config, args.batch)
        for precision in ("fp32", "bf16"):
            mine = _rate(_step_fn(ours, _Ours(), images, tokens, precision), args.batch, args.steps)
            ref = (
                _rate(_step_fn(theirs, _Theirs(), images, tokens, precision), args.batch, args.steps)
                if theirs
                else None
            )
            rows.append(
                {
                    "model": name,
                    "precision": precision,
                    "batch": args.batch,
                    "clipforge": mine,
                    "open_clip": ref,
                    "speedup": ref and mine / ref,
                }
            )
            print(
                f"{name:<10} {precision:<5} {mine:>12.1f} {(f'{ref:.1f}' if ref else '—'):>12} "
                f"{(f'{mine / ref:.2f}x' if ref else '—'):>9}",
                flush=True,
            )
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": cpu_record(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": f"python benchmarks/bench_train.py --models {args.models} --batch {args.batch}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
