"""`TrainConfig`: every setting of a training run, typed and validated on construction.

A run is configured from a TOML file and command-line overrides (``clipforge train
--config run.toml --steps 500``); an unknown key is an error that names it.  Each field's
``help`` (its dataclass metadata) documents it; ``clipforge train --help`` shows the texts.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["DEMO_CONFIG", "TrainConfig", "demo_config", "load_toml"]

PRECISIONS = ("fp32", "bf16", "fp16")
LOSSES = ("clip", "siglip")


def _option(default: Any, text: str) -> Any:
    """A field documented by ``text`` (its ``metadata["help"]``); a list default is copied for each config."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """A training run.  Each field's ``help`` (``dataclasses.fields(TrainConfig)[k].metadata["help"]``) is its
    documentation; ``clipforge train --help`` shows them."""

    model: str = _option("tiny", "preset name (random init) or checkpoint path to start from")
    data: str = _option("shapes://", "training data URI: shapes://, digits://, csv:FILE, jsonl:FILE, ...")
    out: str = _option("runs/train", "run directory: checkpoints, metrics.jsonl, TensorBoard logs")
    steps: int = _option(1000, "optimiser steps")
    batch_size: int = _option(256, "global batch per step (all ranks and micro-batches together)")
    accum_steps: int = _option(1, "micro-batches per step; the gradient equals one batch of batch_size")
    lr: float = _option(5e-4, "peak learning rate")
    warmup: int = _option(100, "linear warm-up steps, then cosine decay to min_lr_ratio · lr")
    min_lr_ratio: float = _option(0.0, "final learning rate as a fraction of lr")
    weight_decay: float = _option(0.2, "AdamW decay; never on gains, biases, embeddings, logit scale/bias")
    beta1: float = _option(0.9, "AdamW β1")
    beta2: float = _option(0.98, "AdamW β2 (CLIP §2.5 uses 0.98)")
    adam_eps: float = _option(1e-6, "AdamW ε (CLIP §2.5 uses 1e-6)")
    grad_clip: float = _option(1.0, "max global gradient norm; 0 disables clipping")
    precision: str = _option("fp32", "fp32, bf16 (autocast, CPU or CUDA) or fp16 (autocast + grad scaler, CUDA)")
    loss: str = _option("clip", "clip (softmax) or siglip (sigmoid)")
    label_smoothing: float = _option(0.0, "CLIP loss only")
    chunk_size: int | str | None = _option(
        "auto", "loss tile edge: auto picks it from N, d and free memory; none (None) is the plain N×N formula"
    )
    seed: int = _option(0, "model init, data order and augmentation")
    augment: bool = _option(False, "random resized crops (off for shapes://, whose captions name positions)")
    image_noise: float = _option(0.0, "std of Gaussian noise added to training pixels (values in [0, 1]); 0: none")
    workers: int = _option(0, "data loading processes")
    device: str = _option("auto", "auto, cpu, cuda, cuda:N")
    tokenizer: str = _option("", "tokenizer directory; empty: the checkpoint's, or a BPE trained on the data")
    vocab_size: int = _option(1024, "size of a BPE trained on the data (fresh presets only)")
    lock_image: bool = _option(False, "freeze the image tower (LiT)")
    lock_text: bool = _option(False, "freeze the text tower")
    grad_checkpointing: bool = _option(False, "recompute transformer blocks in backward")
    compile: bool = _option(False, "torch.compile the model")
    resume: str = _option("", '"latest" or a checkpoint directory; empty starts afresh')
    save_every: int = _option(500, "checkpoint every N steps (and at the end)")
    keep_last: int = _option(3, "checkpoints kept")
    log_every: int = _option(10, "steps between metrics.jsonl lines")
    eval_every: int = _option(0, "steps between evaluations; 0: only at the end")
    eval_zeroshot: list[str] = _option([], "labelled data URIs for zero-shot accuracy")
    eval_retrieval: str = _option("", "captioned data URI for retrieval recall@k")
    eval_samples: int = _option(512, "images per evaluation set (the first N)")
    max_bad_fraction: float = _option(0.1, "stop when more of the samples read are unreadable")
    progress: bool = _option(True, "tqdm progress bar")

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"train config: {name} {what}, got {getattr(self, name)!r}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        positive = ("steps", "batch_size", "accum_steps", "save_every", "keep_last", "log_every", "eval_samples",
                    "vocab_size")
        for name in positive:
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be a positive integer")
        for name in ("warmup", "eval_every", "workers", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, name, "must be a non-negative integer")
        numbers = ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip", "label_smoothing",
                   "max_bad_fraction", "image_noise")
        for name in numbers:
            value = getattr(self, name)  # a quoted number in TOML would otherwise fail below with a TypeError
            need(isinstance(value, (int, float)) and not isinstance(value, bool), name, "must be a number")
        if self.chunk_size == "none":  # TOML and the CLI have no null
            self.chunk_size = None
        need(self.chunk_size is None or self.chunk_size == "auto" or (is_int(self.chunk_size) and self.chunk_size >= 1),
             "chunk_size", "must be 'auto', 'none' (the plain formula) or a positive tile edge"
             + (" (0 meant 'auto' before: write 'auto')" if self.chunk_size == 0 else ""))
        need(self.lr > 0, "lr", "must be positive")
        need(self.adam_eps > 0, "adam_eps", "must be positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "must be non-negative")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta2" if not 0 <= self.beta2 < 1 else "beta1",
             "must be in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must be non-negative")
        need(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        need(self.loss in LOSSES, "loss", f"must be one of {LOSSES}")
        need(self.image_noise >= 0, "image_noise", "must be non-negative")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(0 <= self.max_bad_fraction <= 1, "max_bad_fraction", "must be in [0, 1]")
        need(not (self.lock_image and self.lock_text), "lock_text", "cannot be set together with lock_image")
        need(self.batch_size % self.accum_steps == 0, "accum_steps", f"must divide batch_size={self.batch_size}")
        need(isinstance(self.eval_zeroshot, list), "eval_zeroshot", "must be a list of data URIs")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a [train] table is accepted as well as top-level keys."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
    return data.get("train", data)


# The demo's run file, shipped with the package (`clipforge demo`, `clipforge demo --print-config`).
DEMO_CONFIG = Path(__file__).with_name("demo.toml")


def demo_config() -> TrainConfig:
    """The demo run (`DEMO_CONFIG`) as a `TrainConfig`."""
    return TrainConfig.from_dict(load_toml(DEMO_CONFIG), source=str(DEMO_CONFIG))
