"""The losses against naive references kept here: a loop over rows for the cross-entropy,
the full-matrix sigmoid formula, forward and gradient, on shapes that do not divide evenly.

Tests that take ``device`` run on the CPU and, where available, on CUDA; the references always
run in float64 on the CPU (their inputs are copied there inside autograd, so gradients taken
through them land on the device)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge import ClipLoss, LogitScale, SigLipLoss, clip_loss, siglip_loss
from clipforge.loss import auto_chunk_size

# fp32 results are compared with float64 ones: on CUDA, TF32 would round matmul inputs to 10 bits
pytestmark = pytest.mark.usefixtures("no_tf32")

# ---------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------


def targets_ref(n: int, labels: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Ỹ (n, n) in float64, built entry by entry."""
    y = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        pos = [j for j in range(n) if (j == i if labels is None else labels[j] == labels[i])]
        for j in pos:
            y[i, j] = 1.0 / len(pos)
    return (1 - eps) * y + eps / n


def clip_loss_ref(img, txt, scale, labels=None, eps=0.0):
    """½ (mean_i CE(row i) + mean_j CE(column j)), a Python loop over rows, float64 on the CPU."""
    img, txt = img.double().cpu(), txt.double().cpu()
    scale = scale.double().cpu() if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=torch.float64)
    labels = None if labels is None else labels.cpu()
    n = img.shape[0]
    y = targets_ref(n, labels, eps)
    logits = scale * img @ txt.T
    rows = [-(y[i] * torch.log_softmax(logits[i], dim=0)).sum() for i in range(n)]
    cols = [-(y[:, j] * torch.log_softmax(logits[:, j], dim=0)).sum() for j in range(n)]
    return (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2


def siglip_loss_ref(img, txt, scale, bias, labels=None):
    """−(1/N) Σ_ij log σ(z_ij (s I_i·T_j + b)), element by element, float64 on the CPU."""
    img, txt, scale, bias = (t.double().cpu() for t in (img, txt, scale, bias))
    labels = None if labels is None else labels.cpu()
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            pos = (i == j) if labels is None else bool(labels[i] == labels[j])
            x = scale.double() * (img[i] @ txt[j]) + bias.double()
            total = total + F.logsigmoid(x if pos else -x)
    return -total / n


def features(n, d, *, dtype=torch.float64, seed=0, normalize=True, device="cpu"):
    """(n, d) image and text features, leaves that require grad; the same numbers on every device."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g, dtype=torch.float64)
    txt = img + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)  # correlated pairs
    if normalize:
        img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    return img.to(device, dtype).requires_grad_(), txt.to(device, dtype).requires_grad_()


def leaves(*tensors, dtype=torch.float64):
    """Detached copies on the CPU in ``dtype`` that require grad: the float64 reference's inputs."""
    return tuple(t.detach().cpu().to(dtype).requires_grad_() for t in tensors)


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def assert_close_all(a, b, **tol):
    """Pairwise close, compared on the CPU (the references live there)."""
    for x, y in zip(a, b):
        torch.testing.assert_close(x.cpu(), y.cpu(), **tol)


GROUPS = {1: [0], 2: [5, 5], 7: [0, 1, 0, 2, 1, 0, 3], 13: [i % 4 for i in range(13)], 31: [i // 3 for i in range(31)]}

# ---------------------------------------------------------------------------------------
# CLIP loss
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 13])
@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_naive_clip_matches_row_loop(n, use_labels, eps):
    img, txt = features(n, 5)
    s = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor(GROUPS[n]) if use_labels else None
    got = clip_loss(img, txt, s, labels=labels, label_smoothing=eps)
    ref = clip_loss_ref(img, txt, s, labels, eps)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert_close_all(grads(got, img, txt, s), grads(ref, img, txt, s), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,chunk", [(1, 1), (1, 8), (2, 1), (7, 3), (13, 4), (13, 13), (13, 64), (31, 5)])
@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_tiled_clip_matches_reference(n, chunk, use_labels, eps, device):
    img, txt = features(n, 6, seed=n, device=device)
    s = torch.tensor(11.0, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor(GROUPS[n], device=device) if use_labels else None
    got = clip_loss(img, txt, s, labels=labels, label_smoothing=eps, chunk_size=chunk)
    assert got.device.type == device
    ref = clip_loss_ref(img, txt, s, labels, eps)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-12, atol=1e-12)
    assert_close_all(grads(got, img, txt, s), grads(ref, img, txt, s), rtol=1e-10, atol=1e-12)


def test_tiled_clip_gradcheck(device):
    img, txt = features(9, 4, seed=3, device=device)
    s = torch.tensor(3.0, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5], device=device)
    for lab in (None, labels):
        assert torch.autograd.gradcheck(
            lambda a, b, c, lab=lab: clip_loss(a, b, c, labels=lab, label_smoothing=0.1, chunk_size=4), (img, txt, s)
        )


@pytest.mark.parametrize("name", ["clip_loss", "siglip_loss"])
def test_tiled_path_refuses_double_backward(name):
    """The tiled backward recomputes tiles outside autograd, so its gradients carry no graph;
    create_graph=True is refused at once, naming the limit and chunk_size=None."""
    img, txt = features(5, 3, seed=4)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    loss = clip_loss(img, txt, s, chunk_size=2) if name == "clip_loss" else siglip_loss(img, txt, s, b, chunk_size=2)
    message = rf"tiled {name} has no double backward \(create_graph=True\).*Pass chunk_size=None"
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(loss, (img, txt, s), create_graph=True)
    assert all(g is not None for g in torch.autograd.grad(loss, (img, txt, s)))  # first order still works


def test_plain_path_has_double_backward():
    """chunk_size=None is ordinary autograd: second derivatives are exact (float64)."""
    img, txt = features(4, 3, seed=4)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2])
    assert torch.autograd.gradgradcheck(
        lambda x, y, c: clip_loss(x, y, c, labels=labels, label_smoothing=0.1), (img, txt, s)
    )
    assert torch.autograd.gradgradcheck(lambda x, y, c, d: siglip_loss(x, y, c, d, labels=labels), (img, txt, s, b))


def test_tiled_clip_float32_large_batch_matches_float64(device):
    """fp32 on the device (TF32 off on CUDA: it would round the logits' inputs to 10 bits)
    against the plain formula in float64 on the CPU."""
    img, txt = features(1000, 64, dtype=torch.float32, seed=1, device=device)
    s = torch.tensor(100.0, device=device, requires_grad=True)  # the largest scale CLIP allows: sharpest softmax
    got = clip_loss(img, txt, s, chunk_size=128)
    g_got = grads(got, img, txt, s)
    img64, txt64, s64 = leaves(img, txt, s)
    ref = clip_loss(img64, txt64, s64)
    g_ref = grads(ref, img64, txt64, s64)
    # The loss is tiny here (≈2e-7: the batch is separated at s = 100), a difference of
    # log-sum-exps ≈ 100 and target logits ≈ 100 that the tiled path computes separately, so
    # the absolute error is a few float32 ulps of the logits: ulp(100) ≈ 7.6e-6.
    torch.testing.assert_close(got.double().cpu(), ref, rtol=0, atol=4 * 7.7e-6)
    assert_close_all([g.double() for g in g_got], g_ref, rtol=1e-4, atol=1e-7)
    # On an unseparated batch (s = 10) the value is exact to a few float32 roundings of its
    # terms.  The target logits' sum is one BLAS dot over N·d = 64,000 products, whose rounding
    # depends on how many threads split it: the bound holds for a two-way split (the suite
    # otherwise runs on one thread, where 5.3e-6 was measured: a sum twice as long per thread).
    # CUDA sums it as a tree, shorter still.
    s10 = torch.tensor(10.0, device=device)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        value = clip_loss(img.detach(), txt.detach(), s10, chunk_size=128).double().cpu()
    finally:
        torch.set_num_threads(before)
    ref10 = clip_loss(img64.detach(), txt64.detach(), torch.tensor(10.0, dtype=torch.float64))
    torch.testing.assert_close(value, ref10, rtol=2e-6, atol=0)


def test_column_underflow_fallback_is_exact(device):
    """Columns whose row-shifted exponentials underflow are recomputed with their own max.

    Unnormalised features with large norms give logits spread over thousands: a tile's
    column sums relative to the tile's maximum vanish in float32 and must not become −inf."""
    g = torch.Generator().manual_seed(0)
    img = (torch.randn(40, 8, generator=g) * torch.linspace(0.1, 30, 40)[:, None]).to(device).requires_grad_()
    txt = (torch.randn(40, 8, generator=g) * torch.linspace(30, 0.1, 40)[:, None]).to(device).requires_grad_()
    s = torch.tensor(5.0, device=device, requires_grad=True)
    got = clip_loss(img, txt, s, chunk_size=16)
    g_got = grads(got, img, txt, s)
    assert torch.isfinite(got)
    i64, t64, s64 = leaves(img, txt, s)
    ref = clip_loss(i64.detach(), t64.detach(), s64.detach())
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-3)
    g_ref = grads(clip_loss(i64, t64, s64), i64, t64, s64)
    # Logits reach ±4,000 here, so a float32 log-sum-exp carries ~ulp(4000) = 2.4e-4 of
    # absolute error into every probability: gradients agree to ~1e-3 of their scale.
    for a, b in zip(g_got, g_ref):
        assert torch.isfinite(a).all()
        assert (a.double().cpu() - b).abs().max() <= 1e-2 * b.abs().max()


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("chunk", [None, 32])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_low_precision_inputs_against_float64(dtype, rtol, chunk, eps, device):
    """bf16/fp16 features: the loss accumulates in float32, so its value is exact to
    float32 rounding of the rounded inputs; gradients come back in the input dtype, so
    their error is that dtype's rounding (bf16: 8 bits, fp16: 11 bits) — the tolerance.
    N = 100 with tiles of 32: the last tile is 4 wide.  (The CPU runs fp16 matmuls, slowly
    and without fast paths, so fp16 is checked on both devices.)"""
    img, txt = features(100, 32, dtype=dtype, seed=4, device=device)
    s = torch.tensor(30.0, device=device, requires_grad=True)
    labels = torch.arange(100, device=device) // 3
    got = clip_loss(img, txt, s, chunk_size=chunk, labels=labels, label_smoothing=eps)
    g_got = grads(got, img, txt, s)
    assert got.dtype == torch.float32 and got.device.type == device
    assert g_got[0].dtype == dtype and g_got[2].dtype == torch.float32
    i64, t64, s64 = leaves(img, txt, s)
    ref = clip_loss_ref(i64, t64, s64, labels, eps)
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-6, atol=1e-6)  # exact inputs, fp32 accumulation
    g_ref = grads(ref, i64, t64, s64)
    for a, b in zip(g_got, g_ref):
        scale = b.abs().max()
        err = (a.double().cpu() - b).abs().max()
        assert err <= rtol * scale, (a.dtype, err, scale)


def test_auto_chunk_and_module(device):
    """The module's default chunk size is "auto": on CUDA it reads the device's free memory."""
    img, txt = features(50, 8, seed=2, device=device)
    s = torch.tensor(20.0, dtype=torch.float64, device=device, requires_grad=True)
    got = ClipLoss(label_smoothing=0.05)(img, txt, s)
    ref = clip_loss_ref(img, txt, s, None, 0.05)
    torch.testing.assert_close(got.cpu(), ref)
    assert_close_all(grads(got, img, txt, s), grads(ref, img, txt, s), rtol=1e-10, atol=1e-12)
    assert 1 <= auto_chunk_size(50, 8) <= 50
    budget = 64 << 20
    edge = auto_chunk_size(100_000, 512, budget=budget)
    assert 16 * edge * edge <= budget < 16 * (2 * edge) ** 2  # the largest tile within budget


def test_matches_openclip_and_hf_formula(device):
    """OpenCLIP's ClipLoss and Hugging Face's clip_loss are ½(CE(logits) + CE(logitsᵀ)) with
    arange targets — written out here as they write it."""
    img, txt = features(17, 8, dtype=torch.float32, seed=5, device=device)
    s = torch.tensor(1 / 0.07, device=device)
    logits_per_image = s * img @ txt.T
    logits_per_text = s * txt @ img.T
    labels = torch.arange(17, device=device)
    theirs = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    for chunk in (None, 5):
        torch.testing.assert_close(clip_loss(img, txt, s, chunk_size=chunk), theirs, rtol=1e-6, atol=1e-6)


def test_gradient_is_softmax_minus_target():
    """dLoss/dL = ((softmax_rows(L) − Ỹ) + (softmax_cols(L) − Ỹ)) / 2N, checked on the logits."""
    n = 5
    logits = torch.randn(n, n, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(n, dtype=torch.float64)
    loss = clip_loss(eye, logits.T.contiguous(), 1.0)  # I = identity ⇒ L = I·(logitsᵀ)ᵀ = logits
    (g,) = torch.autograd.grad(loss, logits)
    expected = ((logits.softmax(1) - eye) + (logits.softmax(0) - eye)) / (2 * n)
    torch.testing.assert_close(g, expected.T.T)


# ---------------------------------------------------------------------------------------
# SigLIP loss
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,chunk", [(1, None), (1, 4), (7, None), (7, 3), (13, 5), (13, 64), (31, 8)])
@pytest.mark.parametrize("use_labels", [False, True])
def test_siglip_matches_reference(n, chunk, use_labels, device):
    img, txt = features(n, 6, seed=n + 1, device=device)
    s = torch.tensor(10.0, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.tensor(-10.0, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor(GROUPS[n], device=device) if use_labels else None
    got = siglip_loss(img, txt, s, b, labels=labels, chunk_size=chunk)
    assert got.device.type == device
    ref = siglip_loss_ref(img, txt, s, b, labels)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-12, atol=1e-12)
    assert_close_all(grads(got, img, txt, s, b), grads(ref, img, txt, s, b), rtol=1e-10, atol=1e-12)


def test_siglip_gradcheck_and_module(device):
    img, txt = features(8, 4, seed=7, device=device)
    s = torch.tensor(4.0, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4], device=device)
    assert torch.autograd.gradcheck(lambda *a: siglip_loss(*a, labels=labels, chunk_size=3), (img, txt, s, b))
    got = SigLipLoss()(img, txt, s, b, labels=labels)
    torch.testing.assert_close(got.cpu(), siglip_loss_ref(img, txt, s, b, labels))


def test_siglip_matches_openclip_formula(device):
    """OpenCLIP's SigLipLoss: −Σ logsigmoid(labels · logits) / N with labels 2·I − 1."""
    img, txt = features(12, 8, dtype=torch.float32, seed=8, device=device)
    s, b = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    logits = s * img @ txt.T + b
    sign = 2 * torch.eye(12, device=device) - 1
    theirs = -F.logsigmoid(sign * logits).sum() / 12
    for chunk in (None, 5):
        torch.testing.assert_close(siglip_loss(img, txt, s, b, chunk_size=chunk), theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_labels", [False, True])
def test_siglip_low_precision(dtype, use_labels, device):
    """bf16/fp16 features, N = 64 in tiles of 20 (the last one 4 wide): the value to fp32
    rounding, gradients to the input dtype's (2e-2 of their scale)."""
    img, txt = features(64, 16, dtype=dtype, seed=9, device=device)
    s = torch.tensor(10.0, device=device, requires_grad=True)
    b = torch.tensor(-10.0, device=device, requires_grad=True)
    labels = torch.arange(64, device=device) // 4 if use_labels else None
    got = siglip_loss(img, txt, s, b, labels=labels, chunk_size=20)
    assert got.dtype == torch.float32 and got.device.type == device
    i64, t64, s64, b64 = leaves(img, txt, s, b)
    ref = siglip_loss(i64, t64, s64, b64, labels=None if labels is None else labels.cpu())
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-6, atol=1e-6)
    for a, r in zip(grads(got, img, txt, s, b), grads(ref, i64, t64, s64, b64)):
        assert a.device.type == device
        assert (a.double().cpu() - r).abs().max() <= 2e-2 * r.abs().max()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("chunk", [None, 4], ids=["plain", "chunk-4"])
def test_scale_and_bias_may_be_cpu_scalars(kind, chunk, device):
    """The loss takes a scale and a bias held on the CPU (0-dim tensors, as ``torch.tensor(10.0)``
    makes them) with features on any device; their gradients come back on the CPU."""
    img, txt = features(9, 5, seed=11, device=device)
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5], device=device)
    if kind == "clip":
        inputs = (img, txt, s)
        got = clip_loss(img, txt, s, labels=labels, label_smoothing=0.1, chunk_size=chunk)
        ref = clip_loss_ref(img, txt, s, labels, 0.1)
    else:
        inputs = (img, txt, s, b)
        got = siglip_loss(img, txt, s, b, labels=labels, chunk_size=chunk)
        ref = siglip_loss_ref(img, txt, s, b, labels)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-12, atol=1e-12)
    g_got, g_ref = grads(got, *inputs), grads(ref, *inputs)
    assert [g.device.type for g in g_got] == [device, device] + ["cpu"] * (len(inputs) - 2)
    assert_close_all(g_got, g_ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------


def test_logit_scale_init_and_clamp():
    ls = LogitScale()
    assert math.isclose(float(ls().detach()), 1 / 0.07, rel_tol=1e-6)
    assert ls.bias is None
    sig = LogitScale.siglip()
    assert math.isclose(float(sig().detach()), 10.0, rel_tol=1e-6) and float(sig.bias.detach()) == -10.0
    with torch.no_grad():
        ls.log_scale.fill_(math.log(500.0))
    assert math.isclose(float(ls().detach()), 100.0, rel_tol=1e-6)  # value capped
    ls.clamp_()
    assert math.isclose(float(ls.log_scale.detach()), math.log(100.0), rel_tol=1e-6)
    ls().backward()
    assert ls.log_scale.grad is not None and float(ls.log_scale.grad) > 0  # at the cap, gradient still flows
    assert set(dict(sig.named_parameters())) == {"log_scale", "bias"}


def test_logit_scale_trains_through_the_loss(device):
    ls = LogitScale().to(device)
    img, txt = features(16, 8, dtype=torch.float32, device=device)
    clip_loss(img, txt, ls(), chunk_size=5).backward()
    g_tiled = ls.log_scale.grad.clone()
    ls.zero_grad()
    clip_loss(img, txt, ls()).backward()
    torch.testing.assert_close(g_tiled, ls.log_scale.grad)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img=torch.randn(4, 3), txt=torch.randn(5, 3)), r"same shape.*\(4, 3\).*\(5, 3\)"),
        (dict(img=torch.randn(4, 3), txt=torch.randn(4, 2)), r"same shape.*\(4, 3\).*\(4, 2\)"),
        (dict(img=torch.randn(4), txt=torch.randn(4)), r"image_features must have shape \(N, d\)"),
        (dict(img=torch.randn(0, 3), txt=torch.randn(0, 3)), r"empty batch"),
        (dict(img=torch.tensor([[float("nan"), 1.0]]), txt=torch.ones(1, 2)), r"image_features has non-finite"),
        (dict(txt=torch.tensor([[float("inf"), 1.0]]), img=torch.ones(1, 2)), r"text_features has non-finite"),
        (dict(scale=0.0), r"logit_scale must be positive"),
        (dict(scale=-1.0), r"logit_scale must be positive"),
        (dict(scale=torch.ones(2)), r"logit_scale must be a scalar"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), r"labels must have shape \(4,\).*\(3,\)"),
        (dict(labels=torch.zeros(4)), r"labels must be an integer tensor.*float32"),
        (dict(chunk=0), r"chunk_size must be"),
        (dict(eps=1.0), r"label_smoothing must be in \[0, 1\)"),
        (dict(img=torch.zeros(4, 3, dtype=torch.long), txt=torch.zeros(4, 3, dtype=torch.long)), r"floating point"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    img = kwargs.get("img", torch.randn(4, 3))
    txt = kwargs.get("txt", torch.randn(4, 3))
    with pytest.raises(ValueError, match=match):
        clip_loss(
            img, txt, kwargs.get("scale", 10.0), labels=kwargs.get("labels"),
            label_smoothing=kwargs.get("eps", 0.0), chunk_size=kwargs.get("chunk", None),
        )


def test_siglip_bad_bias():
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        siglip_loss(torch.randn(3, 2), torch.randn(3, 2), 10.0, float("nan"))


def test_distributed_true_without_process_group_is_an_error():
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        clip_loss(torch.randn(3, 2), torch.randn(3, 2), 10.0, distributed=True)


def test_loading_a_scale_above_the_cap_keeps_it():
    """OpenAI's checkpoints store log s = 4.6052 > log 100 and use s = 100.0035 as is."""
    ls = LogitScale()
    ls.load_state_dict({"log_scale": torch.tensor(4.6052)})
    assert math.isclose(float(ls().detach()), math.exp(4.6052), rel_tol=1e-6)
    ls.load_state_dict({"log_scale": torch.tensor(2.0)})  # a lower scale is unaffected
    assert math.isclose(float(ls().detach()), math.exp(2.0), rel_tol=1e-6)
