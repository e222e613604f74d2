"""The indexed texts beside the Lucene index: found by the ids hits carry, equal to Lucene's."""

import pyarrow as pa
import pytest
import ray

from rare_ray.engines.index_broadcast import IndexBuild, local_index
from rare_ray.engines.lucene import LuceneIndexWriter, LuceneSearcher
from rare_ray.engines.texts import IDS_FILE, TEXTS_FILE, IndexTexts, TextsWriter
from tests.helpers import sample_questions, sample_rows


def test_rows_finds_every_stored_id_across_batches_and_nothing_else(tmp_path):
    ids = [f"doc-{i}" for i in range(1000)] + ["", "ünï-çødé", "a" * 300]
    writer = TextsWriter(tmp_path)
    for start in range(0, len(ids), 128):  # many record batches: rows count across them
        chunk = ids[start : start + 128]
        writer.add(chunk, pa.array([f"text of {i!r} ✓" for i in chunk]))
    writer.close()

    texts = IndexTexts(tmp_path)
    assert texts.num_docs == len(ids)
    rows = texts.rows([*reversed(ids), "doc-1000", "doc-", "ünï"])
    assert rows.tolist() == [*reversed(range(len(ids))), -1, -1, -1]
    for row in (0, 127, 128, 1001, len(ids) - 1):
        assert texts.text(row) == f"text of {ids[row]!r} ✓"
        assert texts.utf8(row).tobytes() == texts.text(row).encode()


def test_an_empty_index_has_empty_texts(tmp_path):
    TextsWriter(tmp_path).close()
    texts = IndexTexts(tmp_path)
    assert texts.num_docs == 0
    assert texts.rows(["x"]).tolist() == [-1]


@pytest.fixture(scope="module")
def grouped_index(ray_local, tmp_path_factory):
    rows = [{**r, "source_id": f"s{i // 3}"} for i, r in enumerate(sample_rows(300))]
    built = IndexBuild.start(
        ray.data.from_items(rows), "text", 0.9, 0.4, chunk_bytes=1 << 20, group_column="source_id"
    ).result()
    return local_index(built, tmp_path_factory.mktemp("indexes")), rows


def test_hits_read_from_the_texts_file_equal_what_lucene_stores(grouped_index, tmp_path):
    path, rows = grouped_index
    assert (path / TEXTS_FILE).is_file() and (path / IDS_FILE).is_file()
    # The same documents indexed as pyserini does it: texts stored in Lucene, no Arrow files.
    pyserini_style = tmp_path / "pyserini-style"
    writer = LuceneIndexWriter(pyserini_style)
    writer.add([r["id"] for r in rows], [r["text"] for r in rows], [r["source_id"] for r in rows])
    writer.close()
    ours, theirs = LuceneSearcher(path, grouped=True), LuceneSearcher(pyserini_style, grouped=True)
    assert ours.texts is not None and ours.texts.num_docs == len(rows)
    assert theirs.texts is None

    queries = [q["question"] for q in sample_questions()[:40]]
    group_of = {r["id"]: r["source_id"] for r in rows}
    text_of = {r["id"]: r["text"] for r in rows}
    compared = 0
    for our_hits, their_hits in zip(
        ours.search(queries, 20), theirs.search(queries, 20), strict=True
    ):
        # The same scores for the same documents (ties may come in another order).
        assert {(h.docid, h.score) for h in our_hits} == {(h.docid, h.score) for h in their_hits}
        for hit in [*our_hits, *their_hits]:
            assert hit.group == group_of[hit.docid]
            assert hit.text == text_of[hit.docid]
            assert hit.utf8.tobytes() == hit.text.encode()
            compared += 1
    assert compared > 2 * 40 * 10  # a few questions match fewer than 20 documents
