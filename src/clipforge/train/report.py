"""A training run's report: Markdown with PNG figures, written next to the checkpoints.

    clipforge report runs/demo          # rewrites runs/demo/report.md and runs/demo/figures/

Figures: loss and temperature against step (from metrics.jsonl), the similarity matrix of
a batch of validation pairs, the zero-shot confusion matrix of each labelled evaluation set,
and text-to-image retrieval examples.  Each figure has a title that says how to read it, and
report.md a short paragraph under it.  Needs matplotlib.

The evaluation sets are read as the evaluation reads them (`clipforge.evaluate.open_eval_source`
and the protocols of `clipforge.data.protocols`): the validation images are the first distinct
images of the retrieval set, each shown once however many captions it has, and unreadable
image files are left out and named in the report.

The figures are laid out in inches (`_place`) rather than by matplotlib's automatic layout, so
that a cell of a matrix has the same size whatever its labels, and saved with a tight bounding
box, so that no label is cut.  A confusion matrix over the 64 ``shapes://`` classes is drawn
in the data set's own order (colour-major), with a line between colours, and with the same
predictions counted by colour alone and by shape alone beside it.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from clipforge.data import shapes
from clipforge.data.images import Skipped
from clipforge.embed import embed_images, embed_texts

__all__ = ["write_report"]

_PAIRS = 10  # validation pairs in the similarity matrix
_QUERIES = 4  # captions searched for in the retrieval examples
_POOL = 256  # validation images they are searched among
_DPI = 100
_HELDOUT_COLOUR = "#c04000"  # labels of the shapes:// pairs held out of training
_OWN_COLOUR = "#1a9850"  # frame around the image a retrieval query was written for


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    # A tight bounding box grows the canvas to hold every label: a long caption is never cut.
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", pad_inches=0.15)
    _plt().close(fig)


def _place(fig: Any, x: float, y: float, w: float, h: float, label: str) -> Any:
    """Axes w × h inches at (x, y) inches from the figure's lower left corner."""
    width, height = fig.get_size_inches()
    return fig.add_axes((x / width, y / height, w / width, h / height), label=label)


def _wrap(text: str, width: int) -> str:
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


def _colorbar(fig: Any, image: Any, x: float, y: float, h: float, label: str) -> None:
    """A colorbar right of a matrix whose lower right corner is at (x, y), as tall as it, 1.6 inches at least."""
    tall = max(h, 1.6)
    bar = fig.colorbar(image, cax=_place(fig, x, y + h - tall, 0.18, tall, "colorbar"))
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)


@dataclass
class _Validation:
    """The readable images among the first ones of a captioned source, with a caption each."""

    images: list[Image.Image]  # as decoded, for display
    features: Tensor  # [len(images), D], normalised
    captions: list[str | None]  # the first caption of each image; None for an image without one
    several: bool  # some image has more than one caption
    skipped: list[Skipped]  # the unreadable image files among the first ones


def _validation(model: Any, preprocess: Any, source: Any, limit: int) -> _Validation:
    """The first ``limit`` images of the `CaptionedSource` ``source`` and their features."""
    decoded: list[Image.Image] = []

    def keep(image: Image.Image) -> Tensor:
        # The loader decodes in this process (num_workers=0) and in order, calling the transform
        # for readable images only: decoded[i] is image loader.kept[i].
        decoded.append(image)
        return preprocess(image)

    loader = source.images(keep, batch_size=_POOL, num_workers=0, limit=limit)
    features = embed_images(model, loader, batch_size=_POOL, progress=False)
    index = source.caption_index(limit)
    first: dict[int, str] = {}
    for caption, image in zip(index.captions, index.text_to_image):
        first.setdefault(image, caption)
    captions = [first.get(k) for k in loader.kept]
    return _Validation(decoded, features, captions, len(index.captions) > len(first), list(loader.skipped))


# ---------------------------------------------------------------- training curves


def _curves(rows: list[dict[str, Any]], path: Path, *, chance_batch: int | None) -> None:
    """``chance_batch``: draw the loss ln(N) of a model that cannot tell the N pairs of a batch apart."""
    plt = _plt()
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="training batches")
    if chance_batch is not None:
        chance = math.log(chance_batch)
        axes[0].axhline(chance, color="0.5", ls="--", lw=1, label=f"chance: ln {chance_batch} = {chance:.2f}")
        axes[0].legend(fontsize=8)
    axes[0].set(xlabel="optimiser step", ylabel="loss", title="Contrastive loss on the training batches")
    axes[1].plot([r["step"] for r in train], [1 / r["logit_scale"] for r in train])
    axes[1].set(xlabel="optimiser step", ylabel="τ = 1/s", title="Learned temperature τ")
    for name in sorted({k for r in evals for k, v in r["eval"].items() if "acc1" in v}):
        points = [(r["step"], r["eval"][name]["acc1"]) for r in evals if "acc1" in r["eval"].get(name, {})]
        axes[2].plot(*zip(*points), "o-", label=name.split("split=")[-1])
    axes[2].set(xlabel="optimiser step", ylabel="top-1 accuracy", title="Zero-shot top-1 accuracy", ylim=(0, 1))
    if axes[2].lines:
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------- similarity matrix


def _similarity(model: Any, tokenizer: Any, val: _Validation, path: Path, n: int = _PAIRS) -> None:
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from matplotlib.patches import Rectangle

    plt = _plt()
    rows = [k for k, c in enumerate(val.captions) if c is not None][:n]  # a small set shows all its pairs
    captions = [str(val.captions[k]) for k in rows]
    n = len(rows)
    txt = embed_texts(model, tokenizer, captions, progress=False)
    sim = (val.features[rows] @ txt.T).numpy()  # [n images, n captions]

    cell, font = 0.95, 8  # inches per matrix cell; points
    labels = [_wrap(c, 14) for c in captions]
    lines = max(label.count("\n") + 1 for label in labels)
    left, bottom, size = 1.6, 0.5 + lines * font * 1.3 / 72, n * cell
    fig = plt.figure(figsize=(left + size + 1.3, bottom + size + 0.9))
    ax = _place(fig, left, bottom, size, size, "similarity")
    image = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(n), labels, fontsize=font)
    ax.set_yticks(range(n), [""] * n)
    ax.tick_params(axis="y", length=0)
    for i, k in enumerate(rows):  # the image itself is the row's label
        thumb = val.images[k]
        zoom = 0.9 * cell * 72 / max(thumb.size)  # OffsetImage sizes are in points at zoom 1
        ax.add_artist(AnnotationBbox(OffsetImage(np.asarray(thumb), zoom=zoom), (-0.5, i), xybox=(-5, 0),
                                     xycoords="data", boxcoords="offset points", box_alignment=(1, 0.5),
                                     frameon=False, annotation_clip=False))
    for i in range(n):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=2.5))
        for j in range(n):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=font,
                    color="w" if abs(sim[i, j]) > 0.6 else "k")
    ax.set_ylabel("validation image", labelpad=cell * 72 + 6)
    columns = "the first caption of each image" if val.several else "the caption of each image"
    ax.set_xlabel(columns, labelpad=6)
    ax.set_title(f"Cosine similarity of {n} validation images (rows) and their captions (columns)\n"
                 "outlined: each image with its own caption", fontsize=10)
    _colorbar(fig, image, left + size + 0.2, bottom, size, "cosine similarity of image and caption")
    _save(fig, path)


# ---------------------------------------------------------------- retrieval examples


def _retrieval(model: Any, tokenizer: Any, val: _Validation, queries: list[tuple[int, str]], path: Path) -> None:
    """``queries``: (the index of the image a caption belongs to, the caption)."""
    plt = _plt()
    q = embed_texts(model, tokenizer, [text for _, text in queries], progress=False)
    shown = min(5, len(val.images))
    scores = q @ val.features.T  # [queries, images]
    top = scores.topk(shown, dim=1)
    side, gap, text = 1.35, 0.12, 2.7  # inches: an image, the space between two, the caption column
    row = side + 0.55
    fig = plt.figure(figsize=(text + shown * (side + gap), 0.7 + len(queries) * row))
    height = fig.get_size_inches()[1]
    for r, (own, caption) in enumerate(queries):
        y = height - 0.7 - (r + 1) * row + 0.2
        for c in range(shown):
            ax = _place(fig, text + c * (side + gap), y, side, side, f"query {r}, rank {c + 1}")
            k = int(top.indices[r, c])
            ax.imshow(val.images[k])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{float(top.values[r, c]):.2f}", fontsize=8)
            if k == own:
                for spine in ax.spines.values():
                    spine.set(edgecolor=_OWN_COLOUR, linewidth=4)
            if c == 0:
                rank = int((scores[r] > scores[r, own]).sum()) + 1
                below = f"\n\n(its own image ranks {rank} of {len(val.images)})" if rank > shown else ""
                ax.set_ylabel(_wrap(caption, 30) + below, rotation=0, ha="right", va="center", multialignment="left",
                              fontsize=9, labelpad=10)
    fig.suptitle(f"Text → image: each caption (left) searched among {len(val.images)} validation images\n"
                 f"the {shown} most similar, best first · number: cosine similarity · "
                 "green frame: the image the caption belongs to", fontsize=10, y=1 - 0.1 / height, va="top")
    _save(fig, path)


# ---------------------------------------------------------------- confusion matrices


def _confusion(matrix: list[list[int]], classnames: list[str], name: str, path: Path) -> list[str]:
    """Draw the confusion matrix of one zero-shot set; return the report's sentences on it."""
    plt = _plt()
    counts = torch.tensor(matrix, dtype=torch.float64)  # [C, C], rows true, columns predicted
    present = (counts.sum(1) > 0).nonzero().squeeze(1).tolist()
    rows = counts[present]  # [R, C], only classes that occur in this set
    shares = (rows / rows.sum(1, keepdim=True)).numpy()
    r, c, total = len(present), len(classnames), int(counts.sum())
    grid = list(classnames) == shapes.class_names()  # 8 colours × 8 shapes, colour-major
    heldout = {f"{colour} {shape}" for colour, shape in shapes.HELDOUT_PAIRS} if grid else set()

    cell = min(0.4, 9 / c)  # inches; a 64-class matrix is 9 inches wide
    font = min(8.0, 0.75 * cell * 72)
    label = 0.55 * font / 72 * max(map(len, classnames)) + 0.15  # inches taken by the longest label
    panel = 0.3 * 8 if grid else 0.0  # the colour and shape summaries: 8 × 8 cells of 0.3 inch
    below = panel + 1.15 if grid else 0.0
    left, bottom, width, height = label + 0.4, below + label + 0.5, c * cell, r * cell
    fig = plt.figure(figsize=(left + width + 1.4, bottom + height + 1.1))
    ax = _place(fig, left, bottom, width, height, "classes")
    image = ax.imshow(shares, cmap="Blues", aspect="auto", vmin=0, vmax=1)
    ax.set_yticks(range(r), [classnames[k] for k in present], fontsize=font)
    ax.set_xticks(range(c), classnames, rotation=90, fontsize=font)
    for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        if tick.get_text() in heldout:
            tick.set_color(_HELDOUT_COLOUR)
    chars = int(width * 72 / 5.5)  # characters of 10 points that fit under the matrix
    ax.set_xlabel(_wrap("predicted class (the prompt with the highest similarity)", max(chars, 24)))
    ax.set_ylabel("true class")
    for i, k in enumerate(present):
        ax.add_patch(_cell_outline(k, i))
        for j in rows[i].nonzero().squeeze(1).tolist():
            ax.text(j, i, f"{int(rows[i, j])}", ha="center", va="center", fontsize=0.8 * font,
                    color="w" if shares[i, j] > 0.6 else "k")
    if grid:  # a line between two colours, on both axes
        for x in range(8, c, 8):
            ax.axvline(x - 0.5, color="0.6", lw=0.8)
        for i in range(1, r):
            if present[i] // 8 != present[i - 1] // 8:
                ax.axhline(i - 0.5, color="0.6", lw=0.8)
    seen_rows = {classnames[k] not in heldout for k in present} if grid else set()
    held, seen = len(heldout), c - len(heldout)
    if seen_rows == {True}:
        which = f"the {seen}" if r == seen else f"{r} of the {seen}"
        split = (f"these images show only {which} colour–shape pairs that training shows; the {held} columns "
                 "labelled in orange are the pairs held out of training, which the model can still answer")
    elif seen_rows == {False}:
        which = f"the {held}" if r == held else f"{r} of the {held}"
        split = (f"these images show only {which} colour–shape pairs held out of training (labelled in orange), "
                 "so a right answer combines a colour and a shape the model has seen only apart")
    else:
        split = f"the {held} colour–shape pairs held out of training are labelled in orange" if grid else ""
    title = [f"Zero-shot classification of {total} images of {name}: {r} true classes × {c} answers",
             f"rows: the {r} classes in this set · columns: the {c} classes the model chooses among · "
             "number: images · outlined: the right answer"]
    title = [_wrap(line, max(int((width + 1.2) * 72 / 5.5), 60)) for line in [*title, split] if line]
    ax.set_title("\n".join(title), fontsize=10, loc="left")
    _colorbar(fig, image, left + width + 0.2, bottom, height, "share of the row's images")

    text = [f"Rows are the {r} classes that occur among the {total} images evaluated, columns all {c} classes "
            f"the model chooses among" + (f", hence {r} × {c}" if r != c else "") + (f": {split}." if split else ".")]
    text.append("A cell's colour is the share of the row's images given the column's answer and its number their "
                "count; the outlined cell of each row is the right answer"
                + (", and the two small matrices below count the same answers by colour alone and by shape alone."
                   if grid else "."))
    if grid:
        _attribute(fig, counts.view(8, 8, 8, 8).sum((1, 3)), shapes.COLOURS, "colour", left, 0.75)
        _attribute(fig, counts.view(8, 8, 8, 8).sum((0, 2)), shapes.SHAPES, "shape", left + panel + 1.6, 0.75)
    _save(fig, path)
    return text


def _cell_outline(column: int, row: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=1)


def _attribute(fig: Any, counts: Tensor, names: tuple[str, ...], what: str, x: float, y: float) -> None:
    """The 8 × 8 confusion of one attribute (rows true, columns answered), its lower left corner at (x, y)
    inches when all 8 rows occur; with fewer, its top stays where 8 rows would put it."""
    present = (counts.sum(1) > 0).nonzero().squeeze(1).tolist()
    rows = counts[present]
    shares = (rows / rows.sum(1, keepdim=True)).numpy()
    ax = _place(fig, x, y + 0.3 * (len(names) - len(present)), 0.3 * len(names), 0.3 * len(present), what)
    ax.imshow(shares, cmap="Blues", aspect="auto", vmin=0, vmax=1)
    ax.set_yticks(range(len(present)), [names[k] for k in present], fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    for i, k in enumerate(present):
        ax.add_patch(_cell_outline(k, i))
        for j in rows[i].nonzero().squeeze(1).tolist():
            ax.text(j, i, f"{100 * shares[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="w" if shares[i, j] > 0.6 else "k")
    right = float(counts.diagonal().sum() / counts.sum())
    ax.set_title(f"{what.capitalize()} alone: right for {100 * right:.0f}% of images\n(number: % of the row's images)",
                 fontsize=9, loc="left")
    ax.set(xlabel=f"{what} answered", ylabel=f"true {what}")


# ---------------------------------------------------------------- the report


def write_report(run: str | Path, *, checkpoint: str | Path | None = None) -> Path:
    """Write ``run/report.md`` and ``run/figures/*.png`` for the run's last checkpoint."""
    from clipforge.checkpoints import load
    from clipforge.data.images import describe_skipped
    from clipforge.evaluate import open_eval_source
    from clipforge.train.run_state import list_checkpoints

    run = Path(run)
    figures = run / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    config = json.loads((run / "config.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    final = json.loads((run / "metrics.json").read_text())
    ckpt = Path(checkpoint) if checkpoint else list_checkpoints(run)[-1]
    model, preprocess, tokenizer = load(ckpt)
    evals = final.get("eval", {})

    # The softmax loss of a model that scores every pair of a batch alike is ln(batch) in both
    # directions; the sigmoid loss has no such single level.
    batch = config["batch_size"]
    softmax = config.get("loss", "clip") == "clip"
    _curves(rows, figures / "curves.png", chance_batch=batch if softmax else None)
    lines = [f"# Training report: `{run}`", "", f"Model `{config['model']}` trained on `{config['data']}` for "
             f"{final['step']} steps of {config['batch_size']} pairs; checkpoint `{ckpt}`.", "",
             "![loss, temperature and zero-shot accuracy](figures/curves.png)", ""]
    about = "Left: the contrastive loss on each logged training batch, against the optimiser step"
    if softmax:
        about += (f"; the dashed line, ln {batch} = {math.log(batch):.2f}, is the loss of a model that cannot tell the "
                  f"{batch} pairs of a batch apart")
    about += ". Middle: the learned temperature τ that divides the cosine similarities before the softmax."
    classes = sorted({len(m["confusion_matrix"]) for m in evals.values() if "confusion_matrix" in m})
    if classes:
        about += (" Right: zero-shot top-1 accuracy on each labelled evaluation set at each evaluation"
                  + (f"; guessing scores 1/{classes[0]}." if len(classes) == 1 else "."))
    lines += [about, ""]
    if evals:
        lines += ["## Evaluation", "", "| set | metric | value |", "|---|---|---|"]
        for name, metrics in evals.items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    lines.append(f"| `{name}` | {key} | {value:.4f} |")
        lines.append("")
    uri = config.get("eval_retrieval")
    val = None
    if uri:
        val = _validation(model, preprocess, open_eval_source(uri, "retrieval"), _POOL)
        _similarity(model, tokenizer, val, figures / "similarity.png")
        lines += ["## Similarity matrix", "", "![similarity](figures/similarity.png)", "",
                  f"Rows are the first validation images of `{uri}` (shown at the left), columns their captions, "
                  "each cell the cosine similarity of the two embeddings; the outlined diagonal pairs each image "
                  "with its own caption, and a model that tells the pairs apart makes it the highest of its row "
                  "and of its column. An off-diagonal cell can be high for good reason when a caption fits "
                  "another image as well.", ""]
        if val.skipped:
            lines += [f"Validation images of `{uri}`: {describe_skipped(val.skipped)}, left out of the figures.", ""]
    for k, name in enumerate(config.get("eval_zeroshot", [])):
        if name in evals and "confusion_matrix" in evals[name]:
            classnames = list(open_eval_source(name, "zeroshot").classnames)
            figure = f"confusion-{k}.png"
            text = _confusion(evals[name]["confusion_matrix"], classnames, name, figures / figure)
            lines += [f"## Zero-shot confusion matrix: `{name}`", "", f"![confusion](figures/{figure})", "",
                      " ".join(text), ""]
    if val is not None:
        queries = [(k, c) for k, c in enumerate(val.captions) if c is not None][:_QUERIES]  # the first captions
        _retrieval(model, tokenizer, val, queries, figures / "retrieval.png")
        lines += ["## Retrieval examples", "", "![retrieval](figures/retrieval.png)", "",
                  f"Each row searches the {len(val.images)} validation images with one caption (left) and shows "
                  f"the {min(5, len(val.images))} whose embeddings are most similar to the caption's, best first, "
                  "with the cosine similarity above each; a green frame marks the image the caption was written "
                  "for, and where none is shown the note under the caption gives that image's rank. The other "
                  "images may fit the caption too.", ""]
    if final.get("bad_samples"):
        lines += [f"{final['bad_samples']} unreadable samples were skipped, e.g. {final.get('bad_examples')}", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path
