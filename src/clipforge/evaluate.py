"""Evaluating a model on a data source: zero-shot classification, image–text retrieval and the
linear probe.

    import clipforge
    from clipforge.data import open_data
    from clipforge.evaluate import evaluate_linear_probe, evaluate_retrieval, evaluate_zeroshot

    model, preprocess, tokenizer = clipforge.load("runs/demo/checkpoints/step-0000750")
    result = evaluate_zeroshot(model, preprocess, tokenizer, open_data("shapes://?split=heldout"))
    result.metrics["acc1"], result.skipped
    result = evaluate_retrieval(model, preprocess, tokenizer, open_data("csv:captions.tsv"), limit=1000)
    result.metrics["text_to_image_R@1"]
    result = evaluate_linear_probe(model, preprocess, open_data("digits://?split=train"),
                                   open_data("digits://?split=test"))
    result.metrics["acc1"], result.probe.weight_decay

`evaluate_zeroshot` and `evaluate_retrieval` are the one evaluation path: ``clipforge eval
zeroshot|retrieval`` and the trainer's periodic evaluation (``eval_zeroshot``,
``eval_retrieval``, ``eval_samples``) both call them, so a number logged during training is the
number the command gives for the saved checkpoint.  Zero-shot classification takes a `LabelledSource` and retrieval a
`CaptionedSource` (`clipforge.data.protocols`); ``limit`` evaluates the first ``limit`` images.

The metrics are `clipforge.zeroshot.classification_metrics` and
`clipforge.retrieval.retrieval_metrics`, whose module notes define them.  Unreadable image
files are skipped and returned in the result, with their captions.

The linear probe (``clipforge eval linear-probe``) is CLIP_benchmark's third task and the other
evaluation of the CLIP paper (Radford et al., 2021, section 3.2 and appendix A.3): a linear
classifier fitted on the model's frozen image features.  It follows CLIP_benchmark's method
(``clip_benchmark/metrics/linear_probe.py``) so that its numbers compare with theirs; the
method, and where it differs, is `fit_linear_probe`'s docstring.  `fit_linear_probe` works on
features alone, for callers that embed their own images.

The model runs in eval mode, and afterwards each of its modules is back in its own mode: a
tower frozen for training (``lock_image``) stays in eval mode, its BatchNorm statistics frozen.
Torch's global random state is left as it was, so evaluating does not change a training run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from clipforge.data import CaptionedSource, DataError, ImageFolder, LabelledSource, open_data
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
    zeroshot_probabilities,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "WEIGHT_DECAYS",
    "LinearProbe",
    "LinearProbeResult",
    "RetrievalResult",
    "ZeroshotResult",
    "eval_mode",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "fit_linear_probe",
    "open_eval_source",
    "stratified_split",
    "train_linear_classifier",
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
    kept: list[int] = field(default_factory=list)  # source index of each image evaluated, in row order
    targets: list[int] = field(default_factory=list)  # the class of each image evaluated
    # [images_evaluated, C] class probabilities when asked for (`clipforge.zeroshot.zeroshot_probabilities`:
    # per-class sigmoids for SigLIP, a softmax for CLIP), else None
    probabilities: Tensor | None = None


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


_TASKS = {"zeroshot": "zero-shot classification", "linear_probe": "a linear probe", "retrieval": "retrieval"}


def open_eval_source(uri: str, task: str, **options: Any) -> Any:
    """The data source ``uri`` names, checked to serve ``task`` ("zeroshot", "linear_probe" or
    "retrieval"): a `LabelledSource` or a `CaptionedSource`; a DataError in one line otherwise."""
    if task not in _TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, _TASKS))}, got {task!r}")
    source = open_data(uri, **options)
    what, labelled = _TASKS[task], task != "retrieval"
    if getattr(source, "streaming", False):
        raise DataError(f"{what} cannot use {uri!r}: a streamed source is no evaluation source (it has no fixed "
                        "first N images); evaluate on imagefolder:, csv:, jsonl:, pairs:, shapes:// or digits://")
    if labelled and not isinstance(source, LabelledSource):
        raise DataError(f"{what} cannot use {uri!r}: it gives a {type(source).__name__}, which has no class labels "
                        "(labelled sources: imagefolder:, shapes://?split=seen|heldout, digits://)")
    if labelled and len(source):
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
    probabilities: bool = False,
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
        probabilities: also return each image's class probabilities (`ZeroshotResult.probabilities`).
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
    probs = zeroshot_probabilities(model, features, classifier).cpu() if probabilities else None
    timings["metrics"], _ = _lap(clock)
    return ZeroshotResult(metrics, names, templates, len(prompts), n, len(loader.kept), list(loader.skipped), timings,
                          kept=list(loader.kept), targets=targets.tolist(), probabilities=probs)


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


# ----------------------------------------------------------------------------- linear probe

# CLIP_benchmark's weight-decay grid (``clip_benchmark/metrics/linear_probe.py``, after the CLIP
# paper's appendix A.3 sweep): 97 values, twelve a decade, from 1e-6 to 1e2.  The search starts on
# every 16th and refines around the best with steps of 8, 4, 2 and 1 grid points.
WEIGHT_DECAYS: tuple[float, ...] = tuple(np.logspace(-6, 2, num=97).tolist())
_SEARCH_START = 16


@dataclass
class LinearProbe:
    """A linear classifier on frozen features, as `fit_linear_probe` fitted it."""

    classifier: nn.Linear  # features [N, D] -> logits [N, C]
    weight_decay: float  # the weight decay of the final fit
    train_size: int  # features the final fit learned from
    val_size: int = 0  # features held out to choose the weight decay (0: no search)
    search: list[tuple[float, float]] = field(default_factory=list)  # (weight decay, validation top-1), as tried

    def logits(self, features: Tensor) -> Tensor:
        """Class scores [N, C] of features [N, D]."""
        weight = self.classifier.weight
        with torch.no_grad():
            return self.classifier(features.to(weight.device, weight.dtype))


@dataclass
class LinearProbeResult:
    """What `evaluate_linear_probe` measured, on what."""

    metrics: dict[str, Any]  # `classification_metrics` of the test images: acc{k}, mean_per_class_recall, ...
    classnames: list[str]  # the probe's classes, in its output order
    probe: LinearProbe  # the fitted classifier, its weight decay and the search
    split: str  # where the test images came from: a test source, or a stratified split of one source
    train_images: int  # readable training images (the probe's validation share among them)
    test_images: int  # readable images it was scored on
    skipped: list[Skipped] = field(default_factory=list)  # unreadable images, left out
    timings_s: dict[str, float] = field(default_factory=dict)  # seconds: features, probe, metrics


def stratified_split(labels: Tensor | Sequence[int], fraction: float, *, seed: int = 0,
                     keep: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (kept, held out) of a seeded split that holds out ``fraction`` of each class.

    Class c of n_c items gives floor(fraction * n_c + 1/2) of them, chosen by a permutation
    drawn from ``torch.Generator().manual_seed(seed)``, but at most n_c - ``keep``.  Both index
    tensors are sorted.  A class may end up on one side only; callers that need both say so.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = torch.as_tensor(labels).long().cpu()
    generator = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique().tolist():  # sorted: the draws do not depend on the items' order
        members = (labels == c).nonzero().flatten()
        count = min(math.floor(fraction * len(members) + 0.5), max(len(members) - keep, 0))
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    out = torch.zeros(len(labels), dtype=torch.bool)
    out[torch.cat(held)] = True
    return (~out).nonzero().flatten(), out.nonzero().flatten()


def _check_features(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must be [N, D] with N >= 1, got {list(features.shape)}")
    if labels.shape != (len(features),):
        raise ValueError(f"labels must have shape [{len(features)}], got {list(labels.shape)}")
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is not a class index in [0, {num_classes})")
    if not torch.isfinite(features).all():
        raise ValueError(f"features[{int((~torch.isfinite(features)).any(1).nonzero()[0])}] holds a NaN or infinity")


def _linear(dim: int, classes: int, generator: torch.Generator) -> nn.Linear:
    """`nn.Linear`'s own initialisation drawn from ``generator``: the layer CLIP_benchmark gets
    from ``torch.manual_seed(seed); nn.Linear(dim, classes)``, without touching the global state."""
    layer = nn.Linear(dim, classes, device="meta").to_empty(device="cpu")
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(dim)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


def train_linear_classifier(
    features: Tensor,
    labels: Tensor | Sequence[int],
    num_classes: int,
    *,
    weight_decay: float = 0.0,
    lr: float = 0.1,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Linear:
    """One fit of a linear classifier [D -> num_classes] on ``features`` [N, D], on their device.

    AdamW (``lr``, ``weight_decay``, torch's other defaults) minimises the cross-entropy over
    ``epochs`` passes of shuffled batches of ``batch_size``; the learning rate follows a cosine
    from ``lr`` at the first step to 0 after the last, without warm-up.  The layer's initial
    weights and every epoch's order come from ``torch.Generator().manual_seed(seed)``: a seed
    gives the same classifier every time, and torch's global random state is left alone.
    """
    labels = torch.as_tensor(labels).long().to(features.device)
    _check_features(features, labels, num_classes)
    if lr <= 0 or epochs < 1 or batch_size < 1 or weight_decay < 0:
        raise ValueError(f"need lr > 0, epochs >= 1, batch_size >= 1, weight_decay >= 0; got lr={lr}, "
                         f"epochs={epochs}, batch_size={batch_size}, weight_decay={weight_decay}")
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        inputs = features.detach().float().clone()  # inference-mode features cannot be saved for backward
        classifier = _linear(inputs.shape[1], num_classes, generator).to(inputs.device)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
        total = epochs * math.ceil(len(inputs) / batch_size)
        step = 0
        for _ in range(epochs):
            for batch in torch.randperm(len(inputs), generator=generator).to(inputs.device).split(batch_size):
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total)) * lr
                loss = F.cross_entropy(classifier(inputs[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    return classifier.requires_grad_(False)


class _TooFewExamples(ValueError):
    """The data are too few for the probe asked for (a few-shot k, a validation share)."""


def _fewshot(labels: Tensor, k: int, generator: torch.Generator, classnames: Sequence[str]) -> Tensor:
    """The first ``k`` items of each class in a random order (CLIP_benchmark's few-shot draw)."""
    taken: dict[int, list[int]] = {}
    for i in torch.randperm(len(labels), generator=generator).tolist():
        chosen = taken.setdefault(int(labels[i]), [])
        if len(chosen) < k:
            chosen.append(i)
    short = sorted(c for c, chosen in taken.items() if len(chosen) < k)
    if short:
        raise _TooFewExamples(f"{k}-shot probing needs {k} training examples of each class; "
                              f"class {classnames[short[0]]!r} has {len(taken[short[0]])}")
    return torch.tensor(sorted(i for chosen in taken.values() for i in chosen), dtype=torch.long)


def fit_linear_probe(
    features: Tensor,
    labels: Tensor | Sequence[int],
    num_classes: int,
    *,
    lr: float = 0.1,
    epochs: int = 10,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    val_proportion: float | None = None,
    fewshot_k: int | None = None,
    seed: int = 0,
    classnames: Sequence[str] | None = None,
) -> LinearProbe:
    """A linear probe on frozen features, by CLIP_benchmark's method (``--task linear_probe``).

    The classifier is `train_linear_classifier`'s: one linear layer, AdamW, learning rate
    ``lr`` (default 0.1) on a cosine schedule, ``epochs`` (10) passes in batches of
    ``batch_size`` (64), CLIP_benchmark's defaults.  Without ``val_proportion`` the weight decay
    is ``weight_decay`` (CLIP_benchmark's 0 when it has no validation set).  With it, that share
    of each class is held out (`stratified_split`, seeded by ``seed``), the weight decay is
    searched on `WEIGHT_DECAYS` by validation top-1 as CLIP_benchmark searches (7 starting
    values, then the best's neighbours at 8, 4, 2 and 1 grid steps; a tie goes to the smaller
    weight decay), and the final classifier is fitted on all the features with the one chosen.
    ``fewshot_k`` keeps k examples of each class for the fits (the validation ones apart),
    drawn in a seeded random order; the final fit then uses those k alone, as theirs does.

    Where this differs from CLIP_benchmark, and why: the validation share is stratified where
    theirs is a plain random split (every class is then validated); the fits run in float32
    where theirs run under CUDA autocast (fp16), and on any device; a fit repeated during the
    search is not run again (its result is the same for the same seed); the random draws come
    from generators of their own, so the classifiers equal theirs in method and initialisation
    but not in batch order.  The CLIP paper itself fitted scikit-learn's L-BFGS logistic
    regression with a searched inverse regularisation C; CLIP_benchmark replaced it by this
    AdamW fit, so its numbers and these compare with each other, not digit for digit with the paper's.

    ``features`` [N, D] are the L2-normalised image features (`clipforge.embed`), ``labels`` [N]
    class indices in [0, ``num_classes``); ``classnames`` name the classes in error messages.
    Too few examples for ``fewshot_k`` or ``val_proportion`` is a ValueError naming the class.
    """
    names = list(classnames) if classnames is not None else [str(c) for c in range(num_classes)]
    labels = torch.as_tensor(labels).long().to(features.device)
    _check_features(features, labels, num_classes)
    if val_proportion is not None and weight_decay != 0:
        raise ValueError("give either weight_decay or val_proportion (which searches the weight decay), not both")
    if fewshot_k is not None and fewshot_k < 1:
        raise ValueError(f"fewshot_k must be a positive number of examples per class, got {fewshot_k}")
    fit = {"lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed}
    every = torch.arange(len(labels))
    pool, held = (every, every[:0]) if val_proportion is None else stratified_split(
        labels.cpu(), val_proportion, seed=seed, keep=1)
    if val_proportion is not None and len(held) == 0:
        raise _TooFewExamples(f"a validation share of {val_proportion:g} holds out no example of any class "
                              f"({len(labels)} examples); give a larger share or a fixed weight decay")
    if fewshot_k is not None:
        pool = pool[_fewshot(labels[pool].cpu(), fewshot_k, torch.Generator().manual_seed(seed), names)]
    pool_device, held_device = pool.to(features.device), held.to(features.device)
    search: list[tuple[float, float]] = []
    if len(held):
        tried: dict[int, float] = {}

        def accuracy(index: int) -> float:
            if index not in tried:
                classifier = train_linear_classifier(features[pool_device], labels[pool_device], num_classes,
                                                     weight_decay=WEIGHT_DECAYS[index], **fit)
                with torch.no_grad():
                    predicted = classifier(features[held_device].float()).argmax(1)
                tried[index] = float((predicted == labels[held_device]).double().mean())
                search.append((WEIGHT_DECAYS[index], tried[index]))
            return tried[index]

        def peak(indices: Sequence[int]) -> int:
            best, best_acc = 0, 0.0  # as CLIP_benchmark: a strictly better accuracy moves the peak
            for index in indices:
                if accuracy(index) > best_acc:
                    best, best_acc = index, accuracy(index)
            return best

        last = len(WEIGHT_DECAYS) - 1
        best = peak(range(0, last + 1, _SEARCH_START))
        span = _SEARCH_START // 2
        while span > 0:
            best = peak([max(best - span, 0), best, min(best + span, last)])
            span //= 2
        weight_decay = WEIGHT_DECAYS[best]
        if fewshot_k is None:  # the final fit learns from the validation examples too
            pool_device = torch.cat([pool_device, held_device])
    classifier = train_linear_classifier(features[pool_device], labels[pool_device], num_classes,
                                         weight_decay=weight_decay, **fit)
    return LinearProbe(classifier, weight_decay, len(pool_device), len(held), search)


def _names(classnames: Sequence[str], classes: Sequence[int], shown: int = 5) -> str:
    listed = ", ".join(repr(classnames[c]) for c in list(classes)[:shown])
    return listed + (f" and {len(classes) - shown} more" if len(classes) > shown else "")


def evaluate_linear_probe(
    model: nn.Module,
    preprocess: Preprocess,
    train: LabelledSource,
    test: LabelledSource | None = None,
    *,
    split: float | None = None,
    seed: int = 0,
    lr: float = 0.1,
    epochs: int = 10,
    probe_batch_size: int = 64,
    weight_decay: float = 0.0,
    val_proportion: float | None = None,
    fewshot_k: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    workers: int = 0,
    progress: bool = False,
    ks: Sequence[int] = (1, 5),
) -> LinearProbeResult:
    """A linear probe of ``model``'s frozen image features: fitted on ``train``, scored on ``test``.

    Without ``test``, ``split`` (a fraction in (0, 1)) holds out that share of each class of
    ``train`` as the test images (`stratified_split` of the source's images, seeded by
    ``seed``); every class must keep an image on both sides.  Test classes are matched to the
    training classes by name; the probe classifies among the classes that have training images,
    and test images of any other class are an error, as is an empty class folder of an
    ``imagefolder:`` training set (a generated source's split may leave classes out by design:
    ``shapes://?split=seen`` shows 48 of its 64).  These checks run before any image is embedded.

    The features are `clipforge.embed`'s L2-normalised image features (CLIP_benchmark's
    default); ``lr``, ``epochs``, ``probe_batch_size``, ``weight_decay``, ``val_proportion``,
    ``fewshot_k`` and ``seed`` are `fit_linear_probe`'s, which states the method.  The other
    arguments are `evaluate_zeroshot`'s; the metrics are `classification_metrics` of the test
    images (``acc1``, ``acc5``, ``mean_per_class_recall``, ...), over the probe's classes.
    """
    if (test is None) == (split is None):
        raise ValueError("give either a test source or a split fraction, not both and not neither")
    run = {"batch_size": batch_size, "device": device, "autocast_dtype": autocast_dtype, "progress": progress}
    classnames = list(train.classnames)
    sources = [train] if test is None else [train, test]
    loaders = [s.images(preprocess, batch_size=batch_size, num_workers=workers) for s in sources]
    names = [loader.source for loader in loaders]
    labels = [torch.tensor([s.label(k) for k in range(len(s))], dtype=torch.long) for s in sources]
    if isinstance(train, ImageFolder):
        empty = sorted(set(range(len(classnames))) - set(labels[0].tolist()))
        if empty:
            raise DataError(f"{names[0]}: class folder(s) {_names(classnames, empty)} hold no image; a linear probe "
                            "learns each class from its images (add some, or remove the folder)")
    if test is None:  # the split is drawn over the source's images, whichever turn out unreadable
        assert split is not None
        kept, held = stratified_split(labels[0], split, seed=seed)
        counts = torch.bincount(labels[0], minlength=len(classnames))
        for side, indices in (("test", held), ("training", kept)):
            missing = sorted(set(labels[0].tolist()) - set(labels[0][indices].tolist()))
            if missing:
                raise DataError(f"{names[0]}: a {split:g} test split leaves class {classnames[missing[0]]!r} "
                                f"({int(counts[missing[0]])} image(s)) with no {side} image; use a "
                                f"{'larger' if side == 'test' else 'smaller'} split, or a separate test set")
        sides = [kept, held]
        how = f"stratified split of {names[0]}: {split:g} of each class held out for testing, seed {seed}"
    else:
        index = {name: c for c, name in enumerate(classnames)}  # test class -> training class, by name
        labels.append(torch.tensor([index.get(test.classnames[c], -1) for c in labels[1].tolist()], dtype=torch.long))
        unknown = sorted({int(c) for c, mapped in zip(labels[1], labels[2]) if mapped < 0 or mapped not in labels[0]})
        if unknown:
            raise DataError(f"{names[1]}: test images of class(es) {_names(test.classnames, unknown)}, of which the "
                            f"training images ({names[0]}) hold none; the probe cannot predict them")
        labels = [labels[0], labels[2]]
        how = f"trained on {names[0]}, tested on {names[1]}"

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    with eval_mode(model):
        embedded = [embed_images(model, loader, **run) for loader in loaders]
    timings["features"], clock = _lap(clock)
    if test is None:  # rows of the readable images on each side of the split
        row = {image: r for r, image in enumerate(loaders[0].kept)}
        picks = [torch.tensor([row[i] for i in side.tolist() if i in row], dtype=torch.long) for side in sides]
        features = [embedded[0][p.to(embedded[0].device)] for p in picks]
        targets = [labels[0][loaders[0].kept][p] for p in picks]
    else:
        features = embedded
        targets = [lab[loader.kept] for lab, loader in zip(labels, loaders)]
    present = sorted(set(targets[0].tolist()))
    lacking = sorted(set(targets[1].tolist()) - set(present))
    if lacking:  # every training image of these classes was unreadable
        raise DataError(f"{names[0]}: no readable training image of class(es) {_names(classnames, lacking)}, "
                        "which the test images hold; the probe cannot predict them")
    relabel = torch.full((len(classnames),), -1, dtype=torch.long)
    relabel[present] = torch.arange(len(present))
    try:
        probe = fit_linear_probe(features[0], relabel[targets[0]], len(present), lr=lr, epochs=epochs,
                                 batch_size=probe_batch_size, weight_decay=weight_decay, val_proportion=val_proportion,
                                 fewshot_k=fewshot_k, seed=seed, classnames=[classnames[c] for c in present])
    except _TooFewExamples as err:
        raise DataError(f"{names[0]}: {err}") from None
    timings["probe"], clock = _lap(clock)
    metrics = classification_metrics(probe.logits(features[1]), relabel[targets[1]].to(features[1].device), ks=ks)
    timings["metrics"], _ = _lap(clock)
    skipped = [s for loader in loaders for s in loader.skipped]
    return LinearProbeResult(metrics, [classnames[c] for c in present], probe, how, len(targets[0]), len(targets[1]),
                             skipped, timings)


def _lap(start: float) -> tuple[float, float]:
    now = time.perf_counter()
    return round(now - start, 3), now
