"""Time and memory of the CLIP loss, forward + backward: tiled against the plain formula.

    make bench-loss                      # or: python benchmarks/bench_loss.py [--quick]

Prints a table, writes benchmarks/results/bench_loss.json and bench_loss.png.  Every case
runs in its own process, so its peak memory is its own: "extra peak" is the peak resident
memory during one forward + backward minus the resident memory just before it (inputs
already allocated).  Times are medians over repeats (3 by default) after a warm-up run.  The plain
formula runs up to the largest N whose N×N buffers fit in memory; the tiled one goes on.
Achieved GFLOP/s count 8·N²·d (the floor with recomputation: the logits are computed
twice, and the two gradient products once each) against this machine's matmul rate,
measured on the tile's own shape in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _memory import reset_peak, rss  # benchmarks/_memory.py
from _timing import cpu_record  # benchmarks/_timing.py

RESULTS = Path(__file__).resolve().parent / "results"

# (N, d, implementations) — the plain formula stops at 16,384 (it needs ~4 GB there).
FULL_PLAN = [
    (1024, 512, ("naive", "tiled")),
    (2048, 512, ("naive", "tiled")),
    (4096, 512, ("naive", "tiled")),
    (8192, 512, ("naive", "tiled")),
    (16384, 512, ("naive", "tiled")),
    (32768, 512, ("tiled",)),
    (65536, 512, ("tiled",)),
    (131072, 256, ("tiled",)),
]
QUICK_PLAN = [(1024, 512, ("naive", "tiled")), (4096, 512, ("naive", "tiled"))]


def child(impl: str, n: int, d: int, dtype_name: str, repeats: int) -> dict:
    """One case, in this process: returns its times and extra peak memory."""
    import gc

    import torch

    from clipforge import clip_loss
    from clipforge.loss import CLIP_INIT_SCALE

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).requires_grad_()
    scale = torch.tensor(CLIP_INIT_SCALE, requires_grad=True)
    chunk = None if impl == "naive" else "auto"

    def step() -> float:
        img.grad = txt.grad = scale.grad = None
        t0 = time.perf_counter()
        clip_loss(img, txt, scale, chunk_size=chunk).backward()
        return time.perf_counter() - t0

    gc.collect()
    reset_peak()
    before, _ = rss()
    first = step()
    _, peak = rss()
    times = [step() for _ in range(repeats)] or [first]
    median = statistics.median(times)
    return {
        "impl": impl, "n": n, "d": d, "dtype": dtype_name,
        "seconds": median, "all_seconds": times, "first_seconds": first,
        "extra_peak_bytes": peak - before,
        "gflops": 8 * n * n * d / median / 1e9,
    }


def matmul_rate(dtype_name: str, chunk: int, d: int) -> float:
    """GFLOP/s of one (chunk × d) @ (d × chunk) product, the tiled loss's inner step."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(chunk, d).to(dtype), torch.randn(chunk, d).to(dtype)
    for _ in range(2):
        a @ b.T
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ b.T
        reps += 1
    return 2 * chunk * chunk * d * reps / (time.perf_counter() - t0) / 1e9


def run_case(impl: str, n: int, d: int, dtype: str, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(n), str(d), dtype, str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for (impl, dtype), style in {
        ("naive", "fp32"): "o-",
        ("tiled", "fp32"): "s-",
        ("naive", "bf16"): "o--",
        ("tiled", "bf16"): "s--",
    }.items():
        pts = sorted(
            (r["n"], r["seconds"], r["extra_peak_bytes"])
            for r in rows
            if r["impl"] == impl and r["dtype"] == dtype and r["d"] == 512
        )
        if not pts:
            continue
        ns, ts, ms = zip(*pts)
        ax_t.loglog(ns, ts, style, label=f"{impl} {dtype}", base=2)
        ax_m.loglog(ns, [m / 2**20 for m in ms], style, label=f"{impl} {dtype}", base=2)
    ax_t.set(xlabel="batch size N (d = 512)", ylabel="forward + backward (s)", title="Time")
    ax_m.set(xlabel="batch size N (d = 512)", ylabel="extra peak memory (MiB)", title="Memory")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two sizes only (a smoke run)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case after the warm-up")
    parser.add_argument("--max-n", type=int, default=None, help="skip cases above this N")
    parser.add_argument(
        "--sizes",
        type=lambda v: {int(x) for x in v.split(",")},
        default=None,
        help="comma-separated N values to run (default: all of the plan)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_loss.json")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, n, d, dtype, repeats = args.child
        print(json.dumps(child(impl, int(n), int(d), dtype, int(repeats))))
        return

    import torch

    from clipforge.loss import auto_chunk_size

    plan = QUICK_PLAN if args.quick else FULL_PLAN
    dtypes = args.dtypes.split(",")
    rows: list[dict] = []
    header = (
        f"{'N':>7} {'d':>4} {'dtype':>5} {'naive s':>9} {'tiled s':>9} {'ratio':>6} "
        f"{'naive MiB':>10} {'tiled MiB':>10} {'mem %':>6} {'GFLOP/s':>8}"
    )
    print(header)
    print("-" * len(header))
    for n, d, impls in plan:
        if (args.max_n and n > args.max_n) or (args.sizes and n not in args.sizes):
            continue
        for dtype in dtypes:
            if dtype == "bf16" and n > 16384:
                continue
            res = {}
            for impl in impls:
                # big cases: the warm-up run is the measurement (minutes each otherwise)
                repeats = args.repeats if n <= 16384 else 0
                res[impl] = run_case(impl, n, d, dtype, repeats)
                rows.append(res[impl])
            nv, tl = res.get("naive"), res["tiled"]
            fmt = lambda v, spec: format(v, spec) if v is not None else "—".rjust(len(format(0, spec)))  # noqa: E731
            print(
                f"{n:>7} {d:>4} {dtype:>5} {fmt(nv and nv['seconds'], '9.2f')} {tl['seconds']:>9.2f} "
                f"{fmt(nv and tl['seconds'] / nv['seconds'], '6.2f')} "
                f"{fmt(nv and nv['extra_peak_bytes'] / 2**20, '10.0f')} "
                f"{tl['extra_peak_bytes'] / 2**20:>10.0f} "
                f"{fmt(nv and 100 * tl['extra_peak_bytes'] / nv['extra_peak_bytes'], '6.1f')} "
                f"{tl['gflops']:>8.0f}",
                flush=True,
            )
    rates = {}
    for dtype in dtypes:
        chunk = auto_chunk_size(16384, 512)
        rates[dtype] = {"chunk": chunk, "d": 512, "gflops": matmul_rate(dtype, chunk, 512)}
        print(f"matmul rate {dtype} ({chunk}×512 @ 512×{chunk}): {rates[dtype]['gflops']:.0f} GFLOP/s")
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": cpu_record(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": "python benchmarks/bench_loss.py" + (" --quick" if args.quick else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "matmul": rates, "rows": rows}, indent=1))
    try:
        plot(rows, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
