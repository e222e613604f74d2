"""BM25HardNeg on the real sample corpus, through Ray, the index actor and real searchers."""

from pathlib import Path

import pytest
import ray

from rare_ray.config import BM25Config
from rare_ray.engines.lucene import LuceneSearcher
from rare_ray.operators import BM25HardNeg
from rare_ray.operators.bm25_hardneg import Filters, Positive, plan_searchers, select_negatives
from rare_ray.rows import content_key
from rare_ray.vocabulary import SettingsError
from tests.helpers import sample_questions, sample_rows


@pytest.fixture(scope="module")
def mined(ray_local, tmp_path_factory):
    """Human-written PubMedQA questions against their 1,000 abstracts."""
    texts = {r["id"]: r["text"] for r in sample_rows()}
    table = [
        {"id": q["id"], "question": q["question"], "text": texts[q["id"]]}
        for q in sample_questions()
    ]
    config = BM25Config(local_dir=str(tmp_path_factory.mktemp("indexes")), searchers_per_node=2)
    rows = BM25HardNeg(config).run(ray.data.from_items(table)).take_all()
    return config, table, rows


def test_gold_abstract_ranks_first_for_95_percent_of_human_questions(mined):
    _, table, rows = mined
    assert len(rows) == len(table) == 1000
    first = sum(r["positive_rank"] == 1 for r in rows)
    assert first / len(rows) >= 0.95, f"gold abstract first for only {first} of {len(rows)}"


def test_no_negative_is_the_positive_and_num_neg_where_the_corpus_allows(mined):
    config, _, rows = mined
    # An independent search over the node-local copy says what the corpus allows.
    searcher = LuceneSearcher(next(Path(config.local_dir).glob("*/")))
    hits = searcher.search([r["question"] for r in rows], config.depth)
    for row, row_hits in zip(rows, hits, strict=True):
        assert row["reject_reason"] is None
        allowed = select_negatives(Positive(row["id"], row["text"]), row_hits, Filters(10_000)).hits
        assert len(row["hard_negatives"]) == min(3, len(allowed))
        assert row["_bm25_short"] == int(len(row["hard_negatives"]) < 3)
        assert row["id"] not in row["hard_negatives_ids"]
        keys = [content_key(t) for t in row["hard_negatives"]]
        assert content_key(row["text"]) not in keys
        assert len(set(keys)) == len(keys)
        assert row["hard_negatives_scores"] == sorted(row["hard_negatives_scores"], reverse=True)


def test_reference_keys_are_honoured(ray_local, tmp_path):
    rows = [
        {"id": str(i), "query": f"cell death in plants {i}", "doc": t["text"]}
        for i, t in enumerate(sample_rows(30))
    ]
    op = BM25HardNeg(
        input_question_key="query",
        input_text_key="doc",
        output_negatives_key="negs",
        num_neg=2,
        local_dir=str(tmp_path),
    )
    out = op.run(ray.data.from_items(rows)).take_all()
    assert len(out) == 30
    assert all(len(r["negs"]) == 2 and "negs_ids" in r for r in out)


def _node(cpus: float, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus, "memory": 8 << 30}}


def test_searchers_leave_a_cpu_of_every_node_to_the_tasks_that_feed_them():
    # Default: half of the smallest alive node's CPUs, never none.
    assert plan_searchers(BM25Config(), [_node(8), _node(4), _node(1, alive=False)]).per_node == 2
    assert plan_searchers(BM25Config(), [_node(2)]).per_node == 1
    assert plan_searchers(BM25Config(searchers_per_node=3), [_node(4)]).total == 3
    # Every CPU of a node to searchers: their blocks would never be cut; refused, named.
    with pytest.raises(SettingsError, match=r"searchers_per_node=2 x bm25\.cpus_per_searcher=1 "):
        plan_searchers(BM25Config(searchers_per_node=2), [_node(2), _node(8)])
    with pytest.raises(SettingsError, match="cpus_per_searcher=4"):
        plan_searchers(BM25Config(searchers_per_node=1, cpus_per_searcher=4), [_node(4)])
