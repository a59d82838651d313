"""The user pages (README.md, docs/evaluation.md, docs/training.md, docs/search.md, docs/pretrained.md) against the code
and the recorded benchmarks.

Each test reads what a page says and checks it against its source: a default against the
config or the parser that defines it, a run file against the one that ships, a number against
the JSON in benchmarks/results/ that records it, a command against the command-line parser,
an example's output against what the command prints.  Editing either side alone fails.

How a number is bound to its sentence (`sentence`): the page is cut into blocks at blank lines,
headings and list items; a block's whitespace is collapsed and it is cut into sentences after
"." followed by whitespace and an upper-case letter, "`" or "*" (so "2.2 ms", "e.g. corrupt"
and "et al., 2021" do not end one).  An anchor is a phrase that picks exactly one sentence,
and every number quoted must stand whole in that sentence ("2.2" does not match "12.2" or
"2.25").
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from clipforge.cli import build_parser, main
from clipforge.train.config import DEMO_CONFIG, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = {
    name: ROOT / name
    for name in ("README.md", "docs/evaluation.md", "docs/training.md", "docs/search.md", "docs/pretrained.md")
}


def page(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def record(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- sentences


def code_blocks(text: str, lang: str | None = None) -> list[str]:
    """The fenced blocks of ``text`` (of language ``lang`` when given), verbatim."""
    blocks = re.findall(r"^```([^\n]*)\n(.*?)^```", text, flags=re.S | re.M)
    return [body for info, body in blocks if lang is None or info.strip() == lang]


def sentences(text: str) -> list[str]:
    prose = re.sub(r"^```.*?^```", "\n", text, flags=re.S | re.M)
    out = []
    for block in re.split(r"\n\s*\n|\n(?=#)|\n(?=\s*[*-] )|\n(?=\|)", prose):
        flat = " ".join(block.split())
        out += [s for s in re.split(r"(?<=\.)\s+(?=[A-Z`*])", flat) if s]
    return out


def sentence(name: str, anchor: str) -> str:
    """The one sentence of page ``name`` that holds ``anchor``."""
    found = [s for s in sentences(page(name)) if anchor in s]
    assert len(found) == 1, f"{name}: {len(found)} sentences hold {anchor!r}: {found}"
    return found[0]


def says(text: str, number: str) -> bool:
    """``number`` stands whole in ``text``: not inside a longer number."""
    return re.search(rf"(?<![\d.,]){re.escape(number)}(?![\d]|[.,]\d)", text) is not None


def assert_said(name: str, anchor: str, *numbers: str) -> None:
    text = sentence(name, anchor)
    for number in numbers:
        assert says(text, number), f"{name}: the sentence with {anchor!r} should say {number!r}: {text}"


def test_sentence_binding_matches_whole_numbers_only():
    assert says("a median of 2.2 ms", "2.2") and not says("a median of 12.2 ms", "2.2")
    assert not says("2.25 ms", "2.2") and not says("1,678 MiB", "678") and says("in 4.0 minutes.", "4.0")
    assert sentences("It took 2.2 ms, e.g. here. `x` is next.") == ["It took 2.2 ms, e.g. here.", "`x` is next."]


# ----------------------------------------------------------------------------- commands


def commands(text: str) -> list[list[str]]:
    """Every ``clipforge ...`` command in the fenced blocks, as argv after the program name.

    In a transcript (a block with ``$ `` lines) only those lines are commands; the program's own
    messages (``clipforge train: stopped ...``) are not, but the command it prints after
    ``resume with:`` is.  ``torchrun ... -m clipforge.cli ...`` counts; ``\\`` continues a line.
    """
    found = []
    for block in code_blocks(text):
        lines = re.sub(r"\\\n\s*", " ", block).splitlines()
        transcript = any(line.startswith("$ ") for line in lines)
        for line in lines:
            line = line.strip().lstrip("# ").removeprefix("resume with: ")
            if transcript and not line.startswith(("$ ", "clipforge ")):
                continue
            line = line.removeprefix("$ ")
            match = re.match(r"(?:clipforge|torchrun .*?-m clipforge\.cli) (?!\S+:)(.*)", line)
            if match:
                found.append(shlex.split(match.group(1), comments=True))
    return found


def subparser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    for word in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def command_path(argv: list[str]) -> list[str]:
    """The sub-command words at the start of ``argv`` (``["index", "build"]``)."""
    parser, path = build_parser(), []
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser, path = subs[0].choices[word], [*path, word]
    return path


def inline_commands(text: str) -> list[list[str]]:
    """The ``clipforge ...`` spans in running text, split into words; ``clipforge COMMAND`` is not one."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [span.split()[1:] for span in re.findall(r"`(clipforge [^`A-Z][^`]*)`", prose)]


@pytest.mark.parametrize("name", list(PAGES))
def test_every_command_shown_parses(name):
    found = commands(page(name))
    assert found, f"{name} shows no command"
    parser = build_parser()
    for argv in found:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: `clipforge {shlex.join(argv)}` does not parse")


@pytest.mark.parametrize("name", list(PAGES))
def test_every_option_named_in_the_text_exists(name):
    for words in inline_commands(page(name)):
        path = command_path(words)
        assert path, f"{name}: `clipforge {' '.join(words)}` names no command"
        options = subparser(build_parser(), path)._option_string_actions
        for word in words:
            if word.startswith("-"):
                assert word in options, f"{name}: `clipforge {' '.join(words)}`: {word} is not an option of {path}"


@pytest.mark.parametrize("name", list(PAGES))
def test_python_imports_shown_exist(name):
    for block in code_blocks(page(name), "python"):
        for module, names in re.findall(r"^from (\S+) import (.+)$", block, flags=re.M):
            loaded = importlib.import_module(module)
            for attr in names.split("#")[0].split(","):
                assert hasattr(loaded, attr.strip()), f"{name}: {module} has no {attr.strip()}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


@pytest.mark.parametrize("name", list(PAGES))
def test_links_to_pages_and_sections_resolve(name):
    for target in re.findall(r"\]\(([^)\s]+)\)", page(name)):
        if re.match(r"https?:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (PAGES[name].parent / file) if file else PAGES[name]
        assert path.exists(), f"{name}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{name}: link to {target}: no such section"


# ----------------------------------------------------------------------------- training.md


def test_the_run_file_shown_is_the_demos():
    shown = code_blocks(page("docs/training.md"), "toml")
    assert shown == [DEMO_CONFIG.read_text(encoding="utf-8")]


def test_print_config_prints_the_run_file(capsys):
    assert main(["demo", "--print-config"]) == 0
    assert capsys.readouterr().out == DEMO_CONFIG.read_text(encoding="utf-8")


def test_optimiser_defaults_are_trainconfigs():
    text = sentence("docs/training.md", "The defaults are `lr`")
    quoted = {key: value.rstrip(".") for key, value in re.findall(r"`(\w+)` ([0-9][0-9.e-]*)", text)}
    assert set(quoted) == {"lr", "warmup", "weight_decay", "grad_clip", "beta1", "beta2", "adam_eps"}
    defaults = TrainConfig()
    for key, value in quoted.items():
        assert float(value) == getattr(defaults, key), f"training.md: {key} {value}; TrainConfig: {defaults}"


def test_clips_resnet_settings_are_stated_with_the_options_that_set_them():
    from clipforge.model import get_config

    assert TrainConfig().model == "tiny" and get_config("tiny").vision.patch_size is None  # the default is a ResNet
    assert_said("docs/training.md", "its ResNets used", "0.999", "1e-8")
    text = sentence("docs/training.md", "gives CLIP's ResNet settings")
    flags = re.search(r"`(--beta2 \S+ --adam-eps \S+)`", text).group(1)
    args = build_parser().parse_args(["train", *flags.split()])
    assert (args.beta2, args.adam_eps) == (0.999, 1e-8)


def test_batchnorm_caveat_names_the_towers_that_have_it():
    import torch.nn as nn

    from clipforge.model import CLIP, get_config

    def has_batchnorm(preset: str) -> bool:
        return any(isinstance(m, nn.BatchNorm2d) for m in CLIP(get_config(preset)).modules())

    assert has_batchnorm("tiny") and not has_batchnorm("tiny-vit")
    training = sentence("docs/training.md", "BatchNorm is the exception")
    assert "`tiny`" in training and "`RN50`" in training
    assert "`tiny-vit`" in sentence("docs/training.md", "Towers without BatchNorm")
    readme = sentence("README.md", "K micro-batches equal one batch")
    assert "`tiny-vit`" in readme and "the default `tiny` preset" in readme and "BatchNorm" in readme


def test_log_example_follows_the_demo_schedule():
    from clipforge.train.config import demo_config
    from clipforge.train.step import lr_factor

    config = demo_config()
    block = next(b for b in code_blocks(page("docs/training.md"), "text") if "samples/s" in b)
    lines = re.findall(r"^step (\d+)/(\d+) .* lr (\S+) ", block, flags=re.M)
    assert lines
    for step, steps, lr in lines:
        assert int(steps) == config.steps
        assert lr == f"{config.lr * lr_factor(int(step), config):.2e}"


def test_demo_minutes_are_recorded():
    from clipforge.train.config import demo_config

    budget = next(b for b in record("bench_demo_curve")["budgets"] if b["steps"] == demo_config().steps)
    minutes = f"{budget['minutes']:.1f}"
    assert_said("docs/training.md", "On two quiet cores the demo's", f"{budget['steps']} steps", minutes)
    assert_said("README.md", "Its 750 steps", f"{budget['steps']} steps", minutes)


# ----------------------------------------------------------------------------- README.md


def test_readme_loss_numbers_are_recorded():
    rows = {(r["impl"], r["dtype"]): r for r in record("bench_loss")["rows"] if r["n"] == 16384}
    naive, tiled = rows["naive", "fp32"], rows["tiled", "fp32"]
    assert 0.4 < tiled["seconds"] / naive["seconds"] < 0.6  # "about half the time"
    memory = f"{100 * tiled['extra_peak_bytes'] / naive['extra_peak_bytes']:.1f} %"
    assert_said("README.md", "At N = 16,384", "16,384", "about half the time", memory)


def test_readme_search_numbers_are_recorded():
    result = record("bench_index")["result"]
    assert_said("README.md", "On a million 512-d vectors", f"{result['recall_at_10']:.3f}",
                f"{result['median_ms']:.1f} ms")


def test_readme_generation_numbers_are_recorded():
    data = record("bench_generate")
    n = data["prompts"]
    judge = round(data["results"]["generation_judge"]["colour_and_shape"] * n)
    clean = round(data["results"]["generation_clean_judge"]["colour_and_shape"] * n)
    assert_said("README.md", "a judge of the same recipe", f"{judge} of the {n}",
                f"judge trained without noise {clean}", f"other {n - 1}",
                f"--image-noise {data['generate_config']['noise']}")


# ----------------------------------------------------------------------------- evaluation.md


def markdown_table(text: str, header_start: str) -> list[list[str]]:
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return rows


def test_retrieval_table_is_the_record():
    recorded = [r for r in record("bench_eval")["rows"] if r["case"] == "retrieval"]
    shown = markdown_table(page("docs/evaluation.md"), "| retrieval, d = 512")
    assert len(shown) == len(recorded)
    mib = 2**20
    for cells, r in zip(shown, recorded):
        blocked = r["impl"] == "blocked"
        expected = [
            r["impl"], f"{r['images']:,}", f"{r['captions']:,}", str(r["block_size"]) if blocked else "—",
            f"{r['tiles_sweep1']} + {r['tiles_sweep2']}" if blocked else "—", f"{r['seconds']:.1f}",
            f"{r['gflops']:.0f}", f"{r['extra_peak_bytes'] / mib:.0f}", f"{r['features_bytes'] / mib:.0f}",
        ]
        assert cells == expected


def test_retrieval_performance_sentences_are_the_record():
    rows = {(r["images"], r["block_size"]): r for r in record("bench_eval")["rows"] if r["case"] == "retrieval"}
    small, large, full = rows[20000, 1024], rows[20000, 4096], rows[5000, 0]
    mib = 2**20
    assert_said("docs/evaluation.md", "Memory follows the block size", f"{small['extra_peak_bytes'] / mib:.0f} MiB",
                f"{large['extra_peak_bytes'] / mib:.0f} MiB", f"{full['extra_peak_bytes'] / mib:.0f} MiB")
    assert small["images"] * small["captions"] == 2e9 and full["images"] * full["captions"] * 16 == 2e9
    assert_said("docs/evaluation.md", "is also the faster", f"{large['seconds']:.1f} s", f"{small['seconds']:.1f} s")

    from clipforge.retrieval import retrieval_metrics

    default = inspect.signature(retrieval_metrics).parameters["block_size"].default
    assert default == large["block_size"] and f"Block {default}, the default" in sentence(
        "docs/evaluation.md", "is also the faster")
    assert build_parser().parse_args(["eval", "retrieval", "--model", "m", "--data", "d"]).block_size == default

    matmul = record("bench_loss")["matmul"]["fp32"]
    seconds = 2 * large["images"] * large["captions"] * large["d"] * (
        1 + large["tiles_sweep1"] / large["tiles_sweep2"]) / (matmul["gflops"] * 1e9)
    chunk, d = matmul["chunk"], matmul["d"]
    assert_said("docs/evaluation.md", "about a fifth of the", f"{large['gflops']:.0f} GFLOP/s",
                f"{matmul['gflops']:.0f} GFLOP/s", f"{chunk} × {d} @ {d} × {chunk}", f"about {seconds:.0f} s")
    assert 0.15 < large["gflops"] / matmul["gflops"] < 0.25  # "about a fifth"


def test_zeroshot_benchmark_is_described_as_it_runs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "benchmarks" / "bench_eval.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from clipforge.templates import load_templates

    source = (ROOT / "benchmarks" / "bench_eval.py").read_text()
    assert 'load_model("tiny")' in source
    prompts = 10 * len(load_templates("default"))
    assert_said("docs/evaluation.md", "synthetic 64×64 images", f"{bench.ZEROSHOT_FULL:,}", "`tiny`",
                f"({prompts} prompts)", "10 classes")


@pytest.fixture
def eval_workspace(tmp_path, monkeypatch):
    """The data of tests/test_eval_cli.py, in the working directory as the page's commands expect."""
    import os

    import torch

    import test_eval_cli as t
    from clipforge.checkpoints import load_model, save
    from clipforge.templates import load_templates
    from clipforge.tokenizer import train_bpe

    for seed, name in enumerate(t.CAPTIONS):
        t.write_png(tmp_path / "images" / name, seed)
    t.write_png(tmp_path / "images" / "dog" / "2.png", 10)
    (tmp_path / "images" / "cat" / "corrupt.jpg").write_bytes(b"not really a jpeg")
    os.symlink(tmp_path / "images" / "gone.png", tmp_path / "images" / "dog" / "missing.png")
    rows = ["filepath\ttitle"]
    rows += [f"images/{name}\t{caption}" for name, captions in t.CAPTIONS.items() for caption in captions]
    rows += ["images/cat/corrupt.jpg\ta corrupt picture", "images/nowhere.png\ta missing picture",
             "images/dog/2.png\t ", "images/dog/2.png\ta dog, shown in a third picture"]
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    model = load_model("tiny")
    corpus = [c for captions in t.CAPTIONS.values() for c in captions] + list(load_templates("default"))
    tokenizer = train_bpe(corpus * 3 + t.CLASSES, 600, min_frequency=1, context_length=model.context_length)
    save(model, tmp_path / "tiny-model", tokenizer=tokenizer)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_eval_output_shown_is_what_the_commands_print(eval_workspace, capsys):
    """The transcript of docs/evaluation.md, run: every printed line but the time, and the JSON."""
    text = page("docs/evaluation.md")
    transcript = next(b for b in code_blocks(text) if b.startswith("$ clipforge eval zeroshot"))
    for part in transcript.split("$ ")[1:]:
        command, *shown = part.strip().splitlines()
        assert main(shlex.split(command)[1:]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert [x for x in printed if not x.startswith("time ")] == [x for x in shown if not x.startswith("time ")]
    result = json.loads((eval_workspace / "zeroshot.json").read_text())
    shown_json = json.loads(next(b for b in code_blocks(text, "json") if '"task"' in b))
    for data in (result, shown_json):
        del data["clipforge"]["timings_s"]
    assert shown_json == result
    assert says(sentence("docs/evaluation.md", "is `n/a` with"), str(result["clipforge"]["metrics"]["num_classes"]))


# ----------------------------------------------------------------------------- search.md


def test_search_numbers_are_recorded():
    data = record("bench_index")
    result = data["result"]
    assert_said("docs/search.md", "Exact search scans every vector", f"{result['exact_median_ms']:.1f} ms",
                f"{result['exact_median_ms'] / result['median_ms']:.0f}×")
    assert_said("docs/search.md", "IVF-PQ with re-ranking reaches", f"{result['recall_at_10']:.3f}",
                f"{result['median_ms']:.1f} ms", f"{result['build_s']:.1f} s")
    params = result["params"]
    assert_said("docs/search.md", "Measured on a million", f"{result['recall_at_10']:.3f}",
                f"{result['median_ms']:.1f} ms", f"`{result['index']}`", f"nprobe {params['nprobe']}",
                f"k_factor {params['k_factor']}", f"{result['build_s']:.1f} s")
    assert result["n"] == 1_000_000 and result["dim"] == 512 and data["machine"]["cpus"] == 2


def test_search_build_output_is_consistent():
    from clipforge.search.build import SAMPLE_QUERIES

    text = page("docs/search.md")
    described = sentence("docs/search.md", "Here on a folder of")
    folder = int(re.search(r"a folder of (\d+) generated images", described).group(1))
    first, last = map(int, re.search(r"samples (\d+)–(\d+)", described).groups())
    assert last - first + 1 == folder
    assert_said("docs/search.md", "measured on a sample of", f"at most {SAMPLE_QUERIES} stored images")
    counts = [tuple(map(int, m)) for m in re.findall(
        r"(\d+) image\(s\) embedded, (\d+) already there, (\d+) in the index", text)]
    assert counts[0] == (folder, 0, folder)
    added, _, total = counts[1]
    assert total == folder + added
    for stored in map(int, re.findall(r"on (\d+) stored images, median", text)):
        assert stored == min(SAMPLE_QUERIES, folder)


def test_search_option_table_defaults_are_the_parsers():
    rows = markdown_table(page("docs/search.md"), "| option | default | meaning |")
    actions = subparser(build_parser(), ["index", "build"])._option_string_actions
    assert {re.match(r"`(--[\w-]+)", r[0]).group(1) for r in rows} == {
        a for a in actions if a.startswith("--") and a != "--help"}
    for option, default, _ in rows:
        action = actions[re.match(r"`(--[\w-]+)", option).group(1)]
        if default == "(required)":
            assert action.required, option
        elif default == "off":
            assert action.default is False, option
        elif re.fullmatch(r"[\w.]+", default):
            assert str(action.default) == default, option


def test_eval_option_defaults_are_the_parsers():
    rows = markdown_table(page("docs/evaluation.md"), "| option | meaning |")
    actions = subparser(build_parser(), ["eval", "zeroshot"])._option_string_actions
    checked = 0
    for option, meaning in rows:
        name = re.match(r"`(--[\w-]+)", option).group(1)
        assert name in actions, f"evaluation.md: {name} is not an option of eval zeroshot"
        default = re.search(r"\(([\d.]+|fp32|bf16)\)$", meaning)  # a literal default, last in the cell
        if default:
            assert str(actions[name].default) == default.group(1), name
            checked += 1
    assert checked == 2  # --batch-size, --precision


# ----------------------------------------------------------------------------- pretrained.md


def table_rows(name: str, header: str) -> list[list[str]]:
    """The cells of the rows of the table whose header line starts with ``header``."""
    lines = page(name).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_model_table_is_the_registrys():
    from clipforge.checkpoints.registry import list_pretrained

    entries = {entry.name: entry for entry in list_pretrained()}
    rows = table_rows("docs/pretrained.md", "| model | parameters |")
    assert len(rows) >= 10
    for name, params, download, top1 in rows:
        entry = entries[name.strip("`")]
        assert params == f"{entry.params / 1e6:.0f} M", name
        assert download == f"{entry.download_size / 1e6:,.0f} MB", name
        assert top1 == f"{entry.top1 * 100:.1f} %", name


def test_the_family_table_is_the_registrys():
    from clipforge.checkpoints.registry import REGISTRY
    from clipforge.model.config import get_config

    rows = table_rows("docs/pretrained.md", "| family | example name |")
    assert [row[0] for row in rows] == ["CLIP", "SigLIP", "SigLIP", "SigLIP 2", "Chinese-CLIP"]
    for family, name, params, top1, _ in rows:
        entry = REGISTRY[name.strip("`")]
        assert get_config(entry.architecture).family == family.lower().replace(" 2", "").replace("-", "_"), name
        assert params == f"{entry.params / 1e6:.0f} M", name
        assert top1 == ("—" if entry.top1 is None else f"{entry.top1 * 100:.1f} %"), name
    assert_said("docs/pretrained.md", "above ViT-bigG-14",
                f"{REGISTRY['ViT-bigG-14:laion2b_s39b_b160k'].top1 * 100:.1f} %")
    for length in (get_config("ViT-B-16").text.context_length, get_config("ViT-B-16-SigLIP").text.context_length,
                   get_config("ViT-SO400M-14-SigLIP").text.context_length, get_config("CN-CLIP-ViT-B-16").text.tokens):
        assert_said("docs/pretrained.md", "CLIP reads 77 tokens", str(length))


def test_the_speed_table_is_the_record():
    result = record("bench_model_pick")
    speed = {(r["model"], r["precision"], r["modality"]): r["clipforge_per_s"] for r in result["rows"]}
    rows = table_rows("docs/pretrained.md", "| architecture | images/s")
    assert [row[0] for row in rows] == ["ViT-B-32", "ViT-B-16"]
    for arch, fp32, bf16, text in rows:
        assert (fp32, bf16, text) == (
            f"{speed[arch, 'fp32', 'image']:.1f}", f"{speed[arch, 'bf16', 'image']:.1f}",
            f"{speed[arch, 'fp32', 'text']:.1f}"), arch
    assert_said("docs/pretrained.md", "bench_model_pick.json", result["date"])
    ratio = speed["ViT-B-32", "fp32", "image"] / speed["ViT-B-16", "fp32", "image"]
    assert_said("docs/pretrained.md", "embeds images about", f"{ratio:.1f}×")
    assert result["cpu"]["model"] in sentence("docs/pretrained.md", "bench_model_pick.json")


# ----------------------------------------------------------------------------- benchmarks.md: SigLIP


def test_the_siglip_table_is_the_record():
    result = record("bench_siglip")
    rows = table_rows("docs/benchmarks.md", "| precision | input | batch | clipforge /s | optimized /s")
    assert len(rows) == len(result["rows"]) == 4
    names = {"image": "image", "text": "text"}
    for row, want in zip(rows, result["rows"]):
        optimized = want.get("clipforge_optimized_per_s")
        spread = want["ratio_per_round"]
        assert row == [want["precision"], names[want["modality"]], str(want["batch"]),
                       f"{want['clipforge_per_s']:.2f}", "–" if optimized is None else f"{optimized:.2f}",
                       f"{want['transformers_per_s']:.2f}", f"{want['ratio']:.2f}×",
                       f"{spread['min']:.2f}–{spread['max']:.2f}×"], row
    assert_said("docs/benchmarks.md", "bin/python benchmarks/bench_siglip.py", result["date"])
    fp32, bf16 = result["max_abs_feature_difference"]["fp32"], result["max_abs_feature_difference"]["bf16"]
    def short(x: float) -> str:
        return f"{x:.1e}".replace("e-0", "e-")  # 2.5e-6, as the page writes it

    assert_said("docs/benchmarks.md", "In fp32 the largest differences were", short(fp32["image_clipforge"]),
                short(fp32["text_clipforge"]))
    assert_said("docs/benchmarks.md", "Under bf16 they were", f"{bf16['image_clipforge']:.3f}")
