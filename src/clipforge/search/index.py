"""Searching an index directory by text, by image or by one of its own images.

    index = Index.load("photos.index")          # loads the model that built it, and checks it
    for hit in index.search_text("a red star", k=10):
        print(f"{hit.score:.3f}  {hit.path}")
    hits = index.search_image("query.jpg")        # a path or a PIL image
    hits = index.search_similar(hit.id)           # the stored embedding of an indexed image
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipforge.search import ann
from clipforge.search.build import Model, index_model
from clipforge.search.store import IndexDirError, Store

__all__ = ["Hit", "Index"]

MAX_K = 1000


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int  # row of the index (stable: rows are only ever appended)
    score: float  # cosine similarity of the query and the image embeddings
    key: str
    path: str | None
    caption: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Index:
    """An index directory opened for search: the faiss index, the metadata and the model."""

    def __init__(self, store: Store, faiss_index: Any, model: Model | None) -> None:
        self.store, self.faiss_index, self.model = store, faiss_index, model
        self.metadata = store.metadata()
        self._ids = self.metadata.column("id").to_numpy()
        if not np.array_equal(self._ids, np.arange(len(self._ids))):
            raise IndexDirError(f"{store.directory}: metadata ids are not 0..{len(self._ids) - 1} in order")
        self._chunks = list(store.vectors(mmap=True))
        self._offsets = np.cumsum([0] + [len(c) for c in self._chunks])

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        model: str | os.PathLike[str] | Model | None = None,
        pretrained: str | os.PathLike[str] | None = None,
        tokenizer: str | os.PathLike[str] | None = None,
        device: str | None = None,
        load_model: bool = True,
    ) -> Index:
        """Opens ``directory``; ``model`` (with ``pretrained``, as `clipforge.load`'s) defaults to
        the one recorded in it, a checkpoint's path or a pretrained name, and any model is
        checked against the index's fingerprint (an IndexDirError if it is another).
        ``load_model=False`` opens it for `search_vectors` and `search_similar` only."""
        store = Store.open(directory)
        faiss_index = store.read_faiss()
        loaded = None
        if load_model or model is not None:
            loaded = index_model(store, model, pretrained=pretrained, tokenizer=tokenizer, device=device)
        return cls(store, faiss_index, loaded)

    # ---------------------------------------------------------------- lookups
    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def directory(self) -> Path:
        return self.store.directory

    def item(self, id: int) -> dict[str, Any]:
        """The metadata row of ``id`` (an IndexError when out of range)."""
        if not 0 <= id < len(self._ids):
            raise IndexError(f"no image {id} in an index of {len(self._ids)}")
        return {name: column[0] for name, column in self.metadata.slice(id, 1).to_pydict().items()}

    def embedding(self, id: int) -> np.ndarray:
        """The stored embedding [D] of ``id``."""
        if not 0 <= id < self._offsets[-1]:
            raise IndexError(f"no image {id} in an index of {self._offsets[-1]}")
        chunk = int(np.searchsorted(self._offsets, id, side="right") - 1)
        return np.asarray(self._chunks[chunk][id - self._offsets[chunk]], dtype=np.float32)

    # ---------------------------------------------------------------- search
    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each [q, k'] with k' = min(k, len(self)), for normalised queries [q, D]."""
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.store.manifest["dim"]:
            raise ValueError(f"queries must be [q, {self.store.manifest['dim']}], got {list(queries.shape)}")
        # The search setting is tuned for recall@10; a smaller k asks for 10 and keeps the first
        # k, so that re-ranking sees as many candidates as it was tuned with.
        scores, ids = ann.search(self.faiss_index, queries, min(max(k, 10), len(self)))
        return scores[:, :k], ids[:, :k]

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        keep = ids >= 0  # faiss pads with -1 when fewer than k are found
        ids, scores = ids[keep], scores[keep]
        rows = self.metadata.take(ids).to_pydict() if len(ids) else {"key": [], "path": [], "caption": []}
        return [Hit(int(i), float(s), key, path, caption)
                for i, s, key, path, caption in zip(ids, scores, rows["key"], rows["path"], rows["caption"])]

    def _need_model(self) -> Model:
        if self.model is None:
            raise ValueError("this index was opened without its model (load_model=False)")
        return self.model

    def search_text(self, text: str, k: int = 10) -> list[Hit]:
        """The ``k`` images closest to the text ``text``, best first."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the query text is empty")
        scores, ids = self.search_vectors(self._need_model().embed_texts([text]), k)
        return self._hits(scores[0], ids[0])

    def search_image(self, image: str | os.PathLike[str] | Image.Image, k: int = 10) -> list[Hit]:
        """The ``k`` images closest to ``image`` (a file or a PIL image), best first."""
        from clipforge.data.images import read_rgb

        model = self._need_model()
        picture = image.convert("RGB") if isinstance(image, Image.Image) else read_rgb(image)
        pixels = model.preprocess(picture)[None]
        scores, ids = self.search_vectors(model.embed_images(pixels), k)
        return self._hits(scores[0], ids[0])

    def search_similar(self, id: int, k: int = 10) -> list[Hit]:
        """The ``k`` images closest to the indexed image ``id`` (itself first, as a rule)."""
        scores, ids = self.search_vectors(self.embedding(id)[None], k)
        return self._hits(scores[0], ids[0])

    def info(self) -> dict[str, Any]:
        """Size, model and faiss settings, as the manifest records them."""
        manifest = self.store.manifest
        return {"directory": str(self.directory), "images": len(self), "dim": manifest["dim"],
                "model": manifest["model"]["source"], "precision": manifest["precision"],
                "sources": manifest.get("sources", []), "index": manifest["index"]}

