"""A micro CLIP and random rows for it, shared by the training tests (tests/test_train.py) and
their on-device forms (tests/test_on_device.py)."""

from __future__ import annotations

import torch

from clipforge.loss import SIGLIP_INIT_BIAS, SIGLIP_INIT_SCALE
from clipforge.model import CLIP, CLIPConfig
from clipforge.model.config import TextConfig, VisionConfig

VOCAB, CONTEXT, IMAGE = 64, 8, 16


def micro_clip(*, siglip: bool = False, dtype: torch.dtype = torch.float64, device: str = "cpu") -> CLIP:
    """A CLIP small enough to run a dozen rows in milliseconds, the same weights on every device
    (float64 unless asked)."""
    config = CLIPConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=IMAGE, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=2),
        init_logit_scale=SIGLIP_INIT_SCALE if siglip else 1 / 0.07,
        init_logit_bias=SIGLIP_INIT_BIAS if siglip else None,
    )
    torch.manual_seed(0)
    return CLIP(config).to(device=device, dtype=dtype)


def random_rows(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 3, 16, 16] (float64, CPU) and token rows [n, 8]: random ids, the end token (the
    largest id, where the text tower reads out) at a random position, zero padding."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    tokens = torch.zeros(n, CONTEXT, dtype=torch.long)
    for row in range(n):
        end = int(torch.randint(1, CONTEXT, (1,), generator=g))
        tokens[row, :end] = torch.randint(1, VOCAB - 1, (end,), generator=g)
        tokens[row, end] = VOCAB - 1
    return images, tokens
