"""False negatives on a chunked corpus: the chunks of the positive's own abstract.

The sample abstracts cut into two or three overlapping chunks (``rare_ray.bench.negatives.chunked_corpus``),
each searched with its abstract's human question, over the real index of every chunk. With the
reference's rules the positive's sibling chunks outrank everything and become "negatives";
with ``group_key`` or the near-duplicate filter on there is none, and every row still gets
``num_neg`` negatives where the corpus allows. The counts are printed (``-s``) for the README.
"""

import json

import pyarrow.dataset as pads
import pytest
import ray

from rare_ray import pipeline
from rare_ray.bench.negatives import chunked_corpus
from rare_ray.config import BM25Config, RunConfig
from rare_ray.engines.lucene import LuceneSearcher
from rare_ray.operators import BM25HardNeg
from rare_ray.rows import content_key
from tests.helpers import write_jsonl


def own_source(row: dict) -> int:
    """How many of ``row``'s negatives are chunks of its own abstract."""
    return sum(n.split("#")[0] == row["source_id"] for n in row["hard_negatives_ids"])


@pytest.fixture(scope="module")
def chunks():
    return chunked_corpus()


def mine(chunks, tmp_path, **settings):
    config = BM25Config(local_dir=str(tmp_path), searchers_per_node=2, **settings)
    return BM25HardNeg(config).run(ray.data.from_items(chunks)).take_all()


def test_with_the_reference_rules_sibling_chunks_become_negatives_and_near_copies_do_not(
    ray_local, chunks, tmp_path
):
    # One index for both: the first run shares it, the second searches it as it is.
    off = mine(chunks, tmp_path / "off", share_uri=str(tmp_path / "share"))
    (built,) = (tmp_path / "share").glob("*.tar")
    near = mine(chunks, tmp_path / "near", near_duplicate=0.15, prebuilt_index=str(built))
    assert len(off) == len(near) == len(chunks)
    from_own = sum(own_source(r) for r in off)
    rows_hit = sum(own_source(r) > 0 for r in off)
    print(f"\nfilters off: {from_own} of {3 * len(off)} negatives from the positive's own "
          f"abstract, in {rows_hit} of {len(off)} rows")  # fmt: skip
    assert rows_hit > len(off) / 2  # the reason for this issue: most rows are poisoned

    assert sum(own_source(r) for r in near) == 0
    # What the corpus allows, from an independent search of the node-local index: the hits
    # of other abstracts. The filter leaves each row all of those it needs, and no fewer.
    searcher = LuceneSearcher(next((tmp_path / "near").glob("*/")))
    hits = searcher.search([r["question"] for r in near], 50)
    for row, row_hits in zip(near, hits, strict=True):
        others = {
            content_key(h.text) for h in row_hits if h.docid.split("#")[0] != row["source_id"]
        }
        assert len(row["hard_negatives"]) == min(3, len(others)), row["id"]
    print(f"near_duplicate 0.15: {sum(len(r['hard_negatives']) < 3 for r in near)} rows short "
          "(their questions match fewer than 3 other abstracts)")  # fmt: skip
    skipped = sum(r["hard_negatives_skipped"]["near_duplicate"] for r in near)
    assert skipped == sum(r["_bm25_near_duplicate"] for r in near) >= from_own
    print(f"near_duplicate 0.15: 0 from the own abstract, {skipped} candidates skipped")

    # The positive's score: its own hit's when it ranked within depth, else computed; the
    # computed one agrees with the hit's (Anserini rounds hit scores to 4 decimals).
    for r in off:
        assert r["positive_score"] is not None
    ranked = [r for r in off if r["positive_rank"] is not None]
    assert len(ranked) > len(off) / 2


def test_group_key_through_the_pipeline_carries_columns_and_counts_every_skip(
    ray_local, chunks, tmp_path, local_config
):
    """``rare-ray bm25`` as the pipeline runs it: ingest carries ``source_id`` (the group
    key) and ``part`` (named in ``carry_columns``) through to ``data/``."""
    chunks = chunks[:600]  # the same rules as above; fewer rows, as the pipeline is slower
    data = local_config.model_dump()
    data.update(input=str(write_jsonl(tmp_path / "chunks.jsonl", chunks)), carry_columns=["part"])
    data["bm25"].update(group_key="source_id", preset="strict")
    config = RunConfig.model_validate(data)
    manifest = pipeline.run(config, stages=["bm25"])

    rows = pads.dataset(config.output + "/data", partitioning="hive").to_table().to_pylist()
    assert len(rows) == len(chunks) == manifest["counts"]["output_rows"]
    assert {r["id"]: (r["source_id"], r["part"]) for r in rows} == {
        c["id"]: (c["source_id"], str(c["part"])) for c in chunks
    }
    assert sum(own_source(r) for r in rows) == 0
    counts = manifest["counts"]["stages"]["bm25"]
    for name in ("same_source", "near_duplicate", "above_margin", "same_text"):
        assert counts[name] == sum(r["hard_negatives_skipped"][name] for r in rows), name
    assert counts["same_source"] > 0
    assert counts["short"] == sum(len(r["hard_negatives"]) < 3 for r in rows)
    print(f"\nstrict with group_key: {json.dumps(counts)}")
    assert manifest["index"]["group_key"] == "source_id"
