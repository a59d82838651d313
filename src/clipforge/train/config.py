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

__all__ = ["DEMO_CONFIG", "RESUME_MAY_CHANGE", "ConfigError", "TrainConfig", "check_resume", "demo_config",
           "load_toml"]

PRECISIONS = ("fp32", "bf16", "fp16")
LOSSES = ("clip", "siglip")


def _option(default: Any, text: str) -> Any:
    """A field documented by ``text`` (its ``metadata["help"]``); a list default is copied for each config."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


class ConfigError(ValueError):
    """Settings a run cannot start with: a device or precision this machine lacks, or a resume that
    contradicts its checkpoint.  Raised before the run writes anything."""


@dataclass
class TrainConfig:
    """A training run.  Each field's ``help`` (``dataclasses.fields(TrainConfig)[k].metadata["help"]``) is its
    documentation; ``clipforge train --help`` shows them."""

    model: str = _option("tiny", "what to start from: a preset name (random init), a checkpoint path, or a "
                         "pretrained name (ViT-B-32:openai, hf-hub:ORG/NAME, ORG/NAME; `clipforge models` lists them)")
    pretrained: str = _option("", "released weights for the architecture model names (openai, laion2b_s34b_b79k, ...; "
                              "or a weights file), the same as model ARCH:TAG; empty: model alone says")
    data: str = _option("shapes://",
                        "training data URI: shapes://, digits://, csv:FILE, jsonl:FILE, pairs:DIR, shards:URLS")
    out: str = _option("runs/train", "run directory: checkpoints, metrics.jsonl, TensorBoard logs")
    steps: int = _option(1000, "optimiser steps")
    batch_size: int = _option(256, "global batch per step (all ranks and micro-batches together)")
    accum_steps: int = _option(1, "micro-batches per step; the gradient equals one batch of batch_size")
    lr: float = _option(5e-4, "peak learning rate")
    warmup: int = _option(100, "linear warm-up steps, then cosine decay to min_lr_ratio · lr")
    min_lr_ratio: float = _option(0.0, "final learning rate as a fraction of lr")
    weight_decay: float = _option(0.2, "AdamW decay; never on gains, biases, embeddings, logit scale/bias")
    beta1: float = _option(0.9, "AdamW β1")
    beta2: float = _option(0.98, "AdamW β2 (CLIP's ViTs used 0.98, its ResNets 0.999)")
    adam_eps: float = _option(1e-6, "AdamW ε (CLIP's ViTs used 1e-6, its ResNets 1e-8)")
    grad_clip: float = _option(1.0, "max global gradient norm; 0 disables clipping")
    precision: str = _option("fp32", "fp32, bf16 (autocast, CPU or CUDA) or fp16 (autocast + grad scaler, CUDA)")
    loss: str = _option("clip", "clip (softmax) or siglip (sigmoid, with a learned bias); a fresh preset starts with "
                        "the loss's scale and bias, a checkpoint must be of its family (CLIP or SigLIP)")
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
    progress: bool = _option(True, "a progress bar on a terminal, else a plain line every log_every steps")

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
        for name in ("model", "pretrained"):
            need(isinstance(getattr(self, name), str), name, "must be a string")
        need(bool(self.model.strip()), "model", "must name a preset, a checkpoint or pretrained weights")

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


# The keys a resumed run may set differently from its checkpoint: none of them changes what a step
# computes.  Every other difference is refused (`check_resume`): the data, the seed and the batch
# decide which samples each step reads; the model, the loss, the precision, the chunk size and the
# optimiser's and schedule's keys decide what a step does with them.
RESUME_MAY_CHANGE = frozenset({
    "out", "resume",  # where the run lives and which checkpoint it continues from
    "log_every", "progress",  # logging
    "eval_every", "eval_zeroshot", "eval_retrieval", "eval_samples",  # evaluation reads the model, never changes it
    "save_every", "keep_last",  # checkpoint cadence
    "device",  # where the steps run
    "max_bad_fraction",  # when unreadable data stops the run, not what it trains on
})
# ``workers`` may change too, for map-style sources only: their batch order is a function of
# (seed, step), whoever loads it; a streamed source (shards:) is split between the loader workers.
# ``steps`` may grow with ``extend_schedule``: the learning-rate schedule is then re-planned.


def check_resume(saved: dict[str, Any], config: TrainConfig, *, run: str | Path, step: int, streaming: bool,
                 extend_schedule: bool = False) -> None:
    """A `ConfigError` naming both values of every key where ``config`` contradicts the ``saved``
    config of the checkpoint at ``step`` that it resumes; None when the run may continue."""
    where = f"cannot resume {run} at step {step}"
    if config.steps < step:
        raise ConfigError(f"{where}: steps is {config.steps}, fewer than the {step} the checkpoint has done")
    allowed = RESUME_MAY_CHANGE if streaming else RESUME_MAY_CHANGE | {"workers"}
    defaults = TrainConfig().to_dict()  # a checkpoint written before a key existed ran with its default
    now = config.to_dict()
    changed = [(key, saved.get(key, defaults[key]), value) for key, value in now.items()
               if key not in allowed and saved.get(key, defaults[key]) != value]
    steps = [c for c in changed if c[0] == "steps"]
    others = [c for c in changed if c[0] != "steps"]
    if others:
        values = "; ".join(f"{key} is {old!r} in the checkpoint, {new!r} now" for key, old, new in others)
        split = streaming and any(key == "workers" for key, _, _ in others)
        why = " (a streamed source is split between the loader workers)" if split else ""
        raise ConfigError(f"{where}: {values}{why}; resume with the checkpoint's values, or start a new run from it "
                          f"with --model {run}/checkpoints/step-{step:07d}")
    if steps and not extend_schedule:
        old = steps[0][1]
        if config.steps < old:
            raise ConfigError(f"{where}: steps is {old} in the checkpoint, {config.steps} now; a run cannot be "
                              "shortened on resume (its learning-rate schedule was planned for its steps)")
        raise ConfigError(f"{where}: steps is {old} in the checkpoint, {config.steps} now; more steps change the "
                          "learning-rate schedule: pass --extend-schedule to re-plan it from this step")
    if steps and config.steps < steps[0][1]:
        raise ConfigError(f"{where}: steps is {steps[0][1]} in the checkpoint, {config.steps} now; "
                          "--extend-schedule only lengthens a run")


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a [train] table is accepted as well as top-level keys."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    from clipforge.data.text import read_text

    # missing, a folder or not UTF-8: one line naming the file; an empty run file sets nothing
    text = read_text(path, what="run file", allow_empty=True)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    return data.get("train", data)


# The demo's run file, shipped with the package (`clipforge demo`, `clipforge demo --print-config`).
DEMO_CONFIG = Path(__file__).with_name("demo.toml")


def demo_config() -> TrainConfig:
    """The demo run (`DEMO_CONFIG`) as a `TrainConfig`."""
    return TrainConfig.from_dict(load_toml(DEMO_CONFIG), source=str(DEMO_CONFIG))
