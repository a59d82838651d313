"""The numbers and claims of docs/loss.md and docs/loss.zh.md, recomputed.

Each test computes a quantity the docs quote — with the library's loss or from first
principles — and checks that the docs print exactly that value (so editing the code or the
docs alone makes a test fail), or checks an equation the docs state and cite this file for.
The figures script is run into a temporary folder; the committed PNGs are checked for size.
"""

from __future__ import annotations

import importlib.util
import math
import re
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from clipforge import LogitScale, _tiled, clip_loss, siglip_loss
from clipforge.loss import CLIP_INIT_SCALE, MAX_SCALE, auto_chunk_size

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"en": ROOT / "docs" / "loss.md", "zh": ROOT / "docs" / "loss.zh.md"}
FIGURES = ROOT / "docs" / "figures"


def _load_figures_module():
    spec = importlib.util.spec_from_file_location("make_loss_figures", ROOT / "docs" / "make_loss_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


figs = _load_figures_module()


@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    return {lang: path.read_text(encoding="utf-8") for lang, path in DOCS.items()}


def quoted(docs: dict[str, str], *snippets: str) -> None:
    """Every snippet appears verbatim in both languages."""
    for lang, text in docs.items():
        for snip in snippets:
            assert snip in text, f"docs/{DOCS[lang].name} should quote {snip!r}"


def matrix_rows(m: torch.Tensor) -> list[str]:
    """The docs' matrix layout: "[ 0.844  0.114  0.042 ]", three decimals."""
    return ["[" + " ".join(f"{v:6.3f}" for v in row) + " ]" for row in m.tolist()]


# ---------------------------------------------------------------------------------------
# Temperature and the toy batch
# ---------------------------------------------------------------------------------------


def test_logit_scale_numbers(docs):
    s = float(LogitScale.clip()().detach())
    assert math.isclose(s, 1 / 0.07, rel_tol=1e-6) and CLIP_INIT_SCALE == 1 / 0.07 and MAX_SCALE == 100.0
    sig = LogitScale.siglip()
    assert math.isclose(float(sig().detach()), 10.0, rel_tol=1e-6) and float(sig.bias.detach()) == -10.0
    quoted(docs, f"{s:.2f}", f"{math.log(s):.3f}", f"{math.log(MAX_SCALE):.3f}")


def test_toy_batch_numbers(docs):
    """The batch of loss_similarity.png: its cosines, losses at three scales, and how much
    of the negatives' softmax weight the hardest negative takes."""
    img, txt = figs.toy_batch()
    sim = img @ txt.T
    off = sim - 10 * torch.eye(8, dtype=sim.dtype)
    assert bool((sim.diag() > off.amax(dim=1)).all() and (sim.diag() > off.amax(dim=0)).all())  # separable
    margin = float(torch.minimum(sim.diag() - off.amax(dim=1), sim.diag() - off.amax(dim=0)).min())
    quoted(docs, f"{float(sim.diag().min()):.2f}–{float(sim.diag().max()):.2f}", f"{margin:.2f}")
    loss = {s: float(clip_loss(img, txt, s)) for s in (1.0, CLIP_INIT_SCALE, 100.0)}
    quoted(docs, f"{loss[1.0]:.3f}", f"{math.log(8):.3f}", f"{loss[CLIP_INIT_SCALE]:.3f}")
    quoted(docs, f"{loss[100.0] * 1e4:.1f}·10⁻⁴")
    share = {s: figs.hardest_negative_share(img, txt, s) for s in (1.0, CLIP_INIT_SCALE, 100.0)}
    assert share[1.0] < share[CLIP_INIT_SCALE] < share[100.0]  # sharper softmax, harder negatives
    quoted(docs, *(f"{v:.2f}" for v in share.values()), f"{1 / 7:.3f}")


def test_loss_at_init_is_about_log_n(docs):
    """Random unit features: L_ij = s·cos with cos ~ N(0, 1/d), so r_i ≈ log N + s²/2d."""
    g = torch.Generator().manual_seed(0)
    n, d = 1024, 512
    img = F.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=1)
    s = CLIP_INIT_SCALE
    loss = float(clip_loss(img, txt, s))
    predicted = math.log(n) + s * s / (2 * d)
    assert abs(loss - predicted) < 0.02 and loss - math.log(n) < 0.25
    quoted(docs, "N = 1024, d = 512", f"{math.log(n):.2f}", f"{predicted:.2f}", f"{loss:.2f}")


# ---------------------------------------------------------------------------------------
# The formula and its gradient
# ---------------------------------------------------------------------------------------

L3 = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def test_three_by_three_example(docs):
    """With I = the logits, T = identity and s = 1 the features' gradient is ∂loss/∂L:
    it must be ((P_row − Y) + (P_col − Y)) / 2N, with the values the docs print."""
    eye = torch.eye(3, dtype=torch.float64)
    for chunk in (None, 2):
        x = L3.clone().requires_grad_()
        loss = clip_loss(x, eye, 1.0, chunk_size=chunk)
        (g,) = torch.autograd.grad(loss, x)
        p_row, p_col = L3.softmax(dim=1), L3.softmax(dim=0)
        torch.testing.assert_close(g, ((p_row - eye) + (p_col - eye)) / 6, rtol=1e-12, atol=1e-12)
        r, c = L3.logsumexp(dim=1), L3.logsumexp(dim=0)
        torch.testing.assert_close(loss, (r.sum() + c.sum()) / 6 - L3.diag().sum() / 3, rtol=1e-12, atol=1e-12)
    quoted(docs, *matrix_rows(L3), *matrix_rows(p_row), *matrix_rows(p_col), *matrix_rows(g))
    quoted(docs, "r = (" + ", ".join(f"{v:.3f}" for v in r.tolist()) + ")",
           "c = (" + ", ".join(f"{v:.3f}" for v in c.tolist()) + ")", f"{float(loss.detach()):.3f}",
           f"({float(r.sum()):.3f} + {float(c.sum()):.3f})/6")
    assert torch.allclose((p_row - eye).sum(dim=1), torch.zeros(3, dtype=torch.float64))  # rows sum to 0
    assert torch.allclose((p_col - eye).sum(dim=0), torch.zeros(3, dtype=torch.float64))  # columns sum to 0


@pytest.mark.parametrize("chunk", [None, 3, 64])
@pytest.mark.parametrize("labels,eps", [(None, 0.0), ([0, 1, 1, 2, 0, 3, 3, 3, 4, 5, 1], 0.1)])
def test_loss_is_the_log_sum_exp_formula(chunk, labels, eps):
    """loss = (Σ_i r_i + Σ_j c_j)/2N − Σ_ij Ỹ_ij L_ij/N, written out with torch.logsumexp."""
    g = torch.Generator().manual_seed(3)
    n, d = 11, 5
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    s = 9.0
    lab = None if labels is None else torch.tensor(labels)
    logits = s * img @ txt.T
    groups = torch.arange(n) if lab is None else lab
    same = (groups[:, None] == groups[None, :]).double()
    y = (1 - eps) * same / same.sum(dim=1, keepdim=True) + eps / n
    formula = (logits.logsumexp(dim=1).sum() + logits.logsumexp(dim=0).sum()) / (2 * n) - (y * logits).sum() / n
    got = clip_loss(img, txt, s, labels=lab, label_smoothing=eps, chunk_size=chunk)
    torch.testing.assert_close(got, formula, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 4])
def test_scale_gradient_identity(chunk):
    """∂loss/∂s = Σ_ij G_ij ⟨I_i, T_j⟩ = Σ_i ⟨dI_i, I_i⟩ / s, for CLIP and SigLIP."""
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=1)
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    for loss in (
        clip_loss(img, txt, s, chunk_size=chunk),
        siglip_loss(img, txt, s, torch.tensor(-3.0, dtype=torch.float64), chunk_size=chunk),
    ):
        d_img, d_s = torch.autograd.grad(loss, (img, s))
        torch.testing.assert_close(d_s, (d_img * img).sum() / s, rtol=1e-12, atol=1e-12)


def test_targets_from_the_gradient(docs):
    """Ỹ read back from the loss itself: ∂loss/∂L = (P_row + P_col)/2N − Ỹ/N."""
    eye = torch.eye(3, dtype=torch.float64)
    x = L3.clone().requires_grad_()
    (g,) = torch.autograd.grad(clip_loss(x, eye, 1.0, labels=torch.tensor([0, 0, 1])), x)
    y = (L3.softmax(dim=1) + L3.softmax(dim=0)) / 2 - 3 * g
    torch.testing.assert_close(y, torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]], dtype=torch.float64))
    n, eps = 8, 0.1
    x = torch.zeros(n, n, dtype=torch.float64, requires_grad=True)  # L = 0: both softmaxes are 1/N
    (g,) = torch.autograd.grad(clip_loss(x, torch.eye(n, dtype=torch.float64), 1.0, label_smoothing=eps), x)
    y = 1 / n - n * g
    on, off = float(y[0, 0]), float(y[0, 1])
    assert math.isclose(on, 1 - eps + eps / n) and math.isclose(off, eps / n)
    quoted(docs, "N = 8, ε = 0.1", f"{on:.4f}", f"{off:.4f}")


# ---------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------


def test_siglip_identity_and_init(docs):
    x = torch.linspace(-50, 50, 1001, dtype=torch.float64)
    torch.testing.assert_close(F.logsigmoid(x) - F.logsigmoid(-x), x, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    n, d = 1024, 512
    img = F.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=1)
    loss = float(siglip_loss(img, txt, 10.0, -10.0))
    predicted = 10 + (n - 1) * math.log1p(math.exp(-10))  # cos ≈ 0: positives −log σ(−10), negatives log(1 + e⁻¹⁰)
    assert abs(loss - predicted) < 0.02
    quoted(docs, f"{loss:.2f}", f"{math.exp(-10) * 1e5:.1f}·10⁻⁵")
    assert f"{loss:.2f}" == f"{predicted:.2f}"


# ---------------------------------------------------------------------------------------
# Memory and FLOPs
# ---------------------------------------------------------------------------------------


class LiveTensors(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive, and their peak.
    (Storages keep their Python object while alive, so a weakref finaliser marks the free.)"""

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.old = {t.untyped_storage().data_ptr() for t in inputs}
        self.live: dict[int, int] = {}
        self.now = self.peak = self.largest = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.live and key not in self.old:
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    self.largest = max(self.largest, st.nbytes() // t.element_size())
                    weakref.finalize(st, self._free, key)
        return out


def _features(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    return img, txt


def _saved_tensor_sizes(fn) -> list[int]:
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_memory_model(docs):
    """The plain loss peaks at 4 N² floats and saves 2 of them; the tiled one never makes a
    tensor bigger than a tile or N×d, saves none of size N², and peaks at its 2 tile
    buffers plus the features' 2 gradients — the constants of the docs and the figure."""
    n, d, chunk = 512, 16, 128
    img, txt = _features(n, d)
    live = LiveTensors(img, txt)
    with live:
        clip_loss(img, txt, 14.0).backward()
    assert live.largest == n * n
    assert figs.NAIVE_NN_BUFFERS * n * n * 4 <= live.peak <= figs.naive_bytes(n, d)
    assert sorted(_saved_tensor_sizes(lambda: clip_loss(img, txt, 14.0)))[-2:] == [n * n, n * n]

    img.grad = txt.grad = None
    live = LiveTensors(img, txt)
    with live:
        clip_loss(img, txt, 14.0, chunk_size=chunk).backward()
    assert live.largest <= max(chunk * chunk, n * d)
    model = figs.tiled_bytes(n, d, chunk=chunk)
    assert model <= live.peak <= model + 64 * n  # + the O(N) log-sum-exps
    assert max(_saved_tensor_sizes(lambda: clip_loss(img, txt, 14.0, chunk_size=chunk))) <= n * d
    assert (figs.NAIVE_NN_BUFFERS, figs.TILED_TILE_BUFFERS, figs.GRAD_ND_BUFFERS) == (4, 2, 2)

    # N = 16,384, d = 512, fp32: the numbers of §Memory
    big_n, big_d, gib, mib = 16384, 512, 2**30, 2**20
    assert big_n * big_n * 4 == gib
    edge = auto_chunk_size(big_n, big_d, budget=figs.TILE_BUDGET)
    quoted(docs, "16,384", "1 GiB", f"{figs.naive_bytes(big_n, big_d) / gib:.2f} GiB", f"{edge}",
           f"{edge * edge * 4 // mib} MiB", f"{big_n * big_d * 4 // mib} MiB",
           f"{figs.tiled_bytes(big_n, big_d) / gib:.2f} GiB")
    assert figs.TILE_BUDGET == 64 * mib and auto_chunk_size(big_n, big_d, budget=figs.TILE_BUDGET - 1) < edge


class MatmulFlops(TorchDispatchMode):
    """2·m·k·n per product, for every matmul-like kernel the losses call."""

    def __init__(self) -> None:
        super().__init__()
        self.mm = self.mv = self.dot = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "mm":
            self.mm += 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        elif name in ("addmm", "addmm_"):
            self.mm += 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
        elif name in ("mv", "dot"):
            setattr(self, name, getattr(self, name) + 2 * args[0].numel())
        elif name in ("bmm", "baddbmm", "addmv", "addmv_", "linear"):
            raise AssertionError(f"uncounted product {name}")
        return func(*args, **(kwargs or {}))


def test_flop_counts(docs):
    """Plain: 6N²d.  Tiled CLIP: 8N²d (logits twice, two gradient products) + 2N² for the
    column reweighting; tiled SigLIP: 8N²d.  The O(N·d) target dots are counted apart."""
    n, d = 96, 16
    img, txt = _features(n, d)
    for chunk, clip_mm, clip_mv in ((None, 6, 0), (32, 8, 2), (40, 8, 2), (96, 8, 2)):
        flops = MatmulFlops()
        with flops:
            clip_loss(img, txt, 14.0, chunk_size=chunk).backward()
        assert (flops.mm, flops.mv) == (clip_mm * n * n * d, clip_mv * n * n), chunk
        assert flops.dot <= 4 * n * d
        flops = MatmulFlops()
        with flops:
            siglip_loss(img, txt, 10.0, -10.0, chunk_size=chunk).backward()
        assert flops.mm == clip_mm * n * n * d and flops.mv == 0
    big_n, big_d = 16384, 512
    quoted(docs, f"{6 * big_n**2 * big_d / 1e12:.2f} TFLOP", f"{8 * big_n**2 * big_d / 1e12:.2f} TFLOP")


def test_underflow_threshold(docs):
    """A column sum ≥ 10⁻²⁵ keeps every term that matters at float32 precision normal."""
    assert _tiled._UNDERFLOW == 1e-25
    tiny = torch.finfo(torch.float32).tiny
    smallest_term = _tiled._UNDERFLOW * 2.0**-24  # terms below this do not change the sum
    assert smallest_term > tiny
    assert math.isclose(math.exp(-57), _tiled._UNDERFLOW, rel_tol=0.8)
    quoted(docs, "10⁻²⁵", f"{math.exp(-57) * 1e25:.1f}·10⁻²⁵", f"{smallest_term * 1e33:.0f}·10⁻³³",
           f"{tiny * 1e38:.1f}·10⁻³⁸")


def test_column_fallback_is_taken():
    """Logits spread over thousands: without the fallback a column's sum underflows to 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g) * 30
    y = torch.randn(16, 8, generator=g) * 30
    tile = x @ y.T
    row_max = tile.amax(dim=1)
    col_sum = torch.mv((tile - row_max[:, None]).exp().T, (row_max - row_max.max()).exp())
    assert bool((col_sum < _tiled._UNDERFLOW).any())
    _, c = _tiled._clip_lse_tiles(x, y, 1.0, 16)
    torch.testing.assert_close(c, tile.logsumexp(dim=0))


# ---------------------------------------------------------------------------------------
# Cross-references and figures
# ---------------------------------------------------------------------------------------

CITATION = re.compile(r"tests/(test_\w+\.py)::(\w+)")


def test_cited_tests_exist(docs):
    cited = {lang: set(CITATION.findall(text)) for lang, text in docs.items()}
    assert cited["en"] == cited["zh"], "both languages cite the same tests"
    assert len(cited["en"]) >= 15
    for file, name in sorted(cited["en"]):
        source = (ROOT / "tests" / file).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"tests/{file}::{name} does not exist"


def test_figures_linked_and_small(docs):
    made = {"loss_similarity.png", "loss_gradient.png", "loss_temperature.png", "loss_memory.png"}
    for text in docs.values():
        assert set(re.findall(r"\(figures/(\w+\.png)\)", text)) == made
    for name in made:
        assert (FIGURES / name).stat().st_size < 150_000, name


def test_figures_script_runs(tmp_path):
    figs.main(["--out", str(tmp_path)])
    for png in tmp_path.glob("*.png"):
        assert 10_000 < png.stat().st_size < 150_000, png.name
    assert len(list(tmp_path.glob("*.png"))) == 4
