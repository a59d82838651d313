"""``clipforge eval zeroshot|retrieval``: benchmarks whose JSON follows CLIP_benchmark's result schema.

The JSON written by ``--out`` is CLIP_benchmark's (``clip_benchmark/cli.py``)::

    {"dataset": ..., "model": ..., "pretrained": ..., "task": "zeroshot_classification",
     "metrics": {...}, "language": "en", "clipforge": {...}}

``metrics`` holds exactly the keys CLIP_benchmark writes for the task (``acc1``, ``acc5``,
``mean_per_class_recall``; ``image_retrieval_recall@k``, ``text_retrieval_recall@k``), so tools
that read its results read these; an undefined value is ``null``.  Everything else sits under
``clipforge``: the library's full metrics dict (ranks, per-class accuracy, confusion matrix),
skipped images, counts, device, precision and timings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from clipforge.cli._common import (
    Clock,
    CommandError,
    fmt,
    load_model_for_command,
    model_options,
    skipped_report,
    table,
    write_json,
)

__all__ = ["add_parser", "model_options", "run_retrieval", "run_zeroshot"]

def add_parser(subparsers: Any) -> None:
    """Registers ``eval zeroshot`` and ``eval retrieval``."""
    parser = subparsers.add_parser("eval", help="zero-shot classification and retrieval benchmarks")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)

    zeroshot = tasks.add_parser("zeroshot", help="zero-shot classification of a labelled image folder")
    _common_options(zeroshot, data_help="imagefolder:DIR (one sub-folder per class)")
    zeroshot.add_argument("--classnames", metavar="FILE", help="class names: a JSON list in class-index order, "
                          "a JSON object folder name → class name, or a text file with one name per line "
                          "(default: the folder names)")
    zeroshot.add_argument("--templates", metavar="NAME|FILE", default="default",
                          help="a shipped template set (default, single) or a JSON template file (default: default)")
    zeroshot.add_argument("--topk", metavar="K", type=int, nargs="+", default=[1, 5],
                          help="top-k accuracies (default: 1 5)")
    zeroshot.set_defaults(func=run_zeroshot)

    retrieval = tasks.add_parser("retrieval", help="image→text and text→image retrieval over captioned images")
    _common_options(retrieval, data_help="csv:FILE or jsonl:FILE (image path and caption per row)")
    retrieval.add_argument("--recall-k", metavar="K", type=int, nargs="+", default=[1, 5, 10],
                           help="k of each recall@k (default: 1 5 10)")
    retrieval.add_argument("--block-size", type=int, default=4096, help="score tile side (default: 4096)")
    retrieval.add_argument("--image-key", help="image path column (default: filepath, image, ...)")
    retrieval.add_argument("--caption-key", help="caption column (default: title, caption, ...)")
    retrieval.add_argument("--csv-separator",
                           help="CSV separator: tab, comma or one character (default: tab if the header has one)")
    retrieval.set_defaults(func=run_retrieval)


def _common_options(parser: argparse.ArgumentParser, *, data_help: str) -> None:
    parser.add_argument("--data", required=True, help=data_help)
    model_options(parser, workers=4)
    parser.add_argument("--dataset-name", help="the JSON's dataset field (default: the --data value)")
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON (CLIP_benchmark's schema)")


def _open(uri: str, kind: type, task: str, **options: Any) -> Any:
    from clipforge.data import open_data

    source = open_data(uri, **options)
    if not isinstance(source, kind):
        raise CommandError(f"eval {task} cannot use {uri!r}: it gives a {type(source).__name__}, not a {kind.__name__}")
    return source


def _result(args: argparse.Namespace, setup: dict[str, Any], task: str, metrics: dict, extra: dict) -> dict[str, Any]:
    from clipforge import __version__

    extra = {"version": __version__, "data": args.data, "device": setup["device"],
             "precision": setup["precision"], **extra}
    return {
        "dataset": args.dataset_name or args.data,
        "model": setup["model"],
        "pretrained": setup["pretrained"],
        "task": task,
        "metrics": metrics,
        "language": "en",
        "clipforge": extra,
    }


def _headline(task: str, args: argparse.Namespace, setup: dict[str, Any]) -> str:
    model = f"model {setup['model']} ({setup['pretrained']})"
    return f"eval {task}  {args.data}  {model}  {setup['device']} {setup['precision']}"


# ----------------------------------------------------------------------------- zero-shot


def _read_classnames(path: str, folders: list[str]) -> list[str]:
    """Class names from --classnames, checked against the folder's classes."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CommandError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
        if isinstance(data, dict):
            missing = [f for f in folders if f not in data]
            if missing:
                raise CommandError(f"{path}: no class name for folder(s) {missing[:5]}")
            names = [data[f] for f in folders]
        elif isinstance(data, list):
            names = data
        else:
            raise CommandError(f"{path}: expected a JSON list or object, got {type(data).__name__}")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [i for i, n in enumerate(names) if not isinstance(n, str) or not n.strip()]
    if bad:
        raise CommandError(f"{path}: class name {bad[0]} is empty or not a string ({names[bad[0]]!r})")
    if len(names) != len(folders):
        raise CommandError(f"{path}: {len(names)} class names for {len(folders)} class folders")
    return names


def run_zeroshot(args: argparse.Namespace) -> int:
    """``clipforge eval zeroshot --model M --data imagefolder:DIR [--out FILE]``: prints a table
    of top-k accuracies and mean per-class recall, with the number of images skipped."""
    from clipforge.data import ImageFolder
    from clipforge.data.images import describe_skipped
    from clipforge.embed import embed_images
    from clipforge.templates import load_templates
    from clipforge.zeroshot import (
        build_zeroshot_classifier,
        classification_metrics,
        expand_prompts,
        zeroshot_logits,
    )

    clock = Clock()
    model, preprocess, tokenizer, setup = load_model_for_command(args)
    folder = _open(args.data, ImageFolder, "zeroshot")
    classnames = _read_classnames(args.classnames, folder.classes) if args.classnames else folder.classes
    try:
        templates = load_templates(args.templates)
        prompts, _ = expand_prompts(classnames, templates)
    except ValueError as err:
        raise CommandError(str(err)) from err
    clock.lap("load")
    options = {"batch_size": args.batch_size, "device": setup["device"], "autocast_dtype": setup["autocast_dtype"],
               "progress": not args.quiet}
    classifier = build_zeroshot_classifier(model, tokenizer, classnames, templates, **options)
    clock.lap("classifier")
    loader = folder.images(preprocess, batch_size=args.batch_size, num_workers=args.workers)
    features = embed_images(model, loader, **options)
    clock.lap("images")
    targets = torch.tensor([folder.targets[i] for i in loader.kept])
    metrics = classification_metrics(zeroshot_logits(features, classifier), targets, ks=args.topk)
    clock.lap("metrics")

    topk = {f"acc{k}": metrics[f"acc{k}"] for k in args.topk}
    benchmark = {**topk, "mean_per_class_recall": metrics["mean_per_class_recall"]}
    full = {**metrics, "per_class_accuracy": dict(zip(classnames, metrics["per_class_accuracy"]))}
    extra = {"images": len(folder), "images_evaluated": len(loader.kept), **skipped_report(loader),
             "classes": classnames, "templates": args.templates, "prompts": len(prompts),
             "metrics": full, "timings_s": clock.timings()}
    print(_headline("zeroshot", args, setup))
    print(f"{len(loader.kept)} of {len(folder)} images, {len(classnames)} classes, {len(prompts)} prompts; "
          f"{describe_skipped(loader.skipped)}")
    print(table(["metric", "value"], [[k, fmt(v)] for k, v in benchmark.items()]))
    print(f"time {clock.timings()['total']:.1f}s")
    write_json(args.out, _result(args, setup, "zeroshot_classification", benchmark, extra))
    return 0


# ----------------------------------------------------------------------------- retrieval


def run_retrieval(args: argparse.Namespace) -> int:
    """``clipforge eval retrieval --model M --data csv:FILE|jsonl:FILE [--out FILE]``: prints a
    table of recall@k, mean and median rank in both directions, with the images skipped."""
    from clipforge.data import CaptionSet
    from clipforge.data.images import describe_skipped
    from clipforge.embed import embed_images, embed_texts
    from clipforge.retrieval import retrieval_metrics

    clock = Clock()
    model, preprocess, tokenizer, setup = load_model_for_command(args)
    options = {"image_key": args.image_key, "caption_key": args.caption_key}
    if args.csv_separator is not None:
        options["sep"] = args.csv_separator
    pairs = _open(args.data, CaptionSet, "retrieval", **options)
    clock.lap("load")
    run = {"batch_size": args.batch_size, "device": setup["device"], "autocast_dtype": setup["autocast_dtype"],
           "progress": not args.quiet}
    loader = pairs.images(preprocess, batch_size=args.batch_size, num_workers=args.workers)
    image_features = embed_images(model, loader, **run)
    kept = pairs.select_images(loader.kept)  # captions of unreadable images go with them
    clock.lap("images")
    text_features = embed_texts(model, tokenizer, kept.captions, **run)
    clock.lap("texts")
    metrics = retrieval_metrics(image_features, text_features, kept.text_to_image, ks=args.recall_k,
                                block_size=args.block_size)
    clock.lap("metrics")

    benchmark: dict[str, float | None] = {}
    for k in args.recall_k:  # CLIP_benchmark's names: "image retrieval" is text→image
        benchmark[f"image_retrieval_recall@{k}"] = metrics[f"text_to_image_R@{k}"]
        benchmark[f"text_retrieval_recall@{k}"] = metrics[f"image_to_text_R@{k}"]
    extra = {"images": len(pairs.image_paths), "images_evaluated": len(kept.image_paths), **skipped_report(loader),
             "captions": len(pairs.captions), "captions_evaluated": len(kept.captions),
             "empty_captions_skipped": pairs.empty_captions, "metrics": metrics, "timings_s": clock.timings()}
    print(_headline("retrieval", args, setup))
    print(f"{len(kept.image_paths)} of {len(pairs.image_paths)} images, {len(kept.captions)} captions; "
          f"{describe_skipped(loader.skipped)}; {pairs.empty_captions} empty caption(s) skipped")
    directions = ("text_to_image", "image_to_text")
    rows = [[f"R@{k}", *(fmt(metrics[f"{d}_R@{k}"]) for d in directions)] for k in args.recall_k]
    for name in ("mean_rank", "median_rank"):
        rows.append([name.replace("_", " "), *(f"{metrics[f'{d}_{name}']:.2f}" for d in directions)])
    print(table(["metric", "text→image", "image→text"], rows))
    print(f"time {clock.timings()['total']:.1f}s")
    write_json(args.out, _result(args, setup, "zeroshot_retrieval", benchmark, extra))
    return 0
