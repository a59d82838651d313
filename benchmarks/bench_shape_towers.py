"""What limits shape recognition on shapes://: image towers trained to tell shapes, and a trained model's errors.

    python benchmarks/bench_shape_towers.py --steps 120              # the towers, supervised
    python benchmarks/bench_shape_towers.py --model RUN/checkpoints/step-0000600   # a trained CLIP

Towers: each image tower is trained alone, with a linear head, to classify the 8 shapes of
single-object images of the ``seen`` split (batches of 128, AdamW lr 1e-3, the same images
for every tower), then scored on 512 images of the seen and of the held-out pairs; the
seconds per step are measured side by side in one run.  ``--model``: the 64-way zero-shot
predictions of a trained model split into colour and shape, and a linear probe for shape on
its image features (`clipforge.evaluate.fit_linear_probe` with its defaults, CLIP_benchmark's
method), fitted on seen pairs and scored on seen and held-out ones.

Prints tables and writes benchmarks/results/bench_shape_towers.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from _timing import cpu_record  # benchmarks/_timing.py

RESULTS = Path(__file__).resolve().parent / "results"


def _images(split: str, n: int, seed: int, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    from clipforge.data.shapes import ShapesDataset

    data = ShapesDataset(split=split, n=n, seed=seed)
    return torch.stack([preprocess(data[k][0]) for k in range(n)]), torch.tensor([data.label(k) for k in range(n)])


def _tower(kind: str) -> nn.Module:
    from clipforge.model import CLIP, get_config, resnet
    from clipforge.model.config import VisionConfig

    base = get_config("tiny")
    norms = {"": nn.BatchNorm2d, "-groupnorm": lambda c: nn.GroupNorm(min(8, c // 4) or 1, c),
             "-layernorm": lambda c: nn.GroupNorm(1, c)}
    if kind == "tiny-vit":
        return CLIP(get_config("tiny-vit")).visual
    width, _, norm = kind.removeprefix("resnet-w").partition("-")
    vision = VisionConfig(image_size=64, patch_size=None, width=int(width), layers=(1, 1, 1, 1), heads=4)
    original = resnet.nn.BatchNorm2d
    resnet.nn.BatchNorm2d = norms["-" + norm if norm else ""]  # the ResNet's norm layer, for this build only
    try:
        return CLIP(dataclasses.replace(base, vision=vision)).visual
    finally:
        resnet.nn.BatchNorm2d = original


def towers(args: argparse.Namespace) -> list[dict]:
    from clipforge.transforms import image_transform

    preprocess = image_transform(64)
    train = [_images("seen", 128, 1000 + s, preprocess) for s in range(args.steps)]
    tests = {split: _images(split, 512, 2, preprocess) for split in ("seen", "heldout")}
    rows = []
    print(f"{'tower':<22} {'params':>8} {'seen':>6} {'heldout':>8} {'s/step':>7}")
    for kind in args.towers:
        torch.manual_seed(0)
        tower = _tower(kind)
        with torch.no_grad():
            dim = tower(tests["seen"][0][:2]).shape[-1]
        head = nn.Linear(dim, 8)
        opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.1)
        tower.train()
        seconds = 0.0
        for images, labels in train:
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(head(tower(images)), labels % 8)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seconds += time.perf_counter() - start
        tower.eval()
        with torch.no_grad():
            acc = {split: float((head(tower(x)).argmax(1) == y % 8).float().mean()) for split, (x, y) in tests.items()}
        params = sum(p.numel() for p in tower.parameters())
        rows.append({"tower": kind, "params": params, "steps": args.steps, **acc, "s_per_step": seconds / args.steps})
        print(
            f"{kind:<22} {params:>8,} {acc['seen']:>6.3f} {acc['heldout']:>8.3f} {seconds / args.steps:>7.3f}",
            flush=True,
        )
    return rows


def model_errors(path: str) -> dict:
    import clipforge
    from clipforge.data.shapes import ShapesDataset, class_names
    from clipforge.embed import embed_images
    from clipforge.evaluate import fit_linear_probe
    from clipforge.zeroshot import build_zeroshot_classifier

    model, preprocess, tokenizer = clipforge.load(path)
    model.eval()
    classifier = build_zeroshot_classifier(model, tokenizer, class_names(), ShapesDataset.templates)
    out: dict = {}
    print(f"{'split':<8} {'top-1':>6} {'colour':>7} {'shape':>6}")
    for split in ("seen", "heldout"):
        images, labels = _images(split, 512, 0, preprocess)
        pred = (embed_images(model, images, progress=False) @ classifier).argmax(1)
        out[split] = {
            "top1": float((pred == labels).float().mean()),
            "colour": float((pred // 8 == labels // 8).float().mean()),
            "shape": float((pred % 8 == labels % 8).float().mean()),
        }
        print(f"{split:<8} {out[split]['top1']:>6.3f} {out[split]['colour']:>7.3f} {out[split]['shape']:>6.3f}")
    feats = {}
    for name, split, n, seed in (("fit", "seen", 3072, 5), ("seen", "seen", 512, 7), ("heldout", "heldout", 512, 6)):
        images, labels = _images(split, n, seed, preprocess)
        feats[name] = (embed_images(model, images, progress=False), labels % 8)
    probe = fit_linear_probe(*feats["fit"], 8)
    out["shape_probe"] = {
        split: float((probe.logits(x).argmax(1).cpu() == y).double().mean()) for split, (x, y) in feats.items()
        if split != "fit"
    }
    print(
        f"shape probe fitted on seen pairs: seen {out['shape_probe']['seen']:.3f}, "
        f"held-out {out['shape_probe']['heldout']:.3f}"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="supervised steps per tower")
    parser.add_argument(
        "--towers",
        nargs="+",
        default=["tiny-vit", "resnet-w8", "resnet-w16", "resnet-w8-groupnorm", "resnet-w8-layernorm"],
    )
    parser.add_argument("--model", help="a trained checkpoint: split its zero-shot errors instead of training towers")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_shape_towers.json")
    args = parser.parse_args(argv)
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": cpu_record(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.model:
        previous["model"] = {
            "meta": {**meta, "command": f"python benchmarks/bench_shape_towers.py --model {args.model}"},
            **model_errors(args.model),
        }
    else:
        previous["towers"] = {
            "meta": {**meta, "command": f"python benchmarks/bench_shape_towers.py --steps {args.steps}"},
            "rows": towers(args),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(previous, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
