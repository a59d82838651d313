"""CLIP-guided generation and best-of-16 reranking on shapes://, judged by a second model.

    python benchmarks/bench_generate.py                          # `make bench-generate`: the full benchmark
    python benchmarks/bench_generate.py --model runs/a --judge runs/b
    python benchmarks/bench_generate.py --prompts 4 --steps 30 --generator-steps 40 --judge-steps 40 \\
        --clean-judge-steps 40 --runs /tmp/runs --json /tmp/quick.json --figure /tmp/quick.png   # a quick check

Two ``tiny`` models trained independently on ``shapes://`` with one recipe and different
seeds play two parts: the *generator* model (seed 0), against which each image is optimised,
and the *judge* (seed 1), which never saw the optimisation.  The recipe is the demo recipe
(`clipforge/train/demo.toml`) run for 4,800 steps with ``--image-noise 0.25`` (Gaussian noise on
the training images), so that the generator's input gradients point towards visible changes
and the judge reads shapes rather than pixel-level detail.  A third model, the *clean
judge* (seed 1, 2,400 steps without noise, as every other run trains), classifies the same
images: how a model of another recipe sees them.  Without ``--model``/``--judge``/
``--clean-judge`` (run directories, whose last checkpoint is taken, or checkpoints) the
script trains them into ``runs/bench-generate/`` and reuses them on the next run of the same
recipe (``--fresh`` trains again, e.g. after a change to the code rather than the config).

1. Generation: for each of the 64 prompts "a {colour} {shape}", `clipforge.generate.generate`
   makes an image with the generator model; the judge classifies it zero-shot among the 64
   classes (`ShapesDataset.templates`).  Rates: colour and shape both right, colour right,
   shape right; the same for the clean judge, and for the generator classifying its own
   images (a generator far above its judges is making adversarial images).  The generation
   settings default to the benchmark's: 200 steps, 16 cutouts with pixel noise of the generator's
   training noise, total variation 5, spectrum decay 2, learning rate 0.02, the other 63
   class prompts as negative prompts at weight 0.1 (``--negative-weight 0``: none), one start
   (``--best-of N``: N starts, the generator keeps the image it scores highest).
   Each judge's rate on 8 real images of each prompted class is the most its generation rate
   can be: a generator that drew each prompt as shapes:// does would score that.
2. Reranking: for each prompt, 16 candidate images from the ``seen``/``heldout`` splits (one
   of the prompted pair, 15 of classes drawn at random), ordered by the generator model with
   `clipforge.score.rerank`; the rate of prompts whose first image is of the prompted pair.
   Reranking always covers the 64 prompts; ``--prompts N``
   generates for N of them (spread at random, seeded), for a quick check.

Prints a table, writes benchmarks/results/bench_generate.json and the figure
docs/figures/generate_grid.png (each image with its prompt, CLIP-S under both models and the
judge's class), and the images under runs/bench-generate/images/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from _demo_runs import demo_run  # benchmarks/_demo_runs.py
from _timing import cpu_record  # benchmarks/_timing.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CANDIDATES = 16
STEPS = 4800  # both models: training with noise needs longer for the same clean accuracy
NOISE = 0.25  # both models are trained with this image noise (docs/generation.md)
BEST_OF = 1  # starts per prompt (GenerateConfig.best_of): 4 measured no better (docs/benchmarks.md, History)
CLEAN_JUDGE_STEPS = 2400  # the clean recipe near its plateau (docs/benchmarks.md)
NEGATIVE_WEIGHT = 0.1  # GenerateConfig.negative_weight, with the other 63 class prompts as negatives (0: none)
REAL_PER_PROMPT = 8  # real images per prompted class on which the judge's own accuracy is measured


# ----------------------------------------------------------------------------- the two models


def train_or_reuse(seed: int, steps: int, root: Path, *, fresh: bool, image_noise: float = 0.0) -> Path:
    """The last checkpoint of the demo recipe trained for ``steps`` with ``seed`` and
    ``image_noise`` (`_demo_runs.demo_run`), evaluated every 300 steps."""
    from clipforge.train.run_state import list_checkpoints

    run, _ = demo_run(root, fresh=fresh, seed=seed, steps=steps, image_noise=image_noise, eval_every=min(300, steps),
                      save_every=steps)
    return list_checkpoints(run)[-1]


def resolve(path: str) -> Path:
    """A run directory's last checkpoint, or the checkpoint itself."""
    from clipforge.train.run_state import list_checkpoints

    found = list_checkpoints(Path(path))
    return found[-1] if found else Path(path)


# ----------------------------------------------------------------------------- the two tests


def pick_prompts(count: int) -> list[int]:
    """Class indices of the prompts: all 64, or ``count`` of them spread at random (seeded)."""
    return list(range(64)) if count >= 64 else sorted(random.Random(0).sample(range(64), count))


def _split_of(label: int) -> tuple[Any, int, int]:
    """(the seen/heldout split holding class ``label``, its pairs' count, the pair's place in them)."""
    from clipforge.data.shapes import (
        COLOURS,
        HELDOUT_PAIRS,
        SEEN_PAIRS,
        SHAPES,
        ShapesDataset,
    )

    pair = (COLOURS[label // 8], SHAPES[label % 8])
    split, pairs = ("heldout", sorted(HELDOUT_PAIRS)) if pair in HELDOUT_PAIRS else ("seen", list(SEEN_PAIRS))
    return ShapesDataset(split=split), len(pairs), pairs.index(pair)


def images_of(label: int) -> int:
    """How many images of class ``label`` its split holds (the splits cycle through their pairs)."""
    dataset, pairs, _ = _split_of(label)
    return len(dataset) // pairs


def real_image(label: int, draw: int) -> Any:
    """The ``draw``-th single-object shapes:// image of class ``label`` in its split."""
    dataset, pairs, place = _split_of(label)
    index = place + pairs * draw
    assert dataset.label(index) == label
    return dataset[index][0]


def candidates(target: int) -> tuple[list[Any], list[int]]:
    """16 single-object shapes:// images: one of class ``target``, 15 of random classes, shuffled."""
    rng = random.Random(f"rerank/{target}")
    drawn = []
    for number in range(CANDIDATES):
        label = target if number == 0 else rng.randrange(64)
        drawn.append((real_image(label, rng.randrange(images_of(label))), label))
    rng.shuffle(drawn)
    return [image for image, _ in drawn], [label for _, label in drawn]


def classify(model: Any, preprocess: Any, tokenizer: Any, images: list[Any]) -> list[int]:
    """Zero-shot class (0..63) of each image among the shapes:// classes."""
    import torch

    from clipforge.data.shapes import ShapesDataset, class_names
    from clipforge.embed import embed_images
    from clipforge.zeroshot import build_zeroshot_classifier, zeroshot_logits

    classifier = build_zeroshot_classifier(model, tokenizer, class_names(), list(ShapesDataset.templates))
    features = embed_images(model, torch.stack([preprocess(image) for image in images]), progress=False)
    return zeroshot_logits(features, classifier).argmax(1).tolist()


def rates(predicted: list[int], targets: list[int]) -> dict[str, float]:
    n = max(len(targets), 1)
    return {
        "colour_and_shape": sum(p == t for p, t in zip(predicted, targets)) / n,
        "colour": sum(p // 8 == t // 8 for p, t in zip(predicted, targets)) / n,
        "shape": sum(p % 8 == t % 8 for p, t in zip(predicted, targets)) / n,
    }


# ----------------------------------------------------------------------------- the figure


def draw_grid(rows: list[dict[str, Any]], images: list[Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(8, len(rows))
    lines = (len(rows) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(1.9 * columns, 2.4 * lines + 0.4), squeeze=False,
                                layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, row, image in zip(axes.flat, rows, images):
        ax.imshow(image)
        right = row["judge_class"] == row["class"]
        ax.set_title(f"{row['prompt']}\nM {row['model_clip_score']:.2f} · J {row['judge_clip_score']:.2f}\n"
                     f"judge: {row['judge_says']}", fontsize=7, color="darkgreen" if right else "firebrick")
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------- main


def grid_title(count: int, generation: dict[str, float]) -> str:
    return (f"CLIP-guided generation on shapes://, {count} prompts: the judge names colour and shape of "
            f"{generation['colour_and_shape']:.0%}\nM: CLIP-S under the generator, J: under the judge; "
            "green: the judge's class is the prompt's")


def image_name(label: int) -> str:
    from clipforge.data.shapes import class_names

    return f"{label:02d}-{class_names()[label].replace(' ', '-')}.png"


def redraw(args: argparse.Namespace) -> None:
    """The figure again from a results JSON and the images saved beside it, without generating."""
    from PIL import Image

    result = json.loads(args.json.read_text())
    folder = args.images or args.runs / "images"
    images = [Image.open(folder / image_name(row["class"])).convert("RGB") for row in result["per_prompt"]]
    draw_grid(result["per_prompt"], images, args.figure,
              grid_title(result["prompts"], result["results"]["generation_judge"]))
    print(f"wrote {args.figure} from {args.json} and {folder}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="generator: a run directory or checkpoint (default: train seed 0)")
    parser.add_argument("--judge", help="judge: a run directory or checkpoint (default: train seed 1)")
    parser.add_argument("--clean-judge", help="clean judge: a run directory or checkpoint (default: train seed 1)")
    parser.add_argument("--generator-steps", type=int, default=STEPS,
                        help=f"steps when training the generator (default: {STEPS})")
    parser.add_argument("--generator-noise", type=float, default=NOISE,
                        help=f"--image-noise when training the generator model (default: {NOISE})")
    parser.add_argument("--judge-steps", type=int, default=STEPS,
                        help=f"steps when training the judge (default: {STEPS})")
    parser.add_argument(
        "--judge-noise", type=float, default=NOISE, help=f"--image-noise when training the judge (default: {NOISE})"
    )
    parser.add_argument(
        "--clean-judge-steps",
        type=int,
        default=CLEAN_JUDGE_STEPS,
        help=f"steps when training the clean judge (default: {CLEAN_JUDGE_STEPS}; 0: no clean judge)",
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-generate", help="where to train")
    parser.add_argument("--fresh", action="store_true", help="train the models again even if they are there")
    parser.add_argument(
        "--prompts",
        type=int,
        default=64,
        help="generate for this many of the 64 prompts (default: all; reranking always covers all)",
    )
    parser.add_argument("--steps", type=int, default=200, help="generation steps (default: 200)")
    parser.add_argument("--cutouts", type=int, default=16, help="cutouts per step (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    parser.add_argument(
        "--best-of",
        type=int,
        default=BEST_OF,
        help=f"starts per prompt; the generator keeps the one it scores highest (default: {BEST_OF})",
    )
    parser.add_argument(
        "--negative-weight",
        type=float,
        default=NEGATIVE_WEIGHT,
        help=f"weight of the negative prompts, the other 63 classes (0: none; default: {NEGATIVE_WEIGHT})",
    )
    parser.add_argument("--lr", type=float, default=0.02, help="generation learning rate (default: 0.02)")
    parser.add_argument("--tv", type=float, default=5.0, help="total-variation weight (default: 5)")
    parser.add_argument(
        "--noise",
        type=float,
        default=NOISE,
        help=f"std of the cutouts' pixel noise (default: {NOISE}, the generator's training noise)",
    )
    parser.add_argument(
        "--cut-scale",
        type=float,
        nargs=2,
        default=(0.6, 1.0),
        metavar=("LOW", "HIGH"),
        help="range of the cutouts' side, a fraction of the image side (default: 0.6 1.0)",
    )
    parser.add_argument(
        "--size", type=int, default=0, help="side of the generated image (default: 0, the model's input size)"
    )
    parser.add_argument("--decay", type=float, default=2.0, help="spectrum decay of the parameterisation (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_generate.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "generate_grid.png")
    parser.add_argument("--images", type=Path, default=None, help="where to save the images (default: RUNS/images)")
    parser.add_argument(
        "--redraw", action="store_true", help="only draw the figure again, from --json and the images in --images"
    )
    args = parser.parse_args(argv)
    if args.redraw:
        redraw(args)
        return

    import torch

    from clipforge.checkpoints import load
    from clipforge.data.shapes import class_names
    from clipforge.generate import GenerateConfig, generate
    from clipforge.score import clip_score, rerank

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model_path = (
        resolve(args.model)
        if args.model
        else train_or_reuse(0, args.generator_steps, args.runs, fresh=args.fresh, image_noise=args.generator_noise)
    )
    judge_path = (
        resolve(args.judge)
        if args.judge
        else train_or_reuse(1, args.judge_steps, args.runs, fresh=args.fresh, image_noise=args.judge_noise)
    )
    clean_path = None
    if args.clean_judge:
        clean_path = resolve(args.clean_judge)
    elif args.clean_judge_steps:
        clean_path = train_or_reuse(1, args.clean_judge_steps, args.runs, fresh=args.fresh)
    train_seconds = time.perf_counter() - start
    model, preprocess, tokenizer = load(model_path)
    judge, judge_preprocess, judge_tokenizer = load(judge_path)
    names = class_names()
    chosen = pick_prompts(args.prompts)
    classes = tuple(f"a {name}" for name in names)  # the prompts, and each prompt's negatives (generate leaves it out)
    config = GenerateConfig(
        steps=args.steps,
        cutouts=args.cutouts,
        lr=args.lr,
        tv=args.tv,
        noise=args.noise,
        cut_scale=tuple(args.cut_scale),
        decay=args.decay,
        size=args.size,
        seed=args.seed,
        best_of=args.best_of,
        negatives=classes if args.negative_weight > 0 else (),
        negative_weight=args.negative_weight,
    )
    image_dir = args.images or args.runs / "images"
    image_dir.mkdir(parents=True, exist_ok=True)

    # 1. Generation, judged by the other model.
    start = time.perf_counter()
    images, rows = [], []
    for number, label in enumerate(chosen, 1):
        prompt = classes[label]
        result = generate(model, tokenizer, prompt, config=config, progress=False)
        result.image.save(image_dir / image_name(label))
        own = clip_score(model, [preprocess(result.image)], [prompt], tokenizer=tokenizer, progress=False)
        other = clip_score(judge, [judge_preprocess(result.image)], [prompt], tokenizer=judge_tokenizer, progress=False)
        images.append(result.image)
        rows.append(
            {
                "prompt": prompt,
                "class": label,
                "model_clip_score": own.mean,
                "judge_clip_score": other.mean,
                "loss_first": result.losses[0],
                "loss_last": result.losses[-1],
                "seed_kept": result.seed,
                "final_cosine_by_start": [round(c, 6) for c in result.cosines],
            }
        )
        print(f"[{number}/{len(chosen)}] {prompt}: CLIP-S {own.mean:.3f} (model), {other.mean:.3f} (judge)", flush=True)
    generate_seconds = time.perf_counter() - start
    # Each model classifies the generated images and, in the same pass, 8 real images of each
    # prompted class: a judge's rate on those is what a generator that drew each prompt as
    # shapes:// does would be judged right on, the ceiling of its generation rate.
    real_labels = [label for label in chosen for _ in range(REAL_PER_PROMPT)]
    real = [real_image(label, draw) for label in chosen for draw in range(REAL_PER_PROMPT)]
    judge_all = classify(judge, judge_preprocess, judge_tokenizer, images + real)
    model_all = classify(model, preprocess, tokenizer, images + real)
    judged, own_view = judge_all[: len(images)], model_all[: len(images)]
    for row, j, m in zip(rows, judged, own_view):
        row |= {"judge_class": j, "judge_says": names[j], "model_class": m}
    generation = rates(judged, chosen)
    self_rates = rates(own_view, chosen)
    judge_real = rates(judge_all[len(images) :], real_labels)
    model_real = rates(model_all[len(images) :], real_labels)
    clean: dict[str, Any] = {}
    if clean_path is not None:
        clean_model, clean_preprocess, clean_tokenizer = load(clean_path)
        clean_all = classify(clean_model, clean_preprocess, clean_tokenizer, images + real)
        for row, c in zip(rows, clean_all[: len(images)]):
            row["clean_judge_class"] = c
        clean = {
            "generation_clean_judge": rates(clean_all[: len(images)], chosen),
            "real_images_clean_judge": rates(clean_all[len(images) :], real_labels),
        }

    # 2. Reranking 16 candidates for every prompt (all 64: it is cheap) with the generator model
    # and, for comparison, the judge.
    top_model, top_judge = [], []
    for label in range(64):
        pool, labels = candidates(label)
        for scorer, scorer_pre, scorer_tok, tops in (
            (model, preprocess, tokenizer, top_model),
            (judge, judge_preprocess, judge_tokenizer, top_judge),
        ):
            ranking = rerank(
                scorer, [scorer_pre(image) for image in pool], classes[label], tokenizer=scorer_tok, progress=False
            )
            tops.append(labels[ranking[0][0]] == label)
    rerank_rate = sum(top_model) / 64
    rerank_judge = sum(top_judge) / 64

    count = len(chosen)
    table = [
        ("generation: judge sees colour and shape", generation["colour_and_shape"]),
        ("generation: judge sees the colour", generation["colour"]),
        ("generation: judge sees the shape", generation["shape"]),
        ("generation: generator sees colour and shape (own images)", self_rates["colour_and_shape"]),
        (f"real images ({REAL_PER_PROMPT} per prompt): judge right (the ceiling)", judge_real["colour_and_shape"]),
        (f"real images ({REAL_PER_PROMPT} per prompt): generator right", model_real["colour_and_shape"]),
    ]
    if clean:
        table += [
            ("generation: clean judge sees colour and shape", clean["generation_clean_judge"]["colour_and_shape"]),
            ("generation: clean judge sees the shape", clean["generation_clean_judge"]["shape"]),
            (
                f"real images ({REAL_PER_PROMPT} per prompt): clean judge right",
                clean["real_images_clean_judge"]["colour_and_shape"],
            ),
        ]
    table += [
        ("rerank 16: generator's first image matches", rerank_rate),
        ("rerank 16: judge's first image matches", rerank_judge),
    ]
    print(
        f"\n{count} prompts; generator {model_path}; judge {judge_path}; clean judge {clean_path}; "
        f"best of {args.best_of} starts of {args.steps} steps × {args.cutouts} cutouts; negative weight "
        f"{args.negative_weight}"
    )
    width = max(len(name) for name, _ in table)
    print(f"{'measure'.ljust(width)}  rate   count")
    for name, value in table:
        total = 64 if name.startswith("rerank") else count * REAL_PER_PROMPT if name.startswith("real") else count
        print(f"{name.ljust(width)}  {value:.3f}  {round(value * total):>2}/{total}")
    mean_model = sum(r["model_clip_score"] for r in rows) / count
    mean_judge = sum(r["judge_clip_score"] for r in rows) / count
    print(
        f"mean CLIP-S of the generated images: {mean_model:.3f} (generator), {mean_judge:.3f} (judge); "
        f"generation {generate_seconds / count:.1f} s per prompt"
    )

    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": cpu_record(),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "torch_threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "generate_seconds": round(generate_seconds, 1),
    }
    result = {
        "meta": meta,
        "model": str(model_path),
        "judge": str(judge_path),
        "clean_judge": None if clean_path is None else str(clean_path),
        "prompts": count,
        "generate_config": config.to_dict(),
        "results": {
            "generation_judge": generation,
            "generation_self": self_rates,
            "real_images_judge": judge_real,
            "real_images_model": model_real,
            **clean,
            "rerank_top1_model": rerank_rate,
            "rerank_top1_judge": rerank_judge,
            "mean_clip_score_model": mean_model,
            "mean_clip_score_judge": mean_judge,
        },
        "per_prompt": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    draw_grid(rows, images, args.figure, grid_title(count, generation))
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
