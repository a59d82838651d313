"""Running a CLIP model over a data source in batches: normalised image and text features.

    image_features = embed_images(model, images, batch_size=256)        # [N, D] float32
    text_features = embed_texts(model, tokenizer, captions, batch_size=256)

Both run under `torch.inference_mode`, optionally under autocast (``autocast_dtype=torch.bfloat16``),
show a tqdm progress bar unless ``progress=False``, and return L2-normalised float32 features
on the device the model ran on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["embed_images", "embed_texts"]


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _input_dtype(model: nn.Module) -> torch.dtype:
    parameter = next(model.parameters(), None)
    return parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _packed_width(model: nn.Module) -> int | None:
    """The width K of a SigLIP 2 NaFlex model's packed patches [P, K] (its preprocess's,
    `clipforge.transforms.naflex_transform`); None for a model that takes images only."""
    vision = getattr(getattr(model, "config", None), "vision", None)
    if not getattr(vision, "naflex", False):
        return None
    from clipforge.transforms import NAFLEX_FLAGS

    return NAFLEX_FLAGS + 3 * vision.patch_size**2


def _image_ndim(item: Tensor, packed_width: int | None) -> int:
    """Dimensions of one image: 2 for packed NaFlex patches [P, K], told by their last dimension K, else 3.

    Only an image exactly K = 2 + 3 * patch**2 pixels wide would be mistaken for patches; that is
    never a whole number of patches (for patches wider than 2 pixels), the widths a NaFlex tower sees.
    """
    return 2 if packed_width is not None and item.shape[-1] == packed_width else 3


def _items(images: Iterable[Any], packed_width: int | None) -> Iterator[Any]:
    """Items of an iterable, or of a map-style dataset (``__len__`` and ``__getitem__``) by index."""
    if isinstance(images, Tensor):
        return iter([images] if images.ndim == _image_ndim(images, packed_width) + 1 else images)
    if hasattr(images, "__getitem__") and hasattr(images, "__len__"):
        return (images[i] for i in range(len(images)))  # type: ignore[index]
    return iter(images)


def _image_batches(images: Iterable[Any], batch_size: int, packed_width: int | None = None) -> Iterator[Tensor]:
    """Batches [B, 3, H, W] from items that are images [3, H, W], batches [B, 3, H, W], or
    (image, label) pairs as torchvision datasets yield them; for a NaFlex model (``packed_width``)
    also its packed patches [P, K] and batches [B, P, K]."""
    pending: list[Tensor] = []
    for item in _items(images, packed_width):
        if isinstance(item, (tuple, list)):
            item = item[0]
        ndim = _image_ndim(item, packed_width) if isinstance(item, Tensor) else 3
        if not isinstance(item, Tensor) or item.ndim not in (ndim, ndim + 1):
            shape = list(item.shape) if isinstance(item, Tensor) else type(item).__name__
            packed = "" if packed_width is None else f", or NaFlex patches [P, {packed_width}] or batches of them"
            raise TypeError(f"expected image tensors [3, H, W] or batches [B, 3, H, W]{packed}, got {shape}")
        if item.ndim == ndim:
            pending.append(item)
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
            continue
        if pending:
            yield torch.stack(pending)
            pending = []
        yield from item.split(batch_size)
    if pending:
        yield torch.stack(pending)


def _embed(
    encode: Callable[[Tensor], Tensor],
    batches: Iterable[Tensor],
    *,
    device: torch.device,
    input_dtype: torch.dtype | None,
    autocast_dtype: torch.dtype | None,
    total: int | None,
    progress: bool,
    unit: str,
    embed_dim: int,
) -> Tensor:
    chunks: list[Tensor] = []
    # disable=None: no bar when stderr is not a terminal (a log file would get every redraw)
    with torch.inference_mode(), tqdm(total=total, disable=None if progress else True, unit=unit,
                                      dynamic_ncols=True) as bar:
        for batch in batches:
            batch = batch.to(device, dtype=input_dtype, non_blocking=True)
            with _autocast(device, autocast_dtype):
                features = encode(batch)
            chunks.append(F.normalize(features.float(), dim=-1))
            bar.update(len(batch))
    return torch.cat(chunks) if chunks else torch.empty(0, embed_dim, device=device)


def _embed_dim(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "embed_dim", 0))


def embed_images(
    model: nn.Module,
    images: Iterable[Any],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Tensor:
    """Normalised image features [N, D], float32, in the order of ``images``.

    Args:
        model: anything with ``encode_image(images)``; it should already sit on ``device``.
        images: image tensors [3, H, W], batches [B, 3, H, W] or (image, label) pairs, from an
            iterable or a map-style dataset (for a SigLIP 2 NaFlex model, its preprocess's packed
            patches [P, K] or batches [B, P, K]); ``len(images)``, if defined, is taken as the number
            of images for the progress bar.
        batch_size: images per forward pass (batches coming in larger are split).
        device: where to run; the model's device when None.
        autocast_dtype: run under `torch.autocast` with this dtype (e.g. torch.bfloat16).
        progress: show a progress bar.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    run_on = _device(model, device)
    total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
    return _embed(
        lambda batch: model.encode_image(batch),  # type: ignore[operator]
        _image_batches(images, batch_size, _packed_width(model)),
        device=run_on,
        input_dtype=None if autocast_dtype is not None else _input_dtype(model),
        autocast_dtype=autocast_dtype,
        total=total,
        progress=progress,
        unit="img",
        embed_dim=_embed_dim(model),
    )


def embed_texts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Tensor:
    """Normalised text features [len(texts), D], float32; arguments as `embed_images`.

    ``tokenizer`` maps a list of strings to token ids [B, L]; it runs one batch at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    texts = list(texts)
    batches = (tokenizer(texts[start : start + batch_size]) for start in range(0, len(texts), batch_size))
    return _embed(
        lambda tokens: model.encode_text(tokens),  # type: ignore[operator]
        batches,
        device=_device(model, device),
        input_dtype=None,  # token ids stay integers
        autocast_dtype=autocast_dtype,
        total=len(texts),
        progress=progress,
        unit="text",
        embed_dim=_embed_dim(model),
    )
