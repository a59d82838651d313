"""Text and image queries on an index of shapes:// images, with a trained model.

    python benchmarks/bench_search_shapes.py --model runs/demo/checkpoints/step-0000600

Writes ``--images`` single-object images of the ``seen`` and ``heldout`` splits as PNG files
into class folders, indexes them with ``clipforge index build`` (through the Python API), then:

* text: for each of the 64 "a {colour} {shape}" queries, the share of the top 1 / top 5
  results that show exactly that colour and shape (and colour alone, shape alone);
* image: for every indexed image used as the query, whether it comes back first.

Prints a table and writes benchmarks/results/bench_search_shapes.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from _timing import cpu_record  # benchmarks/_timing.py

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a trained checkpoint (e.g. the demo's)")
    parser.add_argument("--images", type=int, default=1024, help="images per split (seen, heldout)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_search_shapes.json")
    args = parser.parse_args(argv)

    from clipforge.data.shapes import COLOURS, HELDOUT_PAIRS, SHAPES, ShapesDataset
    from clipforge.search import Index, build_index

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        truth: dict[str, tuple[str, str]] = {}
        for split in ("seen", "heldout"):
            data = ShapesDataset(split=split, n=args.images, seed=11)
            for k in range(len(data)):
                o = data.objects(k)[0]
                folder = root / f"{o.colour}_{o.shape}"
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{split}-{k:05d}.png"
                data[k][0].save(path)
                truth[str(path.resolve())] = (o.colour, o.shape)
        start = time.perf_counter()
        build_index(f"imagefolder:{root}", Path(tmp) / "index", model=args.model, progress=False)
        build_s = time.perf_counter() - start
        index = Index.load(Path(tmp) / "index")

        rows = []
        for colour in COLOURS:
            for shape in SHAPES:
                hits = index.search_text(f"a {colour} {shape}", k=5)
                got = [truth[str(Path(h.path).resolve())] for h in hits]
                rows.append({"query": f"a {colour} {shape}", "heldout": (colour, shape) in HELDOUT_PAIRS,
                             "top1": got[0] == (colour, shape),
                             "top1_colour": got[0][0] == colour, "top1_shape": got[0][1] == shape,
                             "p_at_5": sum(g == (colour, shape) for g in got) / len(got)})
        self_first = 0
        paths = sorted(truth)
        for path in paths:
            hits = index.search_image(path, k=1)
            self_first += str(Path(hits[0].path).resolve()) == path

    def rate(subset: list[dict], key: str) -> float:
        return sum(r[key] for r in subset) / len(subset)

    groups = {
        "seen pairs (48)": [r for r in rows if not r["heldout"]],
        "held-out pairs (16)": [r for r in rows if r["heldout"]],
        "all (64)": rows,
    }
    summary = {
        name: {key: rate(sub, key) for key in ("top1", "top1_colour", "top1_shape", "p_at_5")}
        for name, sub in groups.items()
    }
    print(f"{'text queries':<22} {'top-1 exact':>11} {'top-1 colour':>12} {'top-1 shape':>11} {'precision@5':>11}")
    for name, s in summary.items():
        print(f"{name:<22} {s['top1']:>11.3f} {s['top1_colour']:>12.3f} {s['top1_shape']:>11.3f} {s['p_at_5']:>11.3f}")
    print(
        f"image queries: the query image first for {self_first} of {len(paths)} ({self_first / len(paths):.3f}); "
        f"index of {len(paths)} images built in {build_s:.1f} s"
    )
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": cpu_record(),
        "model": args.model,
        "images": len(paths),
        "command": f"python benchmarks/bench_search_shapes.py --model {args.model} --images {args.images}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"meta": meta, "summary": summary, "image_query_self_first": self_first / len(paths), "queries": rows},
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
