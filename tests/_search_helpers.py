"""A small image collection and a model trained on it, shared by the search tests.

The collection: `N_IMAGES` single-object ``shapes://`` images (the ``seen`` split, 32×32) written
as ``pairs:`` files with the caption "a {colour} {shape}".  The model: a micro CLIP (2-layer
32-pixel ViT, 1-layer text tower, 32-d embeddings) trained by `clipforge.train.train` for
`STEPS` steps on those pairs, about 15 s on two busy CPU cores.  That is enough to learn
colour — a colour query puts images of that colour first — but not shape, so the tests check
colours only.  The training runs once per test session, whichever test asks first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clipforge.data.shapes import ShapesDataset

N_IMAGES = 720
STEPS = 250
_cache: dict[str, Collection] = {}


@dataclass(frozen=True)
class Collection:
    images: Path  # the pairs folder: 00000.png + 00000.txt, ...
    model: Path  # the trained checkpoint folder (weights, config and tokenizer)
    other_model: Path  # the same architecture with other weights
    colours: dict[str, str]  # file name -> colour


def write_pairs(folder: Path, dataset: ShapesDataset, indices: range) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    colours = {}
    for i in indices:
        obj = dataset.objects(i)[0]
        dataset[i][0].save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"a {obj.colour} {obj.shape}")
        colours[f"{i:05d}.png"] = obj.colour
    return colours


def collection(tmp_path_factory) -> Collection:
    """The shared collection and model (made on first use)."""
    if "c" in _cache:
        return _cache["c"]
    from clipforge.checkpoints import save
    from clipforge.model import CLIP, CLIPConfig
    from clipforge.model.config import TextConfig, VisionConfig
    from clipforge.tokenizer import train_bpe
    from clipforge.train import train
    from clipforge.train.config import TrainConfig

    root = tmp_path_factory.mktemp("search")
    dataset = ShapesDataset(split="seen", size=32, n=N_IMAGES)
    colours = write_pairs(root / "images", dataset, range(N_IMAGES))
    captions = [(root / "images" / name).with_suffix(".txt").read_text() for name in colours]
    tokenizer = train_bpe(captions, 600, min_frequency=1, context_length=8)
    config = CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2),
        text=TextConfig(context_length=8, vocab_size=tokenizer.vocab_size, width=64, heads=2, layers=1),
    )
    torch.manual_seed(0)
    save(CLIP(config), root / "init", tokenizer=tokenizer)
    torch.manual_seed(1)
    save(CLIP(config), root / "other", tokenizer=tokenizer)
    train(TrainConfig(model=str(root / "init"), data=f"pairs:{root / 'images'}", out=str(root / "run"),
                      steps=STEPS, batch_size=64, lr=1e-3, warmup=10, save_every=STEPS, log_every=50,
                      progress=False, seed=0))
    model = root / "run" / "checkpoints" / f"step-{STEPS:07d}"
    _cache["c"] = Collection(root / "images", model, root / "other", colours)
    return _cache["c"]
