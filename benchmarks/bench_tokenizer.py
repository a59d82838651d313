"""Tokenizer throughput: clipforge against OpenCLIP's SimpleTokenizer on the same captions.

    PYTHONPATH=src /path/to/venv-with-open_clip/bin/python benchmarks/bench_tokenizer.py
    python benchmarks/bench_tokenizer.py          # clipforge alone when open_clip is absent

Prints a table and writes benchmarks/results/bench_tokenizer.json.  The captions are
synthetic, 5–25 words drawn from a fixed word list, one in ten with non-ASCII text (accents,
curly quotes, emoji, CJK), so every run times the same text.  Both tokenizers must produce
identical tensors on them before anything is timed.  Needs OpenAI's BPE file: the
``CLIPFORGE_BPE`` variable, ../shared/clip-bpe/, or an installed package that ships it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import time
from pathlib import Path

from _timing import cpu_record  # benchmarks/_timing.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORDS = (
    "a photo of the dog cat red blue small large running on beach under sky with two people "
    "sitting near old wooden table in front green field city street at night man woman child "
    "holding cup coffee bright sunny day black white car parked beside building tree river "
    "mountain snow covered close-up view painting style 3d render illustration of"
).split()
EXTRAS = ["café", "naïve", "“quoted”", "it’s", "🎉", "日本語", "Zürich", "—", "São Paulo", "&amp;"]


def captions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 25))]
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words) + 1), rng.choice(EXTRAS))
        out.append(" ".join(words))
    return out


def throughput(fn, texts: list[str], batch: int, repeats: int) -> float:
    fn(texts[:batch])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            fn(texts[i : i + batch])
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best


def bpe_path() -> str | None:
    shared = ROOT.parent / "shared" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
    return os.environ.get("CLIPFORGE_BPE") or (str(shared) if shared.exists() else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="captions timed")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_tokenizer.json")
    args = parser.parse_args(argv)

    from clipforge.tokenizer import load_tokenizer

    texts = captions(args.count)
    ours = load_tokenizer(bpe_path())
    try:
        from open_clip.tokenizer import SimpleTokenizer

        theirs = SimpleTokenizer(bpe_path()) if bpe_path() else SimpleTokenizer()
        assert (theirs(texts[:2000]) == ours(texts[:2000])).all(), "tokenizers disagree"
    except ImportError:
        theirs = None
    rows = []
    print(f"{'mode':<22} {'clipforge/s':>12} {'open_clip/s':>12} {'speed-up':>9}")
    for mode, batch, repeats in (("batches of 256", 256, 3), ("one caption per call", 1, 1)):
        mine = throughput(ours, texts, batch, repeats)
        ref = throughput(theirs, texts, batch, repeats) if theirs else None
        rows.append({"mode": mode, "clipforge": mine, "open_clip": ref, "speedup": ref and mine / ref})
        print(
            f"{mode:<22} {mine:>12.0f} {(f'{ref:.0f}' if ref else '—'):>12} {(f'{mine / ref:.1f}x' if ref else '—'):>9}"
        )
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": cpu_record(),
        "captions": len(texts),
        "command": "python benchmarks/bench_tokenizer.py",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
