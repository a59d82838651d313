"""Inference speed of clipforge's SigLIP B/16 side by side with transformers' SiglipModel on the same weights.

    nice -n 10 <venv with transformers>/bin/python benchmarks/bench_siglip.py --threads 2

(about 16 minutes on two busy cores, most of it in the emulated bf16 rows of an AVX2 CPU)

Needs transformers beside clipforge (clipforge is taken from this checkout's ``src``).  Builds a
random-weight ``SiglipModel`` with google/siglip-base-patch16-224's config (seeded), saves it with
``save_pretrained`` and loads that directory with each library as its users do:
``SiglipModel.from_pretrained`` and ``clipforge.load_model``.  Before anything is timed, both must
give the same image and text features (fp32: within 1e-4; the largest differences are recorded,
fp32 and bf16).  Then it prints a table of images/s (``encode_image`` / ``get_image_features``)
and texts/s (``encode_text`` / ``get_text_features``), fp32 and bf16, and writes it to
benchmarks/results/bench_siglip.json.

bf16 is autocast (``torch.autocast("cpu", dtype=torch.bfloat16)``) over fp32 weights for both:
clipforge's ``--precision bf16`` and ``load_for_inference(precision="bf16")`` do this, and
transformers runs under it unchanged.  fp32 rows also time clipforge's opt-in
``CLIP.optimize_for_inference()`` (the packed oneDNN path; its features are checked too).

Images are random 224x224 tensors; captions are 10-20 random ids then end of text, padded to the
full 64-id context as SigLIP's tokenizer pads.  Every call runs under ``torch.inference_mode``.  The
contenders run interleaved (clipforge, transformers, clipforge, ...) after one warm-up call each,
so that other load on a shared CPU hits both alike; each cell reports the median call and the
fastest and slowest, and the ratio clipforge/transformers both of the medians and per round (the
two calls of one round ran back to back).  Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # clipforge from this checkout

from _timing import cpu_record  # benchmarks/_timing.py  # noqa: E402
from clipforge.checkpoints import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_siglip.json"
SEED = 0
# google/siglip-base-patch16-224's config.json (its values are also SiglipConfig's defaults).
TEXT_CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, pad_token_id=1, eos_token_id=1, bos_token_id=None)
VISION_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=16, num_channels=3, hidden_act="gelu_pytorch_tanh",
                     layer_norm_eps=1e-6)
PAD = EOS = 1  # SigLIP's SentencePiece ids: padding and end of text are both </s>
FP32_TOLERANCE = 1e-4


def make_checkpoint(directory: Path) -> None:
    """A seeded random SiglipModel B/16 at 224, every parameter moved off its initial value (zero
    biases, unit LayerNorms would hide a misplaced tensor in the feature check), saved to ``directory``."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(SEED)
    model = SiglipModel(SiglipConfig(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG)).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(directory, safe_serialization=True)


def caption_tokens(batch: int, context_length: int, vocab_size: int, seed: int = SEED) -> torch.Tensor:
    """[ids, eos, pad ...] rows of 10-20 random ids, padded to the full context."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((batch, context_length), PAD, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(10, 21, (1,), generator=g))
        tokens[row, :n] = torch.randint(3, vocab_size, (n,), generator=g)
        tokens[row, n] = EOS
    return tokens


def time_rounds(fns: dict[str, Callable[[], object]], *, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call of each function, called round-robin: ``warmup`` untimed rounds, then ``rounds``."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def spread(seconds: list[float]) -> dict[str, float]:
    return {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds)}


def bench(models: dict[str, torch.nn.Module], images: torch.Tensor, tokens: torch.Tensor, precision: str, *,
          warmup: int, rounds: int) -> tuple[list[dict], dict[str, float]]:
    """The rows of one precision, and the largest feature differences from transformers' under it."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    encoders = {
        "image": {
            "clipforge": lambda m: m.encode_image(images),
            "transformers": lambda m: m.get_image_features(pixel_values=images).pooler_output,
        },
        "text": {
            "clipforge": lambda m: m.encode_text(tokens),
            "transformers": lambda m: m.get_text_features(input_ids=tokens).pooler_output,
        },
    }
    contenders = ["clipforge", "transformers"] + (["clipforge_optimized"] if precision == "fp32" else [])
    rows, differences = [], {}
    for modality, batch in (("image", images.shape[0]), ("text", tokens.shape[0])):
        fns = {}
        for name in contenders:
            encode = encoders[modality]["transformers" if name == "transformers" else "clipforge"]

            def call(encode=encode, model=models[name]) -> torch.Tensor:
                with torch.inference_mode(), autocast:
                    return encode(model)

            fns[name] = call
        reference = fns["transformers"]().float()
        for name in contenders:
            if name == "transformers":
                continue
            error = (fns[name]().float() - reference).abs().max().item()
            differences[f"{modality}_{name}"] = error
            if precision == "fp32" and error > FP32_TOLERANCE:
                raise AssertionError(f"{name} {modality} features differ from transformers' by {error:.2e} in fp32")
        times = time_rounds(fns, warmup=warmup, rounds=rounds)
        pair_ratios = [h / c for c, h in zip(times["clipforge"], times["transformers"], strict=True)]
        row = {
            "precision": precision,
            "modality": modality,
            "batch": batch,
            "rounds": rounds,
            "clipforge_per_s": batch / statistics.median(times["clipforge"]),
            "transformers_per_s": batch / statistics.median(times["transformers"]),
            "ratio": statistics.median(times["transformers"]) / statistics.median(times["clipforge"]),
            "ratio_per_round": spread(pair_ratios),
            "seconds": {name: spread(t) for name, t in times.items()},
        }
        if "clipforge_optimized" in times:
            row["clipforge_optimized_per_s"] = batch / statistics.median(times["clipforge_optimized"])
            row["optimized_ratio"] = (statistics.median(times["transformers"])
                                      / statistics.median(times["clipforge_optimized"]))
        rows.append(row)
        print(format_row(row), flush=True)
    return rows, differences


HEADER = (f"{'prec':>5} {'input':>6} {'batch':>5} {'clipforge/s':>12} {'optimized/s':>12} "
          f"{'transformers/s':>15} {'ratio':>7} {'per round min-max':>18}")


def format_row(r: dict) -> str:
    optimized = f"{r['clipforge_optimized_per_s']:12.2f}" if "clipforge_optimized_per_s" in r else f"{'-':>12}"
    per_round = f"{r['ratio_per_round']['min']:.2f}-{r['ratio_per_round']['max']:.2f}x"
    return (f"{r['precision']:>5} {r['modality']:>6} {r['batch']:5d} {r['clipforge_per_s']:12.2f} {optimized} "
            f"{r['transformers_per_s']:15.2f} {r['ratio']:6.2f}x {per_round:>18}")


def lscpu_model_name() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per fp32 call")
    parser.add_argument("--texts", type=int, default=32, help="captions per fp32 call")
    parser.add_argument("--images-bf16", type=int, default=2, help="images per bf16 call (emulated bf16 is slow)")
    parser.add_argument("--texts-bf16", type=int, default=8, help="captions per bf16 call")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds-fp32", type=int, default=5, help="timed rounds per fp32 cell")
    parser.add_argument("--rounds-bf16", type=int, default=3, help="timed rounds per bf16 cell")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import transformers
        from transformers import SiglipModel
    except ImportError:
        sys.exit(f"bench_siglip.py compares with transformers, which {sys.executable} cannot import; "
                 "run it with a Python that has transformers installed")
    transformers.utils.logging.disable_progress_bar()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp))
        hf = SiglipModel.from_pretrained(tmp).eval()
        clipforge = load_model(tmp)
        optimized = load_model(tmp).optimize_for_inference()
    models = {"clipforge": clipforge, "transformers": hf, "clipforge_optimized": optimized}
    config = clipforge.config
    size = config.vision.image_size
    g = torch.Generator().manual_seed(SEED)
    images = torch.randn(max(args.images, args.images_bf16), 3, size, size, generator=g)
    tokens = caption_tokens(max(args.texts, args.texts_bf16), config.text.context_length, config.text.vocab_size)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, attention {hf.config._attn_implementation}")
    print(HEADER)
    print("-" * len(HEADER))
    rows, differences = [], {}
    for precision in args.precisions:
        n_images, n_texts, rounds = ((args.images, args.texts, args.rounds_fp32) if precision == "fp32"
                                     else (args.images_bf16, args.texts_bf16, args.rounds_bf16))
        cells, diffs = bench(models, images[:n_images], tokens[:n_texts], precision, warmup=args.warmup,
                             rounds=rounds)
        rows += cells
        differences[precision] = diffs
    print(f"\nlargest |clipforge - transformers| of the features: {json.dumps(differences)}")
    result = {
        "what": "SigLIP B/16 at 224 pixels (google/siglip-base-patch16-224's config, random weights): "
                "clipforge's encode_image/encode_text against transformers' SiglipModel "
                "get_image_features/get_text_features on the same weights, interleaved in one run; "
                "per_s = batch / median seconds per call; ratio = transformers' median seconds / clipforge's "
                "(> 1: clipforge faster); ratio_per_round: the same per round of back-to-back calls",
        "date": dt.date.today().isoformat(),
        "command": (f"nice -n {os.nice(0)} " if os.nice(0) else "")
        + "python " + shlex.join(["benchmarks/bench_siglip.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "cpu": {**cpu_record(), "lscpu_model_name": lscpu_model_name()},
        "bf16": "torch.autocast('cpu', dtype=torch.bfloat16) over fp32 weights, for both libraries",
        "transformers_attention": hf.config._attn_implementation,
        "inputs": "random 224x224 images; captions of 10-20 random ids and end of text, padded to the 64-id "
                  "context; the batch of each row under rows[].batch (bf16 rows use a smaller one: emulated "
                  "bf16 is many times slower)",
        "warmup_rounds": args.warmup,
        "max_abs_feature_difference": differences,
        "seconds_total": time.perf_counter() - started,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
