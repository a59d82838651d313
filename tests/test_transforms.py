"""clipforge.transforms against OpenCLIP's preprocessing (tests/fixtures/transforms/)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge import transforms
from clipforge.transforms import ImageTransform, batch_preprocess, image_transform, random_resized_crop_params

FIXTURES = Path(__file__).parent / "fixtures" / "transforms"
CASES = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))["cases"]


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "expected.npz") as data:
        return {name: data[name] for name in data.files}


def _clipforge_transform(open_clip_kwargs: dict) -> ImageTransform:
    """The clipforge transform for open_clip.image_transform's keyword arguments."""
    kwargs = dict(open_clip_kwargs)
    mapped = {"image_size": kwargs.pop("image_size"), "train": kwargs.pop("is_train")}
    if "fill_color" in kwargs:
        mapped["fill"] = kwargs.pop("fill_color")
    if "aug_cfg" in kwargs:
        mapped["scale"] = tuple(kwargs.pop("aug_cfg")["scale"])
    if isinstance(mapped["image_size"], list):
        mapped["image_size"] = tuple(mapped["image_size"])
    return image_transform(**mapped, **kwargs)


def _open_clip_output(case: dict, expected: dict[str, np.ndarray]) -> torch.Tensor:
    codes, table = expected[case["name"]], expected[case["lut"]]
    return torch.from_numpy(np.stack([table[c][codes[c]] for c in range(3)]))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_equals_open_clip(case: dict, expected: dict[str, np.ndarray]) -> None:
    image = Image.open(FIXTURES / case["image"])
    assert image.mode == case["mode"]
    transform = _clipforge_transform(case["kwargs"])
    generator = None if case["seed"] is None else torch.Generator().manual_seed(case["seed"])
    out = transform(image, generator=generator)
    want = _open_clip_output(case, expected)
    assert out.dtype == torch.float32 and out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_fixtures_cover_every_mode() -> None:
    modes = {case["mode"] for case in CASES}
    assert {"L", "RGB", "RGBA", "P", "CMYK", "I;16", "LA", "1"} <= modes


def test_global_generator_matches_torchvision(expected: dict[str, np.ndarray]) -> None:
    case = next(c for c in CASES if c["name"] == "train_rgb_seed2")
    torch.manual_seed(case["seed"])  # torchvision draws from torch's global generator
    out = _clipforge_transform(case["kwargs"])(Image.open(FIXTURES / case["image"]))
    torch.testing.assert_close(out, _open_clip_output(case, expected), rtol=0, atol=1e-6)


def test_generator_makes_training_crops_reproducible() -> None:
    image = Image.open(FIXTURES / "photo_300x200.png")
    transform = image_transform(32, train=True, scale=(0.1, 0.5), generator=torch.Generator().manual_seed(0))
    first, second = transform(image), transform(image)
    assert not torch.equal(first, second)  # the generator advances
    again = image_transform(32, train=True, scale=(0.1, 0.5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(image), first) and torch.equal(again(image), second)
    assert torch.equal(transform(image, generator=torch.Generator().manual_seed(0)), first)


@pytest.mark.parametrize("height,width", [(1, 1), (7, 500), (500, 7), (97, 61), (224, 224)])
def test_random_crop_params_within_bounds(height: int, width: int) -> None:
    generator = torch.Generator().manual_seed(height * width)
    for _ in range(50):
        top, left, h, w = random_resized_crop_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3), generator)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0


def test_random_crop_fallback_is_central() -> None:
    # a 3-pixel-wide strip admits no crop of aspect ratio in [3/4, 4/3] keeping 90% of its area
    assert random_resized_crop_params(500, 3, (0.9, 1.0), (3 / 4, 4 / 3)) == (248, 0, 4, 3)
    assert random_resized_crop_params(3, 500, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 248, 3, 4)


def test_eval_geometry_rounding() -> None:
    # torchvision's Resize truncates the long side: 224 * 500 / 333 = 336.3 -> 336
    resized = transforms._resize_short_side(Image.new("L", (500, 333)), 224, Image.Resampling.BICUBIC)
    assert resized.size == (336, 224)
    # CenterCrop rounds the offset: (7 - 4) / 2 = 1.5 -> 2 (round half to even)
    ramp = Image.fromarray(np.arange(7, dtype=np.uint8)[None, :].repeat(4, 0))
    assert np.array(transforms._center_crop(ramp, (4, 4)))[0].tolist() == [2, 3, 4, 5]


def test_batch_preprocess() -> None:
    images = [Image.open(FIXTURES / name) for name in ("rgb_37x23.png", "p_33x45.png", "i16_48x36.png")]
    transform = image_transform(32)
    batch = batch_preprocess(images, transform)
    assert batch.shape == (3, 3, 32, 32)
    assert torch.equal(batch[1], transform(images[1]))
    assert batch_preprocess(images[:1]).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="images"):
        batch_preprocess([], transform)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"interpolation": "nearest"}, "interpolation"),
        ({"resize_mode": "crop"}, "resize_mode"),
        ({"scale": (0.9, 0.1)}, "scale"),
        ({"ratio": (0.0, 1.0)}, "ratio"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": (32, 32, 3)}, "image_size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
    ],
)
def test_invalid_arguments_name_themselves(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        image_transform(**kwargs)


def test_rejects_non_images() -> None:
    with pytest.raises(TypeError, match="PIL"):
        image_transform(32)(np.zeros((32, 32, 3), dtype=np.uint8))


def test_runtime_needs_only_pillow_and_torch() -> None:
    tree = ast.parse(Path(transforms.__file__).read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "collections", "dataclasses", "math", "numpy", "torch", "PIL"}
