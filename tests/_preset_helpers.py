"""Shared by tests/test_presets.py and tests/test_siglip.py: full-size presets against the tensor
shapes OpenCLIP records in a fixture."""

from __future__ import annotations

import re
from functools import cache

import torch

from clipforge.model import CLIP, get_config


def expand_blocks(shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """A fixture's "resblocks.{0..31}.ln_1.weight" runs written out, one name per block."""
    out = {}
    for key, shape in shapes.items():
        match = re.search(r"\{(\d+)\.\.(\d+)\}", key)
        if match is None:
            out[key] = shape
            continue
        for index in range(int(match[1]), int(match[2]) + 1):
            out[key[: match.start()] + str(index) + key[match.end():]] = shape
    return out


@cache
def meta_model(name: str) -> CLIP:
    """The preset ``name`` at full size on the meta device: shapes, no memory for the weights."""
    with torch.device("meta"):
        return CLIP(get_config(name))
