"""Real signals on real training processes: SIGINT (a terminal's Ctrl-C, sent to the whole process
group, data loader workers included), SIGTERM (a scheduler's), SIGUSR1 (SLURM's advance warning).

The first signal finishes the step, writes a checkpoint at it, prints the command that resumes,
and exits with 128 + the signal's number; that command ends on the same bits as a run never
stopped.  A second signal stops at once, leaving the earlier checkpoints intact.  Two processes
over gloo stop after the same step, whichever of them was signalled, and write one checkpoint.

Each run starts a Python process (a few seconds of imports); SIGUSR1 and the two-process cases
are marked slow (`make test-slow`).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
STEPS = 12
# 48 samples of 8 a step; two loader workers, so that the group's signal reaches worker processes too
OPTIONS = ["--model", "tiny", "--data", "shapes://?n=48&size=32", "--steps", str(STEPS), "--batch-size", "8",
           "--warmup", "2", "--vocab-size", "600", "--save-every", "4", "--keep-last", "5", "--log-every", "1",
           "--device", "cpu", "--workers", "2", "--no-progress"]
PYTHON = [sys.executable, "-m", "clipforge.cli"]


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    """No process group from the environment: the two-process tests name their own."""
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in its own process group, as a shell starts a job: a signal to the group reaches
    it and its loader workers."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the process did not end in {timeout:.0f} s: {err[-2000:]}")
    return process.returncode, out, err


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]  # a line being written is skipped


def wait_for_step(processes: list[subprocess.Popen], out: Path, step: int, timeout: float = 240) -> None:
    """Until the run has logged ``step``; sending a signal right then lands at the start of the next step."""
    deadline = time.monotonic() + timeout
    while not logged_steps(out) or logged_steps(out)[-1] < step:
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"the run ended before step {step}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no step {step} logged after {timeout:.0f} s")
        time.sleep(0.005)


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name, w in a.items():
        assert torch.equal(b[name], w), name


def checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.removeprefix("step-")) for p in root.iterdir() if (p / "train_state.pt").is_file()
                  and not p.name.endswith(".tmp"))


def resume_command(stderr: str) -> list[str]:
    (line,) = [line for line in stderr.splitlines() if line.startswith("resume with: ")]
    return shlex.split(line.removeprefix("resume with: "))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run never stopped, with a checkpoint at every step (saving changes nothing in a run)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, _, err = finish(start([*PYTHON, "train", *OPTIONS, "--save-every", "1", "--keep-last", "100",
                                 "--out", str(out)]))
    assert code == 0, err[-2000:]
    return out


# --------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                           pytest.param(signal.SIGUSR1, 138, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM", "SIGUSR1"])
def test_a_signal_finishes_the_step_saves_and_the_printed_command_resumes_exactly(reference, tmp_path, signum,
                                                                                   status):
    out = tmp_path / "run"
    process = start([*PYTHON, "train", *OPTIONS, "--out", str(out)])
    wait_for_step([process], out, 5)  # past the step-4 checkpoint: the stop's own is another one
    os.killpg(process.pid, signum)  # the main process and its two loader workers
    code, _, err = finish(process)

    assert code == status, err[-2000:]
    assert "Traceback" not in err
    stopped = logged_steps(out)[-1]
    assert 5 <= stopped < STEPS
    name = signal.Signals(signum).name
    assert f"{name}: finishing this step, then writing a checkpoint" in err
    assert f"stopped by {name} after step {stopped}; checkpoint {out / 'checkpoints' / f'step-{stopped:07d}'}" in err
    assert checkpoints(out) == [4, stopped]
    assert not (out / "metrics.json").exists()  # the run is not finished
    assert_same_weights(weights(reference, stopped), weights(out, stopped))

    command = resume_command(err)
    assert command[:4] == [*PYTHON, "train"] and command[-4:] == ["--resume", "latest", "--out", str(out)]
    if signum == signal.SIGUSR1:
        return  # resumes as after the other two
    code, printed, err = finish(start(command))
    assert code == 0, err[-2000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped:07d}'} at step {stopped}" in printed
    assert_same_weights(weights(reference, STEPS), weights(out, STEPS))
    assert logged_steps(out) == list(range(1, STEPS + 1))
    final = json.loads((out / "metrics.json").read_text())
    assert final["samples_read"] == STEPS * 8


def test_a_second_sigint_stops_at_once_and_leaves_the_earlier_checkpoint_intact(tmp_path):
    """Steps of half a second (64 images of 64 pixels): the second SIGINT arrives while the step
    the first one let finish is still running."""
    out = tmp_path / "run"
    slow = ["--model", "tiny", "--data", "shapes://?n=256&size=64", "--steps", "20", "--batch-size", "64",
            "--warmup", "2", "--vocab-size", "600", "--save-every", "2", "--log-every", "1", "--device", "cpu",
            "--workers", "2", "--no-progress", "--out", str(out)]
    process = start([*PYTHON, "train", *slow])
    wait_for_step([process], out, 3)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step-0000002").iterdir()}
    os.killpg(process.pid, signal.SIGINT)
    line = process.stderr.readline()
    while "finishing this step" not in line:  # the first one was received: send the second
        assert line, "the run ended without acknowledging the first SIGINT"
        line = process.stderr.readline()
    os.killpg(process.pid, signal.SIGINT)
    code, _, err = finish(process)

    assert code == 130
    assert "Traceback" not in err and err.count("\n") == 1, err[-2000:]
    assert err.startswith("clipforge train: stopped at once by SIGINT, without a checkpoint")
    assert "; resume from the last one with: " in err and "--resume latest" in err
    assert checkpoints(out) == [2]  # no checkpoint of the stopped step; the earlier one as it was
    assert {p.name: p.read_bytes() for p in (out / "checkpoints" / "step-0000002").iterdir()} == before


# --------------------------------------------------------------------------------------
# Two processes over gloo
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str]) -> list[subprocess.Popen]:
    """Two ranks as torchrun starts them: the environment names the group."""
    port = str(_free_port())
    return [start([*PYTHON, *args], env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                         "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                         "LOCAL_WORLD_SIZE": "2"})
            for rank in range(2)]


def finish_ranks(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    try:
        return [finish(p) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


TWO = [*OPTIONS, "--workers", "1", "--model", "tiny-vit"]  # a worker per rank; no BatchNorm statistics per rank


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    for code, _, err in finish_ranks(start_ranks(["train", *TWO, "--out", str(out)])):
        assert code == 0, err[-2000:]
    return out


@pytest.mark.slow  # four two-process runs: about a minute
@pytest.mark.parametrize("signalled", [[1], [0, 1]], ids=["rank-1", "both"])
def test_two_ranks_stop_after_the_same_step_with_one_checkpoint(two_rank_reference, tmp_path, signalled):
    out = tmp_path / "run"
    ranks = start_ranks(["train", *TWO, "--out", str(out)])
    wait_for_step(ranks, out, 5)
    for rank in signalled:
        os.killpg(ranks[rank].pid, signal.SIGTERM)
    results = finish_ranks(ranks)

    assert [code for code, _, _ in results] == [143, 143], [err[-1500:] for _, _, err in results]
    assert all("Traceback" not in err for _, _, err in results)
    stopped = logged_steps(out)[-1]
    assert 5 <= stopped < STEPS and checkpoints(out) == [4, stopped]
    err0 = results[0][2]
    assert f"stopped by SIGTERM after step {stopped}" in err0
    assert "stopped by" not in results[1][2]  # one rank reports
    command = resume_command(err0)
    assert command[:6] == ["torchrun", "--nproc-per-node", "2", "-m", "clipforge.cli", "train"]

    # the printed options, in two processes again: the same bits as the run never stopped
    for code, _, err in finish_ranks(start_ranks(command[5:])):
        assert code == 0, err[-2000:]
    assert_same_weights(weights(two_rank_reference, STEPS), weights(out, STEPS))


def _raise_in(name: str, error: BaseException):
    namespace: dict = {}
    exec(f"def {name}():\n    raise error\n", {"error": error}, namespace)
    try:
        namespace[name]()
    except BaseException as caught:  # noqa: BLE001 - the hook gets what a thread's run would
        return type(caught), caught, caught.__traceback__.tb_next
    raise AssertionError("did not raise")


def test_a_worker_is_silent_when_the_main_process_abandons_a_handover(capsys):
    """A second Ctrl-C can stop the main process while a worker's resource-sharer thread
    (multiprocessing's ``_serve``) hands it a batch's file descriptor; that thread's connection
    error is not the user's concern.  Every other error is printed as Python prints it."""
    from clipforge.data.images import quiet_abandoned_handover

    quiet_abandoned_handover(*_raise_in("_serve", EOFError()))
    quiet_abandoned_handover(*_raise_in("_serve", ConnectionResetError(104, "reset")))
    assert capsys.readouterr().err == ""
    quiet_abandoned_handover(*_raise_in("_serve", ValueError("a real bug")))
    quiet_abandoned_handover(*_raise_in("load_batch", EOFError("elsewhere")))
    err = capsys.readouterr().err
    assert "ValueError: a real bug" in err and "EOFError: elsewhere" in err
