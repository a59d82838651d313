"""Time and memory of evaluation: zero-shot classification with the tiny model, and blocked
retrieval metrics on random features.

    python benchmarks/bench_eval.py            # about ten minutes on two CPU cores
    python benchmarks/bench_eval.py --quick    # a smoke run, under a minute

Prints two tables and writes benchmarks/results/bench_eval.json.  Every case runs in its own
process, so its peak memory is its own: "extra peak" is the peak resident memory during the
case minus the resident memory just before it (model loaded, features allocated).

- Zero-shot: 10,000 synthetic 64×64 images drawn in memory with Pillow (a coloured disc on
  noise, 10 colours = 10 classes), each through the model's preprocess, embedded in batches of
  256 by the random-weight ``tiny`` model; the classifier from the shipped ``default`` templates
  (20 prompts per class).  Accuracy is near chance: the weights are random.
- Retrieval: 20,000 images × 100,000 captions (5 per image, grouped as in COCO), d = 512,
  captions = normalised(image + noise five times its norm).  Each block size is one case; a full-matrix reference
  (the whole score matrix and its masks) runs on a quarter-size set for comparison, since at
  full size it would need 8 GB for the scores alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _memory import reset_peak, rss  # benchmarks/_memory.py
from _timing import cpu_record  # benchmarks/_timing.py

RESULTS = Path(__file__).resolve().parent / "results"

ZEROSHOT_FULL, ZEROSHOT_QUICK = 10_000, 1_000
RETRIEVAL_FULL = [(20_000, 100_000, 1024, "blocked"), (20_000, 100_000, 4096, "blocked"),
                  (5_000, 25_000, 4096, "blocked"), (5_000, 25_000, 0, "full matrix")]
RETRIEVAL_QUICK = [(2_000, 10_000, 1024, "blocked"), (2_000, 10_000, 0, "full matrix")]
DIM, CAPTIONS_PER_IMAGE = 512, 5


# ----------------------------------------------------------------------------- zero-shot


def zeroshot_case(n: int, precision: str) -> dict:
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from clipforge.checkpoints import load_model
    from clipforge.embed import embed_images
    from clipforge.model import get_config
    from clipforge.templates import load_templates
    from clipforge.transforms import image_transform
    from clipforge.zeroshot import build_zeroshot_classifier, classification_metrics, zeroshot_logits

    colours = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40),
               "purple": (140, 40, 170), "orange": (240, 140, 20), "white": (245, 245, 245),
               "black": (10, 10, 10), "pink": (250, 150, 190), "brown": (120, 70, 30)}
    names = list(colours)
    config = get_config("tiny")
    preprocess = image_transform(config.vision.image_size, mean=config.vision.mean, std=config.vision.std)

    class Synthetic(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int):
            rng = np.random.default_rng(i)
            label = i % len(names)
            image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            x, y, r = rng.integers(16, 48), rng.integers(16, 48), rng.integers(8, 16)
            ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=colours[names[label]])
            return preprocess(image), label

    torch.manual_seed(0)
    model = load_model("tiny")
    # A word-level stand-in tokenizer: the tiny preset has no trained vocabulary, and tokenizing
    # is not what is measured here.
    vocab: dict[str, int] = {}

    def tokenizer(texts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(texts), model.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [1 + vocab.setdefault(w, len(vocab)) % 4000 for w in text.lower().split()][
                : model.context_length - 1
            ]
            ids[row, : len(words) + 1] = torch.tensor([*words, 4095])  # the last id acts as end of text
        return ids

    autocast = torch.bfloat16 if precision == "bf16" else None
    templates = load_templates("default")
    reset_peak()
    before, _ = rss()
    t0 = time.perf_counter()
    classifier = build_zeroshot_classifier(model, tokenizer, names, templates, batch_size=256, autocast_dtype=autocast)
    t1 = time.perf_counter()
    loader = torch.utils.data.DataLoader(Synthetic(), batch_size=256, num_workers=1)
    features = embed_images(model, loader, batch_size=256, autocast_dtype=autocast, progress=False)
    t2 = time.perf_counter()
    targets = torch.arange(n) % len(names)
    metrics = classification_metrics(zeroshot_logits(features, classifier), targets)
    t3 = time.perf_counter()
    _, peak = rss()
    return {
        "case": "zeroshot",
        "images": n,
        "classes": len(names),
        "prompts": len(names) * len(templates),
        "precision": precision,
        "classifier_s": t1 - t0,
        "images_s": t2 - t1,
        "metrics_s": t3 - t2,
        "total_s": t3 - t0,
        "images_per_s": n / (t2 - t1),
        "extra_peak_bytes": peak - before,
        "acc1": metrics["acc1"],
        "acc5": metrics["acc5"],
    }


# ----------------------------------------------------------------------------- retrieval


def full_matrix_metrics(images, texts, text_to_image, ks):
    """The plain computation: the whole [captions, images] score matrix and its masks."""
    import torch

    scores = texts @ images.T  # [T, I]
    t2i = torch.as_tensor(text_to_image)
    rows = torch.arange(len(texts))
    best_text = scores[rows, t2i]
    text_ranks = (scores >= best_text[:, None]).sum(1)  # the positive counts itself: 1 + negatives
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[rows, t2i] = True
    best_image = scores.masked_fill(~positive, -torch.inf).amax(0)
    image_ranks = ((scores >= best_image[None, :]) & ~positive).sum(0) + 1
    out = {}
    for name, ranks in (("text_to_image", text_ranks), ("image_to_text", image_ranks)):
        for k in ks:
            out[f"{name}_R@{k}"] = float((ranks <= k).double().mean())
        out[f"{name}_mean_rank"] = float(ranks.double().mean())
    return out


def retrieval_case(n_img: int, n_txt: int, block: int, impl: str) -> dict:
    import torch
    import torch.nn.functional as F

    from clipforge.retrieval import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(n_img, DIM, generator=g), dim=-1)
    t2i = torch.arange(n_txt) // (n_txt // n_img)
    # Noise five times the image's norm: at 20,000 images R@1 lands mid-range, not at 0 or 1.
    texts = F.normalize(images[t2i] + 5.0 * torch.randn(n_txt, DIM, generator=g) / DIM**0.5, dim=-1)
    tiles_total = -(-n_img // block) * -(-n_txt // block) if block else 1
    tiles_first = (
        len(torch.unique((t2i // block) * (-(-n_txt // block)) + torch.arange(n_txt) // block)) if block else 0
    )
    reset_peak()
    before, _ = rss()
    t0 = time.perf_counter()
    if impl == "blocked":
        metrics = retrieval_metrics(images, texts, t2i, ks=(1, 5, 10), block_size=block)
    else:
        metrics = full_matrix_metrics(images, texts, t2i, (1, 5, 10))
    seconds = time.perf_counter() - t0
    _, peak = rss()
    return {
        "case": "retrieval",
        "impl": impl,
        "images": n_img,
        "captions": n_txt,
        "d": DIM,
        "block_size": block,
        "tiles_sweep1": tiles_first,
        "tiles_sweep2": tiles_total,
        "seconds": seconds,
        "gflops": 2 * n_img * n_txt * DIM * (1 + (tiles_first / tiles_total if block else 0)) / seconds / 1e9,
        "extra_peak_bytes": peak - before,
        "features_bytes": (n_img + n_txt) * DIM * 4,
        "text_to_image_R@1": metrics["text_to_image_R@1"],
        "image_to_text_R@1": metrics["image_to_text_R@1"],
        "text_to_image_mean_rank": metrics["text_to_image_mean_rank"],
    }


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"case {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--bf16", action="store_true", help="also run zero-shot under bf16 autocast")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_eval.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "zeroshot":
            result = zeroshot_case(int(rest[0]), rest[1])
        else:
            result = retrieval_case(int(rest[0]), int(rest[1]), int(rest[2]), rest[3])
        print(json.dumps(result))
        return

    import torch

    rows: list[dict] = []
    n = ZEROSHOT_QUICK if args.quick else ZEROSHOT_FULL
    header = (
        f"{'zero-shot':<10} {'images':>7} {'prec':>5} {'classifier s':>13} {'images s':>9} {'img/s':>7} "
        f"{'metrics s':>10} {'extra MiB':>10} {'acc1':>6}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    for precision in ["fp32", "bf16"] if args.bf16 else ["fp32"]:
        r = run_child("zeroshot", str(n), precision)
        rows.append(r)
        print(
            f"{'tiny':<10} {r['images']:>7} {precision:>5} {r['classifier_s']:>13.2f} {r['images_s']:>9.1f} "
            f"{r['images_per_s']:>7.0f} {r['metrics_s']:>10.3f} {r['extra_peak_bytes'] / 2**20:>10.0f} "
            f"{r['acc1']:>6.3f}",
            flush=True,
        )
    print()
    header = (
        f"{'retrieval':<12} {'images':>7} {'captions':>9} {'block':>6} {'tiles 1st+2nd':>14} {'seconds':>8} "
        f"{'GFLOP/s':>8} {'extra MiB':>10} {'feat. MiB':>10} {'T→I R@1':>8} {'I→T R@1':>8}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    for n_img, n_txt, block, impl in RETRIEVAL_QUICK if args.quick else RETRIEVAL_FULL:
        r = run_child("retrieval", str(n_img), str(n_txt), str(block), impl)
        rows.append(r)
        tiles = f"{r['tiles_sweep1']}+{r['tiles_sweep2']}" if block else "—"
        print(
            f"{impl:<12} {n_img:>7} {n_txt:>9} {block or '—':>6} {tiles:>14} {r['seconds']:>8.1f} {r['gflops']:>8.0f} "
            f"{r['extra_peak_bytes'] / 2**20:>10.0f} {r['features_bytes'] / 2**20:>10.0f} "
            f"{r['text_to_image_R@1']:>8.4f} {r['image_to_text_R@1']:>8.4f}",
            flush=True,
        )
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": cpu_record(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": "python benchmarks/bench_eval.py"
        + (" --quick" if args.quick else "")
        + (" --bf16" if args.bf16 else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
