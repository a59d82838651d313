"""``clipforge train --resume``: settings that contradict the checkpoint are refused in one line
naming both values, with the run's records left byte for byte as they were; settings that
cannot change a step's numbers are accepted; ``--extend-schedule`` re-plans the learning rate;
the run's counts cover the whole run.

One small run of ``tiny-vit`` (4 steps of 8, checkpoints at steps 2 and 4) is trained once and
copied for each test.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipforge.cli import main

DATA = "shapes://?n=16&size=32"
RUN = ["--model", "tiny-vit", "--data", DATA, "--steps", "4", "--batch-size", "8", "--warmup", "1", "--lr", "1e-3",
       "--vocab-size", "600", "--save-every", "2", "--log-every", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *RUN, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, to resume."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def digests(out: Path) -> dict[str, str]:
    """Every file of the run, by its path, as a hash of its bytes."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def drop_checkpoints_after(out: Path, step: int) -> None:
    """The run as it stood when its step-``step`` checkpoint was the latest."""
    for path in (out / "checkpoints").iterdir():
        if int(path.name.removeprefix("step-")) > step:
            shutil.rmtree(path)


# --------------------------------------------------------------------------------------
# Contradictions are refused, and nothing is rewritten
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["--steps", "3"], "at step 4: steps is 3, fewer than the 4 the checkpoint has done"),
    (["--steps", "8"], "at step 4: steps is 4 in the checkpoint, 8 now; more steps change the learning-rate "
                       "schedule: pass --extend-schedule"),
    (["--batch-size", "16"], "at step 4: batch_size is 8 in the checkpoint, 16 now"),
    (["--model", "tiny"], "at step 4: model is 'tiny-vit' in the checkpoint, 'tiny' now"),
    (["--lr", "2e-3"], "at step 4: lr is 0.001 in the checkpoint, 0.002 now"),
    (["--seed", "1"], "at step 4: seed is 0 in the checkpoint, 1 now"),
    (["--data", "shapes://?n=17&size=32"], "data is 'shapes://?n=16&size=32' in the checkpoint, 'shapes://?n=17"),
    (["--precision", "bf16"], "precision is 'fp32' in the checkpoint, 'bf16' now"),
    (["--loss", "siglip"], "loss is 'clip' in the checkpoint, 'siglip' now"),
    (["--chunk-size", "none"], "chunk_size is 'auto' in the checkpoint, None now"),
    (["--accum-steps", "2", "--warmup", "2"], "accum_steps is 1 in the checkpoint, 2 now; warmup is 1 in the "
                                              "checkpoint, 2 now"),
], ids=["fewer-steps", "more-steps", "batch-size", "model", "lr", "seed", "data", "precision", "loss", "chunk-size",
        "two-keys"])
def test_a_contradiction_is_refused_in_one_line_and_rewrites_nothing(run, capsys, extra, message):
    before = digests(run)
    assert main(["train", "--resume", "latest", "--out", str(run), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert f"cannot resume {run} " in captured.err and message in captured.err
    assert "resumed" not in captured.out
    assert digests(run) == before  # config.json, metrics.jsonl, metrics.json and every checkpoint


def test_a_shorter_run_is_refused_even_beyond_the_checkpoint(run, capsys):
    drop_checkpoints_after(run, 2)
    before = digests(run)
    assert main(["train", "--resume", "latest", "--out", str(run), "--steps", "3", "--extend-schedule"]) == 2
    assert "at step 2: steps is 4 in the checkpoint, 3 now; --extend-schedule only lengthens" in capsys.readouterr().err
    assert digests(run) == before


def test_the_same_refusal_from_python(run):
    from clipforge.train import train
    from clipforge.train.config import ConfigError, TrainConfig

    saved = json.loads((run / "config.json").read_text())
    before = digests(run)
    with pytest.raises(ConfigError, match="batch_size is 8 in the checkpoint, 16 now"):
        train(TrainConfig.from_dict({**saved, "out": str(run), "resume": "latest", "batch_size": 16}))
    assert digests(run) == before


# --------------------------------------------------------------------------------------
# What resumes
# --------------------------------------------------------------------------------------


def test_resume_latest_alone_continues_the_run_as_it_was_started(trained, run, capsys):
    """No option but --resume and --out: every setting is the checkpoint's, and the run ends on
    the same bits as the one never stopped.  Logging, evaluation, checkpoint cadence and the
    number of loader workers (of a map-style source) may change: none changes a step."""
    drop_checkpoints_after(run, 2)
    (run / "metrics.json").unlink()  # as a run stopped at step 2 left it
    allowed = ["--log-every", "2", "--save-every", "1", "--keep-last", "5", "--workers", "1", "--eval-every", "1",
               "--eval-samples", "8", "--eval-zeroshot", "shapes://?split=heldout&n=8&size=32"]
    assert main(["train", "--resume", "latest", "--out", str(run), *allowed]) == 0
    assert f"resumed from {run / 'checkpoints' / 'step-0000002'} at step 2" in capsys.readouterr().out
    ref, got = weights(trained, 4), weights(run, 4)
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    config = json.loads((run / "config.json").read_text())  # the resumed run's config
    assert (config["model"], config["steps"], config["log_every"], config["workers"]) == ("tiny-vit", 4, 2, 1)
    steps = [r["step"] for r in rows(run) if "loss" in r]
    assert steps == [1, 2, 4]  # the first run's lines up to its checkpoint, then every 2 steps


def test_samples_read_counts_the_whole_run_after_a_resume(trained, run):
    """4 steps of 8 read 32 samples, however often the run was stopped on the way."""
    drop_checkpoints_after(run, 2)
    assert main(["train", "--resume", "latest", "--out", str(run)]) == 0
    final = json.loads((run / "metrics.json").read_text())
    assert final["samples_read"] == json.loads((trained / "metrics.json").read_text())["samples_read"] == 32
    state = torch.load(run / "checkpoints" / "step-0000004" / "train_state.pt", weights_only=True)
    assert state["counts"] == {"samples_read": 32, "bad_samples": 0, "skipped_steps": 0}


def test_extend_schedule_replans_the_learning_rate_from_the_resumed_step(run, capsys):
    """From the step-2 checkpoint of a 4-step run, extended to 8 steps: the learning rate decays by
    cosine from its value at step 2 to the floor at step 8, and says so.  A later resume of the
    extended run keeps the re-planned schedule (it is saved in each checkpoint)."""
    drop_checkpoints_after(run, 2)
    lr, warmup, old_steps, new_steps, since = 1e-3, 1, 4, 8, 2
    at_since = 0.5 * (1 + math.cos(math.pi * (since - warmup) / (old_steps - warmup)))  # the 4-step cosine at 2
    assert main(["train", "--resume", "latest", "--out", str(run), "--steps", "8", "--extend-schedule"]) == 0
    printed = capsys.readouterr().out
    assert f"extended the run from 4 to 8 steps: the learning rate decays from {lr * at_since:.3g} at step 2" in printed
    logged = {r["step"]: r["lr"] for r in rows(run) if "loss" in r}
    assert sorted(logged) == list(range(1, 9))
    for step in range(since, new_steps + 1):  # a row's lr is the one its next step uses
        expected = lr * at_since * 0.5 * (1 + math.cos(math.pi * (step - since) / (new_steps - since)))
        assert logged[step] == pytest.approx(expected, rel=1e-9, abs=1e-15), step
    assert json.loads((run / "config.json").read_text())["steps"] == 8

    # resumed again from step 6 with no option: the same re-planned schedule, the same bits
    again = run.parent / "again"
    shutil.copytree(run, again)
    drop_checkpoints_after(again, 6)
    assert main(["train", "--resume", "latest", "--out", str(again)]) == 0
    ref, got = weights(run, 8), weights(again, 8)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r["lr"] for r in rows(again) if "loss" in r] == [logged[s] for s in range(1, 9)]


# --------------------------------------------------------------------------------------
# Settings this machine cannot run: one line before anything is written
# --------------------------------------------------------------------------------------


def test_fp16_on_a_cpu_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *RUN, "--precision", "fp16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "precision fp16 needs a CUDA device" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *RUN, "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err
    assert not out.exists()
