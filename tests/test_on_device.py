"""Every device-dependent path on each device the machine has: "cpu", and "cuda" where available
(the ``device`` fixture; without CUDA its cases are skipped and say so).

The references are float64 on the CPU, so a CUDA case fails on a wrong CUDA path, not only on a
crash: model parity with the reference implementations' fixtures, the training step under bf16
and fp16 (the grad scaler, an overflowing step skipped), exact gradient accumulation, a resumed
run against one never stopped, the loss over a process group of one (NCCL on CUDA, gloo on the
CPU), evaluation and search embedding, and the auto chunk size read from the device's free memory.
The tiled losses themselves are checked on each device in tests/test_loss.py.

On CUDA, TF32 is off in every case here (the ``no_tf32`` fixture): with it, fp32 matmuls and
convolutions round their inputs to 10 bits and no fp32 tolerance would hold.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from _micro_clip import CONTEXT, IMAGE, micro_clip, random_rows
from clipforge import _tiled, clip_loss, siglip_loss
from clipforge.checkpoints import load, save
from clipforge.data import open_data
from clipforge.data.batches import MicroBatch
from clipforge.devices import check_precision
from clipforge.distributed import Comm
from clipforge.embed import embed_images, embed_texts
from clipforge.evaluate import evaluate_retrieval, evaluate_zeroshot
from clipforge.loss import auto_chunk_size
from clipforge.model import CLIP, CLIPConfig
from clipforge.model.config import TextConfig, VisionConfig
from clipforge.search.build import load_search_model
from clipforge.tokenizer import train_bpe
from clipforge.train import build_optimizer, compute_gradients, train, train_step
from clipforge.train.config import ConfigError, TrainConfig

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("no_tf32")


# --------------------------------------------------------------------------------------
# A micro CLIP and its batches
# --------------------------------------------------------------------------------------


def batches(images, tokens, sizes: list[int], *, device: str, dtype: torch.dtype) -> list[MicroBatch]:
    bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    return [MicroBatch(images[a:b].to(dtype), tokens[a:b], list(range(a, b))).to(torch.device(device))
            for a, b in zip(bounds, bounds[1:])]


def reference(loss: str, images, tokens, eps: float = 0.0) -> tuple[float, dict[str, torch.Tensor]]:
    """The plain formula in float64 on the CPU: one forward of every row, one backward."""
    model = micro_clip(siglip=loss == "siglip")
    img, txt, scale = model(images, tokens)
    if loss == "siglip":
        value = siglip_loss(img, txt, scale, model.logit_scale.bias)
    else:
        value = clip_loss(img, txt, scale, label_smoothing=eps)
    value.backward()
    return float(value.detach()), {name: p.grad for name, p in model.named_parameters()}


def relative_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖got − ref‖ / ‖ref‖ per parameter, in float64 on the CPU."""
    assert set(got) == set(ref)
    return {k: float((got[k].double().cpu() - ref[k]).norm() / ref[k].norm()) for k in ref}


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------
# Model parity: the reference implementations' fixtures on the device
# --------------------------------------------------------------------------------------

# name -> checkpoint (made by tests/fixtures/make_parity_fixtures.py, make_siglip_fixtures.py and
# make_chinese_clip_fixtures.py)
PARITY = {
    "openclip_vit_gelu": "parity/openclip_vit_gelu",
    "openclip_vit_quickgelu": "parity/openclip_vit_quickgelu.pt",
    "openai_rn": "parity/openai_rn.pt",
    "hf_vit": "parity/hf_vit",
    "openclip_vit_wide_heads": "parity/openclip_vit_wide_heads",
    "openclip_rn_deep": "parity/openclip_rn_deep",
    "hf_siglip": "siglip/hf_siglip",
    "hf_siglip2": "siglip/hf_siglip2",
    "openclip_siglip": "siglip/openclip_siglip.safetensors",
    "hf_chinese_clip": "chinese_clip/hf_chinese_clip",  # its tokens under "input_ids", padded with [PAD]
}


@pytest.mark.parametrize("name", PARITY)
def test_parity_fixtures_on_the_device(name, device):
    """Features within 1e-5 of the reference's on the CPU (fp32, as tests/test_checkpoints.py and
    test_siglip.py hold them; ≤ 1.2e-6 measured), logits within as much per unit of scale.  CUDA
    sums in other orders than the CPU the references ran on, so it is allowed 3e-5 (TF32 off):
    still below the > 1e-4 that the exact GELU in place of SigLIP's tanh one gives
    (tests/test_siglip.py), and the > 1e-3 of a wrong activation in CLIP (tests/test_checkpoints.py)."""
    path = TESTS / "fixtures" / PARITY[name]
    expected = load_file(str(path.parent / f"{name}.expected.safetensors"))
    model, _, _ = load(path, device=device)
    assert {p.device.type for p in model.parameters()} == {device}
    with torch.no_grad():
        image_features = model.encode_image(expected["images"].to(device))
        tokens = expected["tokens"] if "tokens" in expected else expected["input_ids"]  # the BERT tower masks padding
        text_features = model.encode_text(tokens.to(device))
        logits = model.logits(image_features, text_features)
    scale = float(model.logit_scale().detach())
    tolerance = 1e-5 if device == "cpu" else 3e-5
    for key, value, allowed in (("image_features", image_features, tolerance),
                                ("text_features", text_features, tolerance), ("logits", logits, tolerance * scale)):
        assert value.device.type == device
        diff = (value.cpu() - expected[key]).abs().max().item()
        assert diff <= allowed, f"{name} {key} on {device}: max abs diff {diff:.2e} > {allowed:.1e}"


# --------------------------------------------------------------------------------------
# The training step: bf16, fp16 with the grad scaler, exact accumulation
# --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:precision bf16 on this CPU")
@pytest.mark.parametrize("sizes", [[6], [3, 3]], ids=["one-batch", "accum-2"])
def test_bf16_step_against_float64(device, sizes):
    """Autocast to bf16 over fp32 weights: the loss within bf16's rounding of the float64 loss,
    every parameter's gradient within 10 % (in norm) of float64's (3.4 % measured on the CPU, for
    a LayerNorm bias).  fp32 without autocast lands within 1e-4 (1.6e-6 measured), so the lower
    bound shows that autocast ran."""
    images, tokens = random_rows(6)
    ref_loss, ref = reference("clip", images, tokens)
    errors = {}
    for precision in ("fp32", "bf16"):
        model = micro_clip(dtype=torch.float32, device=device)
        stats = compute_gradients(model, batches(images, tokens, sizes, device=device, dtype=torch.float32),
                                  precision=precision, chunk_size=4)
        assert stats["loss"] == pytest.approx(ref_loss, rel=2e-2 if precision == "bf16" else 1e-5)
        errors[precision] = relative_errors(grads_of(model), ref)
    assert max(errors["fp32"].values()) < 1e-4, errors["fp32"]
    assert max(errors["bf16"].values()) < 0.1, errors["bf16"]
    assert max(errors["bf16"].values()) > 1e-4  # bf16 rounding is visible: autocast was on


def test_fp16_step_uses_the_grad_scaler(device, tmp_path):
    """fp16 on CUDA: the scaler multiplies what is back-propagated and unscales before clipping, so
    the update follows float64's gradient; a loss scale too large for fp16 (2¹⁰⁰: the towers'
    gradients overflow) skips the step — weights and optimiser state unchanged — and halves the
    scale; the next step at a sane scale updates again.  On the CPU fp16 is refused in one line
    before anything is written (PyTorch's grad scaler is for CUDA)."""
    if device == "cpu":
        with pytest.raises(ValueError, match=r"^precision fp16 needs a CUDA device") as err:
            check_precision("fp16", device, training=True)
        assert "\n" not in str(err.value)
        out = tmp_path / "run"
        config = TrainConfig(model="tiny-vit", data="shapes://?n=8&size=32", steps=1, batch_size=8, vocab_size=600,
                             precision="fp16", device="cpu", out=str(out), progress=False)
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            train(config)
        assert not out.exists()
        return

    images, tokens = random_rows(6)
    _, ref = reference("clip", images, tokens)
    micro = batches(images, tokens, [6], device=device, dtype=torch.float32)
    model = micro_clip(dtype=torch.float32, device=device)
    scale = 2.0**10
    compute_gradients(model, micro, precision="fp16", chunk_size=4, loss_scale=scale)
    unscaled = {k: g / scale for k, g in grads_of(model).items()}
    errors = relative_errors(unscaled, ref)
    # fp16 keeps 11 bits to bf16's 8: 3.6e-3 measured under CPU autocast, which the trainer refuses
    assert max(errors.values()) < 2e-2, errors

    config = TrainConfig(batch_size=6, lr=1e-3, precision="fp16", chunk_size=4, progress=False)
    model = micro_clip(dtype=torch.float32, device=device)
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", init_scale=scale)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_step(model, micro, optimizer, config=config, scaler=scaler)
    assert stats["skipped"] == 0.0 and math.isfinite(stats["grad_norm"])
    assert scaler.get_scale() == scale  # no overflow: the scale stays (it grows after 2000 clean steps)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())

    scaler.update(new_scale=2.0**100)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in optimizer.state.items()}
    stats = train_step(model, micro, optimizer, config=config, scaler=scaler)
    assert stats["skipped"] == 1.0 and math.isfinite(stats["loss"]) and not math.isfinite(stats["grad_norm"])
    assert scaler.get_scale() == 2.0**99  # backed off by half
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for p, st in optimizer.state.items():
        for k, v in st.items():
            assert torch.equal(v, state[id(p)][k]), k  # "step" and both moments: the optimiser did not advance

    scaler.update(new_scale=scale)
    stats = train_step(model, micro, optimizer, config=config, scaler=scaler)
    assert stats["skipped"] == 0.0 and any(not torch.equal(v, params[k]) for k, v in model.state_dict().items())


def test_the_step_drives_a_grad_scaler(device):
    """`train_step` with PyTorch's grad scaler (the trainer makes one for fp16; its mechanics do not
    depend on the precision, so fp32 shows them on the CPU too): a clean step updates and keeps
    the scale; a gradient forced non-finite (a hook on the text projection) skips the update —
    weights and optimiser state unchanged — and halves the scale."""
    images, tokens = random_rows(6)
    micro = batches(images, tokens, [6], device=device, dtype=torch.float32)
    config = TrainConfig(batch_size=6, lr=1e-3, chunk_size=4, progress=False,
                         precision="fp16" if device == "cuda" else "fp32")
    model = micro_clip(dtype=torch.float32, device=device)
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_step(model, micro, optimizer, config=config, scaler=scaler)
    assert stats["skipped"] == 0.0 and math.isfinite(stats["grad_norm"]) and scaler.get_scale() == 2.0**10
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())

    hook = model.text.text_projection.register_hook(lambda g: g * math.inf)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in optimizer.state.items()}
    stats = train_step(model, micro, optimizer, config=config, scaler=scaler)
    assert stats["skipped"] == 1.0 and math.isfinite(stats["loss"]) and not math.isfinite(stats["grad_norm"])
    assert scaler.get_scale() == 2.0**9
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for p, st in optimizer.state.items():
        for k, v in st.items():
            assert torch.equal(v, state[id(p)][k]), k
    hook.remove()
    assert train_step(model, micro, optimizer, config=config, scaler=scaler)["skipped"] == 0.0


@pytest.mark.parametrize("loss,eps", [("clip", 0.0), ("clip", 0.1), ("siglip", 0.0)],
                         ids=["clip", "clip-smooth", "siglip"])
def test_accumulation_is_exact_on_the_device(device, loss, eps):
    """K = 3 micro-batches give the gradient of the one batch of 12, in float64 on the device, and
    both equal the CPU's plain-formula reference; the AdamW step taken from them is the same."""
    images, tokens = random_rows(12)
    ref_loss, ref = reference(loss, images, tokens, eps)
    got = []
    for sizes in ([12], [5, 4, 3]):
        model = micro_clip(siglip=loss == "siglip", device=device)
        micro = batches(images, tokens, sizes, device=device, dtype=torch.float64)
        stats = compute_gradients(model, micro, loss=loss, label_smoothing=eps, chunk_size=5)
        assert stats["loss"] == pytest.approx(ref_loss, rel=1e-12)
        got.append(grads_of(model))
    for name, g in ref.items():
        torch.testing.assert_close(got[1][name], got[0][name], rtol=1e-10, atol=1e-13, msg=name)
        torch.testing.assert_close(got[1][name].cpu(), g, rtol=1e-10, atol=1e-13, msg=name)

    config = TrainConfig(batch_size=12, accum_steps=3, loss=loss, label_smoothing=eps, lr=1e-2, grad_clip=0.5,
                         chunk_size=5, progress=False)
    after = []
    for sizes in ([12], [4, 4, 4]):
        model = micro_clip(siglip=loss == "siglip", device=device)
        optimizer = build_optimizer(model, config)
        stats = train_step(model, batches(images, tokens, sizes, device=device, dtype=torch.float64), optimizer,
                           config=config)
        assert stats["skipped"] == 0.0
        after.append(model.state_dict())
    for name, p in after[0].items():
        torch.testing.assert_close(after[1][name], p, rtol=1e-10, atol=1e-12, msg=name)


# --------------------------------------------------------------------------------------
# Resume: the same bits as a run never stopped
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def deterministic(device: str) -> Iterator[None]:
    """What bit-for-bit repetition needs on ``device``.

    ``torch.use_deterministic_algorithms(True)``: the ops with a non-deterministic CUDA kernel that
    this run reaches have a deterministic variant in that mode (``index_add_``, in the tiled loss's
    group sums when rows share an image); none of those that raise instead (PyTorch's list: adaptive pooling's and
    ``grid_sample``'s backward, ``cumsum`` of floats, ...) is reached.  cuBLAS repeats itself with a
    fixed workspace, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which must be set before CUDA starts:
    tests/conftest.py sets it.  Not deterministic on CUDA, whatever the mode: the backward of the
    fused attention kernels (``F.scaled_dot_product_attention``'s memory-efficient and flash
    backends) may add partial sums in any order, so attention runs on the math backend here.
    (Elsewhere in the library, ``generate``'s ``grid_sample`` backward has no deterministic CUDA
    kernel: a deterministic run of it raises.)
    """
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with contextlib.ExitStack() as stack:
            if device == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield
    finally:
        torch.use_deterministic_algorithms(before)


def test_resume_is_bit_identical_on_the_device(device, tmp_path):
    """Four steps of ``tiny-vit`` with checkpoints at 2 and 4; the run cut back to its step-2
    checkpoint and resumed ends on the same weights, bit for bit, as the run never stopped."""
    run = dict(model="tiny-vit", data="shapes://?n=8&size=32", steps=4, batch_size=8, warmup=1, lr=1e-3,
               vocab_size=600, save_every=2, log_every=1, device=device, progress=False)
    full, cut = tmp_path / "full", tmp_path / "cut"
    with deterministic(device):
        train(TrainConfig(**run, out=str(full)))
        shutil.copytree(full, cut)
        shutil.rmtree(cut / "checkpoints" / "step-0000004")
        (cut / "metrics.json").unlink()
        train(TrainConfig(**run, out=str(cut), resume="latest"))
    ref = load_file(full / "checkpoints" / "step-0000004" / "model.safetensors")
    got = load_file(cut / "checkpoints" / "step-0000004" / "model.safetensors")
    assert set(ref) == set(got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


# --------------------------------------------------------------------------------------
# The loss over a process group of one
# --------------------------------------------------------------------------------------


@pytest.fixture
def group_of_one(device, tmp_path) -> Iterator[None]:
    """A process group of this process alone: NCCL on CUDA, gloo on the CPU, met in a FileStore."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("chunk", [None, 4], ids=["plain", "chunk-4"])
def test_distributed_loss_with_one_rank_is_the_single_process_loss(device, group_of_one, kind, chunk):
    """The collectives' paths (gather with autograd for the plain formula; the row gather, the
    log-sum-exp and sum all-reduces of the tiled functions), driven through a `Comm` of one rank,
    give the single-process loss and gradients, which equal the CPU float64 ones."""
    g = torch.Generator().manual_seed(3)
    img64 = F.normalize(torch.randn(11, 6, generator=g, dtype=torch.float64), dim=1)
    txt64 = F.normalize(img64 + 0.8 * torch.randn(11, 6, generator=g, dtype=torch.float64), dim=1)
    labels64 = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 6])
    comm = Comm()
    assert comm.world_size == 1 and comm.rank == 0

    def run(on: str, with_comm: bool):
        img, txt = (t.to(on).requires_grad_() for t in (img64, txt64))
        s = torch.tensor(10.0, dtype=torch.float64, device=on, requires_grad=True)
        b = torch.tensor(-5.0, dtype=torch.float64, device=on, requires_grad=True)
        labels = labels64.to(on)
        inputs = (img, txt, s) if kind == "clip" else (img, txt, s, b)
        if not with_comm:
            value = (clip_loss(img, txt, s, labels=labels, label_smoothing=0.1, chunk_size=chunk) if kind == "clip"
                     else siglip_loss(img, txt, s, b, labels=labels, chunk_size=chunk))
        elif chunk is None:
            img_all, txt_all, labels_all = comm.gather_with_grad(img, txt, labels)
            value = (clip_loss(img_all, txt_all, s, labels=labels_all, label_smoothing=0.1) if kind == "clip"
                     else siglip_loss(img_all, txt_all, s, b, labels=labels_all))
        elif kind == "clip":
            value = _tiled._TiledClipLoss.apply(img, txt, s, labels, 0.1, chunk, comm)
        else:
            value = _tiled._TiledSigLipLoss.apply(img, txt, s, b, labels, chunk, comm)
        return value, torch.autograd.grad(value, inputs)

    ref_value, ref_grads = run("cpu", with_comm=False)
    for with_comm in (False, True):
        value, grads = run(device, with_comm)
        assert value.device.type == device
        torch.testing.assert_close(value.cpu(), ref_value, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)
    # the public switch: one rank is the single-process formula
    value, _ = run(device, with_comm=False)
    img, txt = img64.to(device), txt64.to(device)
    public = (clip_loss(img, txt, 10.0, labels=labels64.to(device), label_smoothing=0.1, chunk_size=chunk,
                        distributed=True) if kind == "clip"
              else siglip_loss(img, txt, 10.0, -5.0, labels=labels64.to(device), chunk_size=chunk, distributed=True))
    torch.testing.assert_close(public, value.detach(), rtol=1e-12, atol=1e-12)


def test_comm_collectives_with_one_rank(device, group_of_one):
    """The row gather (with its size exchange), the log-sum-exp and the sum all-reduce on the device."""
    comm = Comm()
    x = torch.arange(12.0, device=device).view(4, 3)
    gathered, offset = comm.all_gather_rows(x)
    assert offset == 0 and gathered.device.type == device and torch.equal(gathered, x)
    labels, _ = comm.all_gather_rows(torch.tensor([3, 1, 4], device=device))
    assert labels.tolist() == [3, 1, 4]
    v = torch.tensor([0.5, -math.inf, 80.0], device=device)
    torch.testing.assert_close(comm.all_logsumexp(v), v)
    total = comm.all_reduce_sum(x)
    assert torch.equal(total, x) and total.data_ptr() != x.data_ptr()  # a copy: the input is left alone


# --------------------------------------------------------------------------------------
# Evaluation and search embedding
# --------------------------------------------------------------------------------------

CLASSES = ["red", "green", "blue"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
SHADES = ["", "dark "]  # the second image of each colour is 40 darker


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A random micro CLIP saved with a BPE over the captions; three folders of solid images,
    the same as ``pairs:`` (image + caption) for retrieval."""
    root = tmp_path_factory.mktemp("on_device")
    captions = [f"a {shade}{c} square" for c in CLASSES for shade in SHADES] + [f"a photo of a {c}." for c in CLASSES]
    tokenizer = train_bpe(captions * 4, 600, min_frequency=1, context_length=CONTEXT)
    config = CLIPConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=IMAGE, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(context_length=CONTEXT, vocab_size=tokenizer.vocab_size, width=32, heads=2, layers=2),
    )
    torch.manual_seed(0)
    save(CLIP(config), root / "model", tokenizer=tokenizer)
    (root / "pairs").mkdir()
    for k, name in enumerate(CLASSES):
        (root / "folder" / name).mkdir(parents=True)
        for j in range(2):
            image = Image.new("RGB", (20, 18), tuple(max(0, v - 40 * j) for v in COLOURS[name]))
            image.save(root / "folder" / name / f"{j}.png")
            image.save(root / "pairs" / f"{k}{j}.png")
            (root / "pairs" / f"{k}{j}.txt").write_text(f"a {SHADES[j]}{name} square")
    return root


def cpu_reference(root: Path):
    """The saved model in float64 on the CPU, its preprocess and tokenizer."""
    model, preprocess, tokenizer = load(root / "model", dtype=torch.float64)
    return model, preprocess, tokenizer


@pytest.mark.filterwarnings("ignore:precision bf16 on this CPU")
def test_embedding_on_the_device_matches_float64(device, small_model):
    """`embed_images` / `embed_texts` on the device: float32, normalised, on the device, within
    1e-5 of float64 on the CPU (bf16 autocast within bf16's rounding); the search index's model
    (`load_search_model`) embeds the same vectors."""
    ref_model, preprocess, tokenizer = cpu_reference(small_model)
    folder = small_model / "folder"
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("*.png"))])
    texts = [f"a photo of a {c}." for c in CLASSES]
    ref_images = embed_images(ref_model, pixels, progress=False).double()
    ref_texts = embed_texts(ref_model, tokenizer, texts, progress=False).double()

    model, _, _ = load(small_model / "model", device=device)
    for autocast, tolerance in ((None, 1e-5), (torch.bfloat16, 3e-2)):
        images = embed_images(model, pixels, batch_size=4, autocast_dtype=autocast, progress=False)
        captions = embed_texts(model, tokenizer, texts, batch_size=2, autocast_dtype=autocast, progress=False)
        for got, ref in ((images, ref_images), (captions, ref_texts)):
            assert got.device.type == device and got.dtype == torch.float32
            torch.testing.assert_close(got.norm(dim=1).cpu(), torch.ones(len(got)), rtol=0, atol=1e-5)
            assert (got.cpu().double() - ref).abs().max() <= tolerance, (autocast, got.cpu().double() - ref)

    search_model = load_search_model(small_model / "model", device=device)
    assert search_model.device.type == device
    assert {p.device.type for p in search_model.model.parameters()} == {device}
    vectors = search_model.embed_images(pixels)
    assert vectors.dtype.name == "float32"
    assert abs(torch.from_numpy(vectors).double() - ref_images).max() <= 1e-5
    assert abs(torch.from_numpy(search_model.embed_texts(texts)).double() - ref_texts).max() <= 1e-5


def test_evaluation_on_the_device_matches_the_cpu(device, small_model):
    """Zero-shot and retrieval on the device give the metrics that the same model gives in
    float64 on the CPU.  No ranking here hangs on a near tie: zero-shot top-1 margins are ≥ 2 (in
    logits of scale 100), retrieval scores differ by ≥ 2e-3 — fp32 on either device is within 1e-6."""
    ref_model, preprocess, tokenizer = cpu_reference(small_model)
    model, _, _ = load(small_model / "model", device=device)
    templates = ["a photo of a {c}.", "a {c} square"]
    folder = open_data(f"imagefolder:{small_model / 'folder'}")
    pairs = open_data(f"pairs:{small_model / 'pairs'}")
    runs = {}
    for name, m, on in (("ref", ref_model, "cpu"), ("device", model, device)):
        zeroshot = evaluate_zeroshot(m, preprocess, tokenizer, folder, templates=templates, device=on, ks=(1, 2))
        retrieval = evaluate_retrieval(m, preprocess, tokenizer, pairs, device=on, ks=(1, 5))
        runs[name] = (zeroshot.metrics, retrieval.metrics)
    for ref, got in zip(runs["ref"], runs["device"]):
        assert set(ref) == set(got)
        for key, value in ref.items():
            assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert runs["ref"][0]["acc1"] is not None


# --------------------------------------------------------------------------------------
# The auto chunk size reads the device's free memory
# --------------------------------------------------------------------------------------


def test_auto_chunk_size_from_a_cuda_devices_free_memory(monkeypatch):
    """docs/loss.md: the largest power-of-two edge from 128 to 2048 (at most N) whose four fp32
    tiles (16·edge² bytes) fit min(64 MiB, 5 % of free memory), else 128.  On CUDA the free memory
    is `torch.cuda.mem_get_info`'s, asked of the features' device; mocked here, so no GPU is needed."""
    asked: list[torch.device] = []
    free = {"bytes": 0}

    def mem_get_info(device=None):
        asked.append(device)
        return free["bytes"], 141 << 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    mib, big = 1 << 20, 1 << 20
    cases = [
        (80 * 10**9, 2048),  # 5 % is 4 GB: the 64 MiB cap, where 16 · 2048² = 64 MiB just fits
        (1 << 30, 1024),  # 5 % is 51.2 MiB: 2048's 64 MiB does not fit, 1024's 16 MiB does
        (80 * mib, 512),  # 5 % is exactly 4 MiB = 16 · 512²
        (80 * mib - 64, 256),  # a hair less: 512 no longer fits
        (1 * mib, 128),  # nothing from 128 up fits 52 KiB: the floor
    ]
    for free_bytes, edge in cases:
        free["bytes"] = free_bytes
        assert auto_chunk_size(big, 512, device="cuda:1") == edge, free_bytes
        assert asked[-1] == torch.device("cuda:1")  # the device the features are on, not the current one
    free["bytes"] = 80 * 10**9
    assert auto_chunk_size(700, 512, device="cuda") == 700  # at most N
    assert auto_chunk_size(big, 512, device=torch.device("cuda", 0), budget=4 * mib) == 512  # a budget wins
    count = len(asked)
    auto_chunk_size(big, 512, device="cpu")
    assert len(asked) == count  # the CPU's free memory is the system's, not CUDA's


def test_auto_chunk_loss_on_the_device(device):
    """``chunk_size="auto"`` on the device's real free memory gives the plain formula's loss."""
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(300, 16, generator=g, dtype=torch.float64), dim=1).to(device)
    txt = F.normalize(torch.randn(300, 16, generator=g, dtype=torch.float64), dim=1).to(device)
    edge = auto_chunk_size(300, 16, device=device)
    assert 1 <= edge <= 300
    torch.testing.assert_close(clip_loss(img, txt, 20.0, chunk_size="auto"), clip_loss(img, txt, 20.0),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(siglip_loss(img, txt, 10.0, -10.0, chunk_size="auto"),
                               siglip_loss(img, txt, 10.0, -10.0), rtol=1e-12, atol=1e-12)
