"""CLIP's image preprocessing with Pillow and torch only, equal to OpenCLIP's to the last bit.

OpenCLIP (``open_clip/transform.py``, ``image_transform``) composes torchvision transforms:
evaluation resizes the short side, centre-crops, converts to RGB, scales to [0, 1] and normalises;
training takes a ``RandomResizedCrop`` instead of the resize and crop.  The geometry runs on the
image in its own mode and the conversion to RGB comes after it, as in OpenAI's ``clip._transform``;
so Pillow resizes "P" and "1" images with nearest neighbours (it overrides the filter for them),
RGBA and LA with premultiplied alpha, and 16-bit images at 16 bits before ``convert("RGB")``
clips them to 255.  Every step below names the torchvision function whose arithmetic it repeats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "ImageTransform", "batch_preprocess", "image_transform"]

# OpenAI CLIP's per-channel statistics of its training images (clip/clip.py, _transform); every
# preset's `VisionConfig` defaults to them.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")


# --------------------------------------------------------------------- geometry on PIL images
def _resize(image: Image.Image, height: int, width: int, resample: Image.Resampling) -> Image.Image:
    """torchvision ``F.resize`` on a PIL image: unchanged if already that size."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample)


def _resize_short_side(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """torchvision ``Resize(size)``: the short side becomes ``size``, the long side is truncated."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    return _resize(image, new_height, new_width, resample)


def _resize_keep_ratio(
    image: Image.Image, size: tuple[int, int], longest: bool, resample: Image.Resampling
) -> Image.Image:
    """OpenCLIP's ``ResizeKeepRatio``: scale so the short (or long) side fits, sides rounded.

    For "shortest" with a non-square output OpenCLIP resamples bicubic whatever its
    ``interpolation``; this uses ``resample`` (the same by default).
    """
    height, width = image.size[::-1]
    ratio_h, ratio_w = height / size[0], width / size[1]
    # OpenCLIP's blend max * longest + min * (1 - longest), with longest 0 or 1
    ratio = max(ratio_h, ratio_w) * float(longest) + min(ratio_h, ratio_w) * (1.0 - float(longest))
    return _resize(image, round(height / ratio), round(width / ratio), resample)


def _pad(image: Image.Image, left: int, top: int, right: int, bottom: int, fill: int) -> Image.Image:
    """torchvision ``F.pad`` in constant mode on a PIL image: ``fill`` in every band, palette kept."""
    bands = len(image.getbands())
    color: int | tuple[int, ...] = fill if bands == 1 else (fill,) * bands
    padded = ImageOps.expand(image, border=(left, top, right, bottom), fill=color)
    if image.mode == "P":  # older Pillow releases drop the palette here; torchvision restores it too
        padded.putpalette(image.getpalette())
    return padded


def _center_crop(image: Image.Image, size: tuple[int, int], fill: int = 0) -> Image.Image:
    """torchvision ``F.center_crop``, or OpenCLIP's ``center_crop_or_pad`` with ``fill``: pad, then crop."""
    crop_h, crop_w = size
    width, height = image.size
    if crop_w > width or crop_h > height:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        image = _pad(image, pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2, fill)
        width, height = image.size
        if (width, height) == (crop_w, crop_h):
            return image
    top = round((height - crop_h) / 2.0)
    left = round((width - crop_w) / 2.0)
    return image.crop((left, top, left + crop_w, top + crop_h))


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: (top, left, crop height, crop width).

    Draws the same numbers in the same order, so a generator seeded like torch's global one
    gives torchvision's crops; ``None`` draws from the global generator as torchvision does.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_aspect = torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)
        aspect_ratio = torch.exp(log_aspect).item()
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)  # ten misses: the central crop nearest the ratio range
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# --------------------------------------------------------------------- to a normalised tensor
def _to_normalized_tensor(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """torchvision ``ToTensor`` then ``Normalize`` on an RGB image, in the same float32 steps."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # (H, W, 3)
    x = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # (3, H, W), as ToTensor
    return x.sub_(mean[:, None, None]).div_(std[:, None, None])


@dataclass(frozen=True)
class ImageTransform:
    """A PIL image to a normalised float tensor (3, height, width); built by `image_transform`."""

    size: tuple[int, int]  # output (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool
    resize_mode: str
    interpolation: str
    scale: tuple[float, float]  # training crops: range of the area fraction kept
    ratio: tuple[float, float]  # training crops: range of the aspect ratio
    fill: int  # padding value of the "longest" mode, per band of the input's mode
    generator: torch.Generator | None = None  # training crops: random numbers, global if None

    def __call__(self, image: Image.Image, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Preprocesses ``image``; ``generator`` overrides the transform's for this call."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        resample = _RESAMPLE[self.interpolation]
        if self.train:
            width, height = image.size
            g = generator if generator is not None else self.generator
            top, left, h, w = random_resized_crop_params(height, width, self.scale, self.ratio, g)
            image = _resize(image.crop((left, top, left + w, top + h)), *self.size, resample)
        elif self.resize_mode == "squash":
            image = _resize(image, *self.size, resample)
        elif self.resize_mode == "longest":
            image = _center_crop(_resize_keep_ratio(image, self.size, True, resample), self.size, self.fill)
        elif self.size[0] == self.size[1]:  # OpenCLIP's "shortest" for a square output
            image = _center_crop(_resize_short_side(image, self.size[0], resample), self.size)
        else:
            image = _center_crop(_resize_keep_ratio(image, self.size, False, resample), self.size)
        mean, std = torch.tensor(self.mean, dtype=torch.float32), torch.tensor(self.std, dtype=torch.float32)
        return _to_normalized_tensor(image.convert("RGB"), mean, std)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


def _triple(value: Sequence[float], name: str) -> tuple[float, float, float]:
    if len(value) != 3:
        raise ValueError(f"{name} must have one value per RGB channel, got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def image_transform(
    image_size: int | tuple[int, int] = 224,
    *,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    train: bool = False,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    fill: int = 0,
    generator: torch.Generator | None = None,
) -> ImageTransform:
    """CLIP's preprocessing, equal to ``open_clip.image_transform(image_size, is_train=train, ...)``.

    Args:
        image_size: output side, or (height, width).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel divisor after subtracting ``mean``.
        train: random resized crops (OpenCLIP's training augmentation) instead of resize + centre crop.
        resize_mode: evaluation geometry: "shortest" resizes the short side and centre-crops;
            "longest" fits the long side and pads with ``fill``; "squash" resizes to the output
            size, ignoring the aspect ratio.
        interpolation: "bicubic" or "bilinear" (Pillow's filters; nearest for "P" and "1" images).
            OpenCLIP's training crops are always bicubic; here they follow this argument.
        scale: training crops: range of the fraction of the image area kept.
        ratio: training crops: range of the aspect ratio (torchvision's default).
        fill: padding value in the "longest" mode, written in the image's own mode.
        generator: training crops: random number generator; torch's global one if None.  DataLoader
            workers would each copy one generator and crop alike: leave it None there (each
            worker's global generator is seeded apart) or pass one per call.
    """
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}")
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale!r}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio!r}")
    std = _triple(std, "std")
    if any(s == 0 for s in std):
        raise ValueError(f"std must be non-zero, got {std!r}")
    return ImageTransform(
        size=_pair(image_size, "image_size"),
        mean=_triple(mean, "mean"),
        std=std,
        train=train,
        resize_mode=resize_mode,
        interpolation=interpolation,
        scale=(float(scale[0]), float(scale[1])),
        ratio=(float(ratio[0]), float(ratio[1])),
        fill=fill,
        generator=generator,
    )


def batch_preprocess(
    images: Iterable[Image.Image], transform: Callable[[Image.Image], torch.Tensor] | None = None
) -> torch.Tensor:
    """Stacks preprocessed images into a batch (N, 3, height, width); OpenAI's eval transform by default."""
    transform = transform if transform is not None else image_transform()
    tensors = [transform(image) for image in images]
    if not tensors:
        raise ValueError("images must hold at least one image")
    return torch.stack(tensors)
