"""The GPU check's training stage: one bf16 training step of ViT-B-32, clipforge's against OpenCLIP's.

    python3 benchmarks/gpu/stage_train.py --rows rows.jsonl [--deadline T] [--dry-run]

Run by benchmarks/gpu_check.py.  Both models start from the same weights (OpenCLIP's is built
from clipforge's config and loads clipforge's state dict) and train on the same random batch.
clipforge's step is its trainer's own (`clipforge.train.train_step`: bf16 autocast, the tiled
loss in fp32, gradient clipping at 1, fused AdamW, the temperature clamp); OpenCLIP's is what
its training script does with ``--precision amp_bf16 --grad-clip-norm 1``: the loss under
autocast, AdamW over its two parameter groups, the clamp.  One row per implementation and
batch: samples/s (the fastest of up to three timed steps after a warm-up) and the peak memory
the allocator held (weights, gradients, optimiser state and activations).  The model moves to
the device one implementation at a time.
"""

from __future__ import annotations

import math
import sys

import _stage  # benchmarks/gpu/_stage.py
import torch

MODEL, BATCHES = "ViT-B-32", (256, 1024)
DRY_MODEL, DRY_BATCHES = "tiny-vit", (8, 16)
IMPLEMENTATIONS = ("clipforge", "OpenCLIP")


def batch(config, size: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and 15-token captions (start, 13 random ids, end of text: the largest id)."""
    g = torch.Generator(device=dev).manual_seed(0)
    s, ctx, vocab = config.vision.image_size, config.text.context_length, config.text.vocab_size
    images = torch.randn(size, 3, s, s, device=dev, generator=g)
    tokens = torch.zeros(size, ctx, dtype=torch.long, device=dev)
    tokens[:, 0] = vocab - 2
    tokens[:, 1:14] = torch.randint(1, vocab - 2, (size, 13), device=dev, generator=g)
    tokens[:, 14] = vocab - 1
    return images, tokens


def openclip_model(config, state: dict):
    """OpenCLIP's CLIP for clipforge's config, holding clipforge's weights."""
    import open_clip

    from clipforge.checkpoints.configs import config_to_openclip
    from clipforge.checkpoints.names import to_openclip

    model = open_clip.model.CLIP(**config_to_openclip(config)["model_cfg"])
    model.load_state_dict(to_openclip(state))
    return model


def clipforge_step(model, name: str, size: int, images, tokens):
    from clipforge.data.batches import MicroBatch
    from clipforge.train import build_optimizer, train_step
    from clipforge.train.config import TrainConfig

    config = TrainConfig(model=name, precision="bf16", batch_size=size, lr=1e-5)
    optimizer = build_optimizer(model, config)
    micro = [MicroBatch(images, tokens, indices=list(range(size)))]
    return lambda: train_step(model, micro, optimizer, config=config)


def openclip_step(model, images, tokens, dev: torch.device):
    from open_clip.loss import ClipLoss

    exempt = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": 0.2}],
        lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            img, txt, scale = model(images, tokens)[:3]
            loss = loss_fn(img, txt, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def seeded_weights(name: str) -> tuple:
    """(config, state dict) of the preset ``name`` with seed-0 random weights: what both libraries load."""
    from clipforge.model import CLIP, get_config

    config = get_config(name)
    torch.manual_seed(0)
    return config, CLIP(config).state_dict()


def main() -> int:
    args = _stage.parse(__doc__.split("\n")[0])
    rows = _stage.Rows(args.rows, args.deadline)
    dev = _stage.device(args.dry_run)
    name, sizes = (DRY_MODEL, DRY_BATCHES) if args.dry_run else (MODEL, BATCHES)
    config, state = seeded_weights(name)
    from clipforge.model import CLIP

    for impl in IMPLEMENTATIONS:
        base = dict(kind="train", model=name, impl=impl, precision="bf16")
        if rows.out_of_time():
            for size in sizes:
                rows.add(**base, batch=size, status="skipped: time box")
            continue
        try:
            if impl == "clipforge":
                model = CLIP(config)
                model.load_state_dict(state)
            else:
                model = openclip_model(config, state)
            model = model.to(dev).train()
        except Exception as err:  # an OpenCLIP that does not import is this row's result
            for size in sizes:
                rows.add(**base, batch=size, status=f"unavailable: {type(err).__name__}: {str(err)[:200]}")
            continue
        for size in sizes:
            if rows.out_of_time():
                rows.add(**base, batch=size, status="skipped: time box")
                continue
            try:
                images, tokens = batch(config, size, dev)
                step = (clipforge_step(model, name, size, images, tokens) if impl == "clipforge"
                        else openclip_step(model, images, tokens, dev))
                step()  # warm-up: optimiser state, cuBLAS and cuDNN choices
                _stage.reset_peak(dev)
                seconds = min(_stage.timed(step, dev, max_seconds=6.0))
                rows.add(**base, batch=size, status="ok", seconds=seconds, samples_per_s=size / seconds,
                         peak_bytes=_stage.peak(dev))
            except Exception as err:  # out of memory is a result
                status = _stage.failure(err)
                del err
                rows.add(**base, batch=size, status=status)
            finally:
                images = tokens = step = None
                model.zero_grad(set_to_none=True)
                _stage.free(dev)
        model = None
        _stage.free(dev)

    return rows.exit_status()  # 1 when one of clipforge's own cases failed


if __name__ == "__main__":
    sys.exit(main())
