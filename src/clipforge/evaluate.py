"""Evaluating a model on a data source: zero-shot classification and image–text retrieval.

    import clipforge
    from clipforge.data import open_data
    from clipforge.evaluate import evaluate_retrieval, evaluate_zeroshot

    model, preprocess, tokenizer = clipforge.load("runs/demo/checkpoints/step-0000750")
    result = evaluate_zeroshot(model, preprocess, tokenizer, open_data("shapes://?split=heldout"))
    result.metrics["acc1"], result.skipped
    result = evaluate_retrieval(model, preprocess, tokenizer, open_data("csv:captions.tsv"), limit=1000)
    result.metrics["text_to_image_R@1"]

These two functions are the one evaluation path: ``clipforge eval zeroshot|retrieval`` and the
trainer's periodic evaluation (``eval_zeroshot``, ``eval_retrieval``, ``eval_samples``) both call
them, so a number logged during training is the number the command gives for the saved
checkpoint.  Zero-shot classification takes a `LabelledSource` and retrieval a
`CaptionedSource` (`clipforge.data.protocols`); ``limit`` evaluates the first ``limit`` images.

The metrics are `clipforge.zeroshot.classification_metrics` and
`clipforge.retrieval.retrieval_metrics`, whose module notes define them.  Unreadable image
files are skipped and returned in the result, with their captions.

The model runs in eval mode, and afterwards each of its modules is back in its own mode: a
tower frozen for training (``lock_image``) stays in eval mode, its BatchNorm statistics frozen.
Torch's global random state is left as it was, so evaluating does not change a training run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from clipforge.data import CaptionedSource, DataError, LabelledSource, open_data
from clipforge.data.images import Skipped
from clipforge.data.protocols import first_n
from clipforge.embed import embed_images, embed_texts
from clipforge.retrieval import retrieval_metrics
from clipforge.zeroshot import (
    Templates,
    build_zeroshot_classifier,
    classification_metrics,
    expand_prompts,
    zeroshot_logits,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "RetrievalResult",
    "ZeroshotResult",
    "eval_mode",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "open_eval_source",
]

# The shipped template set used for a source without prompts of its own (`clipforge.templates`).
DEFAULT_TEMPLATES = "default"

Preprocess = Callable[[Image.Image], Tensor]
Tokenizer = Callable[[list[str]], Tensor]


@dataclass
class ZeroshotResult:
    """What `evaluate_zeroshot` measured, on what."""

    metrics: dict[str, Any]  # `classification_metrics`: acc{k}, mean_per_class_recall, confusion_matrix, ...
    classnames: list[str]  # in label order
    templates: Templates  # the prompts' templates
    prompts: int  # prompts embedded, over all classes
    images: int  # images asked for: the first `limit`
    images_evaluated: int  # of those, the readable ones
    skipped: list[Skipped] = field(default_factory=list)  # the unreadable ones
    timings_s: dict[str, float] = field(default_factory=dict)  # seconds: classifier, images, metrics


@dataclass
class RetrievalResult:
    """What `evaluate_retrieval` measured, on what."""

    metrics: dict[str, float | None]  # `retrieval_metrics`: {text_to_image,image_to_text}_R@{k}, ranks
    images: int  # images asked for: the first `limit`
    images_evaluated: int  # of those, the readable ones
    captions: int  # captions of the images asked for
    captions_evaluated: int  # of those, the captions of readable images
    captions_skipped: int  # captions the source left out (empty, or unreadable caption files)
    skipped: list[Skipped] = field(default_factory=list)  # unreadable images, left out with their captions
    timings_s: dict[str, float] = field(default_factory=dict)  # seconds: images, texts, metrics


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode; on exit each module gets back its own mode.

    ``model.train(was_training)`` would put every module back in train mode, including a tower
    that training keeps frozen in eval mode, whose BatchNorm statistics would then move.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def open_eval_source(uri: str, task: str, **options: Any) -> Any:
    """The data source ``uri`` names, checked to serve ``task`` ("zeroshot" or "retrieval"): a
    `LabelledSource` or a `CaptionedSource`; a DataError in one line otherwise."""
    if task not in ("zeroshot", "retrieval"):
        raise ValueError(f"task must be 'zeroshot' or 'retrieval', got {task!r}")
    source = open_data(uri, **options)
    what = "zero-shot classification" if task == "zeroshot" else "retrieval"
    if getattr(source, "streaming", False):
        raise DataError(f"{what} cannot use {uri!r}: a streamed source is no evaluation source (it has no fixed "
                        "first N images); evaluate on imagefolder:, csv:, jsonl:, pairs:, shapes:// or digits://")
    if task == "zeroshot" and not isinstance(source, LabelledSource):
        raise DataError(f"{what} cannot use {uri!r}: it gives a {type(source).__name__}, which has no class labels "
                        "(labelled sources: imagefolder:, shapes://?split=seen|heldout, digits://)")
    if task == "zeroshot" and len(source):
        source.label(0)  # a split without labels (shapes://?split=val) says so now, not at the first evaluation
    if task == "retrieval" and not isinstance(source, CaptionedSource):
        raise DataError(f"{what} cannot use {uri!r}: it gives a {type(source).__name__}, which has no captions "
                        "(captioned sources: csv:, jsonl:, pairs:, shapes://, digits://)")
    return source


def _source_templates(source: LabelledSource) -> Templates:
    own = source.templates
    if own is not None:
        return own
    from clipforge.templates import load_templates

    return load_templates(DEFAULT_TEMPLATES)


def evaluate_zeroshot(
    model: nn.Module,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    source: LabelledSource,
    *,
    templates: Templates | None = None,
    classnames: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    workers: int = 0,
    progress: bool = False,
    ks: Sequence[int] = (1, 5),
) -> ZeroshotResult:
    """Zero-shot classification of the first ``limit`` images of ``source`` (all when None).

    Args:
        model: a CLIP model (``encode_image``, ``encode_text``), already on ``device``.
        preprocess: PIL image -> tensor [3, H, W]: the model's evaluation transform.
        tokenizer: list of strings -> token ids [B, L].
        source: the labelled images.
        templates: the prompts (a list with ``{c}``, or class -> prompts); by default the
            source's own, else the shipped `DEFAULT_TEMPLATES` set.
        classnames: the names put in the prompts, in label order; by default the source's.
        limit: evaluate the first ``limit`` images only.
        batch_size: images or prompts per forward pass.
        device: where the model runs; the model's device when None.
        autocast_dtype: run under autocast with this dtype (e.g. torch.bfloat16).
        workers: image decoding processes.
        progress: show progress bars.
        ks: the k of each top-k accuracy.
    """
    names = list(classnames if classnames is not None else source.classnames)
    if len(names) != len(source.classnames):
        raise ValueError(f"{len(names)} class names for the source's {len(source.classnames)} classes")
    templates = templates if templates is not None else _source_templates(source)
    prompts, _ = expand_prompts(names, templates)  # checks the templates before any work
    n = first_n(len(source), limit)
    labels = [source.label(k) for k in range(n)]  # a source without labels fails here, before any work
    run = {"batch_size": batch_size, "device": device, "autocast_dtype": autocast_dtype, "progress": progress}
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    with eval_mode(model):
        classifier = build_zeroshot_classifier(model, tokenizer, names, templates, **run)
        timings["classifier"], clock = _lap(clock)
        loader = source.images(preprocess, batch_size=batch_size, num_workers=workers, limit=n)
        features = embed_images(model, loader, **run)
        timings["images"], clock = _lap(clock)
    targets = torch.tensor([labels[k] for k in loader.kept], dtype=torch.long)
    metrics = classification_metrics(zeroshot_logits(features, classifier), targets, ks=ks)
    timings["metrics"], _ = _lap(clock)
    return ZeroshotResult(metrics, names, templates, len(prompts), n, len(loader.kept), list(loader.skipped), timings)


def evaluate_retrieval(
    model: nn.Module,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    source: CaptionedSource,
    *,
    limit: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    workers: int = 0,
    progress: bool = False,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 4096,
) -> RetrievalResult:
    """Image→text and text→image retrieval among the first ``limit`` images of ``source`` (all
    when None) and their captions.  ``block_size`` is `retrieval_metrics`'s score tile side; the
    other arguments are `evaluate_zeroshot`'s, ``ks`` the k of each recall@k."""
    index = source.caption_index(limit)
    run = {"batch_size": batch_size, "device": device, "autocast_dtype": autocast_dtype, "progress": progress}
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    with eval_mode(model):
        loader = source.images(preprocess, batch_size=batch_size, num_workers=workers, limit=limit)
        image_features = embed_images(model, loader, **run)
        timings["images"], clock = _lap(clock)
        # captions of unreadable images go with them; the rest point at their image's row
        row = {image: k for k, image in enumerate(loader.kept)}
        kept = [j for j, image in enumerate(index.text_to_image) if image in row]
        if not kept:
            raise DataError(f"{loader.source}: none of the {len(loader.kept)} readable images has a caption")
        captions = [index.captions[j] for j in kept]
        text_features = embed_texts(model, tokenizer, captions, **run)
        timings["texts"], clock = _lap(clock)
    owners = torch.tensor([row[index.text_to_image[j]] for j in kept], dtype=torch.long)
    metrics = retrieval_metrics(image_features, text_features, owners, ks=ks, block_size=block_size)
    timings["metrics"], _ = _lap(clock)
    return RetrievalResult(metrics, len(loader), len(loader.kept), len(index.captions), len(captions), index.skipped,
                           list(loader.skipped), timings)


def _lap(start: float) -> tuple[float, float]:
    now = time.perf_counter()
    return round(now - start, 3), now
