"""The numbers and claims of docs/loss.md and docs/loss.zh.md, recomputed.

Each test computes a quantity the docs quote — with the library's loss or from first
principles — and checks that the docs print exactly that value in the sentence that states
it (so editing the code, or moving a number to another claim, makes a test fail), or checks
an equation the docs state and cite this file for.  The figures script is run into a
temporary folder; the committed PNGs are checked for size.

How a number is bound to its sentence (`said`):

* The page is cut into units.  A fenced code block is one unit, kept verbatim.  Other text is
  cut into blocks at blank lines, headings, list items and figure lines; each block has its
  whitespace collapsed and is cut into sentences: after "." "!" or "?" followed by whitespace
  and an upper-case letter, "`" or "*" (so "0.143", "et al. 2021", "Fig. 3" and "i.e. 16" do
  not end a sentence), and after "。" "！" "？".
* An anchor is a phrase of one language that picks the sentence; a call names it in English
  and in Chinese.  Some unit holding the anchor must hold every number.
* A number matches only whole: not inside a longer number ("0.14" does not match "0.142",
  "1 GiB" does not match "0.1 GiB", "10⁻⁴" does not match "10⁻⁴⁵").
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
from clipforge.score import CLIP_SCORE_W, clip_s
from clipforge.zeroshot import LOGIT_SCALE, zeroshot_logits

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"en": ROOT / "docs" / "loss.md", "zh": ROOT / "docs" / "loss.zh.md"}
FIGURES = ROOT / "docs" / "figures"
GIB, MIB = 2**30, 2**20


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


figs = _load("make_loss_figures", ROOT / "docs" / "make_loss_figures.py")


# ---------------------------------------------------------------------------------------
# Sentences and the numbers in them
# ---------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s*```.*?^\s*```[^\n]*$", re.M | re.S)
BLOCK_START = re.compile(r"^(?:\s*[*-] |\s*\d+\. |#|!\[)")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`*])|(?<=[。！？])")
DIGITS = "0-9⁰¹²³⁴⁵⁶⁷⁸⁹"


def units(text: str) -> list[str]:
    """The page's code blocks (verbatim) and prose sentences (whitespace collapsed)."""
    out: list[str] = []
    pos = 0
    for m in FENCE.finditer(text):
        out += _prose_units(text[pos : m.start()])
        out.append(m.group(0))
        pos = m.end()
    return out + _prose_units(text[pos:])


def _prose_units(text: str) -> list[str]:
    blocks: list[list[str]] = []
    for line in text.split("\n"):
        if not line.strip():
            blocks.append([])
        elif BLOCK_START.match(line) or not blocks:
            blocks.append([line])
        else:
            blocks[-1].append(line)
    out = []
    for block in blocks:
        joined = " ".join(" ".join(block).split())
        out += [s for s in SENTENCE_END.split(joined) if s.strip()]
    return out


def has_number(unit: str, number: str) -> bool:
    """``number`` occurs in ``unit`` whole, not as part of a longer number."""
    pattern = rf"(?<![{DIGITS}.,]){re.escape(number)}(?![{DIGITS}]|[.,][0-9])"
    return re.search(pattern, unit) is not None


@pytest.fixture(scope="module")
def docs() -> dict[str, list[str]]:
    return {lang: units(path.read_text(encoding="utf-8")) for lang, path in DOCS.items()}


def said(docs: dict[str, list[str]], anchor: str | tuple[str, str], *numbers: str, lang: str | None = None) -> None:
    """In each language (or only ``lang``), one sentence holding the anchor holds every number.

    ``anchor`` is one phrase for both languages or a pair (English, Chinese)."""
    for k, (code, sentences) in enumerate(docs.items()):
        if lang is not None and code != lang:
            continue
        phrase = anchor if isinstance(anchor, str) else anchor[k]
        found = [u for u in sentences if phrase in u]
        assert found, f"docs/{DOCS[code].name}: no sentence contains {phrase!r}"
        if not any(all(has_number(u, n) for n in numbers) for u in found):
            best = max(found, key=lambda u: sum(has_number(u, n) for n in numbers))
            missing = [n for n in numbers if not has_number(best, n)]
            raise AssertionError(f"docs/{DOCS[code].name}: the sentence with {phrase!r} should say "
                                 f"{missing}:\n    {best}")


def matrix_rows(m: torch.Tensor) -> list[str]:
    """The docs' matrix layout: "[ 0.844  0.114  0.042 ]", three decimals."""
    return ["[" + " ".join(f"{v:6.3f}" for v in row) + " ]" for row in m.tolist()]


def test_sentences_are_cut_where_the_docstring_says():
    text = ("The share is 0.24 at s = 1 (uniform would be 1/7 = 0.143). Radford et al. 2021 and\n"
            "Fig. 3 agree, i.e. 16 MiB. `clip_loss` is all.\n\n* a list item. **Bold** next\n"
            "```text\nG = [ 1.000 ]\n```\n损失为 0.465。由测试检验。")
    assert units(text) == [
        "The share is 0.24 at s = 1 (uniform would be 1/7 = 0.143).",
        "Radford et al. 2021 and Fig. 3 agree, i.e. 16 MiB.", "`clip_loss` is all.",
        "* a list item.", "**Bold** next", "```text\nG = [ 1.000 ]\n```", "损失为 0.465。", "由测试检验。",
    ]
    assert has_number("is 0.143.", "0.143") and not has_number("is 0.143.", "0.14")
    assert not has_number("0.1 GiB", "1 GiB") and not has_number("10⁻⁴⁵", "10⁻⁴")
    assert not has_number("1.25", "1.2") and has_number("N = 16,384, d", "16,384")


# ---------------------------------------------------------------------------------------
# The ten lines and the applications
# ---------------------------------------------------------------------------------------


def test_applications_read_the_same_matrix(docs):
    """The pseudo-code has ten lines, the last five of which are clip_loss; zero-shot logits
    are a row of the scaled matrix; CLIP-S is w · max(cos, 0) with w = 2.5."""
    for lang, heading in (("en", "## CLIP in ten lines"), ("zh", "## 十行代码里的 CLIP")):
        text = DOCS[lang].read_text(encoding="utf-8")
        block = text.split(heading, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
        code = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
        assert len(code) == 10 and code[5].startswith("logits = s * x @ y.T"), lang
    said(docs, ("`LogitScale` also caps s", "`LogitScale` 还把 s 截断在"), f"{MAX_SCALE:g}")

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    classes = F.normalize(torch.randn(3, 8, generator=g), dim=1)  # one embedding per class
    logits = zeroshot_logits(x, classes.T)  # the classifier is [d, C]
    torch.testing.assert_close(logits, LOGIT_SCALE * x @ classes.T)
    assert torch.equal(logits.argmax(dim=1), (x @ classes.T).argmax(dim=1))  # the scale changes no argmax
    said(docs, ("`zeroshot_logits` scales", "`zeroshot_logits` 按"), f"{LOGIT_SCALE:g}")

    y = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    torch.testing.assert_close(clip_s(x, y), CLIP_SCORE_W * (x * y).sum(dim=1).clamp(min=0))
    said(docs, "CLIP-S = w · max(cos, 0)", f"w = {CLIP_SCORE_W:g}")


# ---------------------------------------------------------------------------------------
# Temperature and the toy batch
# ---------------------------------------------------------------------------------------


def test_logit_scale_numbers(docs):
    s = float(LogitScale.clip()().detach())
    assert math.isclose(s, 1 / 0.07, rel_tol=1e-6) and CLIP_INIT_SCALE == 1 / 0.07 and MAX_SCALE == 100.0
    sig = LogitScale.siglip()
    assert math.isclose(float(sig().detach()), 10.0, rel_tol=1e-6) and float(sig.bias.detach()) == -10.0
    said(docs, "log 100 =", f"1/0.07 ≈ {s:.2f}", f"log s = {math.log(s):.3f}",
         f"log {MAX_SCALE:g} = {math.log(MAX_SCALE):.3f}")
    said(docs, "⊆", f"[−{MAX_SCALE:g}, {MAX_SCALE:g}]")
    # cosines in [−1, 1]: the widest gap, 2, gives softmax weights of e²:1 at s = 1
    said(docs, "±1", "e²:1")


def test_toy_batch_numbers(docs):
    """The batch of loss_similarity.png: its cosines, losses at three scales, and how much
    of the negatives' softmax weight the hardest negative takes, averaged over the rows."""
    img, txt = figs.toy_batch()
    n = img.shape[0]
    sim = img @ txt.T
    off = sim - 10 * torch.eye(n, dtype=sim.dtype)
    assert bool((sim.diag() > off.amax(dim=1)).all() and (sim.diag() > off.amax(dim=0)).all())  # separable
    margin = float(torch.minimum(sim.diag() - off.amax(dim=1), sim.diag() - off.amax(dim=0)).min())
    said(docs, ("diagonal cosines lie in", "对角线上的余弦值落在"),
         f"{float(sim.diag().min()):.2f}–{float(sim.diag().max()):.2f}")
    said(docs, ("hardest rival by at least", "最强的对手"), f"{margin:.2f}")

    loss = {s: float(clip_loss(img, txt, s)) for s in (1.0, CLIP_INIT_SCALE, 100.0)}
    said(docs, ("the uniform limit", "均匀极限"), f"{loss[1.0]:.3f}", f"log {n} = {math.log(n):.3f}",
         f"{loss[CLIP_INIT_SCALE]:.3f}", f"{loss[100.0] * 1e4:.1f}·10⁻⁴")

    share = {s: figs.hardest_negative_share(img, txt, s) for s in (1.0, CLIP_INIT_SCALE, 100.0)}
    for s, value in share.items():  # the mean over the rows of (largest negative weight) / (all negative weight)
        p = (s * img @ txt.T).softmax(dim=1).masked_fill(torch.eye(n, dtype=torch.bool), 0.0)
        assert math.isclose(value, float((p.amax(dim=1) / p.sum(dim=1)).mean()), rel_tol=1e-12)
    assert share[1.0] < share[CLIP_INIT_SCALE] < share[100.0]  # sharper softmax, harder negatives
    said(docs, ("Averaged over the", "取平均，这个份额"), *(f"{v:.2f}" for v in share.values()),
         f"1/{n - 1} = {1 / (n - 1):.3f}")
    said(docs, "Averaged over the", f"{n} rows", lang="en")
    said(docs, "取平均，这个份额", f"对 {n} 行", lang="zh")

    rnd, _ = figs.random_batch()
    said(docs, ("random unit vectors", "随机单位向量"), f"d = {rnd.shape[1]}")
    said(docs, "random unit vectors", f"{rnd.shape[0]} random", lang="en")
    said(docs, "随机单位向量", f"{rnd.shape[0]} 个", lang="zh")


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
    said(docs, ("the formula predicts", "公式预测"), f"N = {n}", f"d = {d}", f"log N = {math.log(n):.2f}",
         f"{predicted:.2f}", f"{loss:.2f}")


def test_infonce_bound_numbers(docs):
    """I ≥ log N − loss: the ceiling log N at N = 8 and at CLIP's 32,768, and the toy batch's bound."""
    img, txt = figs.toy_batch()
    n = img.shape[0]
    said(docs, (f"with N = {n}, at most", f"N = {n} 时，无论编码器多好"), f"log {n} = {math.log(n):.3f}")
    clip_batch = 32768  # Radford et al. 2021, §2.5
    said(docs, ("CLIP's batch of", "CLIP 的批大小"), f"{clip_batch:,}",
         f"log {clip_batch:,} = {math.log(clip_batch):.2f}")
    said(docs, ("temperature, its cap", "温度、其上限"), f"{clip_batch:,}")  # the reference list
    loss = float(clip_loss(img, txt, CLIP_INIT_SCALE))
    uniform = float(clip_loss(img, txt, 1e-9))  # s → 0: uniform softmaxes, chance level
    assert math.isclose(uniform, math.log(n), rel_tol=1e-6) and 0 < math.log(n) - loss < math.log(n)
    said(docs, ("so its bound", "它的界是"), f"{loss:.3f}", f"log {n} − {loss:.3f} = {math.log(n) - loss:.3f}",
         f"{math.log(n):.3f}")


# ---------------------------------------------------------------------------------------
# The formula and its gradient
# ---------------------------------------------------------------------------------------

L3 = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _logit_gradient(logits: torch.Tensor, labels: torch.Tensor | None = None, chunk: int | None = None):
    """With I = the logits, T = identity and s = 1 the features' gradient is ∂loss/∂L."""
    x = logits.clone().requires_grad_()
    loss = clip_loss(x, torch.eye(logits.shape[0], dtype=logits.dtype), 1.0, labels=labels, chunk_size=chunk)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def test_three_by_three_example(docs):
    """∂loss/∂L must be ((P_row − Y) + (P_col − Y)) / 2N, with the values the docs print."""
    eye = torch.eye(3, dtype=torch.float64)
    p_row, p_col = L3.softmax(dim=1), L3.softmax(dim=0)
    r, c = L3.logsumexp(dim=1), L3.logsumexp(dim=0)
    for chunk in (None, 2):
        loss, g = _logit_gradient(L3, chunk=chunk)
        torch.testing.assert_close(g, ((p_row - eye) + (p_col - eye)) / 6, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss, (r.sum() + c.sum()) / 6 - L3.diag().sum() / 3, rtol=1e-12, atol=1e-12)
    said(docs, "L     =", *matrix_rows(L3))
    said(docs, "P_row =", *matrix_rows(p_row), *matrix_rows(p_col))
    said(docs, "G     =", *matrix_rows(g))
    said(docs, ("The log-sum-exps", "log-sum-exp 为"),
         "r = (" + ", ".join(f"{v:.3f}" for v in r.tolist()) + ")",
         "c = (" + ", ".join(f"{v:.3f}" for v in c.tolist()) + ")",
         f"({float(r.sum()):.3f} + {float(c.sum()):.3f})/6", f"{float(loss):.3f}")
    said(docs, ("For the worked example", "上面的算例"), "N = 3")
    # the largest push is on image 2's score for caption 1 (1-based)
    push = g.masked_fill(eye.bool(), -1)
    assert divmod(int(push.argmax()), 3) == (1, 0)
    said(docs, ("The largest push", "最大的推力"), f"{float(push.max()):.3f}")
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
    _, g = _logit_gradient(L3, labels=torch.tensor([0, 0, 1]))
    y = (L3.softmax(dim=1) + L3.softmax(dim=0)) / 2 - 3 * g
    torch.testing.assert_close(y, torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]], dtype=torch.float64))
    said(docs, ("the rows of Y are", "Y 的三行分别是"), "(½, ½, 0)", "(0, 0, 1)")
    n, eps = 8, 0.1
    x = torch.zeros(n, n, dtype=torch.float64, requires_grad=True)  # L = 0: both softmaxes are 1/N
    (g,) = torch.autograd.grad(clip_loss(x, torch.eye(n, dtype=torch.float64), 1.0, label_smoothing=eps), x)
    y = 1 / n - n * g
    on, off = float(y[0, 0]), float(y[0, 1])
    assert math.isclose(on, 1 - eps + eps / n) and math.isclose(off, eps / n)
    said(docs, ("the diagonal target becomes", "对角线上的目标变为"), f"N = {n}", f"ε = {eps}", f"{on:.4f}",
         f"{off:.4f}")


def test_false_negatives_and_group_labels(docs):
    """The worked example with labels (0, 0, 1): G as printed, pushes turned into pulls, and the
    push on image 1's own caption from the group's even target."""
    labels = torch.tensor([0, 0, 1])
    _, plain = _logit_gradient(L3)
    for chunk in (None, 2):
        _, g = _logit_gradient(L3, labels=labels, chunk=chunk)
        p_row, p_col = L3.softmax(dim=1), L3.softmax(dim=0)
        target = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]], dtype=torch.float64)
        torch.testing.assert_close(g, (p_row + p_col) / 6 - target / 3, rtol=1e-12, atol=1e-12)
    said(docs, "G     =", *matrix_rows(g))
    said(docs, ("a push against a true match", "真实匹配的推力"), f"{float(plain[1, 0]):.3f}")
    assert plain[1, 0] > 0 > g[1, 0] and plain[0, 1] > 0 > g[0, 1]  # pushes become pulls
    said(docs, ("has become a pull", "变成了拉力"), f"{float(plain[1, 0]):.3f} → −{-float(g[1, 0]):.3f}",
         f"{float(plain[0, 1]):.3f} → −{-float(g[0, 1]):.3f}")
    assert p_row[0, 0] > 0.5 and p_col[0, 0] > 0.5 and g[0, 0] > 0  # above the target ½: pushed off
    said(docs, ("towards balance", "趋向均衡"), f"{float(p_row[0, 0]):.3f}", f"{float(p_col[0, 0]):.3f}",
         f"+{float(g[0, 0]):.3f}")
    torch.testing.assert_close(g[2], plain[2])  # row 3 is unchanged


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
    assert f"{loss:.2f}" == f"{predicted:.2f}"
    said(docs, ("the library gives", "库给出"), f"{loss:.2f}")
    said(docs, "the library gives", f"N = {n} and d = {d}", lang="en")
    said(docs, "库给出", f"N = {n}、d = {d}", lang="zh")
    said(docs, "σ(−10) ≈", f"{math.exp(-10) * 1e5:.1f}·10⁻⁵")


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
    """The plain loss creates 3 N² floats in forward, keeps 2, and peaks at 4 N² in backward;
    the tiled one never makes a tensor bigger than a tile or N×d, saves none of size N², and
    peaks at its 2 tile buffers plus the features' 2 gradients — the constants of the docs
    and the figure."""
    n, d, chunk = 512, 16, 128
    nn_bytes = n * n * 4
    img, txt = _features(n, d)
    live = LiveTensors(img, txt)
    with live:
        loss = clip_loss(img, txt, 14.0)
        assert 3 * nn_bytes <= live.peak < 3.25 * nn_bytes  # logits and two log-softmaxes
        assert 2 * nn_bytes <= live.now < 2.25 * nn_bytes  # the logits freed, the log-softmaxes kept
        loss.backward()
    assert live.largest == n * n
    assert figs.NAIVE_NN_BUFFERS * nn_bytes <= live.peak <= figs.naive_bytes(n, d)
    assert sorted(_saved_tensor_sizes(lambda: clip_loss(img, txt, 14.0)))[-2:] == [n * n, n * n]
    said(docs, ("Forward creates the logits", "前向生成 logits"), "3 N²")
    said(docs, ("the peak is", "峰值为"), f"{figs.NAIVE_NN_BUFFERS} N²")

    img.grad = txt.grad = None
    live = LiveTensors(img, txt)
    with live:
        clip_loss(img, txt, 14.0, chunk_size=chunk).backward()
    assert live.largest <= max(chunk * chunk, n * d)
    model = figs.tiled_bytes(n, d, chunk=chunk)
    assert model <= live.peak <= model + 64 * n  # + the O(N) log-sum-exps
    assert max(_saved_tensor_sizes(lambda: clip_loss(img, txt, 14.0, chunk_size=chunk))) <= n * d
    assert (figs.NAIVE_NN_BUFFERS, figs.TILED_TILE_BUFFERS, figs.GRAD_ND_BUFFERS) == (4, 2, 2)

    # N = 16,384, d = 512, fp32: the numbers of §8
    big_n, big_d = 16384, 512
    assert big_n * big_n * 4 == GIB
    said(docs, ("one fp32 N×N matrix", "一个 fp32 的 N×N 矩阵"), f"N = {big_n:,}", f"{big_n:,}²", "1 GiB",
         f"{figs.NAIVE_NN_BUFFERS * big_n**2 * 4 // GIB} GiB", f"{figs.naive_bytes(big_n, big_d) / GIB:.2f} GiB",
         f"d = {big_d}")
    growth = figs.NAIVE_NN_BUFFERS * (4 * big_n) ** 2 / (figs.NAIVE_NN_BUFFERS * big_n**2)
    said(docs, "Quadruple the batch", "sixteenfold" if growth == 16 else f"{growth:g}-fold", lang="en")
    said(docs, "批次扩大 4 倍", f"{growth:g} 倍", lang="zh")

    edge = auto_chunk_size(big_n, big_d, budget=figs.TILE_BUDGET)
    assert figs.TILE_BUDGET == 64 * MIB and auto_chunk_size(big_n, big_d, budget=figs.TILE_BUDGET - 1) < edge
    said(docs, ("whose four fp32 tiles fit", "使四个 fp32 分块不超出"), f"{edge}", f"N = {big_n:,}", f"d = {big_d}",
         f"{edge * edge * 4 // MIB} MiB")
    said(docs, ("With the two 32 MiB gradients", "再加上两个 32 MiB 的梯度"), f"{big_n * big_d * 4 // MIB} MiB",
         f"{figs.tiled_bytes(big_n, big_d) / GIB:.2f} GiB", f"{figs.tiled_bytes(big_n, big_d) // MIB} MiB",
         f"{figs.naive_bytes(big_n, big_d) / GIB:.2f} GiB")


def test_auto_chunk_size_range_and_budget(docs, monkeypatch):
    """Tile edges from 128 to 2048, at most N; four fp32 tiles within min(64 MiB, 5 % of free memory)."""
    big = 1 << 20
    floor, cap = auto_chunk_size(big, 512, budget=1), auto_chunk_size(big, 512, budget=1 << 40)
    assert auto_chunk_size(5, 512) == 5  # at most N
    tiles, itemsize = 4, 4

    def edge_for(free: int) -> int:
        monkeypatch.setattr(_tiled, "_free_memory", lambda device: free)
        return auto_chunk_size(big, 512)

    cap_bytes = tiles * itemsize * cap * cap
    fraction = 0.05
    assert edge_for(1 << 40) == cap and cap_bytes == 64 * MIB  # plenty free: the 64 MiB cap
    for edge in (1024, 512, 256):  # little free: 5 % of it
        need = tiles * itemsize * edge * edge
        assert edge_for(math.ceil(need / fraction)) == edge
        assert edge_for(math.ceil(need / fraction) - 64) == edge // 2
    said(docs, ("whose four fp32 tiles fit", "使四个 fp32 分块不超出"), f"{floor}", f"{cap}",
         f"{cap_bytes // MIB} MiB", f"{fraction * 100:g} %")
    said(docs, "whose four fp32 tiles fit", f"or {floor} when none fits", lang="en")
    said(docs, "使四个 fp32 分块不超出", f"则取 {floor}", lang="zh")


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
    said(docs, ("6N²d in all", "合计 6N²d"), f"{6 * big_n**2 * big_d / 1e12:.2f} TFLOP", f"N = {big_n:,}",
         f"d = {big_d}")
    said(docs, ("8N²d in all", "合计 8N²d"), f"{8 * big_n**2 * big_d / 1e12:.2f} TFLOP", "2N²")


# ---------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------


def test_exponentials_can_underflow_to_zero(docs):
    """E_ij = exp(L_ij − m_i) is exactly 0 in float32 more than about 104 below the row's
    maximum (below half the smallest subnormal, 2⁻¹⁴⁹); unit features need s > 52 for that."""
    subnormal = 2.0**-149
    assert torch.finfo(torch.float32).smallest_normal > subnormal > 0
    cut = -math.log(subnormal / 2)  # exp(−x) rounds to 0 beyond here
    xs = torch.full((64,), cut, dtype=torch.float32)
    assert bool((torch.exp(-(xs + 0.3)) == 0).all()) and bool((torch.exp(-(xs - 0.3)) > 0).all())
    _, c = _tiled._clip_lse_tiles(torch.tensor([[1.0], [-1.0]]), torch.tensor([[1.0], [-1.0]]), 60.0, 2)
    torch.testing.assert_close(c, torch.tensor([60.0, 60.0]))  # E = exp(−120) = 0, the columns still exact
    said(docs, ("smallest subnormal", "最小次正规数"), f"{cut:.0f}", f"{subnormal * 1e45:.1f}·10⁻⁴⁵")
    said(docs, ("cosines differ by at most 2", "两个余弦之差至多为 2"), f"s > {cut / 2:.0f}")
    said(docs, "E_ij = exp(L_ij − m_i) ∈", "[0, 1]")


def test_underflow_threshold(docs):
    """A column sum ≥ 10⁻²⁵ keeps every term that matters at float32 precision normal."""
    assert _tiled._UNDERFLOW == 1e-25
    tiny = torch.finfo(torch.float32).tiny
    smallest_term = _tiled._UNDERFLOW * 2.0**-24  # terms below this do not change the sum
    assert smallest_term > tiny
    assert math.isclose(math.exp(-57), _tiled._UNDERFLOW, rel_tol=0.8)
    said(docs, ("falls below", "列和低于"), "10⁻²⁵")
    said(docs, ("The threshold loses nothing", "这个阈值不会损失精度"), "10⁻²⁵ · 2⁻²⁴",
         f"{smallest_term * 1e33:.0f}·10⁻³³", f"{tiny * 1e38:.1f}·10⁻³⁸")
    said(docs, ("Since exp(−57)", "由于 exp(−57)"), f"≈ {math.exp(-57) * 1e25:.1f}·10⁻²⁵", "57")


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


def test_shapes_the_tiled_tests_cover(docs):
    """The N and tile sizes that tests/test_loss.py::test_tiled_clip_matches_reference runs."""
    test_loss = _load("test_loss_for_docs", ROOT / "tests" / "test_loss.py")
    marks = {m.args[0]: m.args[1] for m in test_loss.test_tiled_clip_matches_reference.pytestmark}
    shapes = marks["n,chunk"]
    ns = sorted({n for n, _ in shapes})
    assert any(c == 1 for _, c in shapes)  # tiles of 1
    assert any(1 < c < n and n % c for n, c in shapes)  # sizes that do not divide N
    assert any(c > n for n, c in shapes)  # larger than N
    assert True in marks["use_labels"] and any(e > 0 for e in marks["eps"])  # groups and ε
    said(docs, "test_tiled_clip_matches_reference", "N = " + ", ".join(map(str, ns)))


# ---------------------------------------------------------------------------------------
# Distributed: all-gather against a ring
# ---------------------------------------------------------------------------------------


def test_gather_against_ring_numbers(docs):
    """Per rank at N = 16,384, d = 512, fp32, W = 8: gathered captions N×d, a ring chunk B×d;
    forward traffic (W − 1)·B·d either way, a ring all-reduce 2·(W − 1)·B·d, a ring's
    backward (W − 1)·B·d."""
    n, d, w, f32 = 16384, 512, 8, 4
    b = n // w
    said(docs, ("W = 8 ranks", "W = 8 个 rank"), f"N = {n:,}", f"d = {d}", f"W = {w}", f"B = {b}",
         f"{n * d * f32 // MIB} MiB", f"{b * d * f32 // MIB} MiB")
    exponent = 20  # "up to one million" (Zhai et al. 2023), taken as a power of two
    million = 2**exponent
    power = "2" + str(exponent).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
    said(docs, ("a million pairs", "约一百万的批大小"), f"N = {million:,}", power, f"d = {d}",
         f"{million * d * f32 // GIB} GiB")
    forward = (w - 1) * b * d * f32
    all_reduce = 2 * (w - 1) / w * n * d * f32  # what a ring all-reduce sends per rank
    assert all_reduce == 2 * forward
    said(docs, ("receives the other ranks", "收到其余各 rank"), f"{forward // MIB} MiB")
    said(docs, ("In backward, `clipforge` all-reduces", "反向时，`clipforge`"), f"{all_reduce / MIB:g} MiB",
         f"{forward // MIB} MiB")


# ---------------------------------------------------------------------------------------
# Cross-references and figures
# ---------------------------------------------------------------------------------------

CITATION = re.compile(r"tests/(test_\w+\.py)::(\w+)")


def test_cited_tests_exist():
    cited = {lang: set(CITATION.findall(path.read_text(encoding="utf-8"))) for lang, path in DOCS.items()}
    assert cited["en"] == cited["zh"], "both languages cite the same tests"
    assert len(cited["en"]) >= 15
    for file, name in sorted(cited["en"]):
        source = (ROOT / "tests" / file).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"tests/{file}::{name} does not exist"


STEMS = ("loss_similarity", "loss_gradient", "loss_temperature", "loss_memory")


def test_figures_linked_and_small():
    """The English page shows the English figures, the Chinese page their Chinese copies."""
    for lang, suffix in (("en", ".png"), ("zh", ".zh.png")):
        text = DOCS[lang].read_text(encoding="utf-8")
        assert re.findall(r"\(figures/([\w.]+\.png)\)", text) == [stem + suffix for stem in STEMS], lang
        for stem in STEMS:
            assert (FIGURES / (stem + suffix)).stat().st_size < 150_000, stem + suffix


def test_figures_script_runs(tmp_path):
    figs.main(["--out", str(tmp_path)])
    for png in tmp_path.glob("*.png"):
        assert 10_000 < png.stat().st_size < 150_000, png.name
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(stem + ".png" for stem in STEMS)
