"""The search index at scale: build time, memory, recall@10 and query latency on a million
clustered 512-d vectors.

    python benchmarks/bench_index.py               # 1,000,000 vectors; several minutes on two CPU cores
    python benchmarks/bench_index.py --n 100000    # a smaller run

Prints a table and writes benchmarks/results/bench_index.json.

Data: unit vectors drawn around 10,000 random unit centres (x = normalise(c + s·g/√d), g
standard normal, s = 1, so a vector's cosine to its centre is about 0.7 and to another of its
cluster about 0.5), generated in chunks from a fixed seed.  Queries are fresh draws from the
same distribution: 200 tune the search setting (as `clipforge index build` does with stored
vectors), 1,000 others measure it.  Ground truth is exact inner-product search.

The index is what `clipforge index build` chooses (`clipforge.search.ann.choose_index`) with
an 8 GiB budget: IVF-PQ with exact re-ranking for a million vectors.  Latency is one query at a
time (as a person searches), the median and 99th percentile over the 1,000 test queries;
"exact" is a flat index's latency on 50 of them, for scale.  Build time counts k-means
training and adding; memory is this process's peak resident set size (VmHWM), with the
vectors themselves (n·d·4 bytes) counted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from _memory import reset_peak, rss  # benchmarks/_memory.py
from _timing import cpu_record  # benchmarks/_timing.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clipforge.search import ann  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 1 << 30


def clustered(n: int, dim: int, centres: np.ndarray, *, seed: int, spread: float = 1.0,
              chunk: int = 100_000) -> np.ndarray:
    """n unit vectors around ``centres``, drawn chunk by chunk from ``seed``."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        which = rng.integers(0, len(centres), rows)
        x = centres[which] + spread * rng.standard_normal((rows, dim), dtype=np.float32) / np.sqrt(dim)
        out[start : start + rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors indexed (default: 1,000,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=1_000, help="test queries (default: 1,000)")
    parser.add_argument("--budget-gib", type=float, default=8.0, help="memory budget for the index (default: 8)")
    parser.add_argument("--out", default=str(RESULTS / "bench_index.json"))
    args = parser.parse_args()
    faiss = ann.import_faiss()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    start = time.perf_counter()
    vectors = clustered(args.n, args.dim, centres, seed=1)
    tune_queries = clustered(200, args.dim, centres, seed=2)
    test_queries = clustered(args.queries, args.dim, centres, seed=3)
    generate_s = time.perf_counter() - start
    print(f"generated {args.n:,} × {args.dim} vectors in {generate_s:.1f}s", flush=True)

    start = time.perf_counter()
    truth = ann.exact_topk(vectors, test_queries, 10)
    truth_s = time.perf_counter() - start
    print(f"exact top-10 of {args.queries} queries in {truth_s:.1f}s", flush=True)

    before, _ = rss()
    reset_peak()
    built = ann.build_and_tune(vectors, memory_budget=int(args.budget_gib * GiB), queries=tune_queries)
    _, peak = rss()
    print(f"built {built.spec.factory} in {built.build_s:.1f}s, tuned in {built.tune_s:.1f}s: {built.tuned.params}",
          flush=True)
    for row in built.tuned.tried:
        print(f"  tune {row['params']}: recall@10 {row['recall_at_10']:.3f} (less 2 s.e. "
              f"{row['recall_lower_bound']:.3f}), median {row['median_ms']:.2f} ms")

    times, found = ann.query_times_ms(built.index, test_queries)
    recall = ann.recall_at_k(found, truth, 10)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(vectors)
    flat_times, _ = ann.query_times_ms(flat, test_queries[:50])

    row = {
        "n": args.n, "dim": args.dim, "index": built.spec.factory, "params": built.tuned.params,
        "recall_at_10": round(recall, 4), "median_ms": round(float(np.median(times)), 3),
        "p99_ms": round(float(np.percentile(times, 99)), 3), "exact_median_ms": round(float(np.median(flat_times)), 2),
        "build_s": round(built.build_s, 1), "tune_s": round(built.tune_s, 1),
        "peak_rss_gib": round(peak / GiB, 2), "rss_before_build_gib": round(before / GiB, 2),
        "vectors_gib": round(vectors.nbytes / GiB, 2),
        "index_bytes_per_vector": built.spec.bytes_per_vector,
    }
    header = ["n", "index", "setting", "recall@10", "median ms", "p99 ms", "exact ms", "build s", "peak GiB"]
    cells = [f"{args.n:,}", built.spec.factory, " ".join(f"{k}={v:g}" for k, v in built.tuned.params.items()),
             f"{recall:.3f}", f"{row['median_ms']:.2f}", f"{row['p99_ms']:.2f}", f"{row['exact_median_ms']:.1f}",
             f"{built.build_s:.0f}", f"{row['peak_rss_gib']:.2f}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    print("| " + " | ".join(cells) + " |")

    result = {
        "benchmark": "index", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_index.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(), "cpu": cpu_record()},
        "data": {"clusters": args.clusters, "spread": 1.0, "tune_queries": 200, "test_queries": args.queries,
                 "generate_s": round(generate_s, 1), "exact_truth_s": round(truth_s, 1)},
        "result": row, "tune": built.tuned.tried,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
