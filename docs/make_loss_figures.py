"""Figures for docs/loss.md and docs/loss.zh.md, made from the library's own loss.

    .venv/bin/python docs/make_loss_figures.py [--out DIR]

prints the numbers behind each figure and writes four PNGs (default: docs/figures/):

* loss_similarity.png  — the cosine-similarity matrix of a toy batch of 8 image–caption pairs
* loss_gradient.png    — softmax − target, the gradient of the loss on that batch's logits
* loss_temperature.png — loss, gradient norm and focus on the hardest negative against the scale s
* loss_memory.png      — bytes held by the plain and the tiled loss against the batch size N,
  from the counts in docs/loss.md §Memory; measured points from
  benchmarks/results/bench_loss.json are overlaid when that file exists.

Deterministic (fixed seeds, no timing).  tests/test_loss_docs.py imports ``toy_batch`` and the
memory model from here and runs ``main`` into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clipforge import clip_loss  # noqa: E402
from clipforge.loss import CLIP_INIT_SCALE, MAX_SCALE, auto_chunk_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH_JSON = ROOT / "benchmarks" / "results" / "bench_loss.json"
DPI = 110

# --------------------------------------------------------------------------------------
# The toy batch
# --------------------------------------------------------------------------------------

CONCEPTS = ["dog", "wolf", "cat", "car", "truck", "apple", "pear", "boat"]
RELATED = [(0, 1), (3, 4), (5, 6)]  # dog~wolf, car~truck, apple~pear: the hard negatives


def toy_batch(seed: int = 26, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """8 image–caption pairs as unit vectors (float64): each concept is a random direction,
    related concepts share about half of theirs, and an image and its caption are the
    concept plus independent noise.  Seed 26 (picked by trying seeds) gives a batch where
    every image and every caption is closest to its own partner, but by as little as 0.06
    against a related concept: hard negatives."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(8, d, generator=g, dtype=torch.float64), dim=1)
    for a, b in RELATED:
        z[b] = F.normalize(0.55 * z[a] + 0.45 * z[b], dim=0)
    noise = 0.5 / math.sqrt(d)
    img = F.normalize(z + noise * torch.randn(8, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(z + noise * torch.randn(8, d, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def random_batch(n: int = 8, d: int = 512, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent random unit vectors: what an untrained model produces."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return img, txt


# --------------------------------------------------------------------------------------
# The memory model (docs/loss.md §Memory; tests/test_loss_docs.py::test_memory_model)
# --------------------------------------------------------------------------------------

NAIVE_NN_BUFFERS = 4  # two saved log-softmaxes + the gradient in flight (two buffers)
TILED_TILE_BUFFERS = 2  # the recomputed tile and the softmax beside it
GRAD_ND_BUFFERS = 2  # the features' gradients dI and dT, which every method returns
TILE_BUDGET = 64 << 20  # auto_chunk_size's default cap (less only when memory is short)


def naive_bytes(n: int, d: int, itemsize: int = 4) -> int:
    """Peak bytes created by the plain CLIP loss, forward and backward, gradients included."""
    return itemsize * (NAIVE_NN_BUFFERS * n * n + GRAD_ND_BUFFERS * n * d)


def tiled_bytes(n: int, d: int, itemsize: int = 4, chunk: int | None = None) -> int:
    """Peak bytes created by the tiled CLIP loss (no labels), gradients included; the O(N)
    log-sum-exps are left out."""
    c = auto_chunk_size(n, d, budget=TILE_BUDGET) if chunk is None else min(chunk, n)
    return itemsize * (TILED_TILE_BUFFERS * c * c + GRAD_ND_BUFFERS * n * d)


# --------------------------------------------------------------------------------------
# Quantities
# --------------------------------------------------------------------------------------


def gradient_parts(img: torch.Tensor, txt: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_row − Y, P_col − Y) for L = s·I·Tᵀ: the two directions' softmax − target."""
    logits = s * img @ txt.T
    eye = torch.eye(img.shape[0], dtype=img.dtype)
    return logits.softmax(dim=1) - eye, logits.softmax(dim=0) - eye


def hardest_negative_share(img: torch.Tensor, txt: torch.Tensor, s: float) -> float:
    """Mean over images of (largest negative softmax weight) / (sum of negative weights):
    1/(N−1) when the row softmax is uniform, 1 when one negative takes all the gradient."""
    p = (s * img @ txt.T).softmax(dim=1)
    neg = p.masked_fill(torch.eye(p.shape[0], dtype=torch.bool), 0.0)
    return float((neg.amax(dim=1) / neg.sum(dim=1)).mean())


def loss_and_grad_norm(img: torch.Tensor, txt: torch.Tensor, s: float) -> tuple[float, float]:
    """The loss and ‖∂loss/∂I‖_F, with the library's clip_loss."""
    x = img.clone().requires_grad_()
    loss = clip_loss(x, txt, s)
    (g,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), float(g.norm())


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def _annotate(ax, m: torch.Tensor, light) -> None:
    """Write each cell's value; ``light(v)`` says when the cell is dark enough for white text."""
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = float(m[i, j])
            text = f"{v:.2f}" if abs(v) >= 0.005 else "0"  # no "−0.00"
            ax.text(j, i, text, ha="center", va="center", fontsize=7.5,
                    color="white" if light(v) else "black")


def _axis_labels(ax, *, rows: bool = True) -> None:
    ax.set_xticks(range(8), [f'"{c}"' for c in CONCEPTS], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("caption j")
    if rows:
        ax.set_yticks(range(8), [f"img: {c}" for c in CONCEPTS], fontsize=8)
        ax.set_ylabel("image i")
    else:
        ax.set_yticks(range(8), [])


def fig_similarity(out: Path) -> None:
    img, txt = toy_batch()
    sim = img @ txt.T  # (8, 8) cosines: image i against caption j
    fig, ax = plt.subplots(figsize=(5.4, 4.6))
    im = ax.imshow(sim.numpy(), cmap="viridis", vmin=-1, vmax=1)
    _annotate(ax, sim, lambda v: v < 0.3)  # viridis is dark at the low end
    for i in range(8):
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, ec="white", lw=1.6))
    _axis_labels(ax)
    ax.set_title("Cosine similarities I·Tᵀ of a toy batch\n(diagonal: matching pairs)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(out / "loss_similarity.png", dpi=DPI)
    plt.close(fig)
    print(f"loss_similarity.png: diagonal {float(sim.diag().min()):.2f}..{float(sim.diag().max()):.2f}")


def fig_gradient(out: Path) -> None:
    img, txt = toy_batch()
    s = CLIP_INIT_SCALE
    rows, cols = gradient_parts(img, txt, s)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.5), layout="constrained")
    for k, (ax, m, title) in enumerate((
        (axes[0], rows, "P_row − Y\nimage → caption: softmax along each row"),
        (axes[1], cols, "P_col − Y\ncaption → image: softmax down each column"),
    )):
        im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-0.5, vmax=0.5)
        _annotate(ax, m, lambda v: abs(v) > 0.35)
        _axis_labels(ax, rows=k == 0)
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(
        f"∂loss/∂L = ((P_row − Y) + (P_col − Y)) / 2N   for the toy batch at s = 1/0.07 ≈ {s:.1f}",
        fontsize=10,
    )
    fig.savefig(out / "loss_gradient.png", dpi=DPI)
    plt.close(fig)
    print(f"loss_gradient.png: row sums of P_row − Y {float(rows.sum(1).abs().max()):.1e}")


def fig_temperature(out: Path) -> None:
    scales = torch.logspace(math.log10(0.3), math.log10(300), 121, dtype=torch.float64).tolist()
    toy, rnd = toy_batch(), random_batch()
    n = toy[0].shape[0]
    curves = {}
    for name, (img, txt) in (("toy", toy), ("random", rnd)):
        lg = [loss_and_grad_norm(img, txt, s) for s in scales]
        curves[name] = ([a for a, _ in lg], [b for _, b in lg], [hardest_negative_share(img, txt, s) for s in scales])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.7))
    styles = {"toy": dict(color="C0", label="toy batch (matched pairs)"),
              "random": dict(color="C3", ls="--", label="random features (untrained)")}
    titles = ["loss", "‖∂loss/∂I‖ (gradient norm)", "hardest negative's share of the\nnegatives' softmax weight"]
    for k, ax in enumerate(axes):
        for name, c in curves.items():
            ax.plot(scales, c[k], **styles[name])
        ax.set_xscale("log")
        ax.set_xlabel("logit scale s = 1/τ")
        ax.set_title(titles[k], fontsize=10)
        ax.axvline(CLIP_INIT_SCALE, color="gray", lw=0.8)
        ax.axvspan(MAX_SCALE, scales[-1], color="gray", alpha=0.15, lw=0)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    axes[0].axhline(math.log(n), color="black", lw=0.8, ls=":")
    axes[0].text(0.35, math.log(n) * 1.4, "log N", fontsize=8)
    axes[2].axhline(1 / (n - 1), color="black", lw=0.8, ls=":")
    axes[2].text(0.35, 1 / (n - 1) + 0.03, "1/(N−1): uniform", fontsize=8)
    axes[2].set_ylim(0, 1.05)
    for ax in axes[:2]:
        ax.set_yscale("log")
    for ax, y in zip(axes, (0.93, 0.03, 0.03)):  # clear of the legend and the curves
        top = ax.get_xaxis_transform()  # x in data units, y in axes units
        ax.text(CLIP_INIT_SCALE * 0.9, y, "init 1/0.07", fontsize=7, color="gray", ha="right", transform=top)
        ax.text(MAX_SCALE * 1.1, y, "clamped", fontsize=7, color="gray", transform=top)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"What the temperature does (N = {n})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "loss_temperature.png", dpi=DPI)
    plt.close(fig)
    k_max = max(range(len(scales)), key=lambda k: curves["toy"][1][k])
    print(f"loss_temperature.png: toy gradient norm peaks at s ≈ {scales[k_max]:.1f}")


def load_bench(d: int, path: Path | None = None) -> dict[str, list[tuple[int, float]]]:
    """{"naive"|"tiled": [(N, extra peak bytes), ...]} for fp32 rows of width d in the
    benchmark's JSON (benchmarks/bench_loss.py); empty when the file is missing."""
    path = BENCH_JSON if path is None else path
    if not path.exists():
        return {}
    points: dict[str, list[tuple[int, float]]] = {}
    for row in json.loads(path.read_text()).get("rows", []):
        if row.get("dtype") == "fp32" and row.get("d") == d and row.get("extra_peak_bytes"):
            points.setdefault(row["impl"], []).append((int(row["n"]), float(row["extra_peak_bytes"])))
    return points


def fig_memory(out: Path) -> None:
    d = 512
    bench = load_bench(d)
    ns = [2**k for k in range(10, 21)]
    gib = 2.0**30
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(ns, [naive_bytes(n, d) / gib for n in ns], "C3-",
            label=f"plain: {NAIVE_NN_BUFFERS}·N² + {GRAD_ND_BUFFERS}·N·d floats")
    ax.plot(ns, [tiled_bytes(n, d) / gib for n in ns], "C0-",
            label=f"tiled: {TILED_TILE_BUFFERS}·tile² + {GRAD_ND_BUFFERS}·N·d floats")
    ax.plot(ns, [n * n * 4 / gib for n in ns], color="C3", ls=":", lw=1, label="one N×N fp32 matrix")
    ax.plot(16384, 1.0, "ko", ms=4)
    ax.annotate("N = 16,384: 1 GiB", (16384, 1.0), xytext=(2200, 6), fontsize=8,
                arrowprops=dict(arrowstyle="->", lw=0.6))
    for impl, marker in (("naive", "C3o"), ("tiled", "C0s")):
        pts = sorted(bench.get(impl, []))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / gib for p in pts], marker, ms=5, mfc="none",
                    label=f"measured ({'plain' if impl == 'naive' else 'tiled'}; docs/benchmarks.md)")
    ax.axhline(80e9 / gib, color="gray", lw=0.8, ls="--")
    ax.text(ns[0], 80e9 / gib * 1.2, "80 GB accelerator", fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch N")
    ax.set_ylabel("GiB created by the loss (forward + backward)")
    ax.set_title(f"Loss memory, fp32, d = {d}; tile edge from auto_chunk_size", fontsize=10)
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "loss_memory.png", dpi=DPI)
    plt.close(fig)
    n = 16384
    print(f"loss_memory.png: N={n}, d={d}: plain {naive_bytes(n, d) / gib:.2f} GiB, "
          f"tiled {tiled_bytes(n, d) / gib:.2f} GiB; measured points: {sum(map(len, bench.values()))}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; keeps the output identical run to run
    try:
        for make in (fig_similarity, fig_gradient, fig_temperature, fig_memory):
            make(args.out)
    finally:
        torch.set_num_threads(threads)  # main() also runs inside the test process


if __name__ == "__main__":
    main()
