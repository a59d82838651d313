"""Image search: the index-type rule, exact top-k and recall against naive references, tuning
on clustered vectors, the index directory (build, resume after an interruption, add, model
checks, unreadable images), search by text and by image, and the CLI.

The end-to-end tests use a micro model trained on coloured shapes in `_search_helpers` (about
15 s, once per session): colour queries must put images of that colour first; shape is not
tested (the micro model does not learn it).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from _search_helpers import collection, write_pairs
from clipforge.cli import main
from clipforge.data.shapes import COLOURS, ShapesDataset
from clipforge.search import ann
from clipforge.search._items import Item, items_of
from clipforge.search.build import add_to_index, build_index, load_search_model, parse_size
from clipforge.search.index import Index
from clipforge.search.store import IndexDirError, Store

pytest.importorskip("faiss")


def clustered(n: int, dim: int, *, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------
# The faiss layer
# --------------------------------------------------------------------------------------


def test_index_type_follows_size_and_budget():
    big = 1 << 40
    assert ann.choose_index(100, 512, memory_budget=big).factory == "Flat"
    assert ann.choose_index(ann.FLAT_MAX, 512, memory_budget=big).kind == "flat"
    spec = ann.choose_index(1_000_000, 512, memory_budget=big)
    assert (spec.kind, spec.nlist, spec.pq_m, spec.refine) == ("ivfpq", 1024, 64, "Flat")
    assert spec.factory == "IVF1024,PQ64x4fs,RFlat" and spec.bytes_per_vector == 512 * 4 + 32 + 8
    # A budget too small for the float32 vectors re-ranks on 8-bit codes, then not at all.
    assert ann.choose_index(1_000_000, 512, memory_budget=1 << 30).refine == "SQ8"
    assert ann.choose_index(1_000_000, 512, memory_budget=100 << 20).factory == "IVF1024,PQ64x4fs"
    # A small set over the budget is not flat; nlist keeps 39 training points per list.
    assert ann.choose_index(5_000, 512, memory_budget=1 << 20).kind == "ivfpq"
    assert ann.choose_index(1_000, 96, memory_budget=big, kind="ivfpq").nlist == 16
    assert ann.choose_index(1_000, 100, memory_budget=big, kind="ivfpq").pq_m == 10  # largest divisor ≤ d/8
    assert ann.choose_index(10, 8, memory_budget=big, kind="hnsw").factory == "HNSW32,Flat"
    with pytest.raises(ValueError, match="kind must be one of"):
        ann.choose_index(10, 8, memory_budget=big, kind="lsh")
    with pytest.raises(ValueError, match="at least 624 vectors"):
        ann.choose_index(100, 8, memory_budget=big, kind="ivfpq")


@pytest.mark.parametrize("n,block", [(1, 4), (97, 10), (97, 97), (50, 1000)])
def test_exact_topk_matches_a_full_sort(n, block):
    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    got = ann.exact_topk(vectors, queries, 10, block=block)
    expected = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, : min(10, n)]
    np.testing.assert_array_equal(got, expected)


def test_the_recall_margin_is_two_standard_errors():
    recalls = np.array([1.0, 0.9, 0.8, 1.0])
    assert ann.recall_lower_bound(recalls) == pytest.approx(recalls.mean() - 2 * recalls.std(ddof=1) / 2)
    assert ann.recall_lower_bound(np.ones(50)) == 1.0 and ann.recall_lower_bound(np.array([0.7])) == 0.7


def test_recall_counts_the_overlap():
    truth = np.arange(20).reshape(2, 10)
    assert ann.recall_at_k(truth, truth) == 1.0
    shifted = truth.copy()
    shifted[0, :3] = [100, 101, 102]  # three misses in the first query, order ignored
    assert ann.recall_at_k(shifted[:, ::-1], truth) == pytest.approx((7 + 10) / 20)


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_tuning_reaches_the_target_recall(kind):
    vectors = clustered(3_000, 32)
    built = ann.build_and_tune(vectors, memory_budget=1 << 30, kind=kind, target_recall=0.95, n_queries=100)
    assert built.spec.kind == kind
    chosen = next(row for row in built.tuned.tried if row["params"] == built.tuned.params)
    assert built.tuned.recall_at_10 >= chosen["recall_lower_bound"] >= 0.95
    assert all(row["recall_lower_bound"] < 0.95 or row["median_ms"] >= built.tuned.median_ms
               for row in built.tuned.tried)  # the chosen setting is the fastest that reaches it
    # The index is left at the chosen setting: searching stored vectors for their 10 nearest
    # (the k it is tuned for) finds each first.
    scores, ids = ann.search(built.index, vectors[:20], 10)
    np.testing.assert_array_equal(ids[:, 0], np.arange(20))
    assert scores.shape == (20, 10)


def test_parse_size():
    assert parse_size("4G") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    assert parse_size("1.5GB") == int(1.5 * (1 << 30))
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


# --------------------------------------------------------------------------------------
# Items of any data source
# --------------------------------------------------------------------------------------


def test_items_of_generated_and_streamed_sources():
    shapes = ShapesDataset(split="seen", size=32, n=3)
    items = items_of(shapes, "shapes://?n=3")
    assert [i.key for i in items] == ["shapes://?n=3#0", "shapes://?n=3#1", "shapes://?n=3#2"]
    assert items[1].path is None and items[1].caption == shapes.caption(1)
    assert items[1].image().size == (32, 32)

    class Stream:  # iterable only, as a stream of shards would be
        def __iter__(self):
            yield {"image": shapes[0][0], "caption": "first", "key": "shard-0/a"}
            yield (shapes[1][0], "second")

    streamed = list(items_of(Stream(), "stream:x"))
    assert [(i.key, i.caption) for i in streamed] == [("shard-0/a", "first"), ("stream:x#1", "second")]
    assert streamed[1].image().mode == "RGB"

    class Record:  # an undecoded shard sample
        def __init__(self, key, error=None):
            self.name, self.error = f"/d/0.tar#{key}", error

        def caption(self):
            return f"caption {self.name}"

        def decode(self):
            if self.error:
                raise ValueError(self.error)
            return shapes[0][0], self.caption()

    class Shards:
        streaming = True

        def samples(self):
            yield Record("a")
            yield Record("", error="shard /d/0.tar: truncated")

    records = list(items_of(Shards(), "shards:/d/0.tar"))
    assert [(i.key, i.caption) for i in records] == [("/d/0.tar#a", "caption /d/0.tar#a"), ("/d/0.tar#", None)]
    assert records[0].image().size == (32, 32)
    with pytest.raises(ValueError, match="truncated"):
        records[1].image()

    class Custom:  # a source that says for itself how it is indexed
        def index_items(self):
            return [Item("k", None, "c", lambda: shapes[2][0])]

    assert items_of(Custom(), "custom:")[0].key == "k"
    with pytest.raises(TypeError, match="cannot be indexed"):
        items_of(object(), "nothing:")


# --------------------------------------------------------------------------------------
# Building, searching, resuming, adding
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The shared collection with two unreadable files added, indexed once."""
    c = collection(tmp_path_factory)
    root = tmp_path_factory.mktemp("built")
    images = root / "images"
    shutil.copytree(c.images, images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "broken.txt").write_text("a broken file")
    (images / "gone.png").symlink_to(root / "nowhere.png")
    (images / "gone.txt").write_text("a missing file")
    report = build_index(f"pairs:{images}", root / "index", model=c.model, progress=False, chunk_size=256,
                         batch_size=100)
    return {"c": c, "root": root, "images": images, "report": report, "index": Index.load(root / "index")}


def test_build_embeds_lists_skipped_and_records_the_model(built):
    report, c = built["report"], built["c"]
    assert report.embedded == report.total == len(c.colours) and report.already == 0
    assert sorted(s["path"].rsplit("/", 1)[1] for s in report.skipped) == ["broken.png", "gone.png"]
    assert {s["reason"] for s in report.skipped} >= {"file not found"}
    store = Store.open(built["root"] / "index")
    assert [ch["rows"] for ch in store.manifest["chunks"]] == [256, 256, 208]  # chunks of exactly chunk_size rows
    assert len(store.skipped()) == 2
    assert store.manifest["model"]["source"] == str(c.model.resolve())
    assert report.index["spec"]["kind"] == "flat" and report.index["recall_at_10"] == 1.0
    meta = store.metadata().to_pydict()
    assert meta["id"] == list(range(len(c.colours)))
    first = meta["path"].index(str(built["images"] / "00003.png"))
    assert meta["caption"][first] == (built["images"] / "00003.txt").read_text()
    assert (meta["width"][first], meta["height"][first]) == (32, 32)
    assert meta["file_bytes"][first] == (built["images"] / "00003.png").stat().st_size
    vectors = store.all_vectors()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def colour_of(hit) -> str:
    return hit.caption.split()[1]


@pytest.mark.parametrize("colour", COLOURS)
def test_a_colour_query_returns_that_colour_first(built, colour):
    hits = built["index"].search_text(f"a {colour} circle", k=5)
    assert [colour_of(h) for h in hits] == [colour] * 5
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_query_by_image_returns_the_image_itself_first(built):
    index = built["index"]
    for name in ("00000.png", "00101.png", "00555.png"):
        hits = index.search_image(built["images"] / name, k=3)
        assert hits[0].path == str(built["images"] / name) and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert index.search_similar(hits[0].id, k=1)[0].id == hits[0].id
    with pytest.raises(OSError):
        index.search_image(built["root"] / "missing.jpg")
    with pytest.raises(ValueError, match="empty"):
        index.search_text("  ")
    with pytest.raises(ValueError, match="k must be"):
        index.search_text("red", k=0)
    assert len(index.search_text("a red circle", k=10_00)) == len(index)  # k is capped at the index size


def test_an_interrupted_build_continues_where_it_stopped(built, tmp_path, monkeypatch):
    c = built["c"]
    original = Store.append_chunk
    calls = []

    def dies_on_the_second_chunk(self, vectors, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self, vectors, rows)

    monkeypatch.setattr(Store, "append_chunk", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_index(f"pairs:{c.images}", tmp_path / "index", model=c.model, progress=False, chunk_size=300)
    monkeypatch.setattr(Store, "append_chunk", original)
    with pytest.raises(IndexDirError, match="did not finish"):
        Index.load(tmp_path / "index")
    with pytest.raises(IndexDirError, match="never mixes models"):
        build_index(f"pairs:{c.images}", tmp_path / "index", model=c.other_model, progress=False)
    report = build_index(f"pairs:{c.images}", tmp_path / "index", model=c.model, progress=False, chunk_size=300)
    assert (report.already, report.embedded, report.total) == (300, len(c.colours) - 300, len(c.colours))
    # The same vectors, in the same order, as the build that was never interrupted (the
    # module's, over a copy of the same files plus two unreadable ones).
    resumed, whole = Store.open(tmp_path / "index"), Store.open(built["root"] / "index")
    names = [p.rsplit("/", 1)[1] for p in resumed.metadata()["path"].to_pylist()]
    assert names == sorted(c.colours)
    whole_rows = {p.rsplit("/", 1)[1]: i for i, p in enumerate(whole.metadata()["path"].to_pylist())}
    np.testing.assert_allclose(resumed.all_vectors(), whole.all_vectors()[[whole_rows[n] for n in names]], atol=1e-6)
    with pytest.raises(IndexDirError, match="already holds a built index"):
        build_index(f"pairs:{c.images}", tmp_path / "index", model=c.model, progress=False)


def naive_recall_at_10(directory, *, seed: int) -> float:
    """recall@10 of the index in ``directory`` at its recorded setting, on the stored vectors a
    build picks as sample queries (``seed``: 1 for a build, the vector count for an add),
    against a brute-force float64 sort of every inner product."""
    index = Index.load(directory)
    vectors = Store.open(directory).all_vectors()
    count = index.info()["index"]["recall_queries"]
    queries = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), count, replace=False))]
    truth = np.argsort(-(queries.astype(np.float64) @ vectors.astype(np.float64).T), axis=1, kind="stable")[:, :10]
    _, found = index.search_vectors(queries, 10)
    return sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)) / truth.size


def test_add_appends_only_new_images_to_an_ivf_index(built, tmp_path):
    c = built["c"]
    part = tmp_path / "part"
    shutil.copytree(c.images, part, ignore=lambda _, names: [n for n in names if n >= "00680"])
    first = build_index(f"pairs:{part}", tmp_path / "index", model=c.model, progress=False, kind="ivfpq")
    # Tuned on the 680 images: the recorded recall is the one recomputed here against brute
    # force on the same sample queries, and it reaches the target the setting was tuned for.
    assert first.index["spec"]["kind"] == "ivfpq" and first.index["recall_queries"] == 200
    assert first.index["recall_at_10"] == pytest.approx(naive_recall_at_10(tmp_path / "index", seed=1), abs=1e-9)
    assert first.index["recall_at_10"] >= first.index["target_recall"] == 0.95
    more = tmp_path / "more"
    write_pairs(more, ShapesDataset(split="seen", size=32, n=2000, seed=7), range(1990, 2000))
    report = add_to_index(tmp_path / "index", f"pairs:{more}", progress=False)
    assert (report.embedded, report.already, report.total) == (10, 0, 690)
    assert report.index["indexed"] == 690 and report.index["spec"]["kind"] == "ivfpq"
    # Measured again after the add, on sample queries drawn from all 690 vectors.
    assert report.index["recall_at_10"] == pytest.approx(naive_recall_at_10(tmp_path / "index", seed=690), abs=1e-9)
    again = add_to_index(tmp_path / "index", f"pairs:{more}", progress=False)
    assert (again.embedded, again.already, again.total) == (0, 10, 690)
    index = Index.load(tmp_path / "index")
    assert len(index) == 690
    hit = index.search_image(more / "01995.png", k=1)[0]
    assert hit.path == str(more / "01995.png") and hit.id >= 680
    reindexed = add_to_index(tmp_path / "index", f"pairs:{more}", progress=False, reindex=True)
    assert reindexed.index["spec"]["kind"] == "flat"  # 690 images: the rule picks exact search


def test_generated_images_without_files_are_indexed(built, tmp_path):
    c = built["c"]
    report = build_index("shapes://?split=seen&size=32&n=30", tmp_path / "index", model=c.model, progress=False)
    index = Index.load(tmp_path / "index")
    assert report.total == 30 and index.item(4)["key"] == "shapes://?split=seen&size=32&n=30#4"
    assert index.item(4)["path"] is None and index.search_similar(4, k=1)[0].id == 4


def test_webdataset_shards_are_indexed_by_sample_name(built, tmp_path):
    """Runs once the shards: scheme is registered (clipforge.data.shards and webdataset)."""
    import tarfile

    from clipforge.data import schemes

    if "shards" not in schemes():
        pytest.skip("no shards: data scheme in this tree")
    pytest.importorskip("webdataset")
    shard = tmp_path / "000.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("00003", "00004", "00005"):
            tar.add(built["images"] / f"{name}.png", arcname=f"{name}.png")
            tar.add(built["images"] / f"{name}.txt", arcname=f"{name}.txt")
    report = build_index(f"shards:{shard}", tmp_path / "index", model=built["c"].model, progress=False)
    index = Index.load(tmp_path / "index")
    assert report.total == 3 and index.item(1)["key"] == f"{shard}#00004"
    assert index.item(1)["caption"] == (built["images"] / "00004.txt").read_text()
    assert index.search_image(built["images"] / "00005.png", k=1)[0].key == f"{shard}#00005"
    again = add_to_index(tmp_path / "index", f"shards:{shard}", progress=False)
    assert (again.embedded, again.already) == (0, 3)


def test_the_model_is_checked(built, tmp_path):
    c = built["c"]
    with pytest.raises(IndexDirError, match="never mixes models"):
        Index.load(built["root"] / "index", model=c.other_model)
    with pytest.raises(IndexDirError, match="random weights"):
        load_search_model("tiny")
    with pytest.raises(IndexDirError, match="not an index directory"):
        Index.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(IndexDirError, match="not readable JSON"):
        Index.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(IndexDirError, match="clipforge-index version 1"):
        Store.open(tmp_path)


# --------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------


def test_cli_build_and_search(built, tmp_path, capsys):
    c = built["c"]
    out = tmp_path / "index"
    code = main(["index", "build", "--model", str(c.model), "--data", f"pairs:{built['images']}", "--out", str(out),
                 "--quiet", "--workers", "0", "--index-type", "ivfpq", "--target-recall", "0.9"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"{len(c.colours)} image(s) embedded" in printed and "2 unreadable image(s)" in printed
    assert "IVF16,PQ4x4fs,RFlat" in printed and "recall@10" in printed and "broken.png" in printed

    assert main(["search", str(out), "a blue circle", "-k", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"] == {"text": "a blue circle"} and len(result["results"]) == 4
    assert [colour_of(type("H", (), r)) for r in result["results"]] == ["blue"] * 4

    image = built["images"] / "00042.png"
    assert main(["search", str(out), "--image", str(image), "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[0] == "1" and str(image) in table[0] and len(table) == 2


@pytest.mark.parametrize("argv,message", [
    (["search", "{index}"], "either a query text or --image"),
    (["search", "{index}", "red", "--image", "x.png"], "either a query text or --image"),
    (["search", "{index}", " "], "the query text is empty"),
    (["search", "{index}", "--image", "{missing}"], "cannot read the query image"),
    (["search", "{index}", "red", "-k", "0"], "argument -k: must be a positive integer, got 0"),
    (["search", "{nothing}", "red"], "not an index directory"),
    (["search", "{index}", "red", "--model", "{other}"], "never mixes models"),
    (["index", "build", "--model", "tiny", "--data", "pairs:{images}", "--out", "{new}"], "random weights"),
    (["index", "build", "--model", "{model}", "--data", "nope:x", "--out", "{new}"], "known scheme"),
    (["index", "build", "--model", "{model}", "--data", "pairs:{images}", "--out", "{index}"], "already holds"),
    (["index", "add", "{nothing}", "--data", "pairs:{images}"], "not an index directory"),
])
def test_cli_errors_exit_2_with_a_message(built, tmp_path, capsys, argv, message):
    c = built["c"]
    names = {"index": built["root"] / "index", "missing": tmp_path / "missing.png", "nothing": tmp_path,
             "other": c.other_model, "images": built["images"], "new": tmp_path / "new", "model": c.model}
    try:
        code = main([a.format(**names) for a in argv])
    except SystemExit as exit_:  # argparse's refusal of an option value
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nothing written for a build refused
