"""Zero-shot classification: a classifier built from prompts, and its metrics.

    classifier = build_zeroshot_classifier(model, tokenizer, ["cat", "dog"], ["a photo of a {c}."])
    logits = zeroshot_logits(embed_images(model, images), classifier)      # [N, C]
    metrics = classification_metrics(logits, targets)                      # acc1, acc5, ...
    probs = zeroshot_probabilities(model, embed_images(model, images), classifier)  # [N, C]

Templates come in two forms, the ones CLIP_benchmark accepts:

- a list of strings, each with the placeholder ``{c}`` (``{}`` is accepted too, the form of
  OpenAI's published prompt lists), filled in with every class name:
  ``["a photo of a {c}.", "a drawing of a {c}."]``;
- a mapping from class name to that class's own prompts (CuPL style), complete sentences
  that may but need not contain the placeholder: ``{"cat": ["a cat, curled up asleep."], ...}``.

Every class embedding is the mean of its prompts' normalised text embeddings, normalised again
(Radford et al., 2021, section 3.1.4; OpenCLIP's and CLIP_benchmark's ``zero_shot_classifier``).
Template files in these two forms ship under ``clipforge/templates`` (see `clipforge.templates`).

Metric definitions of `classification_metrics`:

- The rank of a sample is ``1 + #(other classes whose logit is >= the true class's logit)``: a
  tie counts against the true class, so constant logits score 0, not 1.
- ``acc{k}`` is the fraction of samples of rank at most k.  For k >= C every sample would be a
  hit whatever the logits, so ``acc{k}`` is None (CLIP_benchmark reports NaN for acc5 when there
  are fewer than 5 classes, and 1.0 with exactly 5).
- The predicted class is the top-1 class, with a tie broken against the truth (the
  lowest-index tied wrong class wins), so that ``acc1`` equals the confusion matrix's trace / N.
- ``per_class_accuracy[c]`` is the recall of class c (None when c has no sample);
  ``mean_per_class_recall`` is their mean over the classes present in the targets, which is
  scikit-learn's ``balanced_accuracy_score``, CLIP_benchmark's definition.
- ``confusion_matrix[t][p]`` counts samples of true class t predicted as p.

Probabilities (`zeroshot_probabilities`) follow the model's family, from its own learned scores
``model.logits`` (scale · cos, plus the bias a sigmoid model has):

- CLIP, trained with the softmax loss: a softmax over the classes, so each row sums to 1 (Radford
  et al., 2021; transformers' ``logits_per_image.softmax(dim=1)``).
- SigLIP and SigLIP 2, trained with the sigmoid loss and holding its learned bias: each class on
  its own, sigmoid(scale · cos + bias), the probability that the image matches that class's prompt
  (Zhai et al., 2023; transformers' ``torch.sigmoid(logits_per_image)``).  A row need not sum
  to 1: an image may fit no class, or several.  A softmax of these scores serves ranking only.

Neither changes the metrics: both are increasing in the score, so the ranking (top-k accuracy,
the confusion matrix) is the logits' own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.embed import embed_texts

__all__ = [
    "Templates",
    "build_zeroshot_classifier",
    "check_templates",
    "classification_metrics",
    "expand_prompts",
    "is_sigmoid_model",
    "zeroshot_logits",
    "zeroshot_probabilities",
]

Templates = Sequence[str] | Mapping[str, Sequence[str]]
PLACEHOLDERS = ("{c}", "{}")
# CLIP_benchmark's fixed scale (clip_benchmark/metrics/zeroshot_classification.py: ``100. * image_features
# @ classifier``, from OpenAI's ImageNet notebook), not the model's own: it changes no metric and makes
# logits comparable to theirs.  It equals `clipforge.loss.MAX_SCALE`, the cap where a trained CLIP's
# scale ends, but is a different quantity: it stays 100 whatever a model's cap.
LOGIT_SCALE = 100.0


def check_templates(templates: Any, *, source: str = "templates") -> Templates:
    """``templates`` unchanged if it has one of the two documented forms; else a ValueError
    naming ``source`` and the offending index or key."""
    if isinstance(templates, Mapping):
        if not templates:
            raise ValueError(f"{source}: the class → prompts mapping is empty")
        for name, prompts in templates.items():
            if not isinstance(name, str):
                raise ValueError(f"{source}: class names must be strings, got {name!r}")
            if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
                raise ValueError(f"{source}[{name!r}]: expected a non-empty list of prompts, got {prompts!r}")
            for i, prompt in enumerate(prompts):
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError(f"{source}[{name!r}][{i}]: expected a non-empty string, got {prompt!r}")
        return templates
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise ValueError(
            f"{source}: expected a list of templates with {{c}} or a mapping class → prompts, "
            f"got {type(templates).__name__}"
        )
    if not templates:
        raise ValueError(f"{source}: the template list is empty")
    for i, template in enumerate(templates):
        if not isinstance(template, str):
            raise ValueError(f"{source}[{i}]: expected a string, got {template!r}")
        if not any(p in template for p in PLACEHOLDERS):
            raise ValueError(f"{source}[{i}]: {template!r} has no {{c}} placeholder for the class name")
    return templates


def _fill(template: str, classname: str) -> str:
    # str.replace, not str.format: templates may hold other braces, class names anything.
    for placeholder in PLACEHOLDERS:
        template = template.replace(placeholder, classname)
    return template


def expand_prompts(classnames: Sequence[str], templates: Templates) -> tuple[list[str], list[int]]:
    """Every prompt of every class, and the class index of each prompt."""
    check_templates(templates)
    if not classnames:
        raise ValueError("no class names")
    prompts: list[str] = []
    owners: list[int] = []
    if isinstance(templates, Mapping):
        missing = [name for name in classnames if name not in templates]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5]) + (" …" if len(missing) > 5 else "")
            raise ValueError(f"templates have no prompts for {len(missing)} class(es): {shown}")
    for index, name in enumerate(classnames):
        chosen = templates[name] if isinstance(templates, Mapping) else templates
        prompts += [_fill(t, name) for t in chosen]
        owners += [index] * len(chosen)
    return prompts, owners


def build_zeroshot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Templates,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Tensor:
    """Class embeddings [D, C], float32: the re-normalised mean of each class's normalised
    prompt embeddings.

    Prompts of all classes are embedded together, ``batch_size`` at a time; ``device``,
    ``autocast_dtype`` and ``progress`` are as in `embed_texts`.
    """
    prompts, owners = expand_prompts(classnames, templates)
    features = embed_texts(
        model, tokenizer, prompts, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype,
        progress=progress,
    )  # [P, D]
    index = torch.tensor(owners, device=features.device)
    sums = torch.zeros(len(classnames), features.shape[1], device=features.device).index_add_(0, index, features)
    means = sums / torch.bincount(index, minlength=len(classnames))[:, None]  # [C, D]
    return F.normalize(means, dim=-1).T.contiguous()  # [D, C]


def zeroshot_logits(image_features: Tensor, classifier: Tensor) -> Tensor:
    """Logits [N, C] of normalised image features [N, D] against a classifier [D, C], scaled by
    CLIP's 100 as CLIP_benchmark does (no metric depends on the scale)."""
    return LOGIT_SCALE * image_features.float() @ classifier.to(image_features.device).float()


def is_sigmoid_model(model: nn.Module) -> bool:
    """Whether ``model`` scores pairs with the sigmoid loss's learned bias (SigLIP, SigLIP 2, or a
    model trained with ``--loss siglip``), whose scores are probabilities through a sigmoid."""
    scale = getattr(model, "logit_scale", None)
    return getattr(scale, "bias", None) is not None


@torch.no_grad()
def zeroshot_probabilities(model: nn.Module, image_features: Tensor, classifier: Tensor) -> Tensor:
    """Class probabilities [N, C], float32, of image features [N, D] against a classifier [D, C],
    from the model's own scores (``model.logits``): per-class sigmoids for a sigmoid model (SigLIP),
    a softmax over the classes otherwise (CLIP).  See the module notes."""
    logits = model.logits(image_features.float(), classifier.to(image_features.device).float().T)  # [N, C]
    logits = logits.float()
    return torch.sigmoid(logits) if is_sigmoid_model(model) else logits.softmax(dim=-1)


def classification_metrics(
    logits: Tensor, targets: Tensor | Sequence[int], *, ks: Sequence[int] = (1, 5)
) -> dict[str, Any]:
    """Top-k accuracy, mean per-class recall, per-class accuracy and confusion matrix.

    Args:
        logits: [N, C] scores, higher is more likely.
        targets: [N] true class indices in [0, C).
        ks: the k of each top-k accuracy.

    Returns ``acc{k}`` for each k (None when k >= C), ``mean_per_class_recall``,
    ``per_class_accuracy`` (C values, None for classes without samples), ``confusion_matrix``
    (C lists of C counts, rows true, columns predicted), ``num_samples`` and ``num_classes``.
    Definitions and the tie rule are in the module notes.
    """
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [N, C] with N, C >= 1, got {list(logits.shape)}")
    if any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    n, c = logits.shape
    targets = torch.as_tensor(targets, device=logits.device).long()
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape [{n}], got {list(targets.shape)}")
    bad = ((targets < 0) | (targets >= c)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is not a class index in [0, {c})")
    if not torch.isfinite(logits).all():
        row = int((~torch.isfinite(logits)).any(1).nonzero()[0])
        raise ValueError(f"logits[{row}] holds a NaN or infinite value")

    rows = torch.arange(n, device=logits.device)
    true = logits[rows, targets]  # [N]
    ranks = (logits >= true[:, None]).sum(1)  # [N], the true class counts itself: 1 + others >= it
    wrong = logits.clone()
    wrong[rows, targets] = -torch.inf
    predicted = torch.where(ranks == 1, targets, wrong.argmax(1))  # argmax takes the lowest tied index
    confusion = torch.bincount(targets * c + predicted, minlength=c * c).view(c, c).cpu()

    metrics: dict[str, Any] = {}
    for k in ks:
        metrics[f"acc{k}"] = None if k >= c else float((ranks <= k).double().mean())
    support = confusion.sum(1)
    recall = confusion.diagonal().double() / support.clamp(min=1)
    present = support > 0
    metrics["mean_per_class_recall"] = float(recall[present].mean())
    metrics["per_class_accuracy"] = [float(r) if p else None for r, p in zip(recall.tolist(), present.tolist())]
    metrics["confusion_matrix"] = confusion.tolist()
    metrics["num_samples"] = n
    metrics["num_classes"] = c
    return metrics
