"""``clipforge convert`` and ``clipforge tokenizer train``: checkpoint and vocabulary tools.

    clipforge convert openai.pt ViT-B-32-hf --to hf     # prints the written path
    clipforge tokenizer train captions.txt tok/ --vocab-size 4096
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.cli._common import CommandError, check_output, non_negative_int, positive_int

__all__ = ["add_parser"]

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".bin")  # --to openclip writes a bare state dict to these


def add_parser(subparsers: Any) -> None:
    """Registers ``convert`` and ``tokenizer train``."""
    convert = subparsers.add_parser(
        "convert", help="rewrite a checkpoint as clipforge, Hugging Face or OpenCLIP files (lossless)"
    )
    convert.add_argument("src", help="a checkpoint: OpenAI .pt, OpenCLIP file or directory, HF directory, "
                         "clipforge directory")
    convert.add_argument("dst", help="output directory (or a .safetensors/.pt/.bin file for --to openclip); "
                         "a new path or an empty folder, so no checkpoint is overwritten")
    convert.add_argument("--to", required=True, choices=("clipforge", "hf", "openclip"), help="output format")
    convert.add_argument("--act", choices=("gelu", "quick_gelu"),
                         help="MLP activation when the source carries no config (default: inferred)")
    convert.set_defaults(func=_run_convert)

    tokenizer = subparsers.add_parser("tokenizer", help="byte-level BPE vocabularies")
    actions = tokenizer.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train a BPE vocabulary on a caption corpus (one caption per line)")
    train.add_argument("corpus", help="UTF-8 text file, one caption per line")
    train.add_argument("out", help="output directory (tokenizer.json and clipforge_tokenizer.json): a new folder "
                       "or one holding only a tokenizer, never a checkpoint's")
    train.add_argument("--vocab-size", type=positive_int, default=4096,
                       help="ids including 512 byte symbols and 2 specials (default: 4096)")
    train.add_argument("--min-frequency", type=non_negative_int, default=2,
                       help="merges seen fewer times are dropped (default: 2)")
    train.add_argument("--context-length", type=positive_int, default=77,
                       help="token positions of the text tower (default: 77)")
    train.set_defaults(func=_run_tokenizer_train)


def _run_convert(args: Any) -> int:
    """``clipforge convert SRC DST --to FORMAT``: writes the checkpoint in that format; prints the written path."""
    from clipforge.checkpoints import convert

    dst = Path(args.dst)
    to_file = args.to == "openclip" and dst.suffix in STATE_DICT_SUFFIXES
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        same = Path(args.src).exists() and dst.resolve() == Path(args.src).resolve()
        raise CommandError(f"{args.dst}: " + ("the source itself" if same else "already exists") +
                           "; give a new path (or an empty folder): convert never overwrites a checkpoint")
    check_output(args.dst, option="DST", folder=not to_file)
    out = convert(args.src, dst, to=args.to, act=args.act)
    print(out)
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
    from clipforge.tokenizer import CONFIG_FILE, train_tokenizer_cli

    if Path(args.corpus).is_dir():
        raise CommandError(f"{args.corpus}: a folder, not a text file")
    _check_corpus(args.corpus)
    check_output(args.out, option="OUT", folder=True)
    out = Path(args.out)
    own = ("tokenizer.json", CONFIG_FILE)  # what `Tokenizer.save` writes; retraining may replace them
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
