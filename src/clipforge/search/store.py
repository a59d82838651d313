"""An index directory on disk: embeddings in chunks, metadata in Parquet, the faiss index,
and a manifest naming the model that made them.

    INDEX_DIR/
      manifest.json            format, model identity, dimension, chunk list, faiss index settings
      embeddings/00000.npy     float32 [rows, D], L2-normalised, row i of chunk c is id offset(c) + i
      metadata/00000.parquet   id, key, path, caption, width, height, file_bytes, source
      skipped.jsonl            {"path", "reason", "source"} of every image that could not be read
      index.faiss              the faiss index over all embeddings (ids are row numbers)

Every file is written to a temporary name and renamed into place, and a chunk counts only
once the manifest lists it, so a build killed at any point leaves a directory that the next
build or ``add`` continues from.  Ids are the rows in chunk order: a chunk is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT", "IndexDirError", "Store", "model_identity"]

FORMAT, VERSION = "clipforge-index", 1
MANIFEST, SKIPPED, FAISS_FILE = "manifest.json", "skipped.jsonl", "index.faiss"
METADATA_COLUMNS = ("id", "key", "path", "caption", "width", "height", "file_bytes", "source")


class IndexDirError(ValueError):
    """An index directory that cannot be used as asked: missing, another model's, malformed."""


@contextmanager
def _atomic(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block ends without error."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def model_identity(model: torch.nn.Module, tokenizer: Any, *, source: str) -> dict[str, Any]:
    """What makes two models give the same embeddings: a SHA-256 over the config and every
    tensor of the state dict (as float32 on the CPU, sorted by name) and one over the tokenizer's
    saved vocabulary and merges; ``source`` says where the model is loaded from."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        value = tensor.detach().to("cpu")
        value = value.float() if value.is_floating_point() else value
        digest.update(value.contiguous().numpy().tobytes())
    tok_digest = hashlib.sha256()
    if hasattr(tokenizer, "save"):
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save(folder)
            for file in sorted(Path(folder).iterdir()):
                tok_digest.update(file.name.encode() + file.read_bytes())
    return {
        "source": source,
        "fingerprint": digest.hexdigest(),
        "tokenizer_fingerprint": tok_digest.hexdigest(),
        "embed_dim": int(getattr(config, "embed_dim", 0)),
    }


class Store:
    """Reads and appends to an index directory; `Store.create` starts one, `Store.open` reads one."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory, self.manifest = directory, manifest

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, directory: str | os.PathLike[str], *, model: dict[str, Any], precision: str) -> Store:
        directory = Path(directory)
        if (directory / MANIFEST).exists():
            raise IndexDirError(f"{directory}: already holds an index")
        (directory / "embeddings").mkdir(parents=True, exist_ok=True)
        (directory / "metadata").mkdir(exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, "model": model, "precision": precision,
                    "dim": model["embed_dim"], "count": 0, "chunks": [], "sources": [], "index": None}
        store = cls(directory, manifest)
        store.save_manifest()
        return store

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Store:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise IndexDirError(f"{directory}: not an index directory (no {MANIFEST}); build one with "
                                f"clipforge index build")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise IndexDirError(f"{path}: not readable JSON: {err}") from err
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise IndexDirError(f"{path}: not a {FORMAT} version {VERSION} manifest")
        for key in ("model", "dim", "count", "chunks"):
            if key not in manifest:
                raise IndexDirError(f"{path}: no {key!r} key")
        return cls(directory, manifest)

    def save_manifest(self) -> None:
        with _atomic(self.directory / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=2) + "\n", encoding="utf-8")

    def check_model(self, identity: dict[str, Any]) -> None:
        """An IndexDirError unless ``identity`` (see `model_identity`) is the index's model."""
        mine = self.manifest["model"]
        for key in ("fingerprint", "tokenizer_fingerprint"):
            if identity.get(key) != mine.get(key):
                what = "weights" if key == "fingerprint" else "tokenizer"
                raise IndexDirError(
                    f"{self.directory}: was built with the model {mine.get('source')!r} "
                    f"({what} sha256 {str(mine.get(key))[:12]}…); the model {identity.get('source')!r} has "
                    f"{what} sha256 {str(identity.get(key))[:12]}…: an index never mixes models"
                )

    # ---------------------------------------------------------------- chunks
    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def _chunk_paths(self, name: str) -> tuple[Path, Path]:
        return self.directory / "embeddings" / f"{name}.npy", self.directory / "metadata" / f"{name}.parquet"

    def append_chunk(self, vectors: np.ndarray, rows: list[dict[str, Any]]) -> None:
        """Writes one chunk (vectors [r, D] and r metadata rows, ids assigned here) and lists it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if vectors.shape != (len(rows), self.manifest["dim"]):
            raise ValueError(
                f"chunk of {vectors.shape} vectors for {len(rows)} rows of dimension {self.manifest['dim']}"
            )
        name = f"{len(self.manifest['chunks']):05d}"
        npy, parquet = self._chunk_paths(name)
        start, types = self.count, _arrow_types()
        table = pa.table(
            {
                "id": pa.array(range(start, start + len(rows)), pa.int64()),
                **{c: pa.array([r.get(c) for r in rows], types[c]) for c in METADATA_COLUMNS[1:]},
            }
        )
        with _atomic(npy, ".npy") as tmp:
            np.save(tmp, np.ascontiguousarray(vectors, dtype=np.float32))
        with _atomic(parquet) as tmp:
            pq.write_table(table, tmp)
        self.manifest["chunks"].append({"name": name, "rows": len(rows)})
        self.manifest["count"] = start + len(rows)
        self.save_manifest()

    def vectors(self, *, mmap: bool = True) -> Iterator[np.ndarray]:
        """Each chunk's embeddings, in id order."""
        for chunk in self.manifest["chunks"]:
            path = self._chunk_paths(chunk["name"])[0]
            try:
                array = np.load(path, mmap_mode="r" if mmap else None)
            except (OSError, ValueError) as err:  # missing, cut short (a damaged disk), not an array
                raise IndexDirError(f"{path}: cannot read this chunk of embeddings ({err})") from None
            if array.shape != (chunk["rows"], self.manifest["dim"]):
                raise IndexDirError(
                    f"{self._chunk_paths(chunk['name'])[0]}: shape {array.shape}, the manifest "
                    f"says ({chunk['rows']}, {self.manifest['dim']})"
                )
            yield array

    def all_vectors(self) -> np.ndarray:
        """Every embedding [count, D] in memory."""
        chunks = list(self.vectors(mmap=True))
        if not chunks:
            return np.empty((0, self.manifest["dim"]), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def metadata(self) -> Any:
        """A pyarrow Table of every row's metadata, in id order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(self._chunk_paths(c["name"])[1]) for c in self.manifest["chunks"]]
        if not tables:
            return pa.table({c: pa.array([], t) for c, t in _arrow_types().items()})
        return pa.concat_tables(tables)

    def keys(self) -> set[str]:
        import pyarrow.parquet as pq

        keys: set[str] = set()
        for chunk in self.manifest["chunks"]:
            keys.update(pq.read_table(self._chunk_paths(chunk["name"])[1], columns=["key"]).column(0).to_pylist())
        return keys

    # ---------------------------------------------------------------- skipped images
    def skipped(self) -> dict[str, dict[str, str]]:
        path = self.directory / SKIPPED
        if not path.is_file():
            return {}
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {row["key"]: row for row in rows}

    def save_skipped(self, skipped: dict[str, dict[str, str]]) -> None:
        with _atomic(self.directory / SKIPPED) as tmp:
            tmp.write_text(
                "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in skipped.values()), encoding="utf-8"
            )

    # ---------------------------------------------------------------- faiss index
    @property
    def faiss_path(self) -> Path:
        return self.directory / FAISS_FILE

    def write_faiss(self, index: Any, info: dict[str, Any]) -> None:
        """Writes the faiss index and records ``info`` (spec, search setting, recall, ...) as the manifest's."""
        from clipforge.search.ann import import_faiss

        with _atomic(self.faiss_path, ".faiss") as tmp:
            import_faiss().write_index(index, str(tmp))
        self.manifest["index"] = {**info, "indexed": int(index.ntotal)}
        self.save_manifest()

    def read_faiss(self) -> Any:
        from clipforge.search.ann import import_faiss, set_search_params

        info = self.manifest.get("index")
        if info is None or not self.faiss_path.is_file():
            raise IndexDirError(
                f"{self.directory}: the build did not finish (no faiss index yet); run "
                f"clipforge index build again with the same --out to continue it"
            )
        try:
            index = import_faiss().read_index(str(self.faiss_path))
        except RuntimeError as err:  # faiss's one error type: a file cut short or not faiss's
            raise IndexDirError(
                f"{self.faiss_path}: not a readable faiss index ({str(err).splitlines()[-1][-80:]}); "
                f"clipforge index add {self.directory} --data URI --reindex rebuilds it from the embeddings"
            ) from None
        if index.ntotal != info["indexed"] or index.d != self.manifest["dim"]:
            raise IndexDirError(
                f"{self.faiss_path}: holds {index.ntotal} vectors of dimension {index.d}, the "
                f"manifest says {info['indexed']} of {self.manifest['dim']}"
            )
        set_search_params(index, info.get("params", {}))
        return index


def _arrow_types() -> dict[str, Any]:
    import pyarrow as pa

    return {
        "id": pa.int64(),
        "key": pa.string(),
        "path": pa.string(),
        "caption": pa.string(),
        "width": pa.int32(),
        "height": pa.int32(),
        "file_bytes": pa.int64(),
        "source": pa.string(),
    }
