"""Tests for `CLIP.optimize_for_inference` (clipforge/model/_inference.py) against the plain modules."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from clipforge.model import CLIP, CLIPConfig, TextConfig, VisionConfig, _inference

pytestmark = pytest.mark.skipif(not _inference.available(), reason="this PyTorch build lacks oneDNN")

# The fp32 tolerance the optimized path promises (docs/benchmarks.md, "The model").
EXACT = {"atol": 1e-5, "rtol": 0.0}


def config(*, act: str = "gelu", resnet: bool = False, width: int = 24, heads: int = 3) -> CLIPConfig:
    if resnet:
        vision = VisionConfig(image_size=64, patch_size=None, width=8, layers=(1, 1, 1, 1), heads=4, act=act)
    else:
        vision = VisionConfig(image_size=40, patch_size=8, width=width, layers=3, heads=heads, act=act)
    text = TextConfig(context_length=17, vocab_size=60, width=16, heads=2, layers=3, act=act)
    return CLIPConfig(embed_dim=12, vision=vision, text=text)


def captions(lengths: list[int], context_length: int = 17, vocab_size: int = 60) -> torch.Tensor:
    """Rows [sot, ids..., eot, 0...] with eot the largest id, as in OpenAI's vocabulary."""
    g = torch.Generator().manual_seed(len(lengths))
    tokens = torch.zeros(len(lengths), context_length, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(1, vocab_size - 2, (n,), generator=g)
        tokens[row, 0], tokens[row, n - 1] = vocab_size - 2, vocab_size - 1
    return tokens


def plain_and_optimized(cfg: CLIPConfig, seed: int = 0) -> tuple[CLIP, CLIP]:
    torch.manual_seed(seed)
    plain = CLIP(cfg).eval()
    for p in plain.parameters():  # non-zero biases and LayerNorm affines, unlike the init
        if p.ndim == 1:
            p.data.add_(0.05 * torch.randn_like(p))
    return plain, copy.deepcopy(plain).optimize_for_inference()


def encode_both(plain: CLIP, fast: CLIP, images: torch.Tensor, tokens: torch.Tensor) -> list[tuple]:
    with torch.inference_mode():
        return [(fast.encode_image(images), plain.encode_image(images)),
                (fast.encode_text(tokens), plain.encode_text(tokens))]


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize(("batch", "lengths"), [(1, [5]), (2, [17, 3]), (7, [2, 9, 4, 17, 1, 11, 6])])
def test_optimized_matches_plain(monkeypatch, act, batch, lengths):
    monkeypatch.setattr(_inference, "_PACKED_MIN_WEIGHTS", 0)  # pack this toy model's small layers too
    plain, fast = plain_and_optimized(config(act=act), seed=batch)
    images = torch.randn(batch, 3, 40, 40)
    for got, want in encode_both(plain, fast, images, captions(lengths)):
        torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("rows", [range(0), range(1, 10**9)], ids=["all-mkl", "all-packed"])
def test_both_row_count_branches_match_plain(monkeypatch, rows):
    """Each layer picks oneDNN or MKL by its size and row count; force each choice everywhere."""
    monkeypatch.setattr(_inference, "_PACKED_ROWS", rows)
    monkeypatch.setattr(_inference, "_PACKED_MIN_WEIGHTS", 0)
    plain, fast = plain_and_optimized(config(), seed=1)
    for got, want in encode_both(plain, fast, torch.randn(3, 3, 40, 40), captions([4, 17, 8])):
        torch.testing.assert_close(got, want, **EXACT)


def test_realistic_width_matches_plain():
    """ViT-B-32's width, heads and patch size (fewer layers): the blocked weight layouts it uses."""
    cfg = CLIPConfig(
        embed_dim=512,
        vision=VisionConfig(image_size=224, patch_size=32, width=768, layers=2, heads=12),
        text=TextConfig(width=512, heads=8, layers=2),
    )
    plain, fast = plain_and_optimized(cfg, seed=2)
    tokens = captions([15, 12], context_length=77, vocab_size=cfg.text.vocab_size)
    for got, want in encode_both(plain, fast, torch.randn(2, 3, 224, 224), tokens):
        torch.testing.assert_close(got, want, **EXACT)


def test_packed_path_runs_only_where_it_is_exact(monkeypatch):
    calls = []
    packed = _inference.PackedTransformer.forward_pooled
    monkeypatch.setattr(_inference.PackedTransformer, "forward_pooled",
                        lambda self, *a, **k: calls.append(1) or packed(self, *a, **k))
    plain, fast = plain_and_optimized(config(), seed=3)
    images, tokens = torch.randn(2, 3, 40, 40), captions([3, 6])
    with torch.no_grad():
        fast.encode_image(images), fast.encode_text(tokens)
    assert len(calls) == 2
    features = fast.encode_image(images)  # gradients on: the plain modules, differentiable
    assert features.requires_grad
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast.encode_text(tokens)
    assert low.dtype == torch.bfloat16
    assert len(calls) == 2
    torch.testing.assert_close(features.detach(), plain.encode_image(images).detach(), **EXACT)


def test_changed_weights_are_repacked(monkeypatch):
    monkeypatch.setattr(_inference, "_PACKED_MIN_WEIGHTS", 0)
    plain, fast = plain_and_optimized(config(), seed=4)
    images, tokens = torch.randn(2, 3, 40, 40), captions([5, 17])
    encode_both(plain, fast, images, tokens)  # packed and used once
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(1.1)
    fast.load_state_dict(plain.state_dict())
    for got, want in encode_both(plain, fast, images, tokens):
        torch.testing.assert_close(got, want, **EXACT)
    block = fast.text.transformer.resblocks[1]
    block.mlp.c_fc.weight.data = block.mlp.c_fc.weight.data * 0.5  # a new tensor, same version
    plain.text.transformer.resblocks[1].mlp.c_fc.weight.data.mul_(0.5)
    for got, want in encode_both(plain, fast, images, tokens):
        torch.testing.assert_close(got, want, **EXACT)


def test_state_dict_copies_and_pickling_are_unchanged():
    plain, fast = plain_and_optimized(config(), seed=5)
    assert list(fast.state_dict()) == list(plain.state_dict())
    copied = copy.deepcopy(fast)  # the copy runs the plain modules
    assert copied.text.transformer._packed is None and copied.visual._packed_patches is None
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    images, tokens = torch.randn(1, 3, 40, 40), captions([7])
    for model in (copied, loaded):
        for got, want in encode_both(plain, model, images, tokens):
            torch.testing.assert_close(got, want, **EXACT)
    fast.optimize_for_inference(False)
    assert fast.text.transformer._packed is None and fast.visual._packed_patches is None


def test_resnet_image_tower_is_left_plain():
    plain, fast = plain_and_optimized(config(resnet=True), seed=6)
    assert not hasattr(fast.visual, "_packed_patches") and fast.text.transformer._packed is not None
    for got, want in encode_both(plain, fast, torch.randn(2, 3, 64, 64), captions([4, 9])):
        torch.testing.assert_close(got, want, **EXACT)
