"""benchmarks/gpu_check.py on the CPU: what the GPU check does before and around its measurements.

Without a GPU the check must stop at once in one line; a missing wheel folder says what to run;
the wheels install without dependencies into a scratch folder; a stage that fails or overruns
its box is reported and the next one runs; and a dry run (the stages on the CPU at tiny sizes)
writes the JSON and the Markdown table.  Nothing here is a measurement.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = load_check()


def run_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """A folder with clipforge's wheel: `make gpu-wheels`'s when it is there, else one built from a copy of the tree."""
    made = sorted((ROOT / ".gpu-wheels").glob("clipforge-*.whl"))
    folder = tmp_path_factory.mktemp("wheels")
    if made:
        shutil.copy(made[0], folder)
        return folder
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree)
    shutil.copytree(ROOT / "src" / "clipforge", tree / "src" / "clipforge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(folder), str(tree)], check=True, capture_output=True, timeout=300)
    return folder


# ----------------------------------------------------------------------------- stopping early


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_check_stops_at_once_in_one_line():
    line = one_line(run_check())
    assert line.startswith("gpu-check: no CUDA device: torch ")
    assert "--dry-run" in line


def test_a_missing_wheel_folder_says_to_run_make_gpu_wheels(tmp_path):
    how = "run `make gpu-wheels` where PyPI is reachable, and bring the folder along"
    with pytest.raises(SystemExit) as stop:
        check.find_wheels(tmp_path / "absent")
    assert str(stop.value) == f"gpu-check: no wheel folder at {tmp_path / 'absent'}: {how}"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ftfy-6.3.1-py3-none-any.whl").touch()
    with pytest.raises(SystemExit) as stop:
        check.find_wheels(tmp_path / "other")
    assert str(stop.value) == f"gpu-check: no clipforge wheel in {tmp_path / 'other'}: {how}"


def test_an_unknown_stage_is_named():
    done = run_check("--dry-run", "--stages", "loss,speed")
    assert done.returncode == 2
    assert "unknown stage 'speed': the stages are tests, loss, train, inference" in done.stderr


# ----------------------------------------------------------------------------- the scratch install


@pytest.mark.slow
def test_the_wheels_install_without_dependencies_into_a_scratch_folder(wheels, tmp_path):
    target = tmp_path / "site"
    target.mkdir()
    done = check.install(sorted(wheels.glob("*.whl")), target)
    assert done["how"] == "pip install --no-deps --no-index --target"
    assert any(name.startswith("clipforge-") for name in done["installed"])
    assert check.installed_version("clipforge", [str(target)]) is not None
    assert (target / "bin" / "clipforge").exists()
    assert not (target / "torch").exists()  # no dependency came along: the machine's torch is the one used
    code = "import clipforge, torch; print(clipforge.__file__); print(torch.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    paths = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout.split()
    assert paths[0].startswith(str(target))
    assert not paths[1].startswith(str(target))
    # Without pip, the wheels are unpacked to the same files (scripts aside).
    unpacked = tmp_path / "unpacked"
    wheel = next(wheels.glob("clipforge-*.whl"))
    check.unpack(wheel, unpacked)
    files = lambda root: sorted(p.relative_to(root) for p in (root / "clipforge").rglob("*") if p.is_file())
    assert files(unpacked) == files(target)


def test_only_the_wheels_the_machine_lacks_are_chosen_and_ours_always():
    """The machine's own copies (torch's and transformers' dependencies among them) are never
    shadowed; clipforge, OpenCLIP and Inf-CL are always the folder's.  pytest is installed here."""
    names = ["pytest-9.2.0-py3-none-any.whl", "open_clip_torch-3.3.0-py3-none-any.whl",
             "clipforge-0.1.0-py3-none-any.whl", "no_such_distribution_here-1.0-py3-none-any.whl"]
    chosen, present = check.choose([Path(n) for n in names])
    assert [p.name for p in chosen] == names[1:]
    assert present == {"pytest": check.installed_version("pytest")}
    assert check.wheel_name(Path(names[1])) == "open-clip-torch"


# ----------------------------------------------------------------------------- time boxes


def test_a_stage_past_its_box_is_killed_with_its_children_and_the_next_still_runs(tmp_path):
    child_pid = tmp_path / "child.pid"
    rows = tmp_path / "rows.jsonl"
    sleeper = ("import json, subprocess, sys, time\n"
               f"open({str(rows)!r}, 'a').write(json.dumps({{'kind': 'x', 'status': 'ok'}}) + '\\n')\n"
               "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
               f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
               "time.sleep(120)\n")
    stages = [
        check.Stage("fails", [sys.executable, "-c", "import sys; print('broken'); sys.exit(3)"], 30),
        check.Stage("sleeps", [sys.executable, "-c", sleeper], 6, rows_file=rows),
        check.Stage("after", [sys.executable, "-c", "print('ran after')"], 30),
    ]
    lines: list[str] = []
    results = check.run_stages(stages, dict(os.environ), deadline=time.time() + 300, log=lines.append)
    failed, killed, after = results
    assert failed.status == "failed (exit 3)" and "broken" in failed.output_tail
    assert killed.status == "timed out after 6 s (killed)"
    assert killed.rows == [{"kind": "x", "status": "ok"}]  # what it wrote before the box closed is kept
    assert after.ok and "ran after" in after.output_tail
    assert lines[1] == f"[sleeps] timed out after 6 s (killed) in {killed.seconds:.1f} s (box 6 s): 1 rows, 0 not ok"
    pid = int(child_pid.read_text())
    state = Path(f"/proc/{pid}/stat")
    deadline = time.time() + 10
    while state.exists() and state.read_text().split(") ")[1][0] != "Z" and time.time() < deadline:
        time.sleep(0.05)
    assert not state.exists() or state.read_text().split(") ")[1][0] == "Z", "the stage's child outlived it"


def test_no_stage_starts_once_the_run_budget_is_spent():
    stage = check.Stage("late", [sys.executable, "-c", "print('ran')"], 30)
    (result,) = check.run_stages([stage], dict(os.environ), deadline=time.time() + 5, log=lambda _: None)
    assert result.status == "skipped: the run's time budget is spent"
    assert not result.ok


def test_the_tests_stage_reports_pytests_counts_and_failures(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "def test_adds_on_cuda():\n    assert 1 + 1 == 2\n\n"
        "def test_cuda_breaks():\n    assert 1 == 2, 'one is not two'\n\n"
        "def test_elsewhere():\n    raise AssertionError('not selected')\n")
    (stage,) = check.build_stages(dry_run=True, tests_path=str(tmp_path), names=["tests"], scratch=tmp_path,
                                  have_timeout_plugin=False)
    result = check.run_stage(stage, dict(os.environ), log=lambda _: None)
    assert result.status == "failed (exit 1)"
    s = result.summary
    assert (s["passed"], s["failures"], s["errors"], s["skipped"]) == (1, 1, 0, 0)
    (problem,) = s["problems"]
    assert problem["test"].endswith("test_cuda_breaks") and "one is not two" in problem["message"]
    assert check.stage_line(result).endswith(": 1 passed, 1 failed, 0 errors, 0 skipped")


# ----------------------------------------------------------------------------- a dry run


@pytest.mark.slow
def test_a_dry_run_writes_the_json_and_the_markdown_table(wheels, tmp_path):
    done = run_check("--dry-run", "--wheels", str(wheels), "--out", str(tmp_path), "--stages", "loss,train,inference",
                     timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "installed into a scratch folder (pip install --no-deps --no-index --target" in done.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["versions"]["device"] == "cpu (dry run)"
    assert report["versions"]["packages"]["clipforge"].startswith("0.1.0 (src/")
    assert [s["name"] for s in report["stages"]] == ["loss", "train", "inference"]
    assert all(s["status"] == "ok" for s in report["stages"])
    loss, train, infer = (s["rows"] for s in report["stages"])

    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    try:
        import stage_loss
    finally:
        sys.path.remove(str(ROOT / "benchmarks" / "gpu"))
    sizes = stage_loss.DRY_SIZES
    assert [(r["n"], r["d"]) for r in loss if r["kind"] == "matmul"] == sizes
    cases = [r for r in loss if r["kind"] == "loss"]
    assert len(cases) == len(sizes) * len(stage_loss.PRECISIONS) * len(stage_loss.IMPLEMENTATIONS)
    for r in cases:
        if r["impl"] == "Inf-CL":
            assert r["status"] == "unavailable: Inf-CL's kernels are Triton's and need CUDA"
        elif r["impl"] != "OpenCLIP ClipLoss":  # present or not, as the machine has it
            assert r["status"] == "ok", r
            n, d = r["n"], r["d"]
            assert r["flops"] == stage_loss.IMPLEMENTATIONS[r["impl"]] * n * n * d
            assert math.isclose(r["useful_tflops"] * r["seconds"], 6 * n * n * d / 1e12, rel_tol=1e-9)
    # The tiled loss and the plain formula agree on every case they both ran.
    by_case = {}
    for r in cases:
        if r["status"] == "ok":
            by_case.setdefault((r["n"], r["d"], r["inputs"], r["tf32"]), {})[r["impl"]] = r["loss"]
    for case, values in by_case.items():
        assert math.isclose(values["clipforge tiled"], values["plain formula"], rel_tol=1e-4), case

    assert {(r["impl"], r["batch"]) for r in train} == {(i, b) for i in ("clipforge", "OpenCLIP") for b in (8, 16)}
    assert all(r["status"] == "ok" and r["samples_per_s"] > 0 for r in train if r["impl"] == "clipforge")
    assert {(r["tower"], r["precision"]) for r in infer if r["impl"] == "clipforge" and r["status"] == "ok"} == {
        (t, p) for t in ("image", "text") for p in ("fp32", "bf16")}

    table = (tmp_path / "gpu_check.md").read_text()
    for heading in ("### Stages", "### Loss, forward + backward", "### Training step (bf16 autocast)", "### Inference"):
        assert heading in table
    loss_rows = [line for line in table.splitlines() if line.startswith("| ") and "clipforge tiled" in line]
    assert len(loss_rows) == len(sizes) * len(stage_loss.PRECISIONS)
    assert table in done.stdout


def test_a_stage_fails_only_when_one_of_clipforges_own_cases_fails(tmp_path, monkeypatch):
    """A contender's error, an out-of-memory and a time-boxed case are results; clipforge's error is not."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent / "gpu"))
    import _stage

    rows = _stage.Rows(tmp_path / "rows.jsonl", deadline=math.inf)
    rows.add(impl="OpenCLIP ClipLoss", status="error: RuntimeError: boom")
    rows.add(impl="clipforge tiled", status="out of memory")
    rows.add(impl="clipforge tiled", status="skipped: time box")
    assert rows.exit_status() == 0
    rows.add(impl="clipforge plain", status="error: RuntimeError: boom")
    assert rows.exit_status() == 1
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 4
