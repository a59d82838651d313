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
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from _micro_clip import CONTEXT, VOCAB, micro_clip, random_rows
from clipforge.cli import main
from clipforge.cli.train import config_from_args
from clipforge.data import DataError
from clipforge.data.batches import MicroBatch
from clipforge.loss import SIGLIP_INIT_BIAS, SIGLIP_INIT_SCALE, clip_loss, siglip_loss
from clipforge.model import CLIP, CLIPConfig, get_config
from clipforge.model.config import TextConfig, VisionConfig
from clipforge.train import build_optimizer, compute_gradients, lr_factor, train, train_step
from clipforge.train.config import TrainConfig

# --------------------------------------------------------------------------------------
# Gradient accumulation: K micro-batches give exactly the gradient of one batch
# --------------------------------------------------------------------------------------


def split(images: torch.Tensor, tokens: torch.Tensor, sizes: list[int], groups: torch.Tensor | None = None
          ) -> list[MicroBatch]:
    bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    return [MicroBatch(images[a:b], tokens[a:b], list(range(a, b)), groups=None if groups is None else groups[a:b])
            for a, b in itertools.pairwise(bounds)]


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

    for micro in (split(images, tokens, [sum(sizes)]), split(images, tokens, sizes)):
        model.zero_grad(set_to_none=True)
        stats = compute_gradients(model, micro, loss=loss, label_smoothing=eps, chunk_size=chunk)
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
    compute_gradients(model, micro)
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


def multi_positive_loss(img, txt, scale, bias, groups: list[int], kind: str) -> torch.Tensor:
    """The loss of a batch whose rows may show the same image, written out pair by pair: CLIP's
    target for image i (and for caption i) is uniform over the rows showing i's image; SigLIP's
    positives are the pairs showing one image, every other pair a negative."""
    n = len(groups)
    logits = scale * img @ txt.T  # (n, n): image i against caption j
    total = img.new_zeros(())
    for i in range(n):
        same = [j for j in range(n) if groups[j] == groups[i]]
        if kind == "siglip":
            for j in range(n):
                sign = 1.0 if j in same else -1.0
                total = total - torch.nn.functional.logsigmoid(sign * (logits[i, j] + bias))
        else:
            by_image, by_caption = logits[i].log_softmax(0), logits[:, i].log_softmax(0)
            total = total - sum(by_image[j] + by_caption[j] for j in same) / (2 * len(same))
    return total / n


@pytest.mark.parametrize("sizes", [[7], [3, 4]], ids=["one-batch", "accum-2"])
@pytest.mark.parametrize("chunk", [None, "auto", 3], ids=["plain", "chunk-auto", "chunk-3"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_rows_showing_one_image_are_positives(loss, chunk, sizes):
    """A batch that holds image 0 three times and image 1 twice (a caption file with several
    captions per image): the micro-batches' groups make those rows positives of each other.

    The rows' pixels differ, as random crops or noise of one image do: with identical pixels
    CLIP's softmax loss is the same with or without groups (identical rows make the uniform
    and the diagonal target sum to the same loss), while SigLIP's is not."""
    model = micro_clip(siglip=loss == "siglip")
    images, tokens = random_rows(7)
    groups = [0, 1, 0, 2, 1, 0, 3]
    model.zero_grad(set_to_none=True)
    img, txt, scale = model(images, tokens)
    ref = multi_positive_loss(img, txt, scale, model.logit_scale.bias, groups, loss)
    ref.backward()
    ref_grads = grads(model)

    model.zero_grad(set_to_none=True)
    micro = split(images, tokens, sizes, torch.tensor(groups))
    stats = compute_gradients(model, micro, loss=loss, chunk_size=chunk)
    assert stats["loss"] == pytest.approx(float(ref.detach()), rel=1e-12)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-10, atol=1e-13, msg=name)
    # without groups the repeated images are negatives of each other: another loss
    model.zero_grad(set_to_none=True)
    plain = compute_gradients(model, split(images, tokens, sizes), loss=loss, chunk_size=chunk)
    assert abs(plain["loss"] - float(ref.detach())) > 1e-3


def test_train_step_with_accumulation_takes_the_same_step():
    """One AdamW step (clipping and temperature clamp included) from K=3 micro-batches
    lands on the same parameters as from one batch."""
    config = TrainConfig(batch_size=12, accum_steps=3, lr=1e-2, grad_clip=0.5, progress=False)
    images, tokens = random_rows(12)
    after = []
    for sizes in ([12], [4, 4, 4]):
        model = micro_clip()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, eps=config.adam_eps)
        stats = train_step(model, split(images, tokens, sizes), optimizer, config=config)
        assert stats["skipped"] == 0.0 and stats["grad_norm"] > config.grad_clip  # clipping was active
        after.append(dict(model.named_parameters()))
    for name, p in after[0].items():
        torch.testing.assert_close(after[1][name], p, rtol=1e-10, atol=1e-12, msg=name)


def test_nan_features_are_an_error_not_a_step():
    model = micro_clip()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, tokens = random_rows(4)
    images[0] = float("nan")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = TrainConfig(batch_size=4, progress=False)
    with pytest.raises(ValueError, match="non-finite"):  # the loss refuses NaN features outright
        train_step(model, split(images, tokens, [4]), optimizer, config=config)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in optimizer.state.items()}
    return params, state


def assert_unchanged(model: nn.Module, optimizer: torch.optim.Optimizer, before: tuple[dict, dict]) -> None:
    params, state = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert {id(p) for p in optimizer.state} == set(state)
    for p, st in optimizer.state.items():
        for k, v in st.items():
            assert torch.equal(v, state[id(p)][k]), k  # "step" and both moments: the optimiser did not advance


@pytest.mark.parametrize("sizes", [[6], [3, 3]], ids=["one-batch", "accum-2"])
def test_non_finite_loss_skips_the_update(sizes):
    """A SigLIP bias of 1e308 is finite, so the loss accepts it, but the N² − N negatives' terms
    (≈ 1e308 each) sum to inf: the step is skipped, nothing moves."""
    model = micro_clip(siglip=True)
    config = TrainConfig(batch_size=6, accum_steps=len(sizes), loss="siglip", lr=1e-2, progress=False)
    optimizer = build_optimizer(model, config)
    batch = split(*random_rows(6), sizes)
    assert train_step(model, batch, optimizer, config=config)["skipped"] == 0.0  # an ordinary step first
    with torch.no_grad():
        model.logit_scale.bias.fill_(1e308)
    before = snapshot(model, optimizer)
    stats = train_step(model, batch, optimizer, config=config)
    assert stats["skipped"] == 1.0 and not math.isfinite(stats["loss"])
    assert_unchanged(model, optimizer, before)
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_gradient_skips_the_update():
    """A finite loss whose gradient overflows in one tensor (here made to by a hook on the text
    projection's gradient): clipping sees a non-finite norm and the update is skipped."""
    model = micro_clip()
    config = TrainConfig(batch_size=6, lr=1e-2, progress=False)
    optimizer = build_optimizer(model, config)
    batch = split(*random_rows(6), [6])
    assert train_step(model, batch, optimizer, config=config)["skipped"] == 0.0
    model.text.text_projection.register_hook(lambda g: g * math.inf)
    before = snapshot(model, optimizer)
    stats = train_step(model, batch, optimizer, config=config)
    assert stats["skipped"] == 1.0 and math.isfinite(stats["loss"]) and not math.isfinite(stats["grad_norm"])
    assert_unchanged(model, optimizer, before)


# --------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,loss,lock", [("tiny", "clip", False), ("tiny-vit", "siglip", False),
                                              ("tiny-vit", "clip", True)])
def test_weight_decay_falls_on_the_weight_matrices_only(preset, loss, lock):
    """Decay on what multiplies activations (linear, convolution and attention weights, the
    towers' projections); none on norms' gains, biases, embeddings, the logit scale and bias;
    a frozen tower in no group."""
    config = TrainConfig(model=preset, loss=loss, weight_decay=0.1, lock_image=lock)
    model = CLIP(get_config(preset))
    if loss == "siglip":
        model = CLIP(dataclasses.replace(get_config(preset), init_logit_bias=SIGLIP_INIT_BIAS))
    if lock:
        model.visual.requires_grad_(False)
    optimizer = build_optimizer(model, config)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert set(groups) == {0.1, 0.0}

    multiplies = set()
    for prefix, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if (isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight") or name in (
                    "in_proj_weight", "proj", "text_projection"):
                multiplies.add(f"{prefix}.{name}" if prefix else name)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert groups[0.1] == multiplies & trainable
    assert groups[0.0] == trainable - multiplies
    assert {"logit_scale.log_scale", "text.token_embedding.weight", "text.positional_embedding"} <= groups[0.0]
    assert ("logit_scale.bias" in groups[0.0]) == (loss == "siglip")
    assert any(name.startswith("visual.") for name in groups[0.1] | groups[0.0]) != lock


def test_lr_factor_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    config = TrainConfig(steps=110, warmup=10, min_lr_ratio=0.1, progress=False)
    assert [lr_factor(s, config) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(π/2) = 0
    assert lr_factor(110, config) == pytest.approx(0.1)
    assert lr_factor(500, config) == pytest.approx(0.1)  # past the end: stays at the floor


def test_a_replanned_schedule_decays_from_where_it_stood_to_the_floor_at_the_new_end():
    """A 110-step run extended at step 60 to 210 steps: from step 60 the factor falls by cosine
    from its value there (0.55) to the floor at step 210 (the steps before 60 were run already)."""
    old, new = TrainConfig(steps=110, warmup=10, min_lr_ratio=0.1), TrainConfig(steps=210, warmup=10, min_lr_ratio=0.1)
    since = (60, lr_factor(60, old))
    assert since[1] == pytest.approx(0.55)
    assert lr_factor(60, new, replanned=since) == pytest.approx(0.55)
    assert lr_factor(135, new, replanned=since) == pytest.approx(0.1 + 0.45 * 0.5)  # half way down
    assert lr_factor(210, new, replanned=since) == pytest.approx(0.1)
    assert lr_factor(300, new, replanned=since) == pytest.approx(0.1)


def test_train_step_clamps_the_stored_temperature():
    """After each update the stored log-scale is clamped back to log 100 (CLIP §2.5), so its
    gradient never vanishes above the cap."""
    model = micro_clip()
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(5.5)  # s = 245, above the cap of 100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = train_step(model, split(*random_rows(4), [4]), optimizer, config=TrainConfig(batch_size=4))
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
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": "big"}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
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


def test_chunk_size_takes_the_loss_functions_meaning(tmp_path):
    """None (written "none" in TOML and on the command line, which have no null) is the plain
    formula, "auto" picks the tile (the default), an integer is the tile's edge."""
    assert TrainConfig().chunk_size == "auto"
    assert TrainConfig(chunk_size=None).chunk_size is None and TrainConfig(chunk_size="none").chunk_size is None
    assert config_from_args(parse("--chunk-size", "none")).chunk_size is None
    assert config_from_args(parse("--chunk-size", "auto")).chunk_size == "auto"
    assert config_from_args(parse("--chunk-size", "64")).chunk_size == 64
    path = tmp_path / "run.toml"
    path.write_text('chunk_size = "none"\n')
    config = config_from_args(parse("--config", str(path)))
    assert config.chunk_size is None and TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # every meaning trains the same step (float64: the tiled and plain losses agree to rounding)
    images, tokens = random_rows(6)
    after = []
    for chunk in (None, "auto", 4):
        model = micro_clip()
        config = TrainConfig(batch_size=6, lr=1e-2, chunk_size=chunk, progress=False)
        train_step(model, split(images, tokens, [6]), torch.optim.AdamW(model.parameters(), lr=1e-2), config=config)
        after.append(dict(model.named_parameters()))
    for other in after[1:]:
        for name, p in after[0].items():
            torch.testing.assert_close(other[name], p, rtol=1e-10, atol=1e-12, msg=name)


def test_help_lists_every_field_with_its_documentation(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert f.metadata["help"] and " ".join(f.metadata["help"].split()) in text, f.name
    assert "peak learning rate" in text and "AdamW β2 (CLIP's ViTs used 0.98, its ResNets 0.999)" in text
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


def test_without_a_terminal_progress_is_a_plain_line_per_log_row(tmp_path, capsys):
    """capsys is not a terminal, as a log file or CI is not: no bar and its carriage returns, but
    one line per metrics.jsonl row, with the row's numbers."""
    short_run(tmp_path / "run", progress=True, log_every=2)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows) == 3
    for line, row in zip(lines, rows):
        numbers = f"step {row['step']}/6  loss {row['loss']:.4f}  lr {row['lr']:.2e}  T {1 / row['logit_scale']:.4f}"
        assert re.fullmatch(re.escape(numbers) + r"  samples/s \d+  ETA \d+s", line), line
    short_run(tmp_path / "quiet", progress=False)
    assert "step " not in capsys.readouterr().err


def test_signal_handlers_are_the_runs_only_while_it_runs_and_only_in_the_main_thread(tmp_path):
    """The stop handlers (tests/test_signals.py sends the signals) are restored when train returns;
    a run in another thread, where Python sets no handlers, leaves them alone and trains."""
    import signal
    import threading

    from clipforge.data.batches import STOP_SIGNALS

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    short_run(tmp_path / "main")
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    logged = []
    thread = threading.Thread(target=lambda: logged.append(short_run(tmp_path / "thread")))
    thread.start()
    thread.join()
    assert len(logged) == 1 and len(logged[0]) == 6  # the run's six rows: it raised nothing
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_a_batch_larger_than_the_data_is_a_one_line_warning(tmp_path, capsys):
    """12 pairs in batches of 36: every batch holds each pair 3 times, its copies negatives of each
    other; the run goes on (the batch is not changed), after saying so once."""
    config = TrainConfig(model="tiny", data="shapes://?n=12&size=32", out=str(tmp_path / "run"), steps=2,
                         batch_size=36, warmup=1, vocab_size=600, progress=False)
    with pytest.warns(UserWarning) as caught:
        final = train(config)
    assert [str(w.message) for w in caught] == [
        "batch_size 36 is larger than the 12 samples of shapes://?n=12&size=32: each batch holds every sample about "
        "3 times, and its copies are negatives of each other; a batch_size of at most 12 avoids it"]
    assert final["samples_read"] == 72
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none when the batch fits
        train(config.replace(out=str(tmp_path / "fits"), batch_size=12))
    # through the command: one line
    args = ["train", "--model", "tiny", "--data", "shapes://?n=12&size=32", "--steps", "1", "--batch-size", "36",
            "--vocab-size", "600", "--no-progress", "--out", str(tmp_path / "cli")]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("clipforge train: warning: batch_size 36 is larger than")


def test_emulated_bf16_is_one_warning_line_and_fp16_on_a_cpu_one_error_line(tmp_path, capsys, monkeypatch):
    from clipforge import devices

    monkeypatch.setattr(devices, "native_cpu_bf16", lambda: False)  # as on an AVX2-only CPU
    args = ["train", "--model", "tiny", "--data", "shapes://?n=8&size=32", "--steps", "1", "--batch-size", "8",
            "--vocab-size", "600", "--device", "cpu", "--no-progress"]
    assert main([*args, "--precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "bf16" in line]
    assert len(lines) == 1 and lines[0].startswith("clipforge train: warning: precision bf16 on this CPU")
    assert main([*args, "--precision", "fp16", "--out", str(tmp_path / "fp16")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fp16 needs a CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "fp16").exists()


def test_train_help_reads_as_plain_text_and_lists_the_training_sources(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.startswith("Train a CLIP model.") and "``" not in text
    data_help = " ".join(text.split("\n  --data DATA")[1].split("\n  --out")[0].split())
    for uri in ("shapes://", "digits://", "csv:FILE", "jsonl:FILE", "pairs:DIR", "shards:"):
        assert uri in data_help


def short_run(out: Path, **changes) -> list[dict]:
    """6 steps of the tiny preset on 8 shapes, the whole set every step, so the loss falls fast;
    the training rows of metrics.jsonl."""
    config = dict(model="tiny", data="shapes://?n=8&size=32", out=str(out), steps=6, batch_size=8, warmup=1, lr=1e-3,
                  vocab_size=600, log_every=1, progress=False)
    train(TrainConfig(**{**config, **changes}))
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


@pytest.mark.filterwarnings("ignore:precision bf16 on this CPU")  # the warning on CPUs without native bf16
def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    """bf16 autocast on the CPU: the loss falls as in fp32.  The first step starts from the same
    weights, so its losses differ by bf16's rounding alone: measured 1.6e-3.  Without autocast
    they would be bit-identical (the run is deterministic), so the lower bound shows it ran."""
    fp32, bf16 = short_run(tmp_path / "fp32"), short_run(tmp_path / "bf16", precision="bf16")
    for rows in (fp32, bf16):
        assert [r["step"] for r in rows] == list(range(1, 7)) and not any(r["skipped"] for r in rows)
        assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < 0.1 * rows[0]["loss"]
    assert 1e-5 < abs(bf16[0]["loss"] - fp32[0]["loss"]) < 1e-2


def test_siglip_trains_its_scale_and_bias(tmp_path):
    """SigLIP starts at scale 10 and bias −10 (SigLIP §3.2); both are learned and saved."""
    import clipforge

    rows = short_run(tmp_path / "run", loss="siglip")
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert (rows[0]["logit_scale"], rows[0]["logit_bias"]) == pytest.approx((SIGLIP_INIT_SCALE, SIGLIP_INIT_BIAS))
    assert rows[-1]["logit_bias"] != pytest.approx(SIGLIP_INIT_BIAS, abs=1e-3)
    assert rows[-1]["logit_scale"] != pytest.approx(SIGLIP_INIT_SCALE, abs=1e-3)
    model, _, _ = clipforge.load(tmp_path / "run" / "checkpoints" / "step-0000006")
    assert model.logit_scale.bias is not None  # saved: one more update after the last logged forward
    assert 0 < abs(model.logit_scale.bias.item() - rows[-1]["logit_bias"]) < 1e-3


def test_periodic_evaluation_is_logged_and_leaves_training_as_it_was(tmp_path):
    """Evaluating every 2 steps logs at steps 2, 4 and 6 and changes nothing in the run: the same
    losses and bit-identical weights as a run that evaluates only at the end, whose final
    evaluation it repeats exactly."""
    heldout = "shapes://?split=heldout&n=16&size=32"
    evaluation = dict(eval_zeroshot=[heldout], eval_samples=16)
    periodic = short_run(tmp_path / "periodic", eval_every=2, **evaluation)
    at_end = short_run(tmp_path / "end", **evaluation)
    assert [(r["loss"], r["grad_norm"]) for r in periodic] == [(r["loss"], r["grad_norm"]) for r in at_end]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "checkpoints/step-0000006/model.safetensors") for run in ("periodic", "end"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def evaluations(run: str) -> dict[int, dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {row["step"]: row["eval"][heldout] for row in map(json.loads, lines) if "eval" in row}

    logged = evaluations("periodic")
    assert sorted(logged) == [2, 4, 6] and sorted(evaluations("end")) == [6]
    assert logged[6] == evaluations("end")[6]
    for metrics in logged.values():
        assert 0 <= metrics["acc1"] <= metrics["acc5"] <= 1 and len(metrics["confusion_matrix"]) == 64


def test_a_caption_files_repeated_images_are_positives_in_training(tmp_path):
    """Four images with two captions each: the first logged loss is the loss of the initial
    model on step 0's batch with each image's rows as positives of each other (SigLIP, where
    that changes the loss even for identical pixels), not the loss that treats them as
    negatives."""
    from clipforge.data import open_data
    from clipforge.data.batches import BatchPlan
    from clipforge.data.shapes import ShapesDataset
    from clipforge.train import build_model

    shapes = ShapesDataset(size=32, n=4)
    lines = []
    for k in range(4):
        image, caption = shapes[k]
        image.save(tmp_path / f"{k}.png")
        lines += [f"{k}.png,{caption}\n", f"{k}.png,a picture: {caption}\n"]
    (tmp_path / "captions.csv").write_text("filepath,title\n" + "".join(lines))
    config = TrainConfig(model="tiny-vit", data=f"csv:{tmp_path / 'captions.csv'}", out=str(tmp_path / "run"), steps=1,
                         batch_size=8, warmup=1, vocab_size=600, loss="siglip", progress=False)
    train(config)
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    source = open_data(config.data)
    torch.manual_seed(config.seed)
    model, preprocess, tokenizer = build_model(config, source)  # as the run built it
    batch = BatchPlan(len(source), batch_size=8, seed=config.seed).global_indices(0)
    images = torch.stack([preprocess(source[i][0]) for i in batch])
    with torch.no_grad():
        img, txt, scale = model(images, tokenizer([source.captions[i] for i in batch]))
    groups = [source.text_to_image[i] for i in batch]
    assert len(set(groups)) < len(groups)  # the batch holds repeated images
    bias = model.logit_scale.bias.detach()
    positives = multi_positive_loss(img, txt, scale, bias, groups, "siglip")
    negatives = multi_positive_loss(img, txt, scale, bias, list(range(8)), "siglip")
    assert row["loss"] == pytest.approx(float(positives), rel=1e-5)
    assert abs(float(negatives) - float(positives)) > 0.1


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


# --------------------------------------------------------------------------------------
# Evaluation during training: the library's path, on any evaluation source
# --------------------------------------------------------------------------------------


def _eval_sources(root: Path) -> tuple[str, str]:
    """A folder of 3 colour classes × 4 images, and a CSV of 10 shapes images with one or two
    captions each, the fourth image's file broken."""
    import numpy as np
    from PIL import Image

    from clipforge.data.shapes import ShapesDataset

    for c, (name, rgb) in enumerate({"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items()):
        for k in range(4):
            noise = np.random.default_rng(10 * c + k).integers(-40, 40, (20, 20, 3))
            (root / "folder" / name).mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "folder" / name / f"{k}.png")
    shapes = ShapesDataset(split="val", n=10, size=32)
    rows = []
    for k in range(10):
        image, caption = shapes[k]
        image.save(root / f"{k}.png")
        rows.append(f"{k}.png\t{caption}")
        if k % 3 == 0:
            rows.append(f"{k}.png\tanother caption of picture {k}")
    (root / "3.png").write_bytes(b"not an image")
    (root / "captions.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    return f"imagefolder:{root / 'folder'}", f"csv:{root / 'captions.tsv'}"


@pytest.mark.parametrize("sources", ["files", "shapes"])
def test_evaluation_in_training_equals_the_library_on_the_saved_checkpoint(tmp_path, capsys, sources):
    import clipforge
    from clipforge.data import open_data
    from clipforge.evaluate import evaluate_retrieval, evaluate_zeroshot

    if sources == "files":  # the change of behaviour: any source `clipforge eval` takes
        zeroshot, retrieval = _eval_sources(tmp_path)
        extra = []
    else:  # training with augmentation: evaluation still resizes and centre-crops
        zeroshot, retrieval = "shapes://?split=heldout&n=20&size=32", "shapes://?split=val&n=20&size=32"
        extra = ["--augment"]
    out = tmp_path / "run"
    code = main(["train", "--model", "tiny", "--data", "shapes://?n=64&size=32", "--steps", "3", "--batch-size", "8",
                 "--warmup", "1", "--vocab-size", "600", "--out", str(out), "--no-progress", "--eval-every", "2",
                 "--eval-zeroshot", zeroshot, "--eval-retrieval", retrieval, "--eval-samples", "8", *extra])
    assert code == 0, capsys.readouterr().err
    final = json.loads((out / "metrics.json").read_text())["eval"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval" in r] == [2, 3]

    model, preprocess, tokenizer = clipforge.load(out / "checkpoints" / "step-0000003")
    zs = evaluate_zeroshot(model, preprocess, tokenizer, open_data(zeroshot), limit=8, ks=(1, 5))
    assert final[zeroshot] == {k: zs.metrics[k] for k in ("acc1", "acc5", "mean_per_class_recall", "confusion_matrix")}
    assert sum(map(sum, zs.metrics["confusion_matrix"])) == 8
    rt = evaluate_retrieval(model, preprocess, tokenizer, open_data(retrieval), limit=8, ks=(1, 5, 10))
    if sources == "files":  # the first 8 images and their 11 captions; the broken image goes with its 2
        assert (rt.images, rt.images_evaluated, rt.captions, rt.captions_evaluated) == (8, 7, 11, 9)
        assert final[retrieval] == {**rt.metrics, "skipped_images": 1}
    else:
        assert final[retrieval] == rt.metrics


@pytest.mark.parametrize("lock", ["lock_image", "lock_text"])
def test_a_locked_tower_stays_bit_identical_through_evaluation(tmp_path, lock):
    import clipforge
    from clipforge.data import open_data
    from clipforge.train.loop import build_model

    config = TrainConfig(model="tiny", data="shapes://?n=64&size=32", out=str(tmp_path / "run"), steps=3,
                         batch_size=8, warmup=1, vocab_size=600, eval_every=1, eval_samples=8, progress=False,
                         eval_zeroshot=["shapes://?split=heldout&n=8&size=32"],
                         eval_retrieval="shapes://?split=val&n=8&size=32", **{lock: True})
    initial = build_model(config, open_data(config.data))[0].state_dict()  # what train() starts from
    train(config)
    trained = clipforge.load(tmp_path / "run" / "checkpoints" / "step-0000003")[0].state_dict()
    tower = "visual." if lock == "lock_image" else "text."
    locked = [k for k in initial if k.startswith(tower)]
    assert len(locked) > 10 and trained.keys() == initial.keys()
    if lock == "lock_image":  # the ResNet's BatchNorm statistics are buffers, and the crux
        assert any(k.endswith("running_mean") for k in locked)
    moved = [k for k in locked if not torch.equal(trained[k], initial[k])]
    assert moved == [], f"{len(moved)} tensors of the locked tower moved, e.g. {moved[:3]}"
    others = [k for k in initial if not k.startswith(tower) and initial[k].is_floating_point()]
    assert any(not torch.equal(trained[k], initial[k]) for k in others)  # the other tower did train


def test_an_evaluation_set_that_cannot_serve_its_task_stops_the_run_before_the_first_step(tmp_path):
    """shapes://?split=val has no class labels: the run says so at the start, not at its first
    evaluation (which may come after the last step), and writes no checkpoint."""
    with pytest.raises(DataError, match="no class labels"):
        short_run(tmp_path / "run", eval_zeroshot=["shapes://?split=val&n=16&size=32"], eval_samples=8)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_set_evaluated_both_ways_keeps_both_tasks_metrics(tmp_path):
    """One URI in eval_zeroshot and eval_retrieval: its results hold the zero-shot metrics and the
    retrieval metrics, each equal to the run that evaluates it one way only."""
    seen = "shapes://?split=seen&n=16&size=32"
    short_run(tmp_path / "both", eval_zeroshot=[seen], eval_retrieval=seen, eval_samples=8)
    short_run(tmp_path / "zeroshot", eval_zeroshot=[seen], eval_samples=8)
    short_run(tmp_path / "retrieval", eval_retrieval=seen, eval_samples=8)
    final = {run: json.loads((tmp_path / run / "metrics.json").read_text())["eval"][seen]
             for run in ("both", "zeroshot", "retrieval")}
    assert final["both"] == {**final["zeroshot"], **final["retrieval"]}
    assert "acc1" in final["both"] and "text_to_image_R@1" in final["both"]


@pytest.mark.parametrize("scheme", ["folder", "imagefolder"])
def test_training_on_images_without_captions_is_refused_in_one_line(tmp_path, capsys, scheme):
    from PIL import Image

    for k in range(2):
        (tmp_path / "images" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / "images" / "a" / f"{k}.png")
    code = main(["train", "--model", "tiny", "--data", f"{scheme}:{tmp_path / 'images'}", "--steps", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "images without captions" in err and "Traceback" not in err
