"""The GPU check: the CUDA tests, the loss, a training step and inference, each in its own time box.

    make gpu-wheels                              # where PyPI is reachable: the wheels, into .gpu-wheels/
    make gpu-check                               # on the GPU machine: python3 benchmarks/gpu_check.py
    python3 benchmarks/gpu_check.py --dry-run    # the same stages on the CPU at tiny sizes

Prints every version, one line per stage as it ends, and the tables; writes
benchmarks/results/gpu_check.json and gpu_check.md (a dry run: benchmarks/results/dry-run/).

Made for a GPU machine without network that has its own Python, a CUDA build of PyTorch,
transformers and timm, and little time.  It uses that PyTorch and never installs another: the
wheels in .gpu-wheels/ go, without dependencies and without an index, into a scratch folder put
on the stages' PYTHONPATH after src/ (so the working tree's clipforge is what runs), and only
those the machine lacks (clipforge's wheel, open_clip_torch and inf-cl always).

Every stage runs in its own process group with a timeout; one that fails or runs past its box is
reported (its rows so far kept) and the next one runs.  The boxes add up to 210 s, and no stage
runs past 240 s after the start.  Only the standard library is imported before
the CUDA check.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES_DIR = Path(__file__).resolve().parent / "gpu"
WHEELS = REPO / ".gpu-wheels"
RESULTS = REPO / "benchmarks" / "results"
DRY_RESULTS = RESULTS / "dry-run"

# Installed from the wheel folder even where the machine has a copy: the versions measured against.
ALWAYS_INSTALLED = ("clipforge", "open-clip-torch", "inf-cl")
# Printed with their versions, and where each came from.
REPORTED = (
    "clipforge", "open-clip-torch", "inf-cl", "triton", "transformers", "timm", "torchvision", "numpy",
    "tokenizers", "safetensors", "huggingface-hub", "regex", "ftfy", "sentencepiece", "pillow", "tqdm",
    "webdataset", "braceexpand", "scikit-learn", "matplotlib", "pytest", "pytest-timeout",
)
# Seconds per stage, most valuable first: 210 s together, inside the run's 240 s (the versions
# and the install take 10-20 s before the first stage).
BOXES = {"tests": 60, "loss": 80, "train": 40, "inference": 30}
BUDGET = 240.0


@dataclass
class Stage:
    """One time-boxed step: a command run in its own process group from the repository root."""

    name: str
    argv: list[str]
    timeout: float
    rows_file: Path | None = None  # JSON lines the stage appends as it goes (kept if it is killed)
    junit: Path | None = None  # pytest's report, for the tests stage


@dataclass
class StageResult:
    name: str
    status: str  # "ok", "failed (exit N)", "timed out after N s (killed)", "skipped: ..."
    seconds: float
    timeout: float
    returncode: int | None = None
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status.startswith("ok")


class CheckError(SystemExit):
    """A one-line reason to stop before any stage runs."""

    def __init__(self, message: str) -> None:
        super().__init__(f"gpu-check: {message}")


# ----------------------------------------------------------------------------- before the stages


def require_cuda(dry_run: bool) -> dict:
    """The device's description; stops at once, in one line, where CUDA is missing (unless a dry run)."""
    try:
        import torch
    except ImportError as err:
        raise CheckError(f"{sys.executable} cannot import torch ({err}); run it with the Python that has "
                         "the machine's CUDA build of PyTorch") from None
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    if dry_run:
        return {**info, "device": "cpu (dry run)"}
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise CheckError(f"no CUDA device: torch {torch.__version__} ({built}) sees no GPU; "
                         "`python3 benchmarks/gpu_check.py --dry-run` runs the stages on the CPU at tiny sizes")
    props = torch.cuda.get_device_properties(0)
    return {**info, "device": props.name, "device_memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}", "device_count": torch.cuda.device_count(),
            **nvidia_smi()}


def nvidia_smi() -> dict:
    """The driver version (and the GPU's name as the driver gives it), where nvidia-smi is present."""
    if shutil.which("nvidia-smi") is None:
        return {"driver": "unknown (no nvidia-smi)"}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return {"driver": f"unknown (nvidia-smi: {str(err).splitlines()[0]})"}
    driver, _, name = out.strip().splitlines()[0].partition(",")
    return {"driver": driver.strip(), "driver_device": name.strip()}


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares them ("Open_CLIP.torch" → "open-clip-torch")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return canonical(path.name.split("-", 1)[0])


def find_wheels(folder: Path) -> list[Path]:
    """The wheels to install; a missing folder, or one without clipforge's wheel, stops the check in one line."""
    how = "run `make gpu-wheels` where PyPI is reachable, and bring the folder along"
    if not folder.is_dir():
        raise CheckError(f"no wheel folder at {folder}: {how}")
    wheels = sorted(folder.glob("*.whl"))
    if "clipforge" not in {wheel_name(w) for w in wheels}:
        raise CheckError(f"no clipforge wheel in {folder}: {how}")
    return wheels


def installed_version(name: str, path: list[str] | None = None) -> str | None:
    if path is None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    for dist in importlib.metadata.distributions(path=path):
        if canonical(dist.metadata["Name"] or "") == name:
            return dist.version
    return None


def choose(wheels: list[Path]) -> tuple[list[Path], dict[str, str]]:
    """The wheels to install, and the machine's versions of those it already has (left alone, so
    that nothing the machine's PyTorch or transformers rely on is shadowed)."""
    chosen, present = [], {}
    for wheel in wheels:
        name = wheel_name(wheel)
        have = installed_version(name)
        if have is not None and name not in ALWAYS_INSTALLED:
            present[name] = have
        else:
            chosen.append(wheel)
    return chosen, present


INSTALL_SECONDS = 60  # a no-index install of a dozen small wheels takes seconds; more leaves no time to measure


def install(wheels: list[Path], target: Path) -> dict:
    """Install into ``target`` the wheels the machine lacks (and ALWAYS_INSTALLED), without
    dependencies or an index; pip where the machine has it, else the wheels are unpacked."""
    chosen, present = choose(wheels)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--quiet",
           "--disable-pip-version-check", "--target", str(target), *map(str, chosen)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise CheckError(f"installing {len(chosen)} wheels took more than {INSTALL_SECONDS} s; nothing was "
                         "measured") from None
    how = "pip install --no-deps --no-index --target"
    if done.returncode != 0:
        if "No module named pip" not in done.stderr:
            raise CheckError(f"installing {len(chosen)} wheels failed: {last_line(done.stderr)}")
        for wheel in chosen:
            unpack(wheel, target)
        how = "unpacked (this Python has no pip)"
    return {"how": how, "installed": [w.name for w in chosen], "machine_has": present,
            "seconds": round(time.perf_counter() - start, 1)}


def unpack(wheel: Path, target: Path) -> None:
    """A pure-Python wheel's files into ``target``, as an install would place them (no scripts)."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            top, _, rest = member.partition("/")
            if top.endswith(".data"):
                kind, _, rest = rest.partition("/")
                if kind not in ("purelib", "platlib") or not rest:
                    continue
                dest = target / rest
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(archive.read(member))
            elif not member.endswith("/"):
                archive.extract(member, target)


def versions(target: Path, before: dict[str, str | None]) -> dict:
    """Each reported package's version and where it comes from: the machine, the wheel folder, src/."""
    out = {}
    for name in REPORTED:
        ours = installed_version(name, [str(target)])
        if name == "clipforge" and ours:
            out[name] = f"{ours} (src/ of the working tree; its wheel installed)"
        elif ours:
            out[name] = f"{ours} (.gpu-wheels)"
        elif before.get(name):
            out[name] = f"{before[name]} (machine)"
        else:
            out[name] = "missing"
    return out


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "(no output)"


# ----------------------------------------------------------------------------- the stages


def build_stages(*, dry_run: bool, tests_path: str, names: list[str], scratch: Path,
                 have_timeout_plugin: bool) -> list[Stage]:
    """The four stages, in the order of their value: the CUDA tests, the loss, training, inference."""
    py = sys.executable
    flag = ["--dry-run"] if dry_run else []
    stages = []
    for name in names:
        box = BOXES[name]
        if name == "tests":
            junit = scratch / "tests.xml"
            argv = [py, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider",
                    "--continue-on-collection-errors", f"--junitxml={junit}", tests_path]
            if have_timeout_plugin:  # one hung test fails alone instead of using up the box
                argv.insert(3, "--timeout=30")
            stages.append(Stage(name, argv, box, junit=junit))
        else:
            rows = scratch / f"{name}.jsonl"
            argv = [py, str(STAGES_DIR / f"stage_{name}.py"), "--rows", str(rows), *flag]
            stages.append(Stage(name, argv, box, rows_file=rows))
    return stages


def run_stage(stage: Stage, env: dict[str, str], *, timeout: float | None = None, log=print) -> StageResult:
    """Run one stage within its box: on time, or killed with its process group (pytest's children too)."""
    box = stage.timeout if timeout is None else timeout
    argv = list(stage.argv)
    if stage.rows_file is not None:
        # The stage stops starting new cases a little before the box closes, so it ends on its own.
        argv += ["--deadline", f"{time.time() + max(1.0, box - 5.0):.1f}"]
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as output:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=box)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            kill_group(process)
            code, status = None, f"timed out after {box:.0f} s (killed)"
        output.seek(0)
        text = output.read()
    result = StageResult(stage.name, status, round(time.perf_counter() - start, 1), box, code,
                         output_tail="\n".join(text.splitlines()[-40:]))
    if stage.rows_file is not None and stage.rows_file.exists():
        result.rows = [json.loads(line) for line in stage.rows_file.read_text().splitlines() if line.strip()]
    if stage.junit is not None:
        result.summary = junit_summary(stage.junit)
        if code == 5:
            result.status = "ok: no test selected"
    log(stage_line(result))
    return result


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def junit_summary(path: Path) -> dict:
    """Counts from pytest's JUnit report, and each failed test's or collection error's id and first line."""
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    problems = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            found = case.find(kind)
            if found is not None:
                test = "::".join(filter(None, (case.get("classname"), case.get("name"))))
                problems.append({"test": test, "kind": kind, "message": (found.get("message") or "")[:300]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "problems": problems}


def stage_line(r: StageResult) -> str:
    extra = ""
    if r.summary:
        s = r.summary
        extra = f": {s['passed']} passed, {s['failures']} failed, {s['errors']} errors, {s['skipped']} skipped"
    elif r.rows:
        bad = sum(1 for row in r.rows if row.get("status") != "ok")
        extra = f": {len(r.rows)} rows, {bad} not ok"
    return f"[{r.name}] {r.status} in {r.seconds:.1f} s (box {r.timeout:.0f} s){extra}"


def run_stages(stages: list[Stage], env: dict[str, str], *, deadline: float, log=print) -> list[StageResult]:
    """Each stage in turn, whatever became of the one before; none starts past ``deadline``
    (time.time()), and none is given a box that would end after it."""
    results = []
    for stage in stages:
        left = deadline - time.time()
        if left < 10:
            result = StageResult(stage.name, "skipped: the run's time budget is spent", 0.0, stage.timeout)
            log(stage_line(result))
        else:
            result = run_stage(stage, env, timeout=min(stage.timeout, left), log=log)
        results.append(result)
    return results


# ----------------------------------------------------------------------------- the report


def cell(value, fmt: str = "{}") -> str:
    return "—" if value is None else fmt.format(value)


def scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(report: dict) -> str:
    v, mib, gib = report["versions"], 1 << 20, 1 << 30
    device = v["device"] + (f", {v['device_memory_bytes'] / gib:.1f} GiB" if v.get("device_memory_bytes") else "")
    parts = [
        md_table(["", ""], [
            ["device", device + (f", driver {v['driver']}" if v.get("driver") else "")],
            ["torch", f"{v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}"],
            ["python", v["python"]],
            ["packages", ", ".join(f"{k} {p.split(' ')[0]}" for k, p in v["packages"].items() if p != "missing")],
            ["date", report["date"]],
            ["command", f"`{report['command']}`"],
        ]),
        "### Stages\n\n" + md_table(["stage", "status", "seconds", "box (s)"], [
            [s["name"], s["status"], f"{s['seconds']:.1f}", f"{s['timeout']:.0f}"] for s in report["stages"]]),
    ]
    by_name = {s["name"]: s for s in report["stages"]}
    if "tests" in by_name and by_name["tests"]["summary"]:
        s = by_name["tests"]["summary"]
        text = (f"### The CUDA tests\n\n{s['passed']} passed, {s['failures']} failed, {s['errors']} errors, "
                f"{s['skipped']} skipped (`pytest -k cuda`).")
        text += "".join(f"\n- {p['kind']}: `{p['test']}`: {p['message'].splitlines()[0] if p['message'] else ''}"
                        for p in s["problems"])
        parts.append(text)
    rows = by_name.get("loss", {}).get("rows", [])
    rates = [r for r in rows if r["kind"] == "matmul"]
    losses = [r for r in rows if r["kind"] == "loss"]
    if losses:
        parts.append("### Loss, forward + backward\n\n" + md_table(
            ["N", "d", "inputs", "TF32", "implementation", "computes", "ms", "extra peak (MiB)",
             "TFLOP/s (its FLOPs)", "TFLOP/s (6·N²·d)", "share of tile matmul", "loss", "status"],
            [[f"{r['n']:,}", str(r["d"]), r["inputs"], "on" if r["tf32"] else "off", r["impl"], r["computes"],
              cell(scaled(r.get("seconds"), 1e3), "{:.1f}"),
              cell(scaled(r.get("extra_peak_bytes"), 1 / mib), "{:,.0f}"),
              cell(r.get("tflops"), "{:.1f}"), cell(r.get("useful_tflops"), "{:.1f}"),
              cell(r.get("tile_share"), "{:.0%}"), cell(r.get("loss"), "{:.5f}"), r["status"]]
             for r in sorted(losses, key=lambda r: (r["n"], r["d"], r["order"]))]))
    if rates:
        parts.append("Matmul rate of the tiled loss's tile, (tile × d) · (d × tile), TFLOP/s:\n\n" + md_table(
            ["N", "d", "tile", "fp32", "TF32", "bf16"],
            [[f"{r['n']:,}", str(r["d"]), str(r["tile"]), cell(r["fp32"], "{:.1f}"), cell(r["tf32"], "{:.1f}"),
              cell(r["bf16"], "{:.1f}")] for r in sorted(rates, key=lambda r: (r["n"], r["d"]))]))
    train = by_name.get("train", {}).get("rows", [])
    if train:
        parts.append("### Training step (bf16 autocast)\n\n" + md_table(
            ["model", "batch", "implementation", "samples/s", "peak (GiB)", "status"],
            [[r["model"], str(r["batch"]), r["impl"], cell(r.get("samples_per_s"), "{:,.0f}"),
              cell(scaled(r.get("peak_bytes"), 1 / gib), "{:.1f}"), r["status"]]
             for r in sorted(train, key=lambda r: (r["batch"], r["impl"] != "clipforge"))]))
    infer = by_name.get("inference", {}).get("rows", [])
    if infer:
        parts.append("### Inference\n\n" + md_table(
            ["tower", "precision", "batch", "implementation", "items/s", "status"],
            [[r["tower"], r["precision"], str(r["batch"]), r["impl"], cell(r.get("items_per_s"), "{:,.0f}"),
              r["status"]] for r in sorted(infer, key=lambda r: (r["tower"], r["precision"] != "fp32",
                                                                  r["impl"] != "clipforge"))]))
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", "--cpu", action="store_true", dest="dry_run",
                        help="run the stages on the CPU at tiny sizes (checks the machinery, measures nothing)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="the folder `make gpu-wheels` filled")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results, "
                        "benchmarks/results/dry-run for a dry run)")
    parser.add_argument("--stages", default=",".join(BOXES), help=f"comma-separated, of {', '.join(BOXES)}")
    parser.add_argument("--tests", default="tests/", help="what the tests stage gives pytest")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds from the start past which no stage runs")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in BOXES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}: the stages are {', '.join(BOXES)}")
    began, deadline = time.perf_counter(), time.time() + args.budget

    device = require_cuda(args.dry_run)
    wheels = find_wheels(args.wheels)
    before = {name: installed_version(name) for name in REPORTED}
    with tempfile.TemporaryDirectory(prefix="clipforge-gpu-check-") as tmp:
        scratch = Path(tmp)
        target = scratch / "site"
        target.mkdir()
        installed = install(wheels, target)
        packages = versions(target, before)
        info = {"python": f"{platform.python_version()} ({sys.executable})", **device, "packages": packages}
        print(f"python {info['python']}")
        print(f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}; device: {info['device']}"
              + (f", driver {info['driver']}" if "driver" in info else ""))
        print(f"installed into a scratch folder ({installed['how']}, {installed['seconds']} s): "
              + ", ".join(installed["installed"]))
        for name, where in packages.items():
            print(f"  {name} {where}")

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), str(target), env.get("PYTHONPATH")]))
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        if args.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU's, even on a GPU machine
            env["OMP_NUM_THREADS"] = "1"  # tiny ops: threads waiting at barriers cost more than they give
        have_timeout = packages.get("pytest-timeout", "missing") != "missing"
        stages = build_stages(dry_run=args.dry_run, tests_path=args.tests, names=names, scratch=scratch,
                              have_timeout_plugin=have_timeout)
        results = run_stages(stages, env, deadline=deadline)

    given = sys.argv[1:] if argv is None else argv
    report = {
        "command": " ".join(["python3 benchmarks/gpu_check.py", *given]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run, "budget_seconds": args.budget,
        "seconds": round(time.perf_counter() - began, 1), "versions": info, "install": installed,
        "stages": [r.__dict__ for r in results],
    }
    out = args.out or (DRY_RESULTS if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print("\n" + table)
    print(f"wrote {out / 'gpu_check.json'} and gpu_check.md in {report['seconds']:.0f} s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
