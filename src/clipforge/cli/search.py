"""``clipforge index build|add``, ``clipforge search`` and ``clipforge serve``: image search.

    clipforge index build --model CKPT --data folder:photos/ --out photos.index
    clipforge index build --model ViT-B-32:openai --data folder:photos/ --out photos.index   # released weights
    clipforge index add photos.index --data imagefolder:more/
    clipforge search photos.index "a red star" -k 10 [--json]
    clipforge search photos.index --image query.jpg
    clipforge serve photos.index [--port 8000]

``index build`` prints the number of images embedded and skipped, the faiss index chosen and
its recall@10 against exact search; ``search`` prints a table of rank, score and path (or JSON).
The index records its model (a checkpoint's path, or a pretrained name with ``--pretrained``'s
tag folded in), and ``index add``, ``search`` and ``serve`` reload it from there.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from clipforge.cli._common import (
    CommandError,
    batch_size_option,
    check_output,
    device_option,
    fraction,
    model_option,
    port_number,
    positive_float,
    positive_int,
    precision_option,
    quiet_option,
    size_in_bytes,
    tokenizer_option,
    warn,
    workers_option,
)

__all__ = ["add_parser", "run_add", "run_build", "run_search", "run_serve"]

SKIPPED_SHOWN = 10
BUILD_MODEL_HELP = ("a checkpoint file or folder, or a pretrained name (ViT-B-32:openai, hf-hub:ORG/NAME, ORG/NAME; "
                    "`clipforge models` lists them); not a random preset")
INDEX_MODEL_HELP = "the index's model, checked against it (default: the one recorded)"


def add_parser(subparsers: Any) -> None:
    """Registers ``index`` (with ``build`` and ``add``), ``search`` and ``serve``."""
    index = subparsers.add_parser("index", help="embed a collection of images and index it for search")
    actions = index.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="embed every image of a data source and build its faiss index")
    model_option(build, help=BUILD_MODEL_HELP, pretrained=True)
    build.add_argument("--data", required=True,
                       help="imagefolder:DIR, csv:FILE, jsonl:FILE, pairs:DIR, or any other data URI")
    build.add_argument("--out", required=True, metavar="INDEX_DIR",
                       help="index directory; an interrupted build there is continued")
    _embed_options(build)
    precision_option(build)
    build.add_argument("--memory-budget", type=size_in_bytes, default="4G",
                       help="memory the faiss index may use; it decides the index type (default: 4G)")
    build.add_argument("--index-type", choices=("auto", "flat", "ivfpq", "hnsw"), default="auto",
                       help="auto: exact for small sets, IVF-PQ with re-ranking for large ones (default: auto)")
    build.add_argument("--target-recall", type=fraction, default=0.95,
                       help="recall@10 the search setting is tuned to reach (default: 0.95)")
    build.set_defaults(func=run_build)

    add = actions.add_parser("add", help="add the images of a data source that are not in the index yet")
    add.add_argument("index_dir", metavar="INDEX_DIR")
    add.add_argument("--data", required=True, help="a data URI, as for index build")
    model_option(add, required=False, help=INDEX_MODEL_HELP, pretrained=True)
    _embed_options(add)
    add.add_argument("--reindex", action="store_true",
                     help="rebuild the faiss index from all embeddings, choosing its type for the new size")
    add.set_defaults(func=run_add)

    search = subparsers.add_parser("search", help="search an index by text or by image")
    search.add_argument("index_dir", metavar="INDEX_DIR")
    search.add_argument("query", nargs="?", help="the text to search for")
    search.add_argument("--image", metavar="FILE", help="search by this image instead of a text")
    search.add_argument("-k", type=positive_int, default=10, help="results (default: 10)")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    model_option(search, required=False, help=INDEX_MODEL_HELP, pretrained=True)
    device_option(search)
    search.set_defaults(func=run_search)

    serve = subparsers.add_parser("serve", help="a web page and JSON API to search an index")
    serve.add_argument("index_dir", metavar="INDEX_DIR")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=port_number, default=8000, help="port (default: 8000)")
    serve.add_argument("--max-upload-mb", type=positive_float, default=10.0, help="largest query image (default: 10)")
    model_option(serve, required=False, help=INDEX_MODEL_HELP, pretrained=True)
    device_option(serve)
    serve.add_argument("--threads", type=positive_int, default=1,
                       help="PyTorch threads per query (default: 1; concurrent requests run in parallel instead)")
    serve.set_defaults(func=run_serve)


def _embed_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``index build`` and ``index add`` that say how the images are embedded."""
    tokenizer_option(parser)
    batch_size_option(parser, default=64, what="images")
    workers_option(parser, most=2)
    parser.add_argument("--chunk-size", type=positive_int, default=10_000,
                        help="embeddings per file; an interruption loses at most one (default: 10000)")
    device_option(parser)
    quiet_option(parser)


def _check_pretrained(args: argparse.Namespace) -> None:
    """``--pretrained`` names weights for the architecture ``--model`` names: alone it means nothing
    (the index's own model is recorded whole)."""
    if args.pretrained is not None and args.model is None:
        raise CommandError(f"--pretrained {args.pretrained} needs --model, the architecture it is for (without "
                           "either, the index's own model is used)")


def _guard(call: Any) -> Any:
    """Runs ``call()``, turning the search package's errors about the user's input into CommandError."""
    from clipforge.search.store import IndexDirError

    try:
        return call()
    except (IndexDirError, ImportError) as err:
        raise CommandError(str(err)) from err


def _report(report: Any, what: str) -> None:
    from clipforge.data.images import Skipped, describe_skipped

    print(f"{what} {report.directory}: {report.embedded} image(s) embedded, {report.already} already there, "
          f"{report.total} in the index")
    if report.skipped:
        print(describe_skipped([Skipped(s["path"], s["reason"]) for s in report.skipped]))
        for row in report.skipped[:SKIPPED_SHOWN]:
            print(f"  skipped {row['path']}: {row['reason']}")
        more = len(report.skipped) - SKIPPED_SHOWN
        print(f"  ... and {more} more; all are listed in {report.directory / 'skipped.jsonl'}" if more > 0
              else f"  (listed in {report.directory / 'skipped.jsonl'})")
    info = report.index
    params = " ".join(f"{k}={v:g}" for k, v in info.get("params", {}).items()) or "exact"
    print(f"faiss index {info['spec']['factory']} ({params}): recall@10 {info['recall_at_10']:.3f} against exact "
          f"search on {info['recall_queries']} stored images, median query {info['median_query_ms']:.2f} ms")
    if info["recall_at_10"] < info.get("target_recall", 0):
        print(f"note: no search setting reached the target recall@10 {info['target_recall']}; the best is used")
    if info.get("suggested_kind") and info["suggested_kind"] != info["spec"]["kind"]:
        print(f"note: at {report.total} images the rule picks a {info['suggested_kind']} index; "
              f"clipforge index add --reindex rebuilds it")
    print(f"time: embedding {report.seconds['embed']:.1f}s, indexing {report.seconds['index']:.1f}s")


def run_build(args: argparse.Namespace) -> int:
    """``clipforge index build --model M --data URI --out DIR``: embeds and indexes the images; prints
    how many were embedded and skipped, the faiss index chosen, its recall@10 and the time taken."""
    from clipforge.search.build import build_index

    check_output(args.out, option="--out", folder=True)

    def call() -> Any:
        return build_index(args.data, args.out, model=args.model, pretrained=args.pretrained,
                           tokenizer=args.tokenizer, device=args.device, precision=args.precision,
                           batch_size=args.batch_size, workers=args.workers, chunk_size=args.chunk_size,
                           memory_budget=args.memory_budget, kind=args.index_type,
                           target_recall=args.target_recall, progress=not args.quiet)

    _report(_guard(call), "built")
    return 0


def run_add(args: argparse.Namespace) -> int:
    """``clipforge index add DIR --data URI``: embeds the images not in the index yet and adds them;
    prints how many were embedded, already there and skipped, and the index's size and recall@10."""
    from clipforge.search.build import add_to_index

    _check_pretrained(args)

    def call() -> Any:
        return add_to_index(args.index_dir, args.data, model=args.model, pretrained=args.pretrained,
                            tokenizer=args.tokenizer, device=args.device, batch_size=args.batch_size,
                            workers=args.workers, chunk_size=args.chunk_size, reindex=args.reindex,
                            progress=not args.quiet)

    _report(_guard(call), "added to")
    return 0


def run_search(args: argparse.Namespace) -> int:
    """``clipforge search DIR "text" | --image FILE [-k K] [--json]``: prints the ranked results."""
    from clipforge.search.index import Index

    if (args.query is None) == (args.image is None):
        raise CommandError("give either a query text or --image FILE")
    if args.query is not None and not args.query.strip():
        raise CommandError("the query text is empty")
    _check_pretrained(args)
    index = _guard(lambda: Index.load(args.index_dir, model=args.model, pretrained=args.pretrained,
                                      device=args.device))
    try:
        hits = index.search_text(args.query, args.k) if args.image is None else index.search_image(args.image, args.k)
    except ValueError as err:
        raise CommandError(str(err)) from err
    except OSError as err:  # the query image: missing or not an image
        raise CommandError(f"{args.image}: cannot read the query image: {err}") from err
    query = {"text": args.query} if args.image is None else {"image": args.image}
    if args.json:
        print(json.dumps({"query": query, "k": args.k, "results": [h.to_dict() for h in hits]}, ensure_ascii=False))
        return 0
    for rank, hit in enumerate(hits, 1):
        label = hit.path or hit.key
        caption = f"  ({hit.caption})" if hit.caption else ""
        print(f"{rank:>4}  {hit.score:7.4f}  {label}{caption}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """``clipforge serve DIR [--host H] [--port P] [--model M]``: prints the address, then serves the search page
    and its JSON API until interrupted (with a warning on stderr for an address other machines reach)."""
    from clipforge.search.index import Index

    _check_pretrained(args)
    try:
        import uvicorn

        from clipforge.search.server import create_app
    except ImportError as err:
        raise CommandError(f"clipforge serve needs the search extra: pip install 'clipforge[search]' ({err})") from err
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        warn("serve", f"serving on {args.host}: anyone who can reach this address can search the index and "
             "see its images")
    import torch

    # Requests are served by a thread pool; each query's forward pass on several intra-op
    # threads as well would put more threads than cores to work, waiting on each other.
    torch.set_num_threads(args.threads)
    index = _guard(lambda: Index.load(args.index_dir, model=args.model, pretrained=args.pretrained,
                                      device=args.device))
    app = create_app(index, max_upload_bytes=int(args.max_upload_mb * (1 << 20)))
    print(f"serving {args.index_dir} ({len(index)} images) on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
