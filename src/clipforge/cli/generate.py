"""``clipforge generate``: CLIP-guided synthesis of an image for a prompt, scored by a second model.

    clipforge generate --model runs/a/checkpoints/step-0000600 "a red circle" --out red.png \\
        --judge runs/b/checkpoints/step-0000600 --seed 0 --frames frames/
    clipforge generate --model ViT-B-32 --pretrained openai "a red circle" --out red.png \\
        --judge ViT-B-16:laion2b_s34b_b88k

An image optimised against one model can fool that model (an adversarial image) without
showing the prompt; ``--judge`` scores the result under a second, independently trained
model, and both scores are printed and written by ``--json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipforge.cli._common import (
    MODEL_HELP,
    CommandError,
    check_output,
    device_option,
    fraction,
    load_model,
    load_model_for_command,
    model_option,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    quiet_option,
    read_text_file,
    table,
    tokenizer_option,
    unit_fraction,
    write_json,
)

__all__ = ["add_parser", "run_generate"]


def add_parser(subparsers: Any) -> None:
    """Registers ``generate``."""
    from clipforge.generate import GenerateConfig

    default = GenerateConfig()
    parser = subparsers.add_parser("generate", help="make an image for a prompt by optimising it against CLIP")
    parser.add_argument("prompt", help="the text the image should show")
    model_option(parser, help=f"the model to optimise against: {MODEL_HELP}", pretrained=True)
    parser.add_argument("--out", required=True, metavar="FILE", help="the image to write (PNG)")
    model_option(parser, flag="--judge", required=False, metavar="MODEL",
                 help="a second, independently trained model that scores the result (any --model name; "
                      "ARCH:TAG for released weights)")
    tokenizer_option(parser)
    tokenizer_option(parser, flag="--judge-tokenizer", help="the judge's tokenizer folder, if it has none")
    parser.add_argument("--steps", type=positive_int, default=default.steps,
                        help=f"Adam steps (default: {default.steps})")
    parser.add_argument("--lr", type=positive_float, default=default.lr, help=f"learning rate (default: {default.lr})")
    parser.add_argument("--size", type=non_negative_int, default=default.size,
                        help="image side in pixels (default: the model's input size)")
    parser.add_argument("--cutouts", type=positive_int, default=default.cutouts,
                        help=f"random crops per step (default: {default.cutouts})")
    parser.add_argument("--cut-scale", type=fraction, nargs=2, metavar=("LOW", "HIGH"), default=default.cut_scale,
                        help="crop side range, fractions of the image side (default: %(default)s)")
    parser.add_argument("--flip", action="store_true", help="random horizontal flips of the crops "
                        "(off by default: they swap left and right, which prompts may name)")
    parser.add_argument("--noise", type=non_negative_float, default=default.noise,
                        help=f"std of the pixel noise added to each crop (default: {default.noise})")
    parser.add_argument("--jitter", type=non_negative_float, default=default.jitter,
                        help="brightness/contrast jitter of the crops (default: 0; it moves colours)")
    parser.add_argument("--tv", type=non_negative_float, default=default.tv, help="total-variation weight (default: 0)")
    parser.add_argument("--decay", type=non_negative_float, default=default.decay,
                        help="the spectrum is scaled by 1/frequency^DECAY; higher is smoother "
                             f"(default: {default.decay})")
    parser.add_argument("--seed", type=non_negative_int, default=default.seed, help="random seed (default: 0)")
    parser.add_argument("--best-of", type=positive_int, default=default.best_of, metavar="N",
                        help="optimise from N starts (seeds SEED, SEED+1, ...) and keep the image the model "
                             "scores highest (default: 1)")
    parser.add_argument("--negative", action="append", default=[], metavar="TEXT",
                        help="a text the image should not match; repeat for more")
    parser.add_argument("--negatives", metavar="FILE",
                        help="texts the image should not match, one per line (a line equal to the prompt is left out)")
    parser.add_argument("--negative-weight", type=non_negative_float, default=default.negative_weight, metavar="W",
                        help="weight of the prompt's cross-entropy among the prompt and the negatives "
                             f"(default: {default.negative_weight})")
    parser.add_argument("--init", metavar="IMAGE", help="start from this image")
    parser.add_argument("--strength", type=unit_fraction, default=None,
                        help="with --init: fraction of the steps run, 0 keeps the image (default: 0.5)")
    parser.add_argument("--frames", metavar="DIR", help="write frame-NNNNN.png files here as the image forms")
    parser.add_argument("--frame-every", type=positive_int, default=default.frame_every,
                        help=f"steps between frames (default: {default.frame_every})")
    parser.add_argument("--json", metavar="FILE", help="write the settings and both scores as JSON")
    device_option(parser)
    quiet_option(parser)
    # The image is optimised in fp32: no --precision.
    parser.set_defaults(func=run_generate, precision="fp32")


def _read_negatives(path: str) -> list[str]:
    """The non-blank lines of a negatives file, stripped."""
    texts = [line.strip() for line in read_text_file(path, option="--negatives").splitlines() if line.strip()]
    if not texts:
        raise CommandError(f"--negatives {path}: the file has no texts (one per line)")
    return texts


def run_generate(args: argparse.Namespace) -> int:
    """``clipforge generate --model M PROMPT --out FILE [--judge M2]``: writes the image and prints
    its CLIP-S under the model and under the judge (and a SigLIP scorer's probability that the
    prompt fits, sigmoid(scale·cos + bias))."""
    from clipforge.data.images import read_rgb
    from clipforge.generate import GenerateConfig, generate
    from clipforge.score import clip_score

    if not args.prompt.strip():
        raise CommandError("the prompt is empty")
    if args.strength is not None and args.init is None:
        raise CommandError("--strength needs --init IMAGE")
    if args.judge_tokenizer is not None and args.judge is None:
        raise CommandError("--judge-tokenizer needs --judge MODEL")
    if not args.out.lower().endswith(".png"):
        raise CommandError(f"--out {args.out}: write a .png file (lossless, so the scores are the file's)")
    if args.init and Path(args.init).resolve() == Path(args.out).resolve():
        raise CommandError(f"--out {args.out} is the --init image: give another file, so the image is kept")
    check_output(args.out, option="--out")
    check_output(args.json, option="--json")
    check_output(args.frames, option="--frames", folder=True)
    negatives = list(args.negative)
    if args.negatives:
        negatives += _read_negatives(args.negatives)
    try:
        config = GenerateConfig(
            steps=args.steps, lr=args.lr, size=args.size, cutouts=args.cutouts, cut_scale=tuple(args.cut_scale),
            flip=args.flip, noise=args.noise, jitter=args.jitter, tv=args.tv, decay=args.decay, seed=args.seed,
            strength=0.5 if args.strength is None else args.strength, frame_every=args.frame_every,
            best_of=args.best_of, negatives=tuple(negatives), negative_weight=args.negative_weight,
        )
    except ValueError as err:
        raise CommandError(str(err)) from err
    init = None
    if args.init:
        try:
            init = read_rgb(args.init)
        except OSError as err:  # missing, a folder, or not an image
            reason = err.strerror if isinstance(err.strerror, str) else str(err)
            raise CommandError(f"--init {args.init}: cannot read the image ({reason})") from None

    model, preprocess, tokenizer, setup = load_model_for_command(args)
    judge = load_model(args.judge, tokenizer=args.judge_tokenizer, device=args.device) if args.judge else None
    result = generate(model, tokenizer, args.prompt, config=config, init=init, frames=args.frames,
                      progress=not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)

    # Both models score the written 8-bit image through their own preprocessing.
    scored = read_rgb(out)
    scorers = {"model": (model, preprocess, tokenizer, setup), **({"judge": judge} if judge else {})}
    scores: dict[str, Any] = {}
    for role, (scorer, scorer_preprocess, scorer_tokenizer, scorer_setup) in scorers.items():
        value = clip_score(scorer, [scorer_preprocess(scored)], [args.prompt], tokenizer=scorer_tokenizer,
                           progress=False)
        scores[role] = {"name": scorer_setup["model"], "pretrained": scorer_setup["pretrained"],
                        "clip_score": value.mean, "cosine": float(value.cosine[0])}
        if value.probability is not None:  # a SigLIP scorer: sigmoid(scale·cos + bias), its P(the prompt fits)
            scores[role]["probability"] = float(value.probability[0])

    notes = [f"{result.steps} steps, {config.cutouts} cutouts, seed {config.seed}"]
    if config.negatives:
        notes.append(f"{len(set(config.negatives) - {args.prompt})} negatives, weight {config.negative_weight}")
    if config.best_of > 1:
        notes.append(f"best of {config.best_of}: seed {result.seed} kept, model cosines "
                     + ", ".join(f"{c:.4f}" for c in result.cosines))
    print(f"generate {args.prompt!r}  " + "; ".join(notes))
    print(f"wrote {out} ({result.image.width}×{result.image.height})"
          + (f"; {len(result.frames)} frames in {args.frames}" if args.frames else ""))
    if result.losses:
        print(f"loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}")
    sigmoid = any("probability" in s for s in scores.values())
    rows = [[role, s["pretrained"], f"{s['cosine']:.4f}", f"{s['clip_score']:.4f}",
             *([f"{s['probability']:.4f}" if "probability" in s else "n/a"] if sigmoid else [])]
            for role, s in scores.items()]
    print(table(["scored by", "model", "cos", "CLIP-S", *(["P(match)"] if sigmoid else [])], rows))
    if args.json:
        write_json(args.json, {"prompt": args.prompt, "out": str(out), "init": args.init, "config": config.to_dict(),
                               "steps_run": result.steps, "seed_kept": result.seed,
                               "final_cosine_by_start": [round(c, 6) for c in result.cosines],
                               "losses": [round(x, 6) for x in result.losses],
                               "frames": [str(p) for p in result.frames], "score": scores["model"],
                               "judge_score": scores.get("judge")})
    return 0
