"""Every command with every model family, on small random-weight models.

Each family in `FAMILIES` is a recipe for a small model with its own tokenizer, written as a
clipforge checkpoint folder; each test runs one command through ``main([...])`` for each family:
``eval zeroshot`` (with the per-family probabilities, checked against the model's own logits),
``eval retrieval``, ``index build`` + ``search`` by text and by image, ``score``, ``rerank``,
``generate``, ``train`` with the family's loss and fine-tuning from the checkpoint it writes (and the one-line
refusal of the other loss), and ``convert`` to Hugging Face's and OpenCLIP's files and back, with
the same features.  A new family is one more `Family` entry.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from _search_helpers import write_pairs
from clipforge.checkpoints import load, save
from clipforge.cli import main
from clipforge.data.shapes import ShapesDataset
from clipforge.model import CLIP, CLIPConfig, get_config
from clipforge.model.config import TextConfig, VisionConfig

SIGLIP_TOKENIZERS = Path(__file__).parent / "fixtures" / "siglip_tokenizers"
ZEROSHOT_DATA = "shapes://?split=heldout&n=4&size=32"
TRAIN_DATA = "shapes://?n=16&size=32"
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a red heart"] * 4
RUN = ["--device", "cpu", "--workers", "0"]


def clip_model(folder: Path) -> Path:
    """A two-block CLIP (OpenAI's ViT and causal text tower) with a BPE trained on a few captions."""
    from clipforge.tokenizer import train_bpe

    tokenizer = train_bpe(CAPTIONS, 600, min_frequency=1, context_length=16)
    config = CLIPConfig(embed_dim=32,
                        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=1),
                        text=TextConfig(context_length=16, vocab_size=tokenizer.vocab_size, width=64, heads=1,
                                        layers=2))
    return save(CLIP(config), folder, tokenizer=tokenizer)


def siglip_model(tokenizer_dir: str) -> Callable[[Path], Path]:
    """A two-block SigLIP (attention-pooled ViT, non-causal text tower read at the last position,
    tanh GELU as transformers runs it, scale 10 and bias −10) with the tokenizer of
    ``fixtures/siglip_tokenizers/<tokenizer_dir>``: SentencePiece for SigLIP, Gemma's for SigLIP 2.
    One 64-wide head per block, so that a bare OpenCLIP state dict reads back by its shapes."""

    def make(folder: Path) -> Path:
        from clipforge.tokenizer.siglip import siglip_tokenizer_from_dir

        tokenizer = siglip_tokenizer_from_dir(SIGLIP_TOKENIZERS / tokenizer_dir, context_length=16)
        config = CLIPConfig(
            embed_dim=64,
            vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=1, act="gelu_tanh",
                                layer_norm_eps=1e-6, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pool="map"),
            text=TextConfig(context_length=16, vocab_size=tokenizer.vocab_size, width=64, heads=1, layers=2,
                            act="gelu_tanh", layer_norm_eps=1e-6, pool="last"),
            init_logit_scale=10.0, init_logit_bias=-10.0,
        )
        return save(CLIP(config), folder, tokenizer=tokenizer)

    return make


def chinese_clip_model(folder: Path) -> Path:
    """transformers' small random ChineseCLIPModel of tests/fixtures/chinese_clip (OpenAI's ViT, a
    BERT text tower, a WordPiece vocabulary with Chinese characters), as a clipforge folder."""
    from clipforge.checkpoints import convert

    return convert(Path(__file__).parent / "fixtures" / "chinese_clip" / "hf_chinese_clip", folder, to="clipforge")


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[Path], Path]  # writes a small random model and its tokenizer into a new folder
    sigmoid: bool  # scores are per-pair sigmoids with a learned bias (SigLIP), not a softmax (CLIP)
    openclip: str | None  # convert --to openclip writes a "dir", a "file" (bare state dict) or None (OpenCLIP lacks it)
    act: str | None = None  # --act that reads the bare OpenCLIP file back, when the shapes alone do not say

    @property
    def loss(self) -> str:
        return "siglip" if self.sigmoid else "clip"


# OpenCLIP builds SigLIP's image tower only from a timm model of a released shape, so a small SigLIP
# goes to OpenCLIP as a bare state dict (as OpenCLIP's training writes it), read back by its shapes.
FAMILIES = [
    Family("clip", clip_model, sigmoid=False, openclip="dir"),
    Family("siglip", siglip_model("siglip"), sigmoid=True, openclip="file", act="gelu_tanh"),
    Family("siglip2", siglip_model("siglip2"), sigmoid=True, openclip="file", act="gelu_tanh"),
    Family("chinese_clip", chinese_clip_model, sigmoid=False, openclip=None),
]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family(request, tmp_path_factory) -> tuple[Family, Path]:
    """(family, its model folder), made once per module."""
    spec = request.param
    torch.manual_seed(0)
    return spec, spec.make(tmp_path_factory.mktemp(spec.name) / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four captioned ``shapes://`` images as a ``pairs:`` folder."""
    folder = tmp_path_factory.mktemp("pairs")
    write_pairs(folder, ShapesDataset(split="seen", size=32, n=4), range(4))
    return folder


def loaded(folder: Path) -> CLIP:
    model, _, _ = load(folder)
    return model.eval()


# ----------------------------------------------------------------------------- eval


def test_zeroshot_probabilities_follow_the_family(family, tmp_path, capsys):
    from clipforge.data import open_data
    from clipforge.embed import embed_images
    from clipforge.evaluate import evaluate_zeroshot
    from clipforge.zeroshot import build_zeroshot_classifier, zeroshot_logits

    spec, folder = family
    predictions, out = tmp_path / "predictions.csv", tmp_path / "result.json"
    code = main(["eval", "zeroshot", "--model", str(folder), "--data", ZEROSHOT_DATA, *RUN, "--quiet",
                 "--predictions", str(predictions), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert ("per-class sigmoid" in printed) == spec.sigmoid

    model, preprocess, tokenizer = load(folder)
    model.eval()
    source = open_data(ZEROSHOT_DATA)
    result = evaluate_zeroshot(model, preprocess, tokenizer, source, probabilities=True)
    # the direct computation: the model's own scores, scale * cos (+ bias), through a sigmoid or a softmax
    classifier = build_zeroshot_classifier(model, tokenizer, source.classnames, source.templates)
    features = embed_images(model, source.images(preprocess, batch_size=4))
    with torch.no_grad():
        logits = model.logits(features, classifier.T)
    expected = torch.sigmoid(logits) if spec.sigmoid else logits.softmax(-1)
    torch.testing.assert_close(result.probabilities, expected, rtol=1e-5, atol=1e-7)
    sums = result.probabilities.sum(1)
    if spec.sigmoid:  # each class on its own: 64 classes of sigmoid(10 cos - 10) sum far below 1
        assert (sums - 1).abs().min() > 0.5
    else:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    # the ranking, and with it every accuracy, is the logits' own
    assert torch.equal(result.probabilities.argmax(1), zeroshot_logits(features, classifier).argmax(1))
    recorded = json.loads(out.read_text())["clipforge"]["metrics"]
    assert recorded["acc1"] == result.metrics["acc1"]

    rows = list(csv.DictReader(predictions.open(encoding="utf-8")))
    assert [r["image"] for r in rows] == [str(k) for k in result.kept]
    for row, probs, label in zip(rows, result.probabilities, result.targets):
        predicted = int(probs.argmax())
        assert row["label"] == result.classnames[label] and row["predicted"] == result.classnames[predicted]
        assert math.isclose(float(row["probability"]), float(probs[predicted]), rel_tol=1e-5)
        assert math.isclose(float(row["label_probability"]), float(probs[label]), rel_tol=1e-5)


def test_predictions_must_be_a_csv_file(family, tmp_path, capsys):
    _, folder = family
    code = main(["eval", "zeroshot", "--model", str(folder), "--data", ZEROSHOT_DATA, *RUN,
                 "--predictions", str(tmp_path / "p.json")])
    assert code == 2
    message = f"clipforge eval: error: --predictions {tmp_path / 'p.json'}: write a .csv file"
    assert capsys.readouterr().err.strip() == message


def test_retrieval(family, images, tmp_path, capsys):
    _, folder = family
    out = tmp_path / "retrieval.json"
    assert main(["eval", "retrieval", "--model", str(folder), "--data", f"pairs:{images}", *RUN, "--quiet",
                 "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["clipforge"]["metrics"]
    assert metrics["image_to_text_R@10"] is None and metrics["text_to_image_R@10"] is None  # undefined for 4 images
    for direction in ("image_to_text", "text_to_image"):
        assert metrics[f"{direction}_R@1"] * 4 in (0, 1, 2, 3, 4)
        assert 1 <= metrics[f"{direction}_mean_rank"] <= 4


# ----------------------------------------------------------------------------- search


def test_index_and_search_by_text_and_image(family, images, tmp_path, capsys):
    _, folder = family
    index = tmp_path / "index"
    assert main(["index", "build", "--model", str(folder), "--data", f"pairs:{images}", "--out", str(index), *RUN,
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "a red circle", "-k", "4", "--json", "--device", "cpu"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert len(hits) == 4
    model, preprocess, tokenizer = load(folder)
    with torch.no_grad():  # each hit's score is the cosine of the query and its image
        text = model.encode_text(tokenizer(["a red circle"]), normalize=True)[0]
        for hit in hits:
            image = model.encode_image(preprocess(Image.open(hit["path"]).convert("RGB"))[None], normalize=True)[0]
            assert hit["score"] == pytest.approx(float(image @ text), abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    query = images / "00002.png"
    assert main(["search", str(index), "--image", str(query), "-k", "1", "--json", "--device", "cpu"]) == 0
    [hit] = json.loads(capsys.readouterr().out)["results"]
    assert Path(hit["path"]).name == "00002.png" and hit["score"] == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- score and rerank


def test_score_and_rerank_give_a_sigmoid_model_its_probability(family, images, tmp_path, capsys):
    spec, folder = family
    captions = tmp_path / "captions.tsv"
    pngs = sorted(images.glob("*.png"))
    captions.write_text("".join(f"{p.name}\t{p.with_suffix('.txt').read_text()}\n" for p in pngs))
    out = tmp_path / "scores.json"
    assert main(["score", "--model", str(folder), "--images", str(images), "--captions", str(captions),
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    assert ("P(match)" in capsys.readouterr().out) == spec.sigmoid
    per_image = json.loads(out.read_text())["per_image"]
    model = loaded(folder)
    scale = float(model.logit_scale().detach())
    for row in per_image:
        if spec.sigmoid:
            expected = 1 / (1 + math.exp(-(scale * row["cosine"] + float(model.logit_scale.bias.detach()))))
            assert row["probability"] == pytest.approx(expected, rel=1e-5)
        else:
            assert "probability" not in row

    ranking = tmp_path / "rerank.json"
    assert main(["rerank", "--model", str(folder), "--images", str(images), "--prompt", "a red circle",
                 "--device", "cpu", "--quiet", "--out", str(ranking)]) == 0
    rows = json.loads(ranking.read_text())["ranking"]
    assert len(rows) == 4
    cosines = [r["cosine"] for r in rows]
    assert cosines == sorted(cosines, reverse=True)
    if spec.sigmoid:
        probabilities = [r["probability"] for r in rows]
        assert probabilities == sorted(probabilities, reverse=True) and all(0 < p < 1 for p in probabilities)
    else:
        assert all("probability" not in r for r in rows)


def test_generate_scores_its_image_as_the_family_scores(family, tmp_path, capsys):
    spec, folder = family
    result = tmp_path / "generated.json"
    assert main(["generate", "--model", str(folder), "a red circle", "--out", str(tmp_path / "red.png"), "--steps",
                 "2", "--cutouts", "2", "--negative", "a blue square", "--device", "cpu", "--quiet",
                 "--json", str(result)]) == 0
    score = json.loads(result.read_text())["score"]
    assert ("probability" in score) == spec.sigmoid
    if spec.sigmoid:
        model = loaded(folder)
        with torch.no_grad():
            logit = model.logit_scale() * score["cosine"] + model.logit_scale.bias
        assert score["probability"] == pytest.approx(float(torch.sigmoid(logit)), rel=1e-5)


# ----------------------------------------------------------------------------- train and fine-tune


def test_train_with_the_familys_loss_then_fine_tune(family, tmp_path, capsys):
    spec, folder = family
    steps = ["--data", TRAIN_DATA, "--batch-size", "4", "--warmup", "1", "--no-progress", "--device", "cpu"]
    assert main(["train", "--model", str(folder), "--loss", spec.loss, "--steps", "2", "--save-every", "2",
                 "--out", str(tmp_path / "run"), *steps]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("logit_bias" in r for r in rows) == spec.sigmoid
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    before, after = loaded(folder), loaded(checkpoint)
    assert not torch.equal(before.text.positional_embedding, after.text.positional_embedding)  # it trained
    assert (after.logit_scale.bias is not None) == spec.sigmoid

    # fine-tuning: a new run from that checkpoint, image tower frozen
    assert main(["train", "--model", str(checkpoint), "--loss", spec.loss, "--steps", "1", "--lock-image",
                 "--out", str(tmp_path / "tuned"), *steps]) == 0
    tuned = loaded(tmp_path / "tuned" / "checkpoints" / "step-0000001")
    assert torch.equal(tuned.visual.conv1.weight, after.visual.conv1.weight)
    assert not torch.equal(tuned.text.positional_embedding, after.text.positional_embedding)

    # the other loss: one line saying why, before anything is written
    other = "clip" if spec.sigmoid else "siglip"
    capsys.readouterr()
    assert main(["train", "--model", str(checkpoint), "--loss", other, "--steps", "1",
                 "--out", str(tmp_path / "other"), *steps]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    named = "Chinese-CLIP" if spec.name == "chinese_clip" else "CLIP"
    kind = "a SigLIP model (sigmoid scores with a learned bias)" if spec.sigmoid else \
        f"a {named} model, without the learned bias the sigmoid loss needs"
    assert line.startswith(f"clipforge train: error: --loss {other}: {checkpoint} is {kind}")


@pytest.mark.parametrize("preset", ["tiny", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_a_fresh_preset_starts_with_its_losss_scale_and_bias(preset, loss):
    from clipforge.train.loop import scores_for_loss

    config = scores_for_loss(get_config(preset), loss)
    if loss == "siglip":  # Zhai et al. 2023: t' = log 10, b = -10, on any architecture (OpenCLIP's --siglip)
        assert (config.init_logit_scale, config.init_logit_bias) == (10.0, -10.0)
    else:  # Radford et al. 2021: 1/0.07, no bias, whatever the preset's family
        assert config.init_logit_scale == pytest.approx(1 / 0.07) and config.init_logit_bias is None
    assert (config.vision, config.text) == (get_config(preset).vision, get_config(preset).text)


# ----------------------------------------------------------------------------- convert


def same_model(a: CLIP, b: CLIP) -> None:
    """Identical features for the same random images and token ids, and the same scale and bias."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, a.image_size, a.image_size, generator=generator)
    tokens = torch.randint(0, a.config.text.vocab_size, (3, a.context_length), generator=generator)
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))
        assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))
        assert torch.equal(a.logit_scale(), b.logit_scale())
    assert (a.logit_scale.bias is None) == (b.logit_scale.bias is None)
    if a.logit_scale.bias is not None:
        assert torch.equal(a.logit_scale.bias, b.logit_scale.bias)


@pytest.mark.parametrize("to", ["hf", "openclip"])
def test_convert_there_and_back_keeps_the_features(family, to, tmp_path, capsys):
    spec, folder = family
    if to == "openclip" and spec.openclip is None:
        pytest.skip(f"OpenCLIP has no {spec.name} model")
    there = tmp_path / ("openclip.safetensors" if to == "openclip" and spec.openclip == "file" else to)
    assert main(["convert", str(folder), str(there), "--to", to]) == 0
    back = tmp_path / "back"
    extra = ["--tokenizer", str(folder)] if there.suffix == ".safetensors" else []  # a bare state dict has none
    if there.suffix == ".safetensors" and spec.act:
        extra += ["--act", spec.act]
    assert main(["convert", str(there), str(back), "--to", "clipforge", *extra]) == 0
    original, _, own = load(folder)
    model, _, tokenizer = load(back)
    same_model(original.eval(), model.eval())
    assert torch.equal(tokenizer(CAPTIONS[:3]), own(CAPTIONS[:3]))


def test_a_siglip_model_without_its_bias_is_refused_by_transformers_format(tmp_path, capsys):
    """SigLIP's towers trained with the softmax loss have no bias, which SiglipModel requires."""
    from dataclasses import replace

    torch.manual_seed(0)
    folder = siglip_model("siglip")(tmp_path / "siglip")
    model = loaded(folder)
    save(CLIP(replace(model.config, init_logit_bias=None)), tmp_path / "no-bias")
    code = main(["convert", str(tmp_path / "no-bias"), str(tmp_path / "hf"), "--to", "hf"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "SiglipModel needs the learned logit bias" in err
    assert not (tmp_path / "hf").exists()


def test_a_tokenizer_larger_than_the_models_vocabulary_is_one_line(tmp_path, capsys):
    """A SigLIP tokenizer of 239 ids for a model of 200 (tests/fixtures/siglip/hf_siglip): one line
    naming the folder and both sizes, from eval and from train, not an index error mid-run."""
    fixtures = Path(__file__).parent / "fixtures"
    model, tokenizer = fixtures / "siglip" / "hf_siglip", SIGLIP_TOKENIZERS / "siglip"
    assert main(["eval", "zeroshot", "--model", str(model), "--tokenizer", str(tokenizer), "--data", ZEROSHOT_DATA,
                 *RUN, "--quiet"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"{tokenizer}: a tokenizer of 239 ids, more than the model's vocab_size 200" in line
    assert main(["train", "--model", str(model), "--tokenizer", str(tokenizer), "--loss", "siglip", "--steps", "1",
                 "--batch-size", "4", "--data", TRAIN_DATA, "--out", str(tmp_path / "run"), *RUN, "--no-progress"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"--tokenizer {tokenizer}: 239 ids, more than the 200 of {model}'s vocabulary" in line
    assert not (tmp_path / "run").exists()


def test_a_folders_own_tokenizer_with_ids_beyond_the_model_fails_in_one_line_when_used(tmp_path, capsys):
    """A model folder whose tokenizer has more ids than the embedding table loads (as transformers
    loads it); a text whose ids fall outside stops with one line, not an index error."""
    import shutil

    folder = shutil.copytree(Path(__file__).parent / "fixtures" / "siglip" / "hf_siglip", tmp_path / "model")
    for file in (SIGLIP_TOKENIZERS / "siglip").iterdir():
        shutil.copy(file, folder / file.name)
    assert main(["eval", "zeroshot", "--model", str(folder), "--data", ZEROSHOT_DATA, *RUN, "--quiet"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "is outside the model's vocabulary of 200 ids: the tokenizer is not the one the model" in line
