"""Building an index directory: embed every image of a data source in chunks, then index the
embeddings with faiss.

    report = build_index("folder:photos/", "photos.index", model="runs/demo/checkpoints/step-0000750")
    report = build_index("folder:photos/", "photos.index", model="ViT-B-32:openai")   # released weights
    report = add_to_index("photos.index", "folder:more-photos/")

Both resume: keys already embedded are skipped, so running either again after an interruption
continues where it stopped (the chunk being written when it stopped is embedded again).
Unreadable images are skipped and listed in ``skipped.jsonl``; a later run retries them.
The index records its model, a checkpoint by its path or released weights by their name, and
`index_model` reloads it from there for ``add`` and for search.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from clipforge.checkpoints import load_for_inference
from clipforge.checkpoints.registry import resolve
from clipforge.data import open_data
from clipforge.search import ann
from clipforge.search._items import Decoded, Item, decoded_batches, items_of
from clipforge.search.store import IndexDirError, Store, model_identity

__all__ = ["BuildReport", "Model", "add_to_index", "build_index", "index_model", "load_search_model", "parse_size"]

DEFAULT_BUDGET = 4 << 30
SAMPLE_QUERIES = 200  # stored vectors searched to measure recall@10 after each build or add


@dataclass
class Model:
    """A model ready to embed images and texts, and its identity (see `model_identity`)."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    identity: dict[str, Any]
    device: torch.device
    autocast_dtype: torch.dtype | None = None

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        from clipforge.embed import embed_images

        features = embed_images(self.model, pixels, batch_size=max(len(pixels), 1), device=self.device,
                                autocast_dtype=self.autocast_dtype, progress=False)
        return features.cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        from clipforge.embed import embed_texts

        features = embed_texts(self.model, self.tokenizer, texts, batch_size=max(len(texts), 1), device=self.device,
                               autocast_dtype=self.autocast_dtype, progress=False)
        return features.cpu().numpy()


def load_search_model(source: str | os.PathLike[str], *, pretrained: str | os.PathLike[str] | None = None,
                      tokenizer: str | os.PathLike[str] | None = None, device: str | None = None,
                      precision: str = "fp32") -> Model:
    """The model ``source`` names (a checkpoint file or folder, or a pretrained name:
    ``ViT-B-32:openai``, ``hf-hub:ORG/NAME``, ``ORG/NAME``; ``pretrained`` as `clipforge.load`'s)
    with its tokenizer (``tokenizer`` overrides it), loaded by
    `clipforge.checkpoints.load_for_inference`.

    Its identity records where it comes from so that the index reloads the same model: a
    checkpoint by its absolute path, a pretrained name as the registry spells it (never the
    cache's path: the entry's activation and preprocessing come with the name), an architecture
    with a weights file as both.  An IndexDirError for a preset (random weights); an
    UnknownModelError for a name that means nothing; a CheckpointError when no tokenizer comes
    with the model."""
    where = resolve(source, None if pretrained is None else str(pretrained))
    if where.kind == "preset":
        raise IndexDirError(f"{str(source)!r} is a preset with random weights, different each time it loads: an index "
                            f"must be queried with the model that built it, so give a checkpoint (clipforge.save "
                            f"writes one) or a pretrained name (`clipforge models` lists them)")
    loaded = load_for_inference(source, pretrained=pretrained, tokenizer=tokenizer, device=device,
                                precision=precision)
    recorded: dict[str, str] = {"source": loaded.source}
    if where.kind == "path":
        recorded["source"] = str(Path(source).resolve())
    elif where.kind == "weights":  # OpenCLIP's pretrained=FILE: the architecture, and the file
        recorded = {"source": str(where.architecture), "pretrained": str(Path(str(pretrained)).resolve())}
    identity = model_identity(loaded.model, loaded.tokenizer, source=recorded["source"])
    if "pretrained" in recorded:
        identity["pretrained"] = recorded["pretrained"]
    if tokenizer is not None:
        identity["tokenizer"] = str(Path(tokenizer).resolve())
    return Model(loaded.model, loaded.preprocess, loaded.tokenizer, identity, loaded.device, loaded.autocast_dtype)


def index_model(store: Store, model: str | os.PathLike[str] | Model | None = None, *,
                pretrained: str | os.PathLike[str] | None = None, tokenizer: str | os.PathLike[str] | None = None,
                device: str | None = None) -> Model:
    """The model that embeds for ``store``: ``model`` (a checkpoint, a pretrained name, or a
    `Model`; ``pretrained`` as `load_search_model`'s), by default the one its manifest records,
    at the index's precision; an IndexDirError unless it is the index's model (`Store.check_model`)."""
    if isinstance(model, Model):
        loaded = model
    else:
        identity = store.manifest["model"]
        recorded = identity["source"]
        # A checkpoint is recorded by its absolute path, a pretrained name never so.
        if model is None and pretrained is not None:
            raise ValueError(f"pretrained={str(pretrained)!r} goes with model=, the architecture it is for")
        if model is None and Path(recorded).is_absolute() and not Path(recorded).exists():
            raise IndexDirError(f"{store.directory}: its model {recorded!r} is not there any more; pass the model")
        if model is None:
            model, pretrained = recorded, identity.get("pretrained")
        loaded = load_search_model(model, pretrained=pretrained,
                                   tokenizer=tokenizer if tokenizer is not None else identity.get("tokenizer"),
                                   device=device, precision=store.manifest["precision"])
    store.check_model(loaded.identity)
    return loaded


def parse_size(text: str | int) -> int:
    """Bytes from ``"4G"``, ``"512MiB"``, ``"1.5GB"`` or a plain number of bytes (binary units)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    number = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        value = float(number[: len(number) - len(unit)])
    except ValueError:
        raise ValueError(f"a size reads like 4G, 512M or 1000000, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return int(value * units[unit])


@dataclass
class BuildReport:
    """What a build or an add did."""

    directory: Path
    embedded: int  # images embedded by this run
    already: int  # images found already embedded (resumed or previously added)
    skipped: list[dict[str, str]]  # unreadable images of this run: key, path, reason, source
    total: int  # images in the index now
    index: dict[str, Any] = field(default_factory=dict)  # the manifest's faiss index record
    seconds: dict[str, float] = field(default_factory=dict)  # embed, index


def _rows(batch: list[Decoded], uri: str) -> list[dict[str, Any]]:
    return [{"key": d.item.key, "path": d.item.path, "caption": d.item.caption,
             "width": d.size[0] if d.size else None, "height": d.size[1] if d.size else None,
             "file_bytes": d.file_bytes, "source": uri} for d in batch]


def _embed_source(store: Store, model: Model, uri: str, source: Any, *, batch_size: int, workers: int,
                  chunk_size: int, progress: bool) -> tuple[int, int, list[dict[str, str]]]:
    """Embeds the images of ``source`` (opened from ``uri``) not yet in ``store``, appending
    chunks; (embedded, already, skipped)."""
    items: Iterable[Item] = items_of(source, uri)
    new = _SkipDone(items, store.keys())
    # A list is filtered at once (workers decode it by index); a stream as it goes by.
    todo: Iterable[Item] = list(new) if isinstance(items, list) else new
    total = len(todo) if isinstance(todo, list) else None
    skipped_all = store.skipped()
    skipped_now: list[dict[str, str]] = []
    pending_vectors: list[np.ndarray] = []
    pending_rows: list[dict[str, Any]] = []
    embedded = 0

    def flush(rows: int) -> None:  # writes the first `rows` pending embeddings as one chunk
        vectors = np.concatenate(pending_vectors)
        store.append_chunk(vectors[:rows], pending_rows[:rows])
        store.save_skipped(skipped_all)
        pending_vectors[:] = [vectors[rows:]]
        del pending_rows[:rows]

    with tqdm(total=total, disable=None if progress else True, unit="img", dynamic_ncols=True) as bar:
        for batch in decoded_batches(todo, model.preprocess, batch_size=batch_size, num_workers=workers):
            good = [d for d in batch if d.pixels is not None]
            for d in batch:
                if d.skipped is not None:
                    row = {"key": d.item.key, "path": d.skipped.path, "reason": d.skipped.reason, "source": uri}
                    skipped_all[d.item.key] = row
                    skipped_now.append(row)
                else:
                    skipped_all.pop(d.item.key, None)
            if good:
                pending_vectors.append(model.embed_images(torch.stack([d.pixels for d in good])))
                pending_rows.extend(_rows(good, uri))
                embedded += len(good)
            while len(pending_rows) >= chunk_size:
                flush(chunk_size)
            bar.update(len(batch))
    if pending_rows:
        flush(len(pending_rows))
    else:
        store.save_skipped(skipped_all)
    if uri not in store.manifest["sources"]:
        store.manifest["sources"].append(uri)
        store.save_manifest()
    return embedded, new.already, skipped_now


class _SkipDone:
    """The items whose keys are not in ``done`` nor seen before (the first of equal keys is
    kept), counting the others."""

    def __init__(self, items: Iterable[Item], done: set[str]) -> None:
        self.items, self.done, self.already = items, done, 0

    def __iter__(self) -> Iterator[Item]:
        for item in self.items:
            if item.key in self.done:
                self.already += 1
            else:
                self.done.add(item.key)
                yield item


def _index_all(store: Store, *, memory_budget: int, kind: str, target_recall: float) -> dict[str, Any]:
    """Builds the faiss index over every stored embedding, tunes it, writes it; its record."""
    vectors = store.all_vectors()
    if len(vectors) == 0:
        raise IndexDirError(f"{store.directory}: no image could be embedded, nothing to index")
    built = ann.build_and_tune(vectors, memory_budget=memory_budget, kind=kind, target_recall=target_recall,
                               n_queries=SAMPLE_QUERIES)
    info = {"spec": built.spec.to_dict(), "params": built.tuned.params, "recall_at_10": built.tuned.recall_at_10,
            "median_query_ms": built.tuned.median_ms, "recall_queries": built.tuned.queries,
            "target_recall": target_recall, "memory_budget": memory_budget, "build_s": round(built.build_s, 3),
            "built_at_count": len(vectors)}
    store.write_faiss(built.index, info)
    return store.manifest["index"]


def build_index(
    data: str,
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | Model,
    pretrained: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    device: str | None = None,
    precision: str = "fp32",
    batch_size: int = 64,
    workers: int = 0,
    chunk_size: int = 10_000,
    memory_budget: int | str = DEFAULT_BUDGET,
    kind: str = "auto",
    target_recall: float = 0.95,
    progress: bool = True,
) -> BuildReport:
    """Embeds every image of the data URI ``data`` into the index directory ``out`` and builds
    its faiss index; a directory left by an interrupted build of the same model is continued.

    Args:
        model: a checkpoint (file or folder), a pretrained name (``ViT-B-32:openai``, ``hf-hub:ORG/NAME``,
            ``ORG/NAME``), or a `Model` from `load_search_model`; the index records it to reload it.
        pretrained: a pretrained tag (or weights file) for the architecture ``model`` names, as
            `clipforge.load`'s ``pretrained=``.
        tokenizer: a tokenizer folder, for checkpoints saved without one.
        precision: "fp32", or "bf16" autocast over fp32 weights.
        batch_size: images per forward pass.
        workers: image decoding processes (0 decodes in this one).
        chunk_size: embeddings per file; an interruption loses at most one chunk's work.
        memory_budget: bytes (or "4G") the faiss index may take; it decides the index type.
        kind: "auto" (the rule of `clipforge.search.ann`), "flat", "ivfpq" or "hnsw".
        target_recall: recall@10 the search setting is tuned to reach.
    """
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    budget = parse_size(memory_budget)
    source = open_data(data)  # a bad URI fails here, before anything is written
    if kind not in ann.KINDS:
        raise ValueError(f"index kind must be one of {ann.KINDS}, got {kind!r}")
    start = time.perf_counter()
    loaded = model if isinstance(model, Model) else load_search_model(model, pretrained=pretrained, tokenizer=tokenizer,
                                                                      device=device, precision=precision)
    out = Path(out)
    if (out / "manifest.json").exists():
        store = Store.open(out)
        store.check_model(loaded.identity)
        if store.manifest.get("index") is not None:
            raise IndexDirError(f"{out}: already holds a built index; add images with clipforge index add")
        if store.manifest["precision"] != precision:
            raise IndexDirError(f"{out}: an interrupted build at {store.manifest['precision']}; continue it with "
                                f"that precision")
    else:
        store = Store.create(out, model=loaded.identity, precision=precision)
    embedded, already, skipped = _embed_source(store, loaded, data, source, batch_size=batch_size, workers=workers,
                                               chunk_size=chunk_size, progress=progress)
    embed_s = time.perf_counter() - start
    info = _index_all(store, memory_budget=budget, kind=kind, target_recall=target_recall)
    return BuildReport(out, embedded, already, skipped, store.count, info,
                       {"embed": round(embed_s, 3), "index": round(time.perf_counter() - start - embed_s, 3)})


def add_to_index(
    directory: str | os.PathLike[str],
    data: str,
    *,
    model: str | os.PathLike[str] | Model | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    device: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    chunk_size: int = 10_000,
    reindex: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Embeds the images of ``data`` not yet in the index and adds them to its faiss index
    (IVF lists keep their trained centroids); ``reindex`` rebuilds the faiss index instead,
    choosing its type afresh for the new size.  ``model`` defaults to the index's own and is
    checked against it either way; other arguments as `build_index`."""
    start = time.perf_counter()
    store = Store.open(directory)
    for _ in store.vectors(mmap=True):  # a damaged chunk is named before anything is written
        pass
    loaded = index_model(store, model, pretrained=pretrained, tokenizer=tokenizer, device=device)
    embedded, already, skipped = _embed_source(store, loaded, data, open_data(data), batch_size=batch_size,
                                               workers=workers, chunk_size=chunk_size, progress=progress)
    embed_s = time.perf_counter() - start
    info = store.manifest.get("index")
    if info is None or reindex:  # an interrupted build, or asked for
        old = info or {}
        info = _index_all(store, memory_budget=old.get("memory_budget", DEFAULT_BUDGET),
                          kind=old.get("spec", {}).get("kind", "auto") if not reindex else "auto",
                          target_recall=old.get("target_recall", 0.95))
    elif info["indexed"] < store.count:
        info = _add_new(store, info)
    return BuildReport(Path(directory), embedded, already, skipped, store.count, info,
                       {"embed": round(embed_s, 3), "index": round(time.perf_counter() - start - embed_s, 3)})


def _add_new(store: Store, info: dict[str, Any]) -> dict[str, Any]:
    """Adds the stored embeddings the faiss index lacks, and measures its recall again."""
    index = store.read_faiss()
    vectors = store.all_vectors()
    ann.add_vectors(index, vectors[info["indexed"]:])
    queries = ann.sample_queries(vectors, SAMPLE_QUERIES, seed=len(vectors))
    truth = ann.exact_topk(vectors, queries, 10)
    times, found = ann.query_times_ms(index, queries)
    spec = ann.choose_index(len(vectors), vectors.shape[1], memory_budget=info["memory_budget"])
    info = {**info, "recall_at_10": ann.recall_at_k(found, truth), "median_query_ms": round(float(np.median(times)), 4),
            "recall_queries": len(queries), "suggested_kind": spec.kind}
    store.write_faiss(index, info)
    return store.manifest["index"]
