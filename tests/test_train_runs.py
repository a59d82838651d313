"""Whole training runs of the ``tiny`` preset: two processes over gloo train exactly what one
process trains, and a run killed with SIGKILL and resumed ends bit-identical to one that was
never interrupted.

Each run is a few steps on 32-pixel ``shapes://`` images with one intra-op thread per
process (a shared two-core machine); the file takes about half a minute.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from clipforge.train import train
from clipforge.train.config import TrainConfig

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    """No process group from the environment: each run here names its own.  (One intra-op
    thread, here and in every child, is conftest's `one_thread`.)"""
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


# --------------------------------------------------------------------------------------
# Two processes train what one trains
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, config: dict) -> None:
    """One torchrun-like process: the environment names the group, `train` joins it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from clipforge import distributed

    try:
        train(TrainConfig(**config))
    finally:
        distributed.shutdown()  # train() joins the group but leaves it to its caller


def run_two_processes(config: TrainConfig, timeout: float = 120.0) -> None:
    context = mp.start_processes(_rank_main, args=(2, _free_port(), config.to_dict()), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):  # raises when a rank failed (and ends the other)
            if time.monotonic() > deadline:
                pytest.fail(f"two-process training did not finish in {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def base_config(out: Path, **changes) -> TrainConfig:
    # tiny-vit: BatchNorm (tiny's ResNet) would normalise 8 rows per rank, not 16 (by design)
    return TrainConfig(model="tiny-vit", data="shapes://?n=40&size=32", out=str(out), steps=3, batch_size=16, warmup=1,
                       lr=1e-3, vocab_size=600, save_every=100, log_every=1, device="cpu", progress=False, **changes)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as patch:  # a module fixture runs before `no_process_group`
        for name in DIST_ENV:
            patch.delenv(name, raising=False)
        train(base_config(out))
    return out


@pytest.mark.parametrize("world,accum", [(2, 1), (2, 2), (1, 2)], ids=["2-ranks", "2-ranks-accum-2", "1-rank-accum-2"])
def test_data_parallel_and_accumulation_train_what_one_batch_trains(single_process_run, tmp_path, world, accum):
    """The same 3 steps of 16 rows (40 samples: step 3 straddles an epoch) as 2 ranks × 8,
    2 ranks × 2 micro-batches × 4, or 1 rank × 2 × 8, against 1 process × 16.

    Tolerance 1e-4 (lr / 10) on every weight.  In float32 the runs differ only in summation
    order (matmuls over 8 rows instead of 16, DDP's all-reduce, the loss's gather), ~1e-7
    relative per operation, but Adam divides by √v + ε with ε = 1e-6, so a rounding
    difference δ in a gradient near zero (rare token embeddings) moves an update by up to
    lr·δ/ε: measured up to 1.6e-5 after 3 steps.  A real difference (a local instead of a
    global loss, no gradient averaging, a wrong rank slice) moves weights by ~lr per step:
    measured 5e-3.  Adam hides a constant factor on the gradient, so the logged gradient
    norm (before clipping) is compared per step too, with the loss and the logit scale.
    """
    out = tmp_path / "run"
    config = base_config(out, accum_steps=accum)
    if world == 1:
        train(config)
    else:
        run_two_processes(config)

    ref, got = weights(single_process_run, 3), weights(out, 3)
    assert set(got) == set(ref)
    for name, w in ref.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-4, msg=name)
    ref_rows, rows = metrics(single_process_run), metrics(out)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [1, 2, 3]
    for r, q in zip(rows, ref_rows):
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-4)
        assert r["logit_scale"] == pytest.approx(q["logit_scale"], rel=1e-6)


# --------------------------------------------------------------------------------------
# SIGKILL, resume, and the same bits as a run never interrupted
# --------------------------------------------------------------------------------------

STEPS = 16


def command(out: Path, *extra: str) -> list[str]:
    # 48 samples, 8 a step: epochs end at steps 6 and 12, on both sides of the kill.
    # Augmentation on: its random crops must also be the same after a resume.
    return [sys.executable, "-m", "clipforge.cli", "train", "--model", "tiny", "--data", "shapes://?n=48&size=32",
            "--steps", str(STEPS), "--batch-size", "8", "--warmup", "2", "--vocab-size", "600", "--augment",
            "--save-every", "2", "--keep-last", "2", "--log-every", "1", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]


def run(args: list[str], timeout: float = 300.0) -> str:
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def complete_checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()
                  if re.fullmatch(r"step-\d{7}", p.name) and (p / "train_state.pt").is_file())


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]  # a line being written is skipped


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and SIGSTOP are POSIX signals")
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    run(command(reference))

    # ---- start; SIGKILL once a checkpoint exists and the log has run ahead of it ----------
    process = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # generous: other jobs may share the machine
    try:
        while True:
            assert process.poll() is None, f"the run ended before it was killed: {process.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no step-4 checkpoint after 300 s"
            if (out / "checkpoints" / "step-0000004").is_dir() and logged_steps(out)[-1:] >= [5]:
                process.send_signal(signal.SIGSTOP)  # look again while it cannot move on
                checkpoints, logged = complete_checkpoints(out), logged_steps(out)
                if logged[-1] > int(checkpoints[-1].removeprefix("step-")):
                    break
                process.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert f"step-{STEPS:07d}" not in complete_checkpoints(out), "killed too late: the run had finished"

    # ---- a half-written checkpoint from a later save must be ignored, then removed -------
    stray = out / "checkpoints" / "step-0000099.tmp"
    stray.mkdir()
    (stray / "train_state.pt").write_bytes(b"half written")
    (stray / "model.safetensors").write_bytes(b"half written")
    latest = complete_checkpoints(out)[-1]
    assert len(complete_checkpoints(out)) <= 2  # keep_last, even in the killed run

    printed = run(command(out, "--resume", "latest"))
    resumed_at = int(latest.removeprefix("step-"))
    assert resumed_at >= 4 and logged[-1] > resumed_at  # the killed run had logged steps the resumed one redoes
    assert f"resumed from {out / 'checkpoints' / latest} at step {resumed_at}" in printed

    # ---- the same bits --------------------------------------------------------------------
    ref, got = weights(reference, STEPS), weights(out, STEPS)
    assert set(got) == set(ref)
    for name, w in ref.items():
        assert torch.equal(got[name], w), name
    ref_state = torch.load(reference / "checkpoints" / f"step-{STEPS:07d}" / "train_state.pt", weights_only=True)
    state = torch.load(out / "checkpoints" / f"step-{STEPS:07d}" / "train_state.pt", weights_only=True)
    for key, moments in ref_state["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(state["optimizer"]["state"][key][name], value), (key, name)
    assert state["schedule"] == ref_state["schedule"]

    # ---- one log line per step, the same numbers; checkpoints pruned, strays gone --------
    rows, ref_rows = metrics(out), metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    numbers = [(r["loss"], r["grad_norm"], r["lr"]) for r in rows]
    assert numbers == [(r["loss"], r["grad_norm"], r["lr"]) for r in ref_rows]
    assert json.loads((out / "metrics.json").read_text())["step"] == STEPS
    for run_dir in (out, reference):
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000014", "step-0000016"]
