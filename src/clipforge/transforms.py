"""CLIP's image preprocessing with Pillow and torch only, equal to OpenCLIP's to the last bit.

OpenCLIP (``open_clip/transform.py``, ``image_transform``) composes torchvision transforms:
evaluation resizes the short side, centre-crops, converts to RGB, scales to [0, 1] and normalises;
training takes a ``RandomResizedCrop`` instead of the resize and crop.  The geometry runs on the
image in its own mode and the conversion to RGB comes after it, as in OpenAI's ``clip._transform``;
so Pillow resizes "P" and "1" images with nearest neighbours (it overrides the filter for them),
RGBA and LA with premultiplied alpha, and 16-bit images at 16 bits before ``convert("RGB")``
clips them to 255.  Every step below names the torchvision function whose arithmetic it repeats.

SigLIP 2's NaFlex models (transformers' ``Siglip2Model``) see each image at its own aspect ratio:
`naflex_transform` resizes it to the largest grid of patches within a budget (`naflex_grid`) and
cuts it into patches, as transformers' ``Siglip2ImageProcessor`` does (its default torchvision
backend: the resize runs on the uint8 image through ``torch.nn.functional.interpolate``, antialiased,
the same call and the same values; its Pillow backend lands up to one grey level away).  Images of
different grids are carried as one fixed-shape tensor each (`pack_patches`), so that batching,
data loaders and ``.to()`` treat them as they treat images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "NAFLEX_FLAGS", "OPENAI_MEAN", "OPENAI_STD", "ImageTransform", "NaFlexTransform", "batch_preprocess",
    "image_transform", "naflex_grid", "naflex_transform", "pack_patches", "unpack_patches",
]

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


# --------------------------------------------------------------------- NaFlex (SigLIP 2, variable resolution)
# Columns in front of each patch of a packed NaFlex input: 1 for an image patch (0 for padding),
# 1 for the first patch of a grid row.  Flags of 0 and 1 survive any cast (bf16 holds them exactly),
# where a grid side written as a number would not.
NAFLEX_FLAGS = 2
# transformers' Siglip2ImageProcessor searches the scale by bisection over [1e-6, 100] until the
# interval is narrower than 1e-5 (get_image_size_for_max_num_patches); the same search gives the same grid.
_NAFLEX_SCALES = (1e-6, 100.0)
_NAFLEX_TOLERANCE = 1e-5
_TORCH_RESIZE = {"bilinear": "bilinear", "bicubic": "bicubic"}


def naflex_grid(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """(rows, columns) of patches an image of ``height`` x ``width`` pixels is resized to.

    The image is scaled by one factor, each side rounded up to whole patches (at least one), and the
    factor is the largest whose grid holds at most ``max_num_patches`` patches, as found by
    transformers' bisection (the sides keep the aspect ratio up to that rounding).
    """

    def grid(scale: float) -> tuple[int, int]:
        return (max(1, math.ceil(height * scale / patch_size)), max(1, math.ceil(width * scale / patch_size)))

    low, high = _NAFLEX_SCALES
    while high - low >= _NAFLEX_TOLERANCE:
        middle = (low + high) / 2
        rows, columns = grid(middle)
        if rows * columns <= max_num_patches:
            low = middle
        else:
            high = middle
    return grid(low)


def pack_patches(patches: torch.Tensor, grid: tuple[int, int], max_num_patches: int) -> torch.Tensor:
    """One image's patches [rows * columns, K] (raster order) as a NaFlex input [max_num_patches, 2 + K]:
    the two flag columns (`NAFLEX_FLAGS`), then the patch; rows past the image's patches are zeros."""
    rows, columns = grid
    count = rows * columns
    if patches.ndim != 2 or patches.shape[0] != count:
        raise ValueError(f"expected {count} patches [N, K] for a {rows}x{columns} grid, got {list(patches.shape)}")
    if count > max_num_patches:
        raise ValueError(f"a {rows}x{columns} grid has {count} patches, more than max_num_patches={max_num_patches}")
    packed = patches.new_zeros(max_num_patches, NAFLEX_FLAGS + patches.shape[1])
    packed[:count, 0] = 1
    packed[:count:columns, 1] = 1
    packed[:count, NAFLEX_FLAGS:] = patches
    return packed


def unpack_patches(packed: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """A batch of NaFlex inputs [B, P, 2 + K] (`pack_patches`'s) as (patches [rows * columns, K],
    (rows, columns)) per image; a ValueError naming the image whose flags do not describe a grid."""
    if packed.ndim != 3 or packed.shape[-1] <= NAFLEX_FLAGS:
        raise ValueError(f"expected NaFlex patches [B, P, {NAFLEX_FLAGS} + K], got {list(packed.shape)}")
    flags = packed[..., :NAFLEX_FLAGS].detach().to("cpu", torch.float32)
    out = []
    for index, (valid, starts) in enumerate(zip(flags[..., 0], flags[..., 1], strict=True)):
        count, rows = int(valid.sum()), int(starts.sum())
        columns = count // rows if rows else 0
        expected_valid = torch.arange(len(valid)) < count
        expected_starts = expected_valid & (torch.arange(len(valid)) % max(columns, 1) == 0)
        if (not rows or rows * columns != count or not torch.equal(valid, expected_valid.float())
                or not torch.equal(starts, expected_starts.float())):
            raise ValueError(f"NaFlex input {index}: its flag columns do not describe a grid of patches "
                             f"({count} image patches, {rows} row starts); make it with pack_patches")
        out.append((packed[index, :count, NAFLEX_FLAGS:], (rows, columns)))
    return out


def _naflex_resize(pixels: torch.Tensor, rows: int, columns: int, patch_size: int, interpolation: str) -> torch.Tensor:
    """torchvision ``F.resize`` of a uint8 image [3, H, W] on the CPU: antialiased, uint8 in and out."""
    size = (rows * patch_size, columns * patch_size)
    if tuple(pixels.shape[1:]) == size:
        return pixels
    return torch.nn.functional.interpolate(pixels[None], size=size, mode=_TORCH_RESIZE[interpolation],
                                           align_corners=False, antialias=True)[0]


@dataclass(frozen=True)
class NaFlexTransform:
    """A PIL image to a packed NaFlex input [max_num_patches, 2 + 3 * patch_size**2]; built by `naflex_transform`.

    Patches are flattened row by row, then column, then channel (transformers' ``pixel_values``
    order); `pack_patches` puts the flags in front.
    """

    patch_size: int
    max_num_patches: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    rescale_factor: float = 1 / 255

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8, copy=True))  # (H, W, 3)
        pixels = pixels.permute(2, 0, 1).contiguous()  # (3, H, W)
        rows, columns = naflex_grid(pixels.shape[1], pixels.shape[2], self.patch_size, self.max_num_patches)
        pixels = _naflex_resize(pixels, rows, columns, self.patch_size, self.interpolation)
        # transformers folds the rescale into the statistics: (x - mean / f) / (std / f), in float32
        scale = 1.0 / self.rescale_factor
        mean = torch.tensor(self.mean, dtype=torch.float32) * scale
        std = torch.tensor(self.std, dtype=torch.float32) * scale
        x = pixels.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None])  # (3, rows*P, columns*P)
        P = self.patch_size
        patches = x.reshape(3, rows, P, columns, P).permute(1, 3, 2, 4, 0)  # (rows, columns, P, P, 3)
        return pack_patches(patches.reshape(rows * columns, P * P * 3), (rows, columns), self.max_num_patches)


def naflex_transform(
    patch_size: int,
    max_num_patches: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    rescale_factor: float = 1 / 255,
) -> NaFlexTransform:
    """SigLIP 2 NaFlex preprocessing, equal to transformers' ``Siglip2ImageProcessor`` (torchvision backend).

    Args:
        patch_size: patch side in pixels.
        max_num_patches: the patch budget each image is resized to fit, and the packed length.
        mean, std: per-channel statistics of pixels scaled by ``rescale_factor``.
        interpolation: "bilinear" (the processor's default) or "bicubic", antialiased.
        rescale_factor: pixel values are multiplied by it before normalising (1/255).
    """
    if interpolation not in _TORCH_RESIZE:
        raise ValueError(f"interpolation must be one of {sorted(_TORCH_RESIZE)}, got {interpolation!r}")
    for name, value in (("patch_size", patch_size), ("max_num_patches", max_num_patches)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    std = _triple(std, "std")
    if any(s == 0 for s in std):
        raise ValueError(f"std must be non-zero, got {std!r}")
    return NaFlexTransform(patch_size, max_num_patches, _triple(mean, "mean"), std, interpolation,
                           float(rescale_factor))
