"""``clipforge eval zeroshot|retrieval|linear-probe``: benchmarks whose JSON follows CLIP_benchmark's result schema.

The work is `clipforge.evaluate`'s, the one evaluation path the trainer's evaluation runs too.
The JSON written by ``--out`` is CLIP_benchmark's (``clip_benchmark/cli.py``)::

    {"dataset": ..., "model": ..., "pretrained": ..., "task": "zeroshot_classification",
     "metrics": {...}, "language": "en" ("cn" for Chinese prompts), "clipforge": {...}}

``metrics`` holds exactly the keys CLIP_benchmark writes for the task (``acc1``, ``acc5``,
``mean_per_class_recall``; ``image_retrieval_recall@k``, ``text_retrieval_recall@k``; for the
linear probe ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``, ``weight_decay``, ``epochs``,
``seed``, ``fewshot_k``, ``normalized``), so tools that read its results read these; an
undefined value is ``null``.  Everything else sits under
``clipforge``: the library's full metrics dict (ranks, per-class accuracy, confusion matrix),
skipped images, counts, device, precision and timings.

``eval zeroshot --predictions FILE.csv`` writes each image's true and predicted class with their
probabilities, as the model's family defines them (`clipforge.zeroshot.zeroshot_probabilities`):
per-class sigmoids for SigLIP, a softmax over the classes for CLIP.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from clipforge.cli._common import (
    Clock,
    CommandError,
    check_output,
    fmt,
    load_model_for_command,
    model_options,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    read_text_file,
    run_options,
    skipped_report,
    table,
    write_json,
)

__all__ = ["add_parser", "run_linear_probe", "run_retrieval", "run_zeroshot"]

LABELLED_DATA = "imagefolder:DIR (one sub-folder per class), shapes://?split=seen|heldout, digits://?split=train|test"


def add_parser(subparsers: Any) -> None:
    """Registers ``eval zeroshot``, ``eval retrieval`` and ``eval linear-probe``."""
    parser = subparsers.add_parser("eval", help="zero-shot classification, retrieval and linear-probe benchmarks")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)

    zeroshot = tasks.add_parser("zeroshot", help="zero-shot classification of labelled images")
    _common_options(zeroshot, data_help="labelled images: imagefolder:DIR (one sub-folder per class), "
                    "shapes://?split=seen|heldout, digits://?split=test")
    zeroshot.add_argument("--classnames", metavar="FILE", help="class names: a JSON list in class-index order, "
                          "a JSON object class (folder) name → class name, or a text file with one name per line "
                          "(default: the data's, e.g. the folder names)")
    zeroshot.add_argument("--templates", metavar="NAME|FILE",
                          help="a shipped template set (English: default, single; Chinese: zh, zh-single) or a JSON "
                          "template file (default: the data's own prompts, as shapes:// and digits:// have; "
                          "else default)")
    zeroshot.add_argument("--topk", metavar="K", type=positive_int, nargs="+", default=[1, 5],
                          help="top-k accuracies (default: 1 5)")
    zeroshot.add_argument("--predictions", metavar="FILE.csv",
                          help="write each image's predicted class and probabilities as CSV: per-class sigmoids "
                          "for a SigLIP model (a row need not sum to 1), a softmax over the classes for CLIP")
    zeroshot.set_defaults(func=run_zeroshot)

    retrieval = tasks.add_parser("retrieval", help="image→text and text→image retrieval over captioned images")
    _common_options(retrieval, data_help="captioned images: csv:FILE or jsonl:FILE (image path and caption per "
                    "row), pairs:DIR (name.jpg + name.txt), shapes://?split=val, digits://?split=test")
    retrieval.add_argument("--recall-k", metavar="K", type=positive_int, nargs="+", default=[1, 5, 10],
                           help="k of each recall@k (default: 1 5 10)")
    retrieval.add_argument("--block-size", type=positive_int, default=4096, help="score tile side (default: 4096)")
    retrieval.add_argument("--image-key", help="csv/jsonl: image path column (default: filepath, image, ...)")
    retrieval.add_argument("--caption-key", help="csv/jsonl: caption column (default: title, caption, ...)")
    retrieval.add_argument("--csv-separator",
                           help="CSV separator: tab, comma or one character (default: tab if the header has one)")
    retrieval.set_defaults(func=run_retrieval)
    _linear_probe_parser(tasks)


def _common_options(parser: argparse.ArgumentParser, *, data_help: str) -> None:
    parser.add_argument("--data", required=True, help=data_help)
    model_options(parser, workers=4)
    parser.add_argument("--limit", metavar="N", type=positive_int,
                        help="evaluate the first N images only (default: all); the trainer's eval_samples")
    parser.add_argument("--dataset-name", help="the JSON's dataset field (default: the --data value)")
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON (CLIP_benchmark's schema)")


def _language(*texts: Any) -> str:
    """CLIP_benchmark's ``language`` of prompts and class names: "cn" when they hold Chinese
    characters (its code for Chinese), else "en"."""
    blob = json.dumps(texts, ensure_ascii=False, default=str)
    return "cn" if any("\u3400" <= ch <= "\u9fff" for ch in blob) else "en"


def _result(args: argparse.Namespace, setup: dict[str, Any], task: str, metrics: dict, extra: dict,
            language: str = "en") -> dict[str, Any]:
    from clipforge import __version__

    data = args.data if args.data is not None else {"train": args.train, "test": args.test}
    extra = {"version": __version__, "data": data, "device": setup["device"], "precision": setup["precision"], **extra}
    return {
        "dataset": args.dataset_name or args.data or args.test,
        "model": setup["model"],
        "pretrained": setup["pretrained"],
        "task": task,
        "metrics": metrics,
        "language": language,
        "clipforge": extra,
    }


def _headline(task: str, args: argparse.Namespace, setup: dict[str, Any]) -> str:
    model = f"model {setup['model']} ({setup['pretrained']})"
    data = args.data if args.data is not None else f"{args.train} → {args.test}"
    return f"eval {task}  {data}  {model}  {setup['device']} {setup['precision']}"


def _run_options(args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    return {**run_options(args, setup), "limit": args.limit, "workers": args.workers}


# ----------------------------------------------------------------------------- zero-shot


def _read_classnames(path: str, classes: list[str], *, what: str) -> list[str]:
    """Class names from --classnames, checked against the data's ``classes`` (``what`` they are)."""
    text = read_text_file(path, option="--classnames")
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CommandError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
        if isinstance(data, dict):
            missing = [c for c in classes if c not in data]
            if missing:
                raise CommandError(f"{path}: no class name for {what}(s) {missing[:5]}")
            names = [data[c] for c in classes]
        elif isinstance(data, list):
            names = data
        else:
            raise CommandError(f"{path}: expected a JSON list or object, got {type(data).__name__}")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [i for i, n in enumerate(names) if not isinstance(n, str) or not n.strip()]
    if bad:
        raise CommandError(f"{path}: class name {bad[0]} is empty or not a string ({names[bad[0]]!r})")
    if len(names) != len(classes):
        raise CommandError(f"{path}: {len(names)} class names for {len(classes)} {what}s")
    return names


def run_zeroshot(args: argparse.Namespace) -> int:
    """``clipforge eval zeroshot --model M --data imagefolder:DIR|shapes://?split=heldout [--out FILE]``:
    prints a table of top-k accuracies and mean per-class recall, with the number of images skipped."""
    from clipforge.data import ImageFolder
    from clipforge.data.images import describe_skipped
    from clipforge.evaluate import evaluate_zeroshot, open_eval_source
    from clipforge.templates import load_templates
    from clipforge.zeroshot import expand_prompts, is_sigmoid_model

    clock = Clock()
    check_output(args.out, option="--out")
    check_output(args.predictions, option="--predictions")
    if args.predictions and not args.predictions.lower().endswith(".csv"):
        raise CommandError(f"--predictions {args.predictions}: write a .csv file")
    model, preprocess, tokenizer, setup = load_model_for_command(args)
    source = open_eval_source(args.data, "zeroshot")
    what = "class folder" if isinstance(source, ImageFolder) else "class"
    classnames = _read_classnames(args.classnames, list(source.classnames), what=what) if args.classnames else None
    try:
        templates = load_templates(args.templates) if args.templates else None
        if templates is not None:  # a mapping may lack a class: say so before loading any image
            expand_prompts(classnames or list(source.classnames), templates)
    except UnicodeDecodeError as err:
        raise CommandError(f"--templates {args.templates}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except ValueError as err:
        raise CommandError(str(err)) from err
    clock.lap("load")
    result = evaluate_zeroshot(model, preprocess, tokenizer, source, templates=templates, classnames=classnames,
                               ks=args.topk, probabilities=bool(args.predictions), **_run_options(args, setup))
    clock.laps.update(result.timings_s)

    metrics = result.metrics
    topk = {f"acc{k}": metrics[f"acc{k}"] for k in args.topk}
    benchmark = {**topk, "mean_per_class_recall": metrics["mean_per_class_recall"]}
    full = {**metrics, "per_class_accuracy": dict(zip(result.classnames, metrics["per_class_accuracy"]))}
    template_name = args.templates or ("default" if source.templates is None else "the data's own")
    extra = {"images": result.images, "images_evaluated": result.images_evaluated, **skipped_report(result),
             "classes": result.classnames, "templates": template_name, "prompts": result.prompts,
             "metrics": full, "timings_s": clock.timings()}
    print(_headline("zeroshot", args, setup))
    print(f"{result.images_evaluated} of {result.images} images, {len(result.classnames)} classes, "
          f"{result.prompts} prompts; {describe_skipped(result.skipped)}")
    print(table(["metric", "value"], [[k, fmt(v)] for k, v in benchmark.items()]))
    print(f"time {clock.timings()['total']:.1f}s")
    language = _language(templates, result.classnames)
    write_json(args.out, _result(args, setup, "zeroshot_classification", benchmark, extra, language))
    if args.predictions:
        _write_predictions(args.predictions, result, source, sigmoid=is_sigmoid_model(model))
    return 0


def _write_predictions(path: str, result: Any, source: Any, *, sigmoid: bool) -> None:
    """One CSV row per image evaluated: its name (the file, relative to an image folder's root, else
    its index in the source), true and predicted class, and the probabilities of both."""
    import csv
    from pathlib import Path

    paths, root = getattr(source, "paths", None), getattr(source, "root", None)

    def name(index: int) -> str:
        if paths is None:
            return str(index)
        file = Path(paths[index])
        return file.relative_to(root).as_posix() if root is not None and file.is_relative_to(root) else str(file)

    probs = result.probabilities
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "label", "predicted", "probability", "label_probability"])
        for row, (index, label) in enumerate(zip(result.kept, result.targets)):
            predicted = int(probs[row].argmax())
            writer.writerow([name(index), result.classnames[label], result.classnames[predicted],
                             f"{float(probs[row, predicted]):.6g}", f"{float(probs[row, label]):.6g}"])
    kind = "per-class sigmoids, a SigLIP model's: rows need not sum to 1" if sigmoid else "a softmax over the classes"
    print(f"wrote {out} ({kind})")


# ----------------------------------------------------------------------------- retrieval


def run_retrieval(args: argparse.Namespace) -> int:
    """``clipforge eval retrieval --model M --data csv:FILE|jsonl:FILE|pairs:DIR|shapes://?split=val [--out FILE]``:
    prints a table of recall@k, mean and median rank in both directions, with the images skipped."""
    from clipforge.data.images import describe_skipped
    from clipforge.evaluate import evaluate_retrieval, open_eval_source

    clock = Clock()
    check_output(args.out, option="--out")
    model, preprocess, tokenizer, setup = load_model_for_command(args)
    options = {"image_key": args.image_key, "caption_key": args.caption_key, "sep": args.csv_separator}
    source = open_eval_source(args.data, "retrieval", **options)  # None options are left out
    clock.lap("load")
    result = evaluate_retrieval(model, preprocess, tokenizer, source, ks=args.recall_k, block_size=args.block_size,
                                **_run_options(args, setup))
    clock.laps.update(result.timings_s)

    metrics = result.metrics
    benchmark: dict[str, float | None] = {}
    for k in args.recall_k:  # CLIP_benchmark's names: "image retrieval" is text→image
        benchmark[f"image_retrieval_recall@{k}"] = metrics[f"text_to_image_R@{k}"]
        benchmark[f"text_retrieval_recall@{k}"] = metrics[f"image_to_text_R@{k}"]
    extra = {"images": result.images, "images_evaluated": result.images_evaluated, **skipped_report(result),
             "captions": result.captions, "captions_evaluated": result.captions_evaluated,
             "empty_captions_skipped": result.captions_skipped, "metrics": metrics, "timings_s": clock.timings()}
    print(_headline("retrieval", args, setup))
    print(f"{result.images_evaluated} of {result.images} images, {result.captions_evaluated} captions; "
          f"{describe_skipped(result.skipped)}; {result.captions_skipped} empty caption(s) skipped")
    directions = ("text_to_image", "image_to_text")
    rows = [[f"R@{k}", *(fmt(metrics[f"{d}_R@{k}"]) for d in directions)] for k in args.recall_k]
    for name in ("mean_rank", "median_rank"):
        rows.append([name.replace("_", " "), *(f"{metrics[f'{d}_{name}']:.2f}" for d in directions)])
    print(table(["metric", "text→image", "image→text"], rows))
    print(f"time {clock.timings()['total']:.1f}s")
    write_json(args.out, _result(args, setup, "zeroshot_retrieval", benchmark, extra))
    return 0


# ----------------------------------------------------------------------------- linear probe


def _open_fraction(text: str) -> float:
    """A number strictly between 0 and 1: a share of each class that leaves some on both sides."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _linear_probe_parser(tasks: Any) -> None:
    probe = tasks.add_parser(
        "linear-probe", help="a linear classifier on the model's frozen image features (CLIP_benchmark's linear_probe)",
        description="Fits a linear classifier on the model's frozen, L2-normalised image features and scores it on "
        "test images, by CLIP_benchmark's method (its --task linear_probe) and with its defaults: one linear layer "
        "trained with AdamW, learning rate 0.1 on a cosine schedule without warm-up, 10 epochs in batches of 64. "
        "The weight decay is fixed (default 0, CLIP_benchmark's when it has no validation set) or, with "
        "--val-proportion, searched on a validation share of the training images over CLIP_benchmark's grid of "
        "97 values from 1e-6 to 1e2, after which the classifier is refitted on all the training images. Where it "
        "differs: the validation share is stratified (theirs is a plain random split) and the classifier trains in "
        "float32 (theirs under CUDA fp16 autocast). The test images come from --test, or from a seeded stratified "
        "split of --data (--split).")
    probe.add_argument("--train", metavar="URI", help=f"training images: {LABELLED_DATA}")
    probe.add_argument("--test", metavar="URI", help="test images, with the training images' class names")
    probe.add_argument("--data", metavar="URI", help="one labelled source instead of --train and --test: --split "
                       "holds out a share of each class for testing")
    probe.add_argument("--split", metavar="F", type=_open_fraction,
                       help="with --data: the share of each class held out for testing, e.g. 0.2")
    probe.add_argument("--seed", type=non_negative_int, default=0,
                       help="seeds the split, the validation share, the classifier's initialisation and its batch "
                       "order (default: 0)")
    model_options(probe, workers=4)
    probe.add_argument("--lr", type=positive_float, default=0.1, help="AdamW learning rate (default: 0.1)")
    probe.add_argument("--epochs", type=positive_int, default=10,
                       help="passes over the training features (default: 10)")
    probe.add_argument("--probe-batch-size", metavar="N", type=positive_int, default=64,
                       help="features per classifier step (default: 64); --batch-size is images per forward pass")
    decay = probe.add_mutually_exclusive_group()
    decay.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay (default: 0)")
    decay.add_argument("--val-proportion", metavar="F", type=_open_fraction,
                       help="search the weight decay on this share of each class of the training images")
    probe.add_argument("--fewshot-k", metavar="K", type=positive_int,
                       help="fit on K training images of each class (default: all of them)")
    probe.add_argument("--dataset-name", help="the JSON's dataset field (default: the --test or --data value)")
    probe.add_argument("--out", metavar="FILE", help="write the results as JSON (CLIP_benchmark's schema)")
    probe.set_defaults(func=run_linear_probe)


def _probe_sources(args: argparse.Namespace) -> None:
    """One line when the data options do not name a training and a test set."""
    if args.data is not None:
        if args.train is not None or args.test is not None:
            raise CommandError("give --train and --test, or --data with --split, not both")
        if args.split is None:
            raise CommandError(f"--data {args.data} needs --split F, the share of each class held out for testing "
                               "(or give --train and --test)")
        return
    if args.split is not None:
        raise CommandError("--split divides the images of --data; with --train, give --test")
    if args.train is None or args.test is None:
        given = "--train" if args.train is not None else "--test" if args.test is not None else None
        raise CommandError(f"{given} needs {'--test' if given == '--train' else '--train'}" if given else
                           "give the images: --train URI --test URI, or --data URI --split F")


def run_linear_probe(args: argparse.Namespace) -> int:
    """``clipforge eval linear-probe --model M --train URI --test URI | --data URI --split F [--out FILE]``:
    prints the data, the classifier's settings and a table of the probe's top-1, top-5 and mean
    per-class recall on the test images."""
    from clipforge.data.images import describe_skipped
    from clipforge.evaluate import evaluate_linear_probe, open_eval_source

    clock = Clock()
    _probe_sources(args)
    check_output(args.out, option="--out")
    train = open_eval_source(args.data or args.train, "linear_probe")  # bad data is named before the model loads
    test = open_eval_source(args.test, "linear_probe") if args.test is not None else None
    model, preprocess, _, setup = load_model_for_command(args, need_tokenizer=False)  # image features only
    clock.lap("load")
    fit = {"lr": args.lr, "epochs": args.epochs, "probe_batch_size": args.probe_batch_size,
           "weight_decay": args.weight_decay, "val_proportion": args.val_proportion, "fewshot_k": args.fewshot_k}
    result = evaluate_linear_probe(model, preprocess, train, test, split=args.split, seed=args.seed, **fit,
                                   **run_options(args, setup), workers=args.workers)
    clock.laps.update(result.timings_s)

    probe, metrics = result.probe, result.metrics
    benchmark = {"lp_acc1": metrics["acc1"], "lp_acc5": metrics["acc5"],
                 "lp_mean_per_class_recall": metrics["mean_per_class_recall"], "weight_decay": probe.weight_decay,
                 "epochs": args.epochs, "seed": args.seed, "fewshot_k": args.fewshot_k or -1, "normalized": True}
    if args.val_proportion is None:
        decay = f"weight decay {probe.weight_decay:g} (fixed)"
    else:
        decay = (f"weight decay {probe.weight_decay:.3g} chosen on a {args.val_proportion:g} validation share "
                 f"({probe.val_size} images, {len(probe.search)} fits)")
    shots = f", {args.fewshot_k} image(s) of each class" if args.fewshot_k else ""
    full = {**metrics, "per_class_accuracy": dict(zip(result.classnames, metrics["per_class_accuracy"]))}
    extra = {"split": result.split, "train_images": result.train_images, "test_images": result.test_images,
             **skipped_report(result), "classes": result.classnames, "lr": args.lr,
             "probe_batch_size": args.probe_batch_size, "val_proportion": args.val_proportion,
             "weight_decay_search": [{"weight_decay": wd, "val_acc1": acc} for wd, acc in probe.search],
             "metrics": full, "timings_s": clock.timings()}
    print(_headline("linear-probe", args, setup))
    if args.data is not None:  # with --train and --test, the headline says where the images come from
        print(result.split)
    print(f"{result.train_images} training and {result.test_images} test images, {len(result.classnames)} classes; "
          f"{describe_skipped(result.skipped)}")
    print(f"linear classifier on normalised features: AdamW lr {args.lr:g} on a cosine schedule, {args.epochs} "
          f"epochs in batches of {args.probe_batch_size}{shots}, {decay}")
    print(table(["metric", "value"], [[k, fmt(benchmark[k])] for k in list(benchmark)[:3]]))
    print(f"time {clock.timings()['total']:.1f}s")
    write_json(args.out, _result(args, setup, "linear_probe", benchmark, extra))
    return 0
