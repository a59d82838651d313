"""The training step and the run: exact gradient accumulation (float64), config validation,
the CLI, the tiny preset end to end, and bad data.

Multi-process equivalence and exact resume after SIGKILL live in tests/test_train_runs.py.
Everything here is small enough for a shared two-core CPU: a hand-built micro CLIP for the
step math, a few steps of the ``tiny`` preset for the end-to-end run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from clipforge.cli import main
from clipforge.cli.train import config_from_args
from clipforge.data.batches import MicroBatch
from clipforge.loss import SIGLIP_INIT_BIAS, SIGLIP_INIT_SCALE, clip_loss, siglip_loss
from clipforge.model import CLIP, CLIPConfig
from clipforge.model.config import TextConfig, VisionConfig
from clipforge.train import compute_gradients, lr_factor, train, train_step
from clipforge.train.config import TrainConfig
from clipforge.train.step import _Forward

VOCAB, CONTEXT, IMAGE = 64, 8, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared two-core machine, OpenMP threads waiting for each
    other make these tiny ops fifty times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# Gradient accumulation: K micro-batches give exactly the gradient of one batch
# --------------------------------------------------------------------------------------


def micro_clip(*, siglip: bool = False) -> CLIP:
    """A float64 CLIP small enough to run a dozen rows in milliseconds."""
    config = CLIPConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=IMAGE, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=2),
        init_logit_scale=SIGLIP_INIT_SCALE if siglip else 1 / 0.07,
        init_logit_bias=SIGLIP_INIT_BIAS if siglip else None,
    )
    torch.manual_seed(0)
    return CLIP(config).double()


def random_rows(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 3, 16, 16] and token rows [n, 8]: start, random ids, the end token (the
    largest id, where the text tower reads out) at a random position, zero padding."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    tokens = torch.zeros(n, CONTEXT, dtype=torch.long)
    for row in range(n):
        end = int(torch.randint(1, CONTEXT, (1,), generator=g))
        tokens[row, :end] = torch.randint(1, VOCAB - 1, (end,), generator=g)
        tokens[row, end] = VOCAB - 1
    return images, tokens


def split(images: torch.Tensor, tokens: torch.Tensor, sizes: list[int]) -> list[MicroBatch]:
    bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    return [MicroBatch(images[a:b], tokens[a:b], list(range(a, b))) for a, b in itertools.pairwise(bounds)]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def reference_grads(model: CLIP, images, tokens, loss: str, eps: float) -> tuple[float, dict[str, torch.Tensor]]:
    """The plain formula: one forward of every row, the untiled loss, one backward."""
    model.zero_grad(set_to_none=True)
    img, txt, scale = model(images, tokens)
    if loss == "siglip":
        value = siglip_loss(img, txt, scale, model.logit_scale.bias)
    else:
        value = clip_loss(img, txt, scale, label_smoothing=eps)
    value.backward()
    return float(value.detach()), grads(model)


LOSS_CASES = [("clip", 0.0), ("clip", 0.1), ("siglip", 0.0)]
SPLITS = [[6, 6], [5, 4, 3], [1, 11]]


@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "+".join(map(str, s)))
@pytest.mark.parametrize("loss,eps", LOSS_CASES, ids=["clip", "clip-smooth", "siglip"])
@pytest.mark.parametrize("chunk", ["auto", 5], ids=["chunk-auto", "chunk-5"])
def test_accumulation_gives_the_gradient_of_one_batch(loss, eps, sizes, chunk):
    model = micro_clip(siglip=loss == "siglip")
    images, tokens = random_rows(sum(sizes))
    ref_loss, ref = reference_grads(model, images, tokens, loss, eps)
    assert ref["logit_scale.log_scale"].abs() > 1e-6  # the temperature's gradient is checked, not vacuous
    if loss == "siglip":
        assert "logit_scale.bias" in ref

    forward = _Forward(model)
    for micro in (split(images, tokens, [sum(sizes)]), split(images, tokens, sizes)):
        model.zero_grad(set_to_none=True)
        stats = compute_gradients(forward, micro, loss=loss, label_smoothing=eps, chunk_size=chunk)
        assert stats["loss"] == pytest.approx(ref_loss, rel=1e-12)
        got = grads(model)
        assert set(got) == set(ref)
        for name, g in ref.items():
            torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-13, msg=f"{name}, {len(micro)} micro-batches")


def test_accumulation_with_batchnorm_normalises_per_micro_batch_and_updates_statistics_once():
    """A BatchNorm tower (the ResNet) normalises each micro-batch by its own statistics, as
    each rank does under DDP; the engine gives exactly the gradient of that model — the
    micro-batches' features encoded with a graph, the loss over all of them — and updates
    the running statistics once per micro-batch, not twice (the feature pass is undone)."""
    config = CLIPConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=32, patch_size=None, width=8, layers=(1, 1, 1, 1), heads=2),
        text=TextConfig(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=2),
    )
    torch.manual_seed(0)
    reference, model = CLIP(config).double(), CLIP(config).double()
    model.load_state_dict(reference.state_dict())
    sizes = [4, 4, 4]
    g = torch.Generator().manual_seed(3)
    _, tokens = random_rows(sum(sizes))
    images = torch.randn(sum(sizes), 3, 32, 32, generator=g, dtype=torch.float64)
    micro = split(images, tokens, sizes)

    parts = [reference(mb.images, mb.tokens) for mb in micro]
    clip_loss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2]).backward()
    compute_gradients(_Forward(model), micro)
    for name, g_ref in grads(reference).items():
        torch.testing.assert_close(grads(model)[name], g_ref, rtol=1e-10, atol=1e-13, msg=name)
    for name, b_ref in reference.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], b_ref, rtol=1e-12, atol=0, msg=name)
    assert int(model.visual.bn1.num_batches_tracked) == 3


def test_replaying_the_loss_per_micro_batch_counts_the_temperature_k_times():
    """The pitfall the engine avoids: with cached features, back-propagating the whole
    batch's loss once per micro-batch gives each tower the right gradient (each pass reaches
    only its own rows) but adds the temperature's gradient K times; and the mean of the
    micro-batches' own losses is a different loss altogether (fewer negatives per row)."""
    sizes = [5, 4, 3]
    model = micro_clip()
    images, tokens = random_rows(sum(sizes))
    _, ref = reference_grads(model, images, tokens, "clip", 0.0)
    micro = split(images, tokens, sizes)

    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        cached = [model(mb.images, mb.tokens) for mb in micro]
    for k, mb in enumerate(micro):
        img, txt, scale = model(mb.images, mb.tokens)
        imgs = [img if j == k else c[0] for j, c in enumerate(cached)]
        txts = [txt if j == k else c[1] for j, c in enumerate(cached)]
        clip_loss(torch.cat(imgs), torch.cat(txts), scale).backward()
    replay = grads(model)
    for name, g in ref.items():
        if name == "logit_scale.log_scale":
            torch.testing.assert_close(replay[name], len(sizes) * g, rtol=1e-10, atol=0)
        else:
            torch.testing.assert_close(replay[name], g, rtol=1e-10, atol=1e-13, msg=name)

    model.zero_grad(set_to_none=True)
    for mb in micro:
        img, txt, scale = model(mb.images, mb.tokens)
        (clip_loss(img, txt, scale) * len(mb) / sum(sizes)).backward()
    naive = grads(model)["logit_scale.log_scale"]
    assert not torch.allclose(naive, ref["logit_scale.log_scale"], rtol=1e-3)


def test_train_step_with_accumulation_takes_the_same_step():
    """One AdamW step (clipping and temperature clamp included) from K=3 micro-batches
    lands on the same parameters as from one batch."""
    config = TrainConfig(batch_size=12, accum_steps=3, lr=1e-2, grad_clip=0.5, progress=False)
    images, tokens = random_rows(12)
    after = []
    for sizes in ([12], [4, 4, 4]):
        model = micro_clip()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, eps=config.adam_eps)
        stats = train_step(_Forward(model), split(images, tokens, sizes), optimizer, config=config)
        assert stats["skipped"] == 0.0 and stats["grad_norm"] > config.grad_clip  # clipping was active
        after.append(dict(model.named_parameters()))
    for name, p in after[0].items():
        torch.testing.assert_close(after[1][name], p, rtol=1e-10, atol=1e-12, msg=name)


def test_non_finite_loss_skips_the_update():
    model = micro_clip()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, tokens = random_rows(4)
    images[0] = float("nan")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = TrainConfig(batch_size=4, progress=False)
    with pytest.raises(ValueError, match="non-finite"):  # the loss refuses NaN features outright
        train_step(_Forward(model), split(images, tokens, [4]), optimizer, config=config)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------


def test_lr_factor_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    config = TrainConfig(steps=110, warmup=10, min_lr_ratio=0.1, progress=False)
    assert [lr_factor(s, config) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(π/2) = 0
    assert lr_factor(110, config) == pytest.approx(0.1)
    assert lr_factor(500, config) == pytest.approx(0.1)  # past the end: stays at the floor


def test_train_step_clamps_the_stored_temperature():
    """After each update the stored log-scale is clamped back to log 100 (CLIP §2.5), so its
    gradient never vanishes above the cap."""
    model = micro_clip()
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(5.5)  # s = 245, above the cap of 100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = train_step(_Forward(model), split(*random_rows(4), [4]), optimizer, config=TrainConfig(batch_size=4))
    assert stats["logit_scale"] == pytest.approx(100.0)  # the forward used the clamped value
    assert float(model.logit_scale.log_scale.detach()) == pytest.approx(math.log(100.0), abs=1e-12)


# --------------------------------------------------------------------------------------
# Configuration: TOML, command line, validation
# --------------------------------------------------------------------------------------


def parse(*argv: str):
    from clipforge.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def test_unknown_toml_key_is_an_error_naming_it(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("steps = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]") as err:
        config_from_args(parse("--config", str(path)))
    assert str(path) in str(err.value)
    # through the command: one line on stderr and exit status 2, not a traceback
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert "learning_rate" in message and message.count("\n") == 1


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": "5e-4"}, "lr"),  # a quoted number in a TOML file
        ({"precision": "fp8"}, "precision"),
        ({"batch_size": 10, "accum_steps": 3}, "accum_steps"),
        ({"steps": 0}, "steps"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"image_noise": -0.1}, "image_noise"),
        ({"loss": "triplet"}, "loss"),
        ({"eval_zeroshot": "shapes://"}, "eval_zeroshot"),
        ({"lock_image": True, "lock_text": True}, "lock_text"),
    ],
)
def test_invalid_values_are_errors_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"train config: {field} "):
        TrainConfig(**changes)


def test_command_line_overrides_beat_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 7\nlr = 0.01\nbatch_size = 256\naccum_steps = 3\naugment = true\n'
                    'eval_zeroshot = ["digits://?split=test"]\n')
    # the file alone is invalid (3 does not divide 256); the command line completes it
    config = config_from_args(parse("--config", str(path), "--steps", "3", "--batch-size", "12", "--no-augment",
                                    "--eval-zeroshot", "shapes://?split=heldout"))
    assert (config.steps, config.batch_size, config.accum_steps, config.lr) == (3, 12, 3, 0.01)
    assert config.augment is False and config.eval_zeroshot == ["shapes://?split=heldout"]
    assert config_from_args(parse("--config", str(path), "--batch-size", "12")).steps == 7  # the file's
    assert config_from_args(parse("--steps", "5")) == TrainConfig(steps=5)  # no file: the defaults
    with pytest.raises(ValueError, match="accum_steps must divide batch_size=256"):
        config_from_args(parse("--config", str(path)))


def test_help_lists_every_field_with_its_comment(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert "peak learning rate" in text and "AdamW β2 (CLIP §2.5 uses 0.98)" in text
    assert "--config" in text


# --------------------------------------------------------------------------------------
# The tiny preset end to end, through the command
# --------------------------------------------------------------------------------------


def test_tiny_preset_trains_end_to_end_through_main(tmp_path, capsys):
    import clipforge

    out = tmp_path / "run"
    heldout, val = "shapes://?split=heldout&n=16&size=32", "shapes://?split=val&n=12&size=32"
    code = main(["train", "--model", "tiny", "--data", "shapes://?n=64&size=32", "--steps", "3",
                 "--batch-size", "8", "--warmup", "1", "--vocab-size", "600", "--log-every", "2",
                 "--out", str(out), "--no-progress", "--eval-zeroshot", heldout, "--eval-retrieval", val,
                 "--eval-samples", "16"])
    assert code == 0
    printed = capsys.readouterr().out
    assert '"step": 3' in printed and heldout in printed

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 3]  # every log_every steps, and the last
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 for r in train_rows)
    assert [r["step"] for r in rows if "eval" in r] == [3]

    final = json.loads((out / "metrics.json").read_text())
    assert final["step"] == 3 and final["bad_samples"] == 0 and final["samples_read"] == 24
    zs, rt = final["eval"][heldout], final["eval"][val]
    assert 0 <= zs["acc1"] <= zs["acc5"] <= 1 and len(zs["confusion_matrix"]) == 64
    assert 0 <= rt["text_to_image_R@1"] <= rt["text_to_image_R@5"] <= 1 and "image_to_text_median_rank" in rt

    assert TrainConfig.from_dict(json.loads((out / "config.json").read_text())).steps == 3
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-0000003"]
    model, _, tokenizer = clipforge.load(out / "checkpoints" / "step-0000003")
    assert tokenizer is not None and tokenizer.vocab_size == model.config.text.vocab_size <= 600
    ids = tokenizer(["a small red star in the top left"])
    assert tokenizer.decode(ids[0, 1 : int(ids[0].argmax())].tolist()).strip() == "a small red star in the top left"
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoints" / "step-0000003" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------


@pytest.fixture
def dirty_csv(tmp_path) -> Path:
    """Five good PNGs, a file that is no image, a truncated PNG, a missing file and an empty
    caption, listed in a CSV."""
    from clipforge.data.shapes import ShapesDataset

    shapes = ShapesDataset(size=32, n=5)
    rows = []
    for k in range(5):
        image, caption = shapes[k]
        image.save(tmp_path / f"good{k}.png")
        rows.append((f"good{k}.png", caption))
    (tmp_path / "garbage.png").write_bytes(b"this is not an image" * 10)
    whole = (tmp_path / "good0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    rows += [("garbage.png", "a red circle"), ("truncated.png", "a blue square"), ("missing.png", "a green star"),
             ("good1.png", "")]
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title\n" + "".join(f'{f},"{c}"\n' for f, c in rows))
    return path


def test_bad_samples_are_skipped_and_counted(dirty_csv, tmp_path):
    from clipforge.data import open_data

    source = open_data(f"csv:{dirty_csv}")
    assert len(source) == 8 and source.empty_captions == 1  # the empty caption never reaches training
    # a batch is the whole set (one epoch per step): 3 bad per step; 80 read, above check_bad's floor of 64
    final = train(TrainConfig(model="tiny", data=f"csv:{dirty_csv}", out=str(tmp_path / "run"), steps=10,
                              batch_size=8, warmup=1, vocab_size=600, max_bad_fraction=0.5, progress=False))
    assert (final["samples_read"], final["bad_samples"], final["skipped_steps"]) == (80, 30, 0)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bad_samples"] == 30
    reasons = {int(re.match(r"#(\d+): ", b).group(1)): b for b in final["bad_examples"]}  # "#index: reason"
    assert set(reasons) == {5, 6, 7}  # the rows of the garbage, truncated and missing files
    assert "UnidentifiedImageError" in reasons[5] and "truncated" in reasons[6] and "FileNotFoundError" in reasons[7]


def test_too_much_bad_data_stops_the_run_naming_examples(dirty_csv, tmp_path, capsys):
    # 3 of 8 bad is 37.5 %, above 10 %: the run stops once 64 samples were read (step 8 of 20)
    code = main(["train", "--model", "tiny", "--data", f"csv:{dirty_csv}", "--out", str(tmp_path / "run"),
                 "--steps", "20", "--batch-size", "8", "--vocab-size", "600", "--max-bad-fraction", "0.1",
                 "--no-progress"])
    assert code == 2
    message = capsys.readouterr().err
    assert re.search(r"24 of 64 samples of csv:.*pairs\.csv are unreadable \(more than 10%\); e\.g\. #\d+: ", message)
