"""A training run's report: Markdown with PNG figures, written next to the checkpoints.

    clipforge report runs/demo          # rewrites runs/demo/report.md and runs/demo/figures/

Figures: loss and temperature against step (from metrics.jsonl), the similarity matrix of
a batch of validation pairs, the zero-shot confusion matrix of each labelled evaluation set,
and text-to-image retrieval examples.  Needs matplotlib.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_report"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def _similarity(model: Any, tokenizer: Any, preprocess: Any, source: Any, path: Path, n: int = 10) -> None:
    plt = _plt()
    n = min(n, len(source))  # a small evaluation set shows all its pairs
    pairs = [source[k] for k in range(n)]
    with torch.inference_mode():
        img = model.encode_image(torch.stack([preprocess(p[0]) for p in pairs]), normalize=True)
        txt = model.encode_text(tokenizer([p[1] for p in pairs]), normalize=True)
    sim = (img @ txt.T).numpy()
    fig, ax = plt.subplots(figsize=(11, 6.5))
    ax.imshow(sim, cmap="viridis", vmin=-0.2, vmax=1)
    ax.set_xticks(range(n), [p[1] for p in pairs], rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(n), [f"image {k}" for k in range(n)], fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="w" if sim[i, j] < 0.5 else "k")
    ax.set_title("Cosine similarity of validation images (rows) and their captions (columns)")
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


def _retrieval(
    model: Any, tokenizer: Any, preprocess: Any, source: Any, queries: list[str], path: Path, pool: int = 256
) -> None:
    plt = _plt()
    images = [source[k][0] for k in range(min(pool, len(source)))]
    with torch.inference_mode():
        feats = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        q = model.encode_text(tokenizer(queries), normalize=True)
    shown = min(5, len(images))
    top = (q @ feats.T).topk(shown, dim=1)
    fig, axes = plt.subplots(len(queries), shown, figsize=(8, 1.8 * len(queries)), squeeze=False)
    for r, text in enumerate(queries):
        for c in range(shown):
            ax = axes[r][c]
            ax.imshow(images[int(top.indices[r, c])])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{float(top.values[r, c]):.2f}", fontsize=7)
        axes[r][0].set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Text → image: the {shown} best of {len(images)} validation images")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(run: str | Path, *, checkpoint: str | Path | None = None) -> Path:
    """Write ``run/report.md`` and ``run/figures/*.png`` for the run's last checkpoint."""
    from clipforge.checkpoints import load
    from clipforge.data import open_data
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
    retrieval = open_data(config["eval_retrieval"]) if config.get("eval_retrieval") else None
    if retrieval is not None:
        _similarity(model, tokenizer, preprocess, retrieval, figures / "similarity.png")
        lines += ["## Similarity matrix", "", "![similarity](figures/similarity.png)", ""]
    for k, uri in enumerate(config.get("eval_zeroshot", [])):
        if uri in evals and "confusion_matrix" in evals[uri]:
            classnames = open_data(uri).classnames
            name = f"confusion-{k}.png"
            _confusion(evals[uri]["confusion_matrix"], classnames, f"Zero-shot confusion: {uri}", figures / name)
            lines += [f"## Zero-shot confusion matrix: `{uri}`", "", f"![confusion](figures/{name})", ""]
    if retrieval is not None:
        queries = [retrieval[k][1] for k in range(min(4, len(retrieval)))]  # the first validation captions
        _retrieval(model, tokenizer, preprocess, retrieval, queries, figures / "retrieval.png")
        lines += ["## Retrieval examples", "", "![retrieval](figures/retrieval.png)", ""]
    if final.get("bad_samples"):
        lines += [f"{final['bad_samples']} unreadable samples were skipped, e.g. {final.get('bad_examples')}", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path
