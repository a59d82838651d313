"""``clipforge convert`` and ``clipforge tokenizer train``: checkpoint and vocabulary tools.

    clipforge convert openai.pt ViT-B-32-hf --to hf     # prints the written path
    clipforge tokenizer train captions.txt tok/ --vocab-size 4096
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> None:
    """Registers ``convert`` and ``tokenizer train``."""
    convert = subparsers.add_parser(
        "convert", help="rewrite a checkpoint as clipforge, Hugging Face or OpenCLIP files (lossless)"
    )
    convert.add_argument("src", help="a checkpoint: OpenAI .pt, OpenCLIP file or directory, HF directory, "
                         "clipforge directory")
    convert.add_argument("dst", help="output directory (or a .safetensors/.pt/.bin file for --to openclip)")
    convert.add_argument("--to", required=True, choices=("clipforge", "hf", "openclip"), help="output format")
    convert.add_argument("--act", choices=("gelu", "quick_gelu"),
                         help="MLP activation when the source carries no config (default: inferred)")
    convert.set_defaults(func=_run_convert)

    tokenizer = subparsers.add_parser("tokenizer", help="byte-level BPE vocabularies")
    actions = tokenizer.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train a BPE vocabulary on a caption corpus (one caption per line)")
    train.add_argument("corpus", help="UTF-8 text file, one caption per line")
    train.add_argument("out", help="output directory (tokenizer.json and clipforge_tokenizer.json)")
    train.add_argument("--vocab-size", type=int, default=4096, help="ids including 512 byte symbols and 2 specials")
    train.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are dropped")
    train.add_argument("--context-length", type=int, default=77, help="token positions of the text tower")
    train.set_defaults(func=_run_tokenizer_train)


def _run_convert(args: Any) -> int:
    """``clipforge convert SRC DST --to FORMAT``: writes the checkpoint in that format; prints the written path."""
    from clipforge.checkpoints import convert

    out = convert(args.src, args.dst, to=args.to, act=args.act)
    print(out)
    return 0


def _run_tokenizer_train(args: Any) -> int:
    """``clipforge tokenizer train CORPUS OUT --vocab-size N``: trains and saves the vocabulary; prints its
    size and folder (and says on stderr when the corpus holds too few pairs to reach N)."""
    from clipforge.tokenizer import train_tokenizer_cli

    train_tokenizer_cli(
        args.corpus, args.out, args.vocab_size, min_frequency=args.min_frequency, context_length=args.context_length
    )
    return 0
