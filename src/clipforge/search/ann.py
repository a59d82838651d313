"""Choosing, building and tuning the faiss index over normalised embeddings (inner product).

    spec = choose_index(n, dim, memory_budget=4 << 30)     # IndexSpec(kind="ivfpq", ...)
    index = build_faiss(spec, vectors)                     # trained and filled
    tuned = tune(index, spec, vectors, target_recall=0.95) # nprobe / k_factor, recall@10 measured

The rule (`choose_index`), with n vectors of dimension d and a memory budget B bytes:

| condition | index | search |
|---|---|---|
| n ≤ `FLAT_MAX` and 4·n·d ≤ B | ``Flat`` | exact inner product |
| otherwise, n·(4·d + c) ≤ B | ``IVF{nlist},PQ{m}x4fs,RFlat`` | probe PQ codes, re-rank ``k_factor``·k exactly |
| otherwise, n·(d + c) ≤ B | ``IVF{nlist},PQ{m}x4fs,Refine(SQ8)`` | the same, re-ranked on 8-bit vectors (SQ8) |
| otherwise | ``IVF{nlist},PQ{m}x4fs`` | PQ codes only (lowest recall) |

nlist is the power of two nearest √n (at least 16, and at most n/39 so k-means has 39
training points per list, faiss's own minimum); m = d/8 sub-quantisers (64 for d = 512) when 8
divides d, of 4 bits each in faiss's "fast scan" layout, scanned with SIMD lookups; c = m/2 + 8
bytes per vector for the code and its id.  On a million clustered 512-d vectors 4-bit
fast-scan codes with exact re-ranking met the recall target an order of magnitude faster per
query than 8-bit PQ codes (docs/benchmarks.md, "How the choice was made").  IVF-PQ with re-ranking
is chosen rather than HNSW for large sets because it met the recall and latency targets on a million vectors with a
136 s build on two cores (an HNSW build of that size was not measured); ``kind="hnsw"``
(``HNSW32,Flat``) can still be asked for.  `tune` then picks the fastest search setting whose
recall@10 against exact search on a sample of queries, less two standard errors, reaches the
target.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "FLAT_MAX",
    "Built",
    "IndexSpec",
    "Tuned",
    "add_vectors",
    "build_and_tune",
    "build_faiss",
    "choose_index",
    "exact_topk",
    "import_faiss",
    "per_query_recall",
    "query_times_ms",
    "recall_at_k",
    "recall_lower_bound",
    "sample_queries",
    "search",
    "set_search_params",
    "tune",
]

# Up to this many vectors exact search stays within a few milliseconds per query on two CPU
# cores (20,000 × 512 float32 is 40 MB scanned per query; at a million vectors a flat scan
# took 292.6 ms, benchmarks/results/bench_index.json, so about 6 ms here); beyond it an IVF
# index is built.
FLAT_MAX = 20_000
KINDS = ("auto", "flat", "ivfpq", "hnsw")
TRAIN_POINTS_PER_LIST = 64  # k-means sample: 64 points per list (faiss warns under 39)
MIN_POINTS_PER_LIST = 39


def import_faiss() -> Any:
    """The faiss module, or an ImportError that says which extra installs it."""
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - the search extra is installed by `make`
        raise ImportError("image search needs faiss: pip install 'clipforge[search]'") from err
    return faiss


@dataclass(frozen=True)
class IndexSpec:
    """What kind of faiss index to build for a collection."""

    kind: str  # "flat", "ivfpq" or "hnsw"
    factory: str  # the faiss.index_factory string
    nlist: int = 0  # IVF lists (ivfpq)
    pq_m: int = 0  # PQ sub-quantisers, 8 bits each (ivfpq)
    refine: str = ""  # "Flat", "SQ8" or "" (ivfpq)
    bytes_per_vector: int = 0  # memory the index holds per vector, for reports

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(**data)


def _nlist(n: int) -> int:
    target = 2 ** round(math.log2(max(math.sqrt(n), 1)))
    return max(16, min(target, 2 ** int(math.log2(max(n // MIN_POINTS_PER_LIST, 1)))))


def _pq_m(dim: int) -> int:
    """d/8 sub-quantisers when 8 divides d, else the largest divisor of d not above d/8 (at least 1)."""
    return max([m for m in range(1, max(dim // 8, 1) + 1) if dim % m == 0])


def choose_index(n: int, dim: int, *, memory_budget: int, kind: str = "auto") -> IndexSpec:
    """The index for ``n`` vectors of dimension ``dim`` within ``memory_budget`` bytes (the
    rule in the module notes); ``kind`` forces "flat", "ivfpq" or "hnsw"."""
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    if n < 1 or dim < 1:
        raise ValueError(f"an index needs at least one vector of positive dimension, got n={n}, dim={dim}")
    flat_bytes = 4 * dim
    if kind == "flat" or (kind == "auto" and n <= FLAT_MAX and n * flat_bytes <= memory_budget):
        return IndexSpec("flat", "Flat", bytes_per_vector=flat_bytes)
    if kind == "hnsw":
        return IndexSpec("hnsw", "HNSW32,Flat", bytes_per_vector=flat_bytes + 2 * 32 * 4)
    if n < 16 * MIN_POINTS_PER_LIST:
        raise ValueError(f"an IVF index needs at least {16 * MIN_POINTS_PER_LIST} vectors to train, got {n}")
    nlist, m = _nlist(n), _pq_m(dim)
    codes = (m + 1) // 2 + 8  # 4-bit PQ code and the vector's id in its inverted list
    if n * (flat_bytes + codes) <= memory_budget:
        refine, extra, suffix = "Flat", flat_bytes, ",RFlat"
    elif n * (dim + codes) <= memory_budget:
        refine, extra, suffix = "SQ8", dim, ",Refine(SQ8)"
    else:
        refine, extra, suffix = "", 0, ""
    return IndexSpec("ivfpq", f"IVF{nlist},PQ{m}x4fs{suffix}", nlist, m, refine, codes + extra)


def build_faiss(spec: IndexSpec, vectors: np.ndarray, *, seed: int = 0, add_batch: int = 65_536) -> Any:
    """A faiss index of ``spec`` trained on (a sample of) ``vectors`` [n, d] and holding all of them."""
    faiss = import_faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(vectors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = min(len(vectors), TRAIN_POINTS_PER_LIST * max(spec.nlist, 256))
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), sample, replace=False))
        if spec.kind == "ivfpq":
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST  # we sampled already; don't warn
            ivf.cp.seed = seed
            # Polysemous training (on by default for IVF-PQ) only serves Hamming-filtered search,
            # which is not used here, and takes minutes.
            ivf = faiss.downcast_index(ivf)
            if hasattr(ivf, "do_polysemous_training"):
                ivf.do_polysemous_training = False
        index.train(vectors[rows])
    add_vectors(index, vectors, batch=add_batch)
    return index


def add_vectors(index: Any, vectors: np.ndarray, *, batch: int = 65_536) -> None:
    """Adds ``vectors`` in batches (the ids continue from ``index.ntotal``)."""
    for start in range(0, len(vectors), batch):
        index.add(np.ascontiguousarray(vectors[start : start + batch], dtype=np.float32))


def set_search_params(index: Any, params: dict[str, float]) -> None:
    """Sets ``nprobe``, ``k_factor`` (re-ranking) or ``efSearch`` on an index that has them."""
    faiss = import_faiss()
    space = faiss.ParameterSpace()
    names = {"nprobe": "nprobe", "k_factor": "k_factor_rf", "efSearch": "efSearch"}
    for name, value in params.items():
        space.set_index_parameter(index, names[name], float(value))


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, *, block: int = 262_144) -> np.ndarray:
    """Ids [q, k] of the ``k`` largest inner products of each query, computed in blocks of rows."""
    faiss = import_faiss()
    k = min(k, len(vectors))
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(vectors), block):
        chunk = np.ascontiguousarray(vectors[start : start + block], dtype=np.float32)
        scores, ids = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        all_s, all_i = np.concatenate([best_s, scores], 1), np.concatenate([best_i, ids + start], 1)
        keep = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)
    return best_i


def per_query_recall(found: np.ndarray, truth: np.ndarray, k: int = 10) -> np.ndarray:
    """|found[:k] ∩ truth[:k]| / |truth[:k]| for each query [q]."""
    k = min(k, truth.shape[1])
    return np.array([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)])


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / |truth[:k]|."""
    recalls = per_query_recall(found, truth, k)
    return float(recalls.mean()) if len(recalls) else 1.0


def recall_lower_bound(recalls: np.ndarray) -> float:
    """The mean recall less two standard errors: a setting is accepted when this reaches the
    target, so that the recall on other queries reaches it too (≈ 97.5 % one-sided, by the
    normal approximation).  On a million vectors, a setting tuned to 0.955 on 200 sample
    queries without this margin gave 0.947 on 1,000 others (docs/benchmarks.md)."""
    if len(recalls) < 2:
        return float(recalls.mean()) if len(recalls) else 1.0
    return float(recalls.mean() - 2 * recalls.std(ddof=1) / np.sqrt(len(recalls)))


@dataclass
class Tuned:
    """The search setting chosen by `tune` and what it measured."""

    params: dict[str, float]  # nprobe / k_factor / efSearch; empty for an exact index
    recall_at_10: float  # against exact search on the sample queries
    median_ms: float  # one query at a time
    queries: int
    tried: list[dict[str, Any]] = field(default_factory=list)  # every setting measured


def _candidates(spec: IndexSpec) -> list[dict[str, float]]:
    if spec.kind == "hnsw":
        return [{"efSearch": ef} for ef in (16, 32, 64, 128, 256, 512)]
    if spec.kind != "ivfpq":
        return [{}]
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p <= spec.nlist]
    factors = (8, 16, 32) if spec.refine else (1,)
    return [{"nprobe": p, **({"k_factor": f} if spec.refine else {})} for f in factors for p in probes]


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each [q, k], of faiss ``index``; ids are -1 where fewer than k exist.

    A handful of queries runs on one OpenMP thread: splitting one query's work across threads
    costs more than it saves, and on a busy machine threads waiting at OpenMP barriers made one
    IVF query 30× slower (8 ms against 0.3 ms, measured with another process on one of two
    cores).  ``omp_set_num_threads`` sets the calling thread's value, so this is per thread.
    """
    faiss = import_faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, index.d)
    threads = faiss.omp_get_max_threads()
    if len(queries) < 16:
        faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k)
    finally:
        faiss.omp_set_num_threads(threads)


def query_times_ms(index: Any, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Each query searched alone: (milliseconds [q], ids [q, k])."""
    times, ids = [], []
    for q in queries:
        start = time.perf_counter()
        _, found = search(index, q[None], k)
        times.append((time.perf_counter() - start) * 1e3)
        ids.append(found[0])
    return np.array(times), np.stack(ids)


def tune(
    index: Any, spec: IndexSpec, queries: np.ndarray, truth: np.ndarray, *, target_recall: float = 0.95, k: int = 10
) -> Tuned:
    """Measures each candidate setting (one query at a time) and keeps the fastest whose
    recall@k against ``truth`` (exact ids [q, ≥k]) reaches ``target_recall`` with a margin
    (`recall_lower_bound`); if none does, the one with the highest recall.  Leaves ``index``
    set to the chosen setting."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    tried: list[dict[str, Any]] = []
    met: set[float] = set()  # k_factors whose target is met: more lists only cost time
    for params in _candidates(spec):
        family = params.get("k_factor", 0.0)
        if family in met:
            continue
        set_search_params(index, params)
        times, found = query_times_ms(index, queries, k)
        recalls = per_query_recall(found, truth, k)
        tried.append(
            {
                "params": params,
                "recall_at_10": float(recalls.mean()),
                "recall_lower_bound": recall_lower_bound(recalls),
                "median_ms": round(float(np.median(times)), 4),
            }
        )
        if tried[-1]["recall_lower_bound"] >= target_recall:
            met.add(family)
    good = [t for t in tried if t["recall_lower_bound"] >= target_recall]
    best = min(good, key=lambda t: t["median_ms"]) if good else max(tried, key=lambda t: t["recall_at_10"])
    set_search_params(index, best["params"])
    return Tuned(best["params"], best["recall_at_10"], best["median_ms"], len(queries), tried)


@dataclass
class Built:
    """An index built by `build_and_tune`, with what was measured on the way."""

    index: Any
    spec: IndexSpec
    tuned: Tuned
    build_s: float  # training and adding
    tune_s: float  # exact search of the sample queries and the setting sweep


def sample_queries(vectors: np.ndarray, count: int, *, seed: int = 0) -> np.ndarray:
    """``count`` stored vectors (or all, if fewer), as queries for measuring recall."""
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), min(count, len(vectors)), replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def build_and_tune(
    vectors: np.ndarray,
    *,
    memory_budget: int,
    kind: str = "auto",
    target_recall: float = 0.95,
    queries: np.ndarray | None = None,
    n_queries: int = 200,
    seed: int = 0,
) -> Built:
    """Chooses the index for ``vectors`` [n, d], builds it, and tunes its search setting on
    ``queries`` (default: ``n_queries`` stored vectors) against exact search."""
    spec = choose_index(len(vectors), vectors.shape[1], memory_budget=memory_budget, kind=kind)
    start = time.perf_counter()
    index = build_faiss(spec, vectors, seed=seed)
    built = time.perf_counter()
    queries = sample_queries(vectors, n_queries, seed=seed + 1) if queries is None else queries
    truth = exact_topk(vectors, queries, 10)
    tuned = tune(index, spec, queries, truth, target_recall=target_recall)
    return Built(index, spec, tuned, built - start, time.perf_counter() - built)
