"""Figures for docs/loss.md and docs/loss.zh.md, made from the library's own loss.

    .venv/bin/python docs/make_loss_figures.py [--out DIR] [--lang en zh]

prints the numbers behind each figure and writes four PNGs per language (default: docs/figures/,
English only; ``--lang en zh`` adds the Chinese copies, ``loss_*.zh.png``, as `make figures` does):

* loss_similarity.png  — the cosine-similarity matrix of a toy batch of 8 image–caption pairs
* loss_gradient.png    — G = ∂loss/∂L, the gradient of the loss on that batch's logits
* loss_temperature.png — loss, gradient norm and focus on the hardest negative against the scale s,
  for the toy batch and for random unit features (N = 8, d = 512)
* loss_memory.png      — bytes held by the plain and the tiled loss against the batch size N,
  from the counts in docs/loss.md §Memory; measured points from
  benchmarks/results/bench_loss.json are overlaid when that file exists.

The Chinese figures need a CJK font (WenQuanYi Micro Hei: `make fonts`); without one the script
writes the English figures and stops with the command that installs it, rather than draw boxes.

Deterministic (fixed seeds, no timing).  tests/test_loss_docs.py imports ``toy_batch`` and the
memory model from here and runs ``main`` into a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib import font_manager  # noqa: E402

from clipforge import clip_loss  # noqa: E402
from clipforge.loss import CLIP_INIT_SCALE, MAX_SCALE, auto_chunk_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH_JSON = ROOT / "benchmarks" / "results" / "bench_loss.json"
DPI = 110
GRAD_NORM = r"$\|\partial\,\mathrm{loss}/\partial I\|_F$"  # mathtext: an italic I, not a sans-serif l

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


def logit_gradient(img: torch.Tensor, txt: torch.Tensor, s: float) -> torch.Tensor:
    """G = ∂loss/∂L from the library's clip_loss: with the logits as image features, identity
    captions and scale 1 the loss is the one of L = s·I·Tᵀ, and the features' gradient is G."""
    logits = (s * img @ txt.T).requires_grad_()
    (g,) = torch.autograd.grad(clip_loss(logits, torch.eye(img.shape[0], dtype=img.dtype), 1.0), logits)
    return g


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
# Words on the figures, in each language (math symbols stay as they are)
# --------------------------------------------------------------------------------------

TEXT = {
    "en": {
        "concepts": CONCEPTS,
        "caption_tick": '"{}"',
        "image_tick": "img: {}",
        "caption_axis": "caption j",
        "image_axis": "image i",
        "sim_title": "Cosine similarities S = I·Tᵀ of a toy batch of 8 pairs\n(white boxes: the matching pairs)",
        "sim_bar": "cosine similarity S_ij (−1 to 1)",
        "grad_title": "G = ∂loss/∂L = ((P_row − Y) + (P_col − Y)) / 2N\n"
                      "on the toy batch (N = 8) at the initial scale s = 1/0.07 ≈ {s:.1f}",
        "grad_bar": "G_ij, the gradient of the loss on logit L_ij\n"
                    "(< 0: gradient descent raises L_ij;  > 0: it lowers L_ij)",
        "temp_title": "What the temperature does: a toy batch (N = 8, d = 16) "
                      "and random unit features (N = 8, d = 512)",
        "temp_panels": ["loss", "gradient norm " + GRAD_NORM,
                        "hardest negative's share of the negatives'\nsoftmax weight (mean over images)"],
        "temp_ylabels": ["loss (nats, log scale)", GRAD_NORM + " (log scale)", "share (1: all on one negative)"],
        "temp_x": "logit scale s = 1/τ (log scale)",
        "temp_toy": "toy batch: matched pairs, d = 16",
        "temp_random": "random unit features, d = 512 (an untrained model)",
        "temp_init": "initial scale s = 1/0.07",
        "temp_clamp": "s > 100: beyond the clamp",
        "temp_uniform": "uniform softmax: log N (loss), 1/(N−1) (share)",
        "mem_title": "Memory the CLIP loss creates, fp32, d = {d}",
        "mem_x": "global batch N (log scale)",
        "mem_y": "GiB created by the loss, forward + backward (log scale)",
        "mem_plain": "plain: {a}·N² + {b}·N·d floats",
        "mem_tiled": "tiled: {a}·tile² + {b}·N·d floats, tile = min(N, {edge})",
        "mem_matrix": "one N×N fp32 matrix",
        "mem_measured": {"naive": "measured, plain (benchmarks/bench_loss.py)",
                         "tiled": "measured, tiled (benchmarks/bench_loss.py)"},
        "mem_gib": "N = 16,384: one N×N matrix is 1 GiB",
        "mem_80gb": "80 GB accelerator",
    },
    "zh": {
        "concepts": ["狗", "狼", "猫", "轿车", "卡车", "苹果", "梨", "船"],
        "caption_tick": "“{}”",
        "image_tick": "图像：{}",
        "caption_axis": "文本 j",
        "image_axis": "图像 i",
        "sim_title": "玩具批次（8 个图文对）的余弦相似度 S = I·Tᵀ\n（白框：匹配的图文对）",
        "sim_bar": "余弦相似度 S_ij（−1 到 1）",
        "grad_title": "G = ∂loss/∂L = ((P_row − Y) + (P_col − Y)) / 2N\n"
                      "玩具批次（N = 8），初始缩放系数 s = 1/0.07 ≈ {s:.1f}",
        "grad_bar": "G_ij：损失对 logit L_ij 的梯度\n（< 0：梯度下降使 L_ij 升高；> 0：使其降低）",
        "temp_title": "温度的作用：玩具批次（N = 8，d = 16）与随机单位特征（N = 8，d = 512）",
        "temp_panels": ["损失", "梯度范数 " + GRAD_NORM,
                        "最难负样本在负样本 softmax 权重中的份额\n（对所有图像取平均）"],
        "temp_ylabels": ["损失（nat，对数坐标）", GRAD_NORM + "（对数坐标）", "份额（1：全部落在一个负样本上）"],
        "temp_x": "logit 缩放系数 s = 1/τ（对数坐标）",
        "temp_toy": "玩具批次：匹配的图文对，d = 16",
        "temp_random": "随机单位特征，d = 512（未训练的模型）",
        "temp_init": "初始缩放系数 s = 1/0.07",
        "temp_clamp": "s > 100：超出截断上限",
        "temp_uniform": "均匀 softmax：log N（损失），1/(N−1)（份额）",
        "mem_title": "CLIP 损失分配的内存（fp32，d = {d}）",
        "mem_x": "全局批大小 N（对数坐标）",
        "mem_y": "损失分配的内存，前向 + 反向（GiB，对数坐标）",
        "mem_plain": "朴素：{a}·N² + {b}·N·d 个浮点数",
        "mem_tiled": "分块：{a}·tile² + {b}·N·d 个浮点数，tile = min(N, {edge})",
        "mem_matrix": "一个 N×N 的 fp32 矩阵",
        "mem_measured": {"naive": "实测，朴素（benchmarks/bench_loss.py）",
                         "tiled": "实测，分块（benchmarks/bench_loss.py）"},
        "mem_gib": "N = 16,384：一个 N×N 矩阵为 1 GiB",
        "mem_80gb": "80 GB 加速器",
    },
}

# CJK fonts in order of preference; the figures in docs/figures/ use the first.
CJK_FONTS = ("WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Noto Sans CJK SC", "Source Han Sans SC", "Noto Sans SC")
CJK_FILES = ("wqy", "notosanscjk", "sourcehansans", "notosanssc")  # how their files are named
CJK_INSTALL = "sudo apt-get install fonts-wqy-microhei"


def cjk_font() -> str | None:
    """The first font of CJK_FONTS that matplotlib can use, or None.  A font installed after
    matplotlib built its font cache is not in it, so the system's font files are searched too."""
    def known() -> set[str]:
        return {f.name for f in font_manager.fontManager.ttflist}

    if not known() & set(CJK_FONTS):
        for path in font_manager.findSystemFonts():
            if any(tag in Path(path).name.lower().replace("-", "") for tag in CJK_FILES):
                font_manager.fontManager.addfont(path)
    return next((name for name in CJK_FONTS if name in known()), None)


@contextlib.contextmanager
def _style(lang: str):
    """Fonts for ``lang``; a glyph missing from every font is an error, not a box in the figure.
    DejaVu Sans comes first in both languages, so Latin letters and math symbols look the same;
    Chinese characters fall back to the CJK font."""
    families = ["DejaVu Sans"]
    if lang == "zh":
        font = cjk_font()
        if font is None:
            raise SystemExit(f"no CJK font for the Chinese figures (looked for {', '.join(CJK_FONTS)}); "
                             f"install one with `{CJK_INSTALL}` or `make fonts`")
        families.append(font)
    with plt.rc_context({"font.family": families}), warnings.catch_warnings():
        warnings.filterwarnings("error", message="Glyph .* missing from")
        try:
            yield TEXT[lang]
        except UserWarning as err:
            raise SystemExit(f"{err} (install a font that has it, e.g. `{CJK_INSTALL}`)") from None


def _name(stem: str, lang: str) -> str:
    return f"{stem}.png" if lang == "en" else f"{stem}.{lang}.png"


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def _annotate(ax, m: torch.Tensor, light, fmt: str = ".2f") -> None:
    """Write each cell's value; ``light(v)`` says when the cell is dark enough for white text."""
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = float(m[i, j])
            text = format(v, fmt).replace("-", "−")
            if float(text.replace("−", "-")) == 0:
                text = "0"  # no "−0.00"
            ax.text(j, i, text, ha="center", va="center", fontsize=7.5,
                    color="white" if light(v) else "black")


def _axis_labels(ax, t: dict) -> None:
    ax.set_xticks(range(8), [t["caption_tick"].format(c) for c in t["concepts"]], rotation=45, ha="right",
                  fontsize=8)
    ax.set_xlabel(t["caption_axis"])
    ax.set_yticks(range(8), [t["image_tick"].format(c) for c in t["concepts"]], fontsize=8)
    ax.set_ylabel(t["image_axis"])


def fig_similarity(out: Path, lang: str = "en") -> None:
    img, txt = toy_batch()
    sim = img @ txt.T  # (8, 8) cosines: image i against caption j
    with _style(lang) as t:
        fig, ax = plt.subplots(figsize=(5.8, 4.8), layout="constrained")
        im = ax.imshow(sim.numpy(), cmap="viridis", vmin=-1, vmax=1)
        _annotate(ax, sim, lambda v: v < 0.3)  # viridis is dark at the low end
        for i in range(8):
            ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, ec="white", lw=1.6))
        _axis_labels(ax, t)
        ax.set_title(t["sim_title"], fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(t["sim_bar"])
        fig.savefig(out / _name("loss_similarity", lang), dpi=DPI)
        plt.close(fig)
    print(f"{_name('loss_similarity', lang)}: diagonal {float(sim.diag().min()):.2f}..{float(sim.diag().max()):.2f}")


def fig_gradient(out: Path, lang: str = "en") -> None:
    img, txt = toy_batch()
    s = CLIP_INIT_SCALE
    n = img.shape[0]
    rows, cols = gradient_parts(img, txt, s)
    g = logit_gradient(img, txt, s)
    torch.testing.assert_close(g, (rows + cols) / (2 * n))  # the figure's title is the library's gradient
    top = math.ceil(float(g.abs().max()) * 200) / 200  # symmetric colour scale, to the next 0.005
    with _style(lang) as t:
        fig, ax = plt.subplots(figsize=(6.4, 5.2), layout="constrained")
        im = ax.imshow(g.numpy(), cmap="RdBu_r", vmin=-top, vmax=top)
        _annotate(ax, g, lambda v: abs(v) > 0.7 * top, fmt=".3f")
        _axis_labels(ax, t)
        ax.set_title(t["grad_title"].format(s=s), fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(t["grad_bar"], fontsize=9)
        fig.savefig(out / _name("loss_gradient", lang), dpi=DPI)
        plt.close(fig)
    print(f"{_name('loss_gradient', lang)}: G from {float(g.min()):.3f} to {float(g.max()):.3f}; "
          f"largest push {float((g - torch.diag(g.diag())).max()):.3f}")


def fig_temperature(out: Path, lang: str = "en") -> None:
    scales = torch.logspace(math.log10(0.3), math.log10(300), 121, dtype=torch.float64).tolist()
    toy, rnd = toy_batch(), random_batch()
    n = toy[0].shape[0]
    assert rnd[0].shape == (n, 512)  # the figure's title says so
    curves = {}
    for name, (img, txt) in (("toy", toy), ("random", rnd)):
        lg = [loss_and_grad_norm(img, txt, s) for s in scales]
        curves[name] = ([a for a, _ in lg], [b for _, b in lg], [hardest_negative_share(img, txt, s) for s in scales])
    with _style(lang) as t:
        fig, axes = plt.subplots(1, 3, figsize=(12.5, 4.6), layout="constrained")
        styles = {"toy": dict(color="C0", label=t["temp_toy"]),
                  "random": dict(color="C3", ls="--", label=t["temp_random"])}
        for k, ax in enumerate(axes):
            for name, c in curves.items():
                ax.plot(scales, c[k], **styles[name])
            ax.set_xscale("log")
            ax.set_xlabel(t["temp_x"], fontsize=9)
            ax.set_ylabel(t["temp_ylabels"][k], fontsize=9)
            ax.set_title(t["temp_panels"][k], fontsize=10)
            ax.axvline(CLIP_INIT_SCALE, color="gray", lw=0.9, label=t["temp_init"])
            ax.axvspan(MAX_SCALE, scales[-1], color="gray", alpha=0.15, lw=0, label=t["temp_clamp"])
            ax.set_xlim(scales[0], scales[-1])
            ax.grid(alpha=0.3, which="both", lw=0.4)
        axes[0].axhline(math.log(n), color="black", lw=0.8, ls=":", label=t["temp_uniform"])
        axes[2].axhline(1 / (n - 1), color="black", lw=0.8, ls=":")
        axes[2].set_ylim(0, 1.05)
        for ax in axes[:2]:
            ax.set_yscale("log")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8.5,
                   frameon=False)
        fig.suptitle(t["temp_title"], fontsize=11)
        fig.savefig(out / _name("loss_temperature", lang), dpi=DPI)
        plt.close(fig)
    k_max = max(range(len(scales)), key=lambda k: curves["toy"][1][k])
    print(f"{_name('loss_temperature', lang)}: toy gradient norm peaks at s ≈ {scales[k_max]:.1f}")


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


def fig_memory(out: Path, lang: str = "en") -> None:
    d = 512
    bench = load_bench(d)
    ns = [2**k for k in range(10, 21)]
    gib = 2.0**30
    edge = auto_chunk_size(ns[-1], d, budget=TILE_BUDGET)  # the largest tile edge; smaller N use N
    with _style(lang) as t:
        fig, ax = plt.subplots(figsize=(6.8, 4.8), layout="constrained")
        ax.plot(ns, [naive_bytes(n, d) / gib for n in ns], "C3-",
                label=t["mem_plain"].format(a=NAIVE_NN_BUFFERS, b=GRAD_ND_BUFFERS))
        ax.plot(ns, [tiled_bytes(n, d) / gib for n in ns], "C0-",
                label=t["mem_tiled"].format(a=TILED_TILE_BUFFERS, b=GRAD_ND_BUFFERS, edge=edge))
        ax.plot(ns, [n * n * 4 / gib for n in ns], color="C3", ls=":", lw=1, label=t["mem_matrix"])
        ax.plot(16384, 1.0, "ko", ms=4)
        ax.annotate(t["mem_gib"], (16384, 1.0), xytext=(40000, 0.04), fontsize=8,
                    arrowprops=dict(arrowstyle="->", lw=0.6))
        for impl, marker in (("naive", "C3o"), ("tiled", "C0s")):
            pts = sorted(bench.get(impl, []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] / gib for p in pts], marker, ms=5, mfc="none",
                        label=t["mem_measured"][impl])
        ax.axhline(80e9 / gib, color="gray", lw=0.8, ls="--")
        ax.text(ns[-1], 80e9 / gib * 0.55, t["mem_80gb"], fontsize=8, color="gray", ha="right", va="top")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(t["mem_x"])
        ax.set_ylabel(t["mem_y"], fontsize=9)
        ax.set_title(t["mem_title"].format(d=d), fontsize=10)
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.legend(fontsize=7.5, loc="upper left")
        fig.savefig(out / _name("loss_memory", lang), dpi=DPI)
        plt.close(fig)
    n = 16384
    print(f"{_name('loss_memory', lang)}: N={n}, d={d}: plain {naive_bytes(n, d) / gib:.2f} GiB, "
          f"tiled {tiled_bytes(n, d) / gib:.2f} GiB; measured points: {sum(map(len, bench.values()))}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "figures")
    parser.add_argument("--lang", nargs="+", choices=sorted(TEXT), default=["en"],
                        help="languages to draw (default: en; `make figures` draws en zh)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; keeps the output identical run to run
    try:
        for lang in sorted(set(args.lang), key=["en", "zh"].index):  # English first: written even without a CJK font
            for make in (fig_similarity, fig_gradient, fig_temperature, fig_memory):
                make(args.out, lang)
    finally:
        torch.set_num_threads(threads)  # main() also runs inside the test process


if __name__ == "__main__":
    main()
