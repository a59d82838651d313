"""CLIP-guided synthesis: the Fourier parameterisation (exact inversion), the cutouts (identity
and mirror cases), the spherical distance, seeded determinism to the byte, the init image and
its strength, frames, a prompt-specific result, and ``clipforge generate`` end to end with a judge."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _search_helpers import collection
from clipforge.checkpoints import load
from clipforge.cli import main
from clipforge.generate import (
    FourierImage,
    GenerateConfig,
    generate,
    init_pixels,
    make_cutouts,
    spherical_distance,
)
from clipforge.model import CLIP, CLIPConfig
from clipforge.model.config import TextConfig, VisionConfig
from clipforge.score import clip_score


def micro_clip(seed: int = 0) -> CLIP:
    """A random-weight CLIP small enough for dozens of steps in a second."""
    config = CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2),
        text=TextConfig(context_length=8, vocab_size=64, width=64, heads=2, layers=1),
    )
    torch.manual_seed(seed)
    return CLIP(config).eval()


def toy_tokenizer(texts: list[str]) -> torch.Tensor:
    """Token ids from the characters: start 1, characters 2..61, end 63 (the highest id ends the text)."""
    rows = []
    for text in texts:
        ids = [1] + [2 + ord(ch) % 60 for ch in text][:6] + [63]
        rows.append(ids + [0] * (8 - len(ids)))
    return torch.tensor(rows)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("size", [32, 33])
def test_fourier_image_starts_grey_and_inverts_exactly(size):
    image = FourierImage(size, generator=torch.Generator().manual_seed(0))
    start = image()
    assert start.shape == (1, 3, size, size) and (start - 0.5).abs().max() < 0.05
    target = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    image.set_pixels(target)
    assert torch.allclose(image()[0], target.clamp(1e-3, 1 - 1e-3), atol=1e-5)


def test_cutouts_of_the_whole_image_are_the_image_or_its_mirror():
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    same = make_cutouts(pixels, 3, 16, cut_scale=(1.0, 1.0))
    assert torch.allclose(same, pixels.expand(3, -1, -1, -1), atol=1e-5)
    flipped = make_cutouts(pixels, 16, 16, cut_scale=(1.0, 1.0), flip=True, generator=torch.Generator().manual_seed(0))
    mirrored = [bool(torch.allclose(cut, pixels[0].flip(-1), atol=1e-5)) for cut in flipped]
    kept = [bool(torch.allclose(cut, pixels[0], atol=1e-5)) for cut in flipped]
    assert all(m != k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)
    # A half-side crop at a random place is a resampled window, inside the image's range.
    cuts = make_cutouts(pixels, 8, 16, cut_scale=(0.5, 0.5), generator=torch.Generator().manual_seed(0))
    assert cuts.shape == (8, 3, 16, 16) and cuts.min() >= pixels.min() - 1e-6 and cuts.max() <= pixels.max() + 1e-6


def test_spherical_distance_is_half_the_squared_angle():
    x = torch.tensor([[1.0, 0.0]] * 4)
    angles = [0.0, math.pi / 3, math.pi / 2, math.pi]
    y = torch.tensor([[3 * math.cos(a), 3 * math.sin(a)] for a in angles])
    assert spherical_distance(x, y).tolist() == pytest.approx([a * a / 2 for a in angles], abs=1e-5)


# ----------------------------------------------------------------------------- generate


CONFIG = GenerateConfig(steps=4, cutouts=4, seed=3)


def test_a_seed_gives_the_same_bytes_and_another_seed_other_bytes():
    model = micro_clip()
    first = generate(model, toy_tokenizer, "a red circle", config=CONFIG, progress=False)
    second = generate(model, toy_tokenizer, "a red circle", config=CONFIG, progress=False)
    other = generate(model, toy_tokenizer, "a red circle", config=GenerateConfig(steps=4, cutouts=4, seed=4),
                     progress=False)
    assert torch.equal(first.pixels, second.pixels) and first.losses == second.losses
    assert png_bytes(first.image) == png_bytes(second.image)
    assert png_bytes(first.image) != png_bytes(other.image)
    assert first.image.size == (32, 32) and first.steps == 4 and len(first.losses) == 4
    assert all(p.requires_grad for p in model.parameters())  # the model's flags are restored


def test_an_init_image_is_kept_at_strength_0_and_partly_run_at_half():
    model = micro_clip()
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))  # resized and cropped to 32
    expected = init_pixels(init, 32).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    kept = generate(model, toy_tokenizer, "a", config=GenerateConfig(steps=6, strength=0.0), init=init, progress=False)
    assert kept.steps == 0 and kept.losses == []
    assert np.array_equal(np.asarray(kept.image), expected)
    half = generate(model, toy_tokenizer, "a", config=GenerateConfig(steps=6, strength=0.5, cutouts=4), init=init,
                    progress=False)
    assert half.steps == 3 and len(half.losses) == 3
    moved = np.abs(np.asarray(half.image).astype(int) - expected.astype(int)).mean()
    fresh = generate(model, toy_tokenizer, "a", config=GenerateConfig(steps=3, cutouts=4), progress=False)
    assert 0 < moved < np.abs(np.asarray(fresh.image).astype(int) - expected.astype(int)).mean() / 4


def test_frames_are_written_at_the_start_every_k_steps_and_at_the_end(tmp_path):
    config = GenerateConfig(steps=5, cutouts=2, frame_every=2)
    result = generate(micro_clip(), toy_tokenizer, "a", config=config, frames=tmp_path / "frames", progress=False)
    names = [p.name for p in result.frames]
    assert names == ["frame-00000.png", "frame-00002.png", "frame-00004.png", "frame-00005.png"]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == names
    with Image.open(result.frames[-1]) as last:
        assert np.array_equal(np.asarray(last), np.asarray(result.image))


def test_best_of_keeps_the_start_the_model_scores_highest_and_each_start_is_its_seeds_run(tmp_path):
    model = micro_clip()
    config = GenerateConfig(steps=3, cutouts=2, seed=5, best_of=3, frame_every=3)
    best = generate(model, toy_tokenizer, "a red circle", config=config, frames=tmp_path, progress=False)
    singles = [generate(model, toy_tokenizer, "a red circle", config=GenerateConfig(steps=3, cutouts=2, seed=seed),
                        progress=False) for seed in (5, 6, 7)]
    # Each start's score, recomputed naively: the 8-bit image through CLIP's preprocessing.
    mean = torch.tensor(model.config.vision.mean)[:, None, None]
    std = torch.tensor(model.config.vision.std)[:, None, None]
    text = torch.nn.functional.normalize(model.encode_text(toy_tokenizer(["a red circle"])), dim=-1)[0]
    with torch.no_grad():
        expected = [float(torch.nn.functional.normalize(model.encode_image(
            ((torch.from_numpy(np.array(r.image)).permute(2, 0, 1).float() / 255 - mean) / std)[None]), dim=-1)[0]
            @ text) for r in singles]
    assert best.cosines == pytest.approx(expected, abs=1e-5)
    kept = int(np.argmax(expected))
    assert best.seed == 5 + kept and png_bytes(best.image) == png_bytes(singles[kept].image)
    assert best.losses == singles[kept].losses
    assert len({png_bytes(r.image) for r in singles}) == 3  # three different starts to choose from
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed-5", "seed-6", "seed-7"]  # frames per start
    assert all(p.parent.name == f"seed-{best.seed}" for p in best.frames) and len(best.frames) == 2
    one = generate(model, toy_tokenizer, "a red circle", config=GenerateConfig(steps=3, cutouts=2, seed=5),
                   progress=False)
    assert one.seed == 5 and len(one.cosines) == 1 and png_bytes(one.image) == png_bytes(singles[0].image)


def test_negatives_add_the_weighted_cross_entropy_of_the_prompt_among_the_texts():
    model = micro_clip()
    prompt, negatives = "a red circle", ["a blue square", "a green star", "a red square"]
    plain = GenerateConfig(steps=1, cutouts=3, noise=0.1, seed=2)
    with_negatives = GenerateConfig(steps=1, cutouts=3, noise=0.1, seed=2, negatives=tuple(negatives),
                                    negative_weight=0.3)
    # The first step's cutouts, drawn naively from the same seed as generate draws them.
    generator = torch.Generator().manual_seed(2)
    pixels = FourierImage(32, generator=generator)()
    cuts = make_cutouts(pixels, 3, 32, noise=0.1, generator=generator)
    mean = torch.tensor(model.config.vision.mean)[:, None, None]
    std = torch.tensor(model.config.vision.std)[:, None, None]
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image((cuts - mean) / std), dim=-1)  # [3, D]
        text = torch.nn.functional.normalize(model.encode_text(toy_tokenizer([prompt, *negatives])), dim=-1)
        scale = float(model.logit_scale())
    cosine = (image @ text.T).double()  # [cutout, text]
    angle = torch.arccos(cosine[:, 0].clamp(-1, 1))
    cross_entropy = [-math.log(math.exp(scale * row[0]) / sum(math.exp(scale * c) for c in row))
                     for row in cosine.tolist()]
    first = generate(model, toy_tokenizer, prompt, config=plain, progress=False).losses[0]
    second = generate(model, toy_tokenizer, prompt, config=with_negatives, progress=False).losses[0]
    assert first == pytest.approx(float((angle ** 2 / 2).mean()), abs=1e-5)
    assert second - first == pytest.approx(0.3 * np.mean(cross_entropy), abs=1e-5)
    # The prompt and repeats among the negatives are left out; weight 0 is no negatives at all.
    repeated = GenerateConfig(steps=1, cutouts=3, noise=0.1, seed=2, negative_weight=0.3,
                              negatives=(prompt, *negatives, negatives[0]))
    assert generate(model, toy_tokenizer, prompt, config=repeated, progress=False).losses[0] == second
    off = GenerateConfig(steps=3, cutouts=3, seed=2, negatives=tuple(negatives), negative_weight=0.0)
    assert (png_bytes(generate(model, toy_tokenizer, prompt, config=off, progress=False).image)
            == png_bytes(generate(model, toy_tokenizer, prompt, config=GenerateConfig(steps=3, cutouts=3, seed=2),
                                  progress=False).image))
    with pytest.raises(ValueError, match="negatives must be a tuple of non-empty strings"):
        GenerateConfig(negatives=("a cat", " "))


def test_a_sigmoid_models_negatives_use_its_pairwise_loss():
    """With SigLIP's learned bias, the push from the negatives is the sigmoid loss of the pairs:
    −log σ(s·cos + b) for the prompt, −log(1 − σ(s·cos + b)) for each negative, mean over cutouts."""
    from dataclasses import replace

    base = micro_clip().config
    torch.manual_seed(0)
    model = CLIP(replace(base, init_logit_scale=10.0, init_logit_bias=-10.0)).eval()
    prompt, negatives = "a red circle", ["a blue square", "a green star"]
    plain = GenerateConfig(steps=1, cutouts=3, noise=0.1, seed=2)
    with_negatives = replace(plain, negatives=tuple(negatives), negative_weight=0.3)
    generator = torch.Generator().manual_seed(2)
    cuts = make_cutouts(FourierImage(32, generator=generator)(), 3, 32, noise=0.1, generator=generator)
    mean = torch.tensor(model.config.vision.mean)[:, None, None]
    std = torch.tensor(model.config.vision.std)[:, None, None]
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image((cuts - mean) / std), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(toy_tokenizer([prompt, *negatives])), dim=-1)
        scale, bias = float(model.logit_scale()), float(model.logit_scale.bias)
    pairwise = []
    for row in (image @ text.T).double().tolist():
        z = [scale * c + bias for c in row]
        pairwise.append(math.log1p(math.exp(-z[0])) + sum(math.log1p(math.exp(v)) for v in z[1:]))
    first = generate(model, toy_tokenizer, prompt, config=plain, progress=False).losses[0]
    second = generate(model, toy_tokenizer, prompt, config=with_negatives, progress=False).losses[0]
    assert second - first == pytest.approx(0.3 * np.mean(pairwise), abs=1e-5)


def test_the_loss_falls_and_each_image_fits_its_own_prompt_best(tmp_path_factory):
    # Not the training loss on augmented cutouts alone: the finished 8-bit images, seen whole
    # through the model's preprocessing, must each match their own prompt better than the others'.
    model, preprocess, tokenizer = load(collection(tmp_path_factory).model)
    prompts = ["a red circle", "a blue square", "a green star"]
    config = GenerateConfig(steps=30, cutouts=8)
    results = [generate(model, tokenizer, p, config=config, progress=False) for p in prompts]
    for result in results:
        assert np.mean(result.losses[-5:]) < 0.6 * np.mean(result.losses[:5])
    cosine = torch.stack([
        clip_score(model, [preprocess(r.image)] * len(prompts), prompts, tokenizer=tokenizer, progress=False).cosine
        for r in results
    ])  # [image, prompt]
    start = clip_score(model, [preprocess(Image.new("RGB", (32, 32), (128, 128, 128)))] * 3, prompts,
                       tokenizer=tokenizer, progress=False).cosine
    assert torch.equal(cosine.argmax(1), torch.arange(3)), cosine
    assert (cosine.diagonal() > start + 0.2).all(), (cosine.diagonal(), start)


# ----------------------------------------------------------------------------- the command


def test_generate_command_writes_the_image_frames_and_both_scores(tmp_path_factory, tmp_path, capsys):
    c = collection(tmp_path_factory)
    out, report = tmp_path / "red.png", tmp_path / "red.json"
    negatives = tmp_path / "negatives.txt"
    negatives.write_text("a red circle\n a green star \n\na red square\n")  # the prompt is left out
    code = main(["generate", "a red circle", "--model", str(c.model), "--judge", str(c.other_model),
                 "--out", str(out), "--steps", "6", "--cutouts", "4", "--seed", "1", "--frames", str(tmp_path / "f"),
                 "--frame-every", "3", "--decay", "2", "--noise", "0.25", "--best-of", "2", "--json", str(report),
                 "--negative", "a blue square", "--negatives", str(negatives), "--negative-weight", "0.2", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "judge" in printed and "CLIP-S" in printed and "best of 2" in printed
    result = json.loads(report.read_text())
    assert result["steps_run"] == 6 and len(result["losses"]) == 6 and len(result["frames"]) == 3
    kept = result["seed_kept"] - 1
    finals = result["final_cosine_by_start"]
    assert "start_cosines" not in result
    assert len(finals) == 2 and finals[kept] == max(finals)
    assert result["score"]["cosine"] == pytest.approx(finals[kept], abs=1e-5)
    assert all(f"seed-{result['seed_kept']}" in frame for frame in result["frames"])
    assert result["config"]["seed"] == 1 and result["config"]["cutouts"] == 4
    assert result["config"]["decay"] == 2 and result["config"]["noise"] == 0.25
    assert result["config"]["negatives"] == ["a blue square", "a red circle", "a green star", "a red square"]
    assert result["config"]["negative_weight"] == 0.2 and "3 negatives" in printed
    with Image.open(out) as written:
        image = written.convert("RGB")
    for key, path in (("score", c.model), ("judge_score", c.other_model)):
        model, preprocess, tokenizer = load(path)
        expected = clip_score(model, [preprocess(image)], ["a red circle"], tokenizer=tokenizer, progress=False)
        assert result[key]["clip_score"] == pytest.approx(expected.mean, abs=1e-5)
        assert result[key]["cosine"] == pytest.approx(float(expected.cosine[0]), abs=1e-5)

    # From an init image at strength 0: the init image comes back.
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(init)
    code = main(["generate", "a red circle", "--model", str(c.model), "--out", str(tmp_path / "same.png"),
                 "--init", str(init), "--strength", "0", "--quiet"])
    assert code == 0
    with Image.open(init) as a, Image.open(tmp_path / "same.png") as b:
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strength", "0.5"], "--strength needs --init"),
        (["--init", "nowhere.png"], "--init nowhere.png: cannot read"),
        (["--cutouts", "0"], "argument --cutouts: must be a positive integer, got 0"),
        (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["--decay", "-1"], "argument --decay: must be 0 or more, got -1"),
        (["--best-of", "0"], "argument --best-of: must be a positive integer, got 0"),
        (["--negative-weight", "-1"], "argument --negative-weight: must be 0 or more, got -1"),
        (["--strength", "1.5", "--init", "x.png"], "argument --strength: must be in [0, 1], got 1.5"),
        (["--cut-scale", "0.9", "0.2"], "cut_scale must be (low, high) with 0 < low <= high <= 1"),
        (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
        (["--size", "4"], "size must be 0 or at least 8 pixels"),
        (["--negatives", "nowhere.txt"], "--negatives nowhere.txt: no such"),
        (["--negatives", "blank.txt"], "blank.txt: the file has no texts"),
        (["--json", "blank.txt/r.json"], "blank.txt is a file, not a folder"),
    ],
)
def test_generate_command_rejects_bad_options(tmp_path, capsys, extra, message):
    (tmp_path / "blank.txt").write_text("\n  \n")
    extra = [str(tmp_path / x) if x.startswith("blank.txt") else x for x in extra]
    try:
        code = main(["generate", "a red circle", "--model", "tiny", "--out", str(tmp_path / "x.png"), "--quiet",
                     *extra])
    except SystemExit as exit_:  # argparse's refusal of an option value
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
