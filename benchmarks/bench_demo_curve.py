"""How far the demo recipe gets with more training: zero-shot accuracy against steps.

    python benchmarks/bench_demo_curve.py                         # the demo's budget and 2,400 steps
    python benchmarks/bench_demo_curve.py --budgets 600 --eval-every 100
    python benchmarks/bench_demo_curve.py --replot                # the figure again from the JSON

For each budget N, the `make demo` recipe (`clipforge/train/demo.toml`: the ``tiny`` preset on
``shapes://``, batch 128, cosine schedule over N steps, only the step count changed) is trained for N steps with the
periodic evaluation every ``--eval-every`` steps: zero-shot top-1 among the 64 colour–shape
classes on the ``seen`` and ``heldout`` splits (512 images each), split into colour right and
shape right from the confusion matrix, and text→image R@1 on ``val``.  The demo's own budget
(the run file's ``steps``, what trains in about 5 minutes on 2 cores) is the first curve; longer budgets show what
more compute buys, and whether the held-out pairs follow the seen ones.

Prints a table, writes benchmarks/results/bench_demo_curve.json and the figure
docs/figures/demo_curve.png.  Runs go to runs/demo-curve/ (a budget already trained there
with the same config is reused; ``--fresh`` trains again).  ``--replot`` trains nothing: it
draws the figure again from the recorded JSON (`make figures` does this).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

from _demo_runs import demo_run  # benchmarks/_demo_runs.py
from _timing import cpu_record  # benchmarks/_timing.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPLITS = {"seen": "shapes://?split=seen", "heldout": "shapes://?split=heldout"}


def attribute_accuracy(confusion: list[list[int]]) -> dict[str, float]:
    """Colour-and-shape, colour and shape accuracy from a 64 × 64 confusion matrix
    (rows: true class, columns: predicted; class = 8 · colour + shape)."""
    total = both = colour = shape = 0
    for true, row in enumerate(confusion):
        for predicted, count in enumerate(row):
            total += count
            both += count * (true == predicted)
            colour += count * (true // 8 == predicted // 8)
            shape += count * (true % 8 == predicted % 8)
    return {"acc1": both / total, "colour": colour / total, "shape": shape / total}


def curve(run: Path) -> list[dict]:
    """One row per evaluation in ``run``/metrics.jsonl."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval" not in record:
            continue
        row: dict = {"step": record["step"]}
        for name, uri in SPLITS.items():
            scores = attribute_accuracy(record["eval"][uri]["confusion_matrix"])
            row.update({f"{name}_{key}": value for key, value in scores.items()})
        retrieval = record["eval"].get("shapes://?split=val", {})
        row["R@1"] = retrieval.get("text_to_image_R@1")
        rows.append(row)
    return rows


def train_budget(steps: int, eval_every: int, seed: int, root: Path, *, fresh: bool) -> tuple[Path, float | None]:
    """The demo recipe trained for ``steps``; returns the run and its minutes (None when reused)."""
    start = time.perf_counter()
    run, trained = demo_run(root, fresh=fresh, seed=seed, steps=steps, eval_every=eval_every, save_every=steps)
    return run, (time.perf_counter() - start) / 60 if trained else None


def plot(results: list[dict], path: Path, demo_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.1), sharey=True)
    for ax, key, title in zip(
        axes, ("acc1", "colour", "shape"), ("colour and shape (64 classes)", "colour right", "shape right")
    ):
        for budget in results:
            steps = [r["step"] for r in budget["curve"]]
            for split, style in (("seen", "-o"), ("heldout", "--s")):
                ax.plot(
                    steps,
                    [r[f"{split}_{key}"] for r in budget["curve"]],
                    style,
                    markersize=3,
                    label=f"{budget['steps']}-step schedule, {split}",
                )
        ax.axhline(0.9, color="grey", lw=0.8, ls=":")
        ax.axvline(demo_steps, color="grey", lw=0.8)
        ax.set_title(f"zero-shot: {title}")
        ax.set_xlabel("training step (batch 128)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"the demo recipe on shapes:// (vertical line: the {demo_steps}-step demo; dotted: 90 % accuracy)\n"
        "seen: the 48 colour–shape pairs of the training images; heldout: the 16 pairs training never shows together",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(json_path: Path, figure: Path) -> None:
    """The figure again from a results JSON, without training."""
    from clipforge.train.config import demo_config

    results = json.loads(json_path.read_text())["budgets"]
    plot(results, figure, demo_config().steps)
    print(f"wrote {figure} from {json_path} (budgets {', '.join(str(b['steps']) for b in results)} steps)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budgets", default=None, help="comma-separated step budgets (default: the demo's steps and 2400)"
    )
    parser.add_argument("--eval-every", type=int, default=300, help="steps between evaluations (default: 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "demo-curve")
    parser.add_argument("--fresh", action="store_true", help="train again even if a run is there")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_demo_curve.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "demo_curve.png")
    parser.add_argument(
        "--replot", action="store_true", help="train nothing: draw --figure again from the curves recorded in --json"
    )
    args = parser.parse_args(argv)
    if args.replot:
        replot(args.json, args.figure)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from clipforge.train.config import demo_config

    budgets = [int(b) for b in (args.budgets or f"{demo_config().steps},2400").split(",")]
    results = []
    for steps in budgets:
        run, minutes = train_budget(steps, min(args.eval_every, steps), args.seed, args.runs, fresh=args.fresh)
        results.append({"steps": steps, "run": str(run), "minutes": minutes, "curve": curve(run)})

    print(
        f"{'budget':>6} {'step':>5} | {'seen':>5} {'colour':>6} {'shape':>5} | "
        f"{'held-out':>8} {'colour':>6} {'shape':>5} | {'R@1':>5}"
    )
    for budget in results:
        for r in budget["curve"]:
            print(
                f"{budget['steps']:>6} {r['step']:>5} | "
                f"{r['seen_acc1']:5.3f} {r['seen_colour']:6.3f} {r['seen_shape']:5.3f} | "
                f"{r['heldout_acc1']:8.3f} {r['heldout_colour']:6.3f} {r['heldout_shape']:5.3f} | {r['R@1'] or 0:5.3f}"
            )
        if budget["minutes"] is not None:
            print(f"{budget['steps']:>6} steps trained and evaluated in {budget['minutes']:.1f} min")
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_record(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": "python benchmarks/bench_demo_curve.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "budgets": results}, indent=1))
    plot(results, args.figure, demo_config().steps)
    print(f"wrote {args.json} and {args.figure}")


if __name__ == "__main__":
    main()
