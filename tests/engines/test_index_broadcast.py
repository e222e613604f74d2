"""The index's trip through the object store, and its node-local unpack."""

import json
import threading

import pyarrow.fs as pafs
import pytest
import ray

from rare_ray.engines.index_broadcast import (
    UNPACK_LOG,
    IndexBuild,
    build_key,
    built_index,
    local_index,
    prebuilt_index,
)
from rare_ray.engines.lucene import LuceneSearcher
from rare_ray.vocabulary import filesystem
from tests.helpers import sample_questions, sample_rows


@pytest.fixture(scope="module")
def built(ray_local):
    corpus = ray.data.from_items(sample_rows(200))
    # Small chunks: the index must come back from many pieces.
    return IndexBuild.start(corpus, "text", 0.9, 0.4, chunk_bytes=64 << 10).result()


def test_build_reports_a_fingerprint_and_is_chunked(built):
    assert built.num_docs == 200
    assert len(built.chunks) > 1
    assert built.describe()["analyzer"].startswith("anserini")
    assert len(built.fingerprint) == 24


def test_same_corpus_in_another_order_has_the_same_fingerprint(ray_local, built):
    corpus = ray.data.from_items(list(reversed(sample_rows(200))))
    again = IndexBuild.start(corpus, "text", 0.9, 0.4, chunk_bytes=64 << 10).result()
    assert again.fingerprint == built.fingerprint
    other = IndexBuild.start(corpus, "text", 1.2, 0.75, chunk_bytes=64 << 10).result()
    assert other.fingerprint != built.fingerprint


def test_concurrent_callers_on_a_node_unpack_once(built, tmp_path):
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(local_index(built, tmp_path, debug_logs=True)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1
    unpacks = (tmp_path / UNPACK_LOG).read_text().splitlines()
    assert len(unpacks) == 1
    assert json.loads(unpacks[0])["fingerprint"] == built.fingerprint
    hits = LuceneSearcher(paths[0]).search([sample_rows(1)[0]["text"][:200]], depth=3)
    assert hits[0][0].docid == sample_rows(1)[0]["id"]


def test_a_partial_unpack_is_redone(built, tmp_path):
    (tmp_path / f"{built.fingerprint}.partial").mkdir()
    (tmp_path / f"{built.fingerprint}.partial" / "junk").write_text("crashed mid-unpack")
    (tmp_path / f"{built.fingerprint}.tar.partial").write_bytes(b"half")
    path = local_index(built, tmp_path)
    assert not (path / "junk").exists()
    assert not (tmp_path / f"{built.fingerprint}.partial").exists()
    assert LuceneSearcher(path).num_docs == 200


def test_shared_storage_and_prebuilt_index(ray_local, tmp_path, built, s3_env, s3_prefix):
    shared = tmp_path / "shared"
    corpus = ray.data.from_items(sample_rows(200))
    key = build_key("corpus-digest", "text", None, 0.9, 0.4)
    assert built_index(str(shared), key) is None  # nothing built yet
    handle = IndexBuild.start(
        corpus, "text", 0.9, 0.4, 64 << 10, share_uri=str(shared), build_key=key
    ).result()
    assert handle.fingerprint == built.fingerprint  # same corpus, same parameters
    assert handle.chunks == [] and handle.uri == str(shared / f"{handle.fingerprint}.tar")
    assert (shared / f"{handle.fingerprint}.json").is_file()
    # A later run reuses it without indexing: the handle comes from the metadata alone.
    again = prebuilt_index(str(shared / f"{handle.fingerprint}.tar"))
    assert again.fingerprint == handle.fingerprint and again.num_docs == 200
    path = local_index(again, tmp_path / "node")
    assert LuceneSearcher(path).num_docs == 200
    with pytest.raises(FileNotFoundError, match="no metadata"):
        prebuilt_index(str(shared / "missing.tar"))
    # A rerun finds it by the key known before building; another corpus or k1 does not.
    assert built_index(str(shared), key).fingerprint == handle.fingerprint
    assert built_index(str(shared), build_key("other", "text", None, 0.9, 0.4)) is None
    assert built_index(str(shared), build_key("corpus-digest", "text", None, 1.2, 0.4)) is None
    # The same pair on an S3-compatible store, as bm25.prebuilt_index names it there. (The
    # job's own runs on S3 write it there and reuse it: tests/test_resume.py.)
    on_s3 = s3_env.uri(s3_prefix, "shared")
    fs, root = filesystem(on_s3)
    pafs.copy_files(str(shared), root, destination_filesystem=fs)
    from_s3 = prebuilt_index(f"{on_s3}/{handle.fingerprint}.tar")
    assert from_s3.fingerprint == handle.fingerprint and from_s3.uri.startswith("s3://")
    assert LuceneSearcher(local_index(from_s3, tmp_path / "node-2")).num_docs == 200
    (shared / f"{handle.fingerprint}.json").unlink()  # an incomplete index is not reused
    assert built_index(str(shared), key) is None


def test_node_id_in_local_dir_gives_each_node_its_own_directory(ray_local, built, tmp_path):
    path = local_index(built, str(tmp_path) + "/{node_id}")
    assert path.parent.name == ray.get_runtime_context().get_node_id()


def test_more_indexing_threads_give_the_same_index_and_the_same_hits(ray_local, built, tmp_path):
    corpus = ray.data.from_items(sample_rows(200))
    threaded = IndexBuild.start(corpus, "text", 0.9, 0.4, 64 << 10, threads=2).result()
    assert threaded.fingerprint == built.fingerprint
    one = LuceneSearcher(local_index(built, tmp_path / "one"))
    two = LuceneSearcher(local_index(threaded, tmp_path / "two"))
    # Short, common queries: many documents tie, and ties must not follow indexing order.
    queries = [q["question"] for q in sample_questions()[:50]] + ["patients", "the cells"]
    for a, b in zip(one.search(queries, 50), two.search(queries, 50), strict=True):
        assert [(h.docid, round(h.score, 4)) for h in a] == [
            (h.docid, round(h.score, 4)) for h in b
        ]
