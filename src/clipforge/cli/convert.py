"""``clipforge convert`` and ``clipforge tokenizer train``: checkpoint and vocabulary tools.

    clipforge convert openai.pt ViT-B-32-hf --to hf     # prints the written path
    clipforge convert openai.pt vit-b-32.safetensors --to openclip   # + on stderr, the OpenCLIP call that loads it
    clipforge convert ViT-B-32:openai ViT-B-32-hf --to hf   # released weights by name (--pretrained TAG too)
    clipforge tokenizer train captions.txt tok/ --vocab-size 4096

``--to hf`` writes a directory that transformers' ``AutoModel.from_pretrained`` and
``AutoProcessor.from_pretrained`` load as it is (weights, config, tokenizer files,
``preprocessor_config.json``).  ``--to openclip`` writes a bare state dict (a .safetensors, .pt or
.bin DST), which ``open_clip.create_model_and_transforms(NAME, pretrained=DST)`` loads where NAME
is OpenCLIP's name for the architecture: the preset's name (RN50 ... RN50x64, ViT-B-32, ViT-B-16,
ViT-L-14, ViT-L-14-336, ViT-H-14, ViT-g-14, ViT-bigG-14), with ``-quickgelu`` for QuickGELU
weights such as OpenAI's (ViT-g-14: ``force_quick_gelu=True``); or a directory, which
``open_clip.create_model_and_transforms("local-dir:DST")`` loads whatever the architecture.  The
command prints the call on stderr (`clipforge.checkpoints.export` holds the table).

SRC is any name ``--model`` takes but a preset's (random weights): a checkpoint file or folder,
whose tensors are written bit for bit in their stored dtype; a Hub repository (``hf-hub:ORG/NAME``,
``ORG/NAME``), read as it is with its tokenizer files; or a registry name (``ViT-B-32:openai``,
``--pretrained TAG``), loaded with the entry's activation and pixel statistics, its tensors
written as float32 (exactly the values stored, in any narrower float dtype).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from clipforge.cli._common import CommandError, check_output, non_negative_int, positive_int

__all__ = ["add_parser"]

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".bin")  # --to openclip writes a bare state dict to these


def add_parser(subparsers: Any) -> None:
    """Registers ``convert`` and ``tokenizer train``."""
    convert = subparsers.add_parser(
        "convert", help="rewrite a checkpoint as clipforge, Hugging Face or OpenCLIP files (lossless)",
        epilog="--to hf: transformers' AutoModel.from_pretrained(DST) and AutoProcessor.from_pretrained(DST) load it "
        "(tokenizer files and preprocessor_config.json included). --to openclip with a .safetensors/.pt/.bin DST: "
        "open_clip.create_model_and_transforms(NAME, pretrained=DST), NAME the preset's name (RN50, ..., ViT-B-32, "
        "ViT-L-14-336, ViT-H-14, ViT-g-14, ViT-bigG-14) plus -quickgelu for QuickGELU weights such as OpenAI's "
        "(ViT-g-14: force_quick_gelu=True); other architectures have no name: give a directory DST and load it with "
        "open_clip.create_model_and_transforms('local-dir:DST'). The command prints that call on stderr.",
    )
    convert.add_argument("src", help="a checkpoint (OpenAI .pt, OpenCLIP file or directory, HF directory, clipforge "
                         "directory) or a pretrained name (ViT-B-32:openai, hf-hub:ORG/NAME, ORG/NAME; `clipforge "
                         "models` lists them)")
    convert.add_argument("dst", help="output directory (or a .safetensors/.pt/.bin file for --to openclip); "
                         "a new path or an empty folder, so no checkpoint is overwritten")
    convert.add_argument("--to", required=True, choices=("clipforge", "hf", "openclip"), help="output format")
    convert.add_argument("--pretrained", metavar="TAG",
                         help="released weights for the architecture SRC names (openai, laion2b_s34b_b79k, ...; or a "
                         "weights file); the same as SRC ARCH:TAG")
    from clipforge.model.config import ACTIVATIONS

    convert.add_argument("--act", choices=ACTIVATIONS,
                         help="MLP activation when the source carries no config (default: inferred; gelu_tanh for "
                         "SigLIP weights from Hugging Face, whose towers run the tanh-approximated GELU)")
    convert.add_argument("--tokenizer", metavar="DIR",
                         help="tokenizer folder to write with the model instead of the source's own (default: the "
                         "source's, else OpenAI's for OpenAI's vocabulary)")
    convert.set_defaults(func=_run_convert)

    tokenizer = subparsers.add_parser("tokenizer", help="byte-level BPE vocabularies")
    actions = tokenizer.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train a BPE vocabulary on a caption corpus (one caption per line)")
    train.add_argument("corpus", help="UTF-8 text file, one caption per line")
    train.add_argument("out", help="output directory (tokenizer.json, clipforge_tokenizer.json and Hugging Face's "
                       "tokenizer_config.json, special_tokens_map.json): a new folder or one holding only a "
                       "tokenizer, never a checkpoint's")
    train.add_argument("--vocab-size", type=positive_int, default=4096,
                       help="ids including 512 byte symbols and 2 specials (default: 4096)")
    train.add_argument("--min-frequency", type=non_negative_int, default=2,
                       help="merges seen fewer times are dropped (default: 2)")
    train.add_argument("--context-length", type=positive_int, default=77,
                       help="token positions of the text tower (default: 77)")
    train.set_defaults(func=_run_tokenizer_train)


def _checkpoint_of(src: str, *, pretrained: str | None, act: str | None) -> Any:
    """The `Checkpoint` that SRC (and ``--pretrained``) name, as the module notes say; downloaded if needed."""
    from clipforge.checkpoints import Checkpoint, load_model, read_checkpoint
    from clipforge.checkpoints.download import fetch_repo
    from clipforge.checkpoints.registry import resolve

    where = resolve(src, pretrained)  # an unknown name: one line with the closest known names
    if where.kind == "preset":
        raise CommandError(f"{src}: a preset, whose weights are random; convert a checkpoint or a pretrained name "
                           "(`clipforge models` lists them)")
    if where.kind == "path":
        return read_checkpoint(where.path, act=act)
    if where.kind == "hub":  # the repository's own files, tokenizer included
        return read_checkpoint(fetch_repo(where.repo_id, revision=where.revision, layout=where.layout), act=act)
    # A registry entry or an architecture with a weights file: loaded as `clipforge.load` loads them, so
    # that the entry's activation and pixel statistics are applied (float32 tensors, the values stored).
    model = load_model(src, pretrained=pretrained, act=act)
    return Checkpoint(model.config, model.state_dict(), Path(where.name), "clipforge")


def _run_convert(args: Any) -> int:
    """``clipforge convert SRC DST --to FORMAT``: writes the checkpoint in that format; prints the written
    path (and, for ``--to openclip``, the OpenCLIP call that loads it on stderr)."""
    from clipforge.checkpoints import convert
    from clipforge.checkpoints.export import check_destination, openclip_usage

    dst = Path(args.dst)
    to_file = args.to == "openclip" and dst.suffix in STATE_DICT_SUFFIXES
    check_destination(args.src, dst)  # before reading the source: a mistake costs no time
    check_output(args.dst, option="DST", folder=not to_file)
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise CommandError(f"--tokenizer {args.tokenizer}: " + ("a file, not a folder" if Path(args.tokenizer).exists()
                                                                 else "no such folder"))
    checkpoint = _checkpoint_of(args.src, pretrained=args.pretrained, act=args.act)
    out = convert(checkpoint, dst, to=args.to, tokenizer=args.tokenizer)
    print(out)
    if args.to == "openclip":
        print(f"note: {openclip_usage(checkpoint.config, out)}", file=sys.stderr)
    return 0


def _check_corpus(path: str) -> None:
    """A CommandError for an empty corpus, or naming the line and byte that is not UTF-8, as
    `clipforge.data.text.read_text` names them; read a line at a time, as the training reads it,
    so that a large corpus is never held whole."""
    offset, captions = 0, 0
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            try:
                captions += bool(line.decode("utf-8").strip())
            except UnicodeDecodeError as err:
                raise CommandError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {offset + err.start})"
                                   ) from None
            offset += len(line)
    if not captions:
        raise CommandError(f"{path}: empty corpus (no captions; one per line)")


def _run_tokenizer_train(args: Any) -> int:
    """``clipforge tokenizer train CORPUS OUT --vocab-size N``: trains and saves the vocabulary; prints its
    size and folder (and says on stderr when the corpus holds too few pairs to reach N)."""
    from clipforge.tokenizer import CONFIG_FILE, HF_FILES, train_tokenizer_cli

    if Path(args.corpus).is_dir():
        raise CommandError(f"{args.corpus}: a folder, not a text file")
    _check_corpus(args.corpus)
    check_output(args.out, option="OUT", folder=True)
    out = Path(args.out)
    own = (*HF_FILES, CONFIG_FILE)  # what `Tokenizer.save` writes; retraining may replace them
    others = sorted(p.name for p in out.iterdir() if p.name not in own) if out.is_dir() else []
    if others:  # a checkpoint's folder: a new vocabulary there would no longer fit its weights
        raise CommandError(f"{args.out}: holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, not "
                           "only a tokenizer; give a new folder")
    try:
        train_tokenizer_cli(args.corpus, args.out, args.vocab_size, min_frequency=args.min_frequency,
                            context_length=args.context_length)
    except ValueError as err:  # the tokenizer's checks of the sizes given (vocabulary, context length)
        raise CommandError(str(err)) from None
    return 0
