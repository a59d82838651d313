"""``clipforge score`` (CLIPScore, RefCLIPScore) and ``clipforge rerank`` (best-of-N for a prompt).

Caption and reference files are UTF-8 text, one ``IMAGE<TAB>TEXT`` pair per line, IMAGE a
path relative to ``--images`` (``2023/beach.jpg`` for a file in a sub-folder); blank lines and
lines starting with ``#`` are ignored, and a first line ``image<TAB>caption`` (or
``image<TAB>ref``) is a header.  The captions file gives each image one caption (the candidate
scored); the references file may give an image several lines, one per reference caption, and
must give every captioned image at least one.

Bad input follows the rule every command follows (docs/evaluation.md, "Unreadable input"):
the text files are the user's instructions, so a file that is not UTF-8, a line without a tab,
an empty name or text, or a second caption for an image is an error naming the file and line;
an image that is missing, not an image or truncated is skipped, counted and listed (its
references go with it), as ``clipforge eval`` does.  ``rerank --images DIR`` ranks every image
under DIR, sub-folders included (`clipforge.data.folder`).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from clipforge.cli._common import (
    CommandError,
    fmt,
    load_model_for_command,
    model_options,
    positive_float,
    positive_int,
    run_options,
    skipped_report,
    table,
    write_json,
)

__all__ = ["add_parser", "read_pairs", "run_rerank", "run_score"]

SHOWN = 20  # per-image rows printed; --out holds all


def add_parser(subparsers: Any) -> None:
    """Registers ``score`` and ``rerank``."""
    from clipforge.score import CLIP_SCORE_W

    score = subparsers.add_parser("score", help="CLIPScore (and RefCLIPScore) of captioned images")
    model_options(score, workers=0)
    score.add_argument("--images", required=True, metavar="DIR", help="folder the captions file names images in")
    score.add_argument("--captions", required=True, metavar="FILE", help="IMAGE<TAB>CAPTION lines, one per image")
    score.add_argument("--refs", metavar="FILE", help="IMAGE<TAB>REFERENCE lines, one or more per image: "
                       "adds RefCLIPScore")
    score.add_argument("--w", type=positive_float, default=CLIP_SCORE_W,
                       help=f"CLIP-S weight: {CLIP_SCORE_W:g} as in Hessel et al. (default), "
                            "100 for torchmetrics' scale")
    score.add_argument("--out", metavar="FILE", help="write per-image scores: .csv or .json")
    score.set_defaults(func=run_score)

    rerank = subparsers.add_parser("rerank", help="order candidate images by how well they fit a prompt")
    model_options(rerank, workers=0)
    rerank.add_argument("--prompt", required=True, help="the text the images should show")
    rerank.add_argument("--images", required=True, metavar="DIR",
                        help="folder of candidate images, sub-folders included")
    rerank.add_argument("-k", type=positive_int, default=None, help="show the best K (default: all)")
    rerank.add_argument("--out", metavar="FILE", help="write the ranking as JSON")
    rerank.set_defaults(func=run_rerank)


# ----------------------------------------------------------------------------- input files


def read_pairs(path: str, *, several: bool) -> dict[str, list[tuple[int, str]]]:
    """``{image name: [(line, text), ...]}`` from an IMAGE<TAB>TEXT file, in file order;
    ``several`` allows more than one line per image.  Errors name the file and line; whether
    the images exist is the loader's to find (missing ones are skipped, not errors)."""
    from clipforge.data.text import lines, read_text

    text = read_text(path, what="references file" if several else "captions file")
    pairs: dict[str, list[tuple[int, str]]] = {}
    first = True
    for number, line in enumerate(lines(text), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if first and line.strip().lower() in ("image\tcaption", "image\tref", "image\treference"):
            first = False
            continue
        first = False
        name, tab, text = line.partition("\t")
        name, text = name.strip(), text.strip()
        if not tab:
            raise CommandError(f"{path}:{number}: expected IMAGE<TAB>TEXT, found no tab in {line[:60]!r}")
        if not name or not text:
            empty = "image name" if not name else "reference" if several else "caption"
            raise CommandError(f"{path}:{number}: empty {empty}")
        if name in pairs and not several:
            raise CommandError(f"{path}:{number}: a second caption for {name} (first on line {pairs[name][0][0]}); "
                               "one caption per image, references go in --refs")
        pairs.setdefault(name, []).append((number, text))
    if not pairs:
        raise CommandError(f"{path}: no IMAGE<TAB>TEXT line")
    return pairs


# ----------------------------------------------------------------------------- score


def _write_scores(path: str, result: dict[str, Any]) -> None:
    """The per-image rows as CSV, or everything as JSON (`run_score` has checked the suffix)."""
    if not path.lower().endswith(".csv"):
        write_json(path, result)
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = result["per_image"]
    with open(out, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["image"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


def run_score(args: argparse.Namespace) -> int:
    """``clipforge score --model M --images DIR --captions FILE [--refs FILE] [--out FILE]``:
    prints the mean CLIPScore (and RefCLIPScore), then each image's scores; for a SigLIP model also
    its probability that the caption fits, sigmoid(scale·cos + bias)."""
    from clipforge.data import ImageFiles
    from clipforge.data.images import describe_skipped
    from clipforge.score import clip_score, ref_clip_score

    if args.out and not args.out.lower().endswith((".csv", ".json")):
        raise CommandError(f"--out {args.out}: write a .csv or a .json file")
    folder = Path(args.images)
    if not folder.is_dir():
        raise CommandError(f"--images {folder}: no such folder")
    captions = read_pairs(args.captions, several=False)
    names = list(captions)
    texts = [captions[name][0][1] for name in names]
    refs = None
    if args.refs:
        references = read_pairs(args.refs, several=True)
        stray = [(name, lines[0][0]) for name, lines in references.items() if name not in captions]
        if stray:
            raise CommandError(f"{args.refs}:{stray[0][1]}: {stray[0][0]} has no caption in {args.captions}")
        missing = [name for name in names if name not in references]
        if missing:
            raise CommandError(f"{args.refs}: no reference for {missing[0]} (captioned on "
                               f"{args.captions}:{captions[missing[0]][0][0]}); every image needs one")
        refs = [[text for _, text in references[name]] for name in names]

    model, preprocess, tokenizer, setup = load_model_for_command(args)
    # the captioned images, in the captions file's order; missing ones are skipped as unreadable
    images = ImageFiles(folder, [folder / name for name in names], name=f"--images {folder}")
    loader = images.images(preprocess, batch_size=args.batch_size, num_workers=args.workers)
    run = {"tokenizer": tokenizer, "w": args.w, **run_options(args, setup)}
    scores = ref_clip_score(model, loader, texts, refs, **run) if refs else clip_score(model, loader, texts, **run)

    per_image = []
    for j, i in enumerate(scores.kept):
        row = {"image": names[i], "caption": texts[i], "cosine": float(scores.cosine[j]),
               "clip_score": float(scores.clip_score[j])}
        if scores.ref_clip_score is not None and scores.ref_cosine is not None:
            row |= {"ref_cosine": float(scores.ref_cosine[j]), "ref_clip_score": float(scores.ref_clip_score[j])}
        if scores.probability is not None:
            row["probability"] = float(scores.probability[j])
        per_image.append(row)
    means = {"clip_score": scores.mean, "ref_clip_score": scores.ref_mean,
             "torchmetrics_clip_score": scores.torchmetrics_mean}
    print(f"score  {folder}  model {setup['model']} ({setup['pretrained']})  w = {args.w:g}")
    print(f"{len(scores.kept)} of {len(names)} captioned images scored; {describe_skipped(loader.skipped)}")
    rows = [["CLIPScore", fmt(scores.mean)]]
    if refs:
        rows.append(["RefCLIPScore", fmt(scores.ref_mean)])
    rows.append(["torchmetrics CLIPScore (100·cos, mean clamped)", f"{scores.torchmetrics_mean:.2f}"])
    sigmoid = scores.probability is not None
    if sigmoid:  # a SigLIP model: its calibrated probability that the caption fits, sigmoid(scale·cos + bias)
        means["probability"] = float(scores.probability.double().mean())
        rows.append(["P(match), sigmoid(scale·cos + bias)", fmt(means["probability"])])
    print(table(["mean", "value"], rows))
    header = ["image", "cos", "CLIP-S", *(["RefCLIP-S"] if refs else []), *(["P(match)"] if sigmoid else [])]
    lines = [[r["image"], f"{r['cosine']:.4f}", f"{r['clip_score']:.4f}",
              *([f"{r['ref_clip_score']:.4f}"] if refs else []),
              *([f"{r['probability']:.4f}"] if sigmoid else [])] for r in per_image[:SHOWN]]
    print(table(header, lines))
    if len(per_image) > SHOWN:
        print(f"... {len(per_image) - SHOWN} more" + (" in " + args.out if args.out else "; --out FILE writes all"))
    if args.out:
        result = {"model": setup["model"], "pretrained": setup["pretrained"], "images": str(folder),
                  "captions": args.captions, "refs": args.refs, "w": args.w, "mean": means,
                  "images_captioned": len(names), "images_scored": len(scores.kept), **skipped_report(loader),
                  "per_image": per_image}
        _write_scores(args.out, result)
    return 0


# ----------------------------------------------------------------------------- rerank


def run_rerank(args: argparse.Namespace) -> int:
    """``clipforge rerank --model M --prompt TEXT --images DIR [-k N] [--out FILE]``: prints the
    images best first with their cosine and CLIP-S for the prompt, and for a SigLIP model the
    probability that the prompt fits, sigmoid(scale·cos + bias)."""
    import torch

    from clipforge.data import find_images
    from clipforge.data.images import describe_skipped
    from clipforge.score import CLIP_SCORE_W, match_probability, rerank

    if not args.prompt.strip():
        raise CommandError("--prompt is empty")
    images = find_images(args.images, name=f"--images {args.images}")  # recursively, as folder: finds them
    model, preprocess, tokenizer, setup = load_model_for_command(args)
    loader = images.images(preprocess, batch_size=args.batch_size, num_workers=args.workers)
    ranking = rerank(model, loader, args.prompt, tokenizer=tokenizer, k=args.k, **run_options(args, setup))
    rows = [{"rank": r, "image": images.relative(i), "cosine": cos, "clip_score": CLIP_SCORE_W * max(cos, 0.0)}
            for r, (i, cos) in enumerate(ranking, 1)]
    # a SigLIP model's probability that the prompt fits each image; CLIP has none per image
    probability = match_probability(model, torch.tensor([cos for _, cos in ranking], dtype=torch.float32))
    if probability is not None:
        for row, p in zip(rows, probability.tolist()):
            row["probability"] = p
    extra = ["P(match)"] if probability is not None else []
    print(f"rerank {args.prompt!r}  {args.images}  model {setup['model']} ({setup['pretrained']})")
    print(f"{len(loader.kept)} of {len(images)} images ranked; {describe_skipped(loader.skipped)}")
    print(table(["rank", "image", "cos", "CLIP-S", *extra],
                [[str(r["rank"]), r["image"], f"{r['cosine']:.4f}", f"{r['clip_score']:.4f}",
                  *([f"{r['probability']:.4f}"] if extra else [])] for r in rows]))
    if args.out:
        write_json(args.out, {"prompt": args.prompt, "model": setup["model"], "pretrained": setup["pretrained"],
                              "images": args.images, "images_ranked": len(loader.kept), **skipped_report(loader),
                              "ranking": rows})
    return 0
