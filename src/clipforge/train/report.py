"""A training run's report: Markdown with PNG figures, written next to the checkpoints.

    clipforge report runs/demo          # rewrites runs/demo/report.md and runs/demo/figures/

Figures: loss and temperature against step (from metrics.jsonl), the similarity matrix of
a batch of validation pairs, the zero-shot confusion matrix of each labelled evaluation set,
and text-to-image retrieval examples.  Needs matplotlib.

The evaluation sets are read as the evaluation reads them (`clipforge.evaluate.open_eval_source`
and the protocols of `clipforge.data.protocols`): the validation images are the first distinct
images of the retrieval set, each shown once however many captions it has, and unreadable
image files are left out and named in the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from clipforge.data.images import Skipped
from clipforge.embed import embed_images, embed_texts

__all__ = ["write_report"]

_PAIRS = 10  # validation pairs in the similarity matrix
_QUERIES = 4  # captions searched for in the retrieval examples
_POOL = 256  # validation images they are searched among


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def _curves(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(xlabel="step", ylabel="loss", title="Contrastive loss (training batches)")
    axes[1].plot([r["step"] for r in train], [1 / r["logit_scale"] for r in train])
    axes[1].set(xlabel="step", ylabel="τ = 1/s", title="Temperature")
    for name in sorted({k for r in evals for k, v in r["eval"].items() if "acc1" in v}):
        points = [(r["step"], r["eval"][name]["acc1"]) for r in evals if "acc1" in r["eval"].get(name, {})]
        axes[2].plot(*zip(*points), "o-", label=name.split("split=")[-1])
    axes[2].set(xlabel="step", ylabel="top-1 accuracy", title="Zero-shot accuracy", ylim=(0, 1))
    if axes[2].lines:
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _similarity(model: Any, tokenizer: Any, val: _Validation, path: Path, n: int = _PAIRS) -> None:
    plt = _plt()
    rows = [k for k, c in enumerate(val.captions) if c is not None][:n]  # a small set shows all its pairs
    captions = [str(val.captions[k]) for k in rows]
    n = len(rows)
    txt = embed_texts(model, tokenizer, captions, progress=False)
    sim = (val.features[rows] @ txt.T).numpy()
    fig, ax = plt.subplots(figsize=(11, 6.5))
    ax.imshow(sim, cmap="viridis", vmin=-0.2, vmax=1)
    ax.set_xticks(range(n), captions, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(n), [f"image {k}" for k in range(n)], fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="w" if sim[i, j] < 0.5 else "k")
    columns = "the first caption of each (columns)" if val.several else "their captions (columns)"
    ax.set_title(f"Cosine similarity of validation images (rows) and {columns}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _retrieval(model: Any, tokenizer: Any, val: _Validation, queries: list[str], path: Path) -> None:
    plt = _plt()
    q = embed_texts(model, tokenizer, queries, progress=False)
    shown = min(5, len(val.images))
    top = (q @ val.features.T).topk(shown, dim=1)
    fig, axes = plt.subplots(len(queries), shown, figsize=(8, 1.8 * len(queries)), squeeze=False)
    for r, text in enumerate(queries):
        for c in range(shown):
            ax = axes[r][c]
            ax.imshow(val.images[int(top.indices[r, c])])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{float(top.values[r, c]):.2f}", fontsize=7)
        axes[r][0].set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Text → image: the {shown} best of {len(val.images)} validation images")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _confusion(matrix: list[list[int]], classnames: list[str], title: str, path: Path) -> None:
    plt = _plt()
    m = torch.tensor(matrix, dtype=torch.float32)
    present = (m.sum(1) > 0).nonzero().squeeze(1).tolist()
    rows = m[present]  # only classes that occur in this set
    fig, ax = plt.subplots(figsize=(12, 0.28 * len(present) + 2))
    ax.imshow((rows / rows.sum(1, keepdim=True).clamp(min=1)).numpy(), cmap="Blues", aspect="auto", vmin=0, vmax=1)
    ax.set_yticks(range(len(present)), [classnames[k] for k in present], fontsize=6)
    ax.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=5)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


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

    _curves(rows, figures / "curves.png")
    lines = [f"# Training report: `{run}`", "", f"Model `{config['model']}` trained on `{config['data']}` for "
             f"{final['step']} steps of {config['batch_size']} pairs; checkpoint `{ckpt}`.", "",
             "![loss, temperature and zero-shot accuracy](figures/curves.png)", ""]
    evals = final.get("eval", {})
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
        lines += ["## Similarity matrix", "", "![similarity](figures/similarity.png)", ""]
        if val.skipped:
            lines += [f"Validation images of `{uri}`: {describe_skipped(val.skipped)}, left out of the figures.", ""]
    for k, name in enumerate(config.get("eval_zeroshot", [])):
        if name in evals and "confusion_matrix" in evals[name]:
            classnames = list(open_eval_source(name, "zeroshot").classnames)
            figure = f"confusion-{k}.png"
            _confusion(evals[name]["confusion_matrix"], classnames, f"Zero-shot confusion: {name}", figures / figure)
            lines += [f"## Zero-shot confusion matrix: `{name}`", "", f"![confusion](figures/{figure})", ""]
    if val is not None:
        queries = [c for c in val.captions if c is not None][:_QUERIES]  # the first validation captions
        _retrieval(model, tokenizer, val, queries, figures / "retrieval.png")
        lines += ["## Retrieval examples", "", "![retrieval](figures/retrieval.png)", ""]
    if final.get("bad_samples"):
        lines += [f"{final['bad_samples']} unreadable samples were skipped, e.g. {final.get('bad_examples')}", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path
