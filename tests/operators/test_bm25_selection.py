"""Choosing negatives from a ranked hit list (no index needed)."""

from rare_ray.engines.lucene import Hit
from rare_ray.operators.bm25_hardneg import select_negatives


def hits(*pairs):
    return [Hit(docid, 10.0 - i, text) for i, (docid, text) in enumerate(pairs)]


def test_positive_is_excluded_by_id_and_by_text_and_its_rank_recorded():
    ranked = hits(("n1", "other one"), ("p", "the positive"), ("copy", "the  positive"),
                  ("n2", "other two"), ("n3", "other three"), ("n4", "other four"))  # fmt: skip
    result = select_negatives("p", "the positive", ranked, num_neg=3)
    assert [h.docid for h in result.hits] == ["n1", "n2", "n3"]
    assert result.positive_rank == 2


def test_negatives_are_deduplicated_by_content():
    ranked = hits(("a", "same text"), ("b", "same   text"), ("c", "different"))
    result = select_negatives("p", "positive", ranked, num_neg=3)
    assert [h.docid for h in result.hits] == ["a", "c"]
    assert result.positive_rank is None


def test_start_rank_skips_the_top_hits():
    ranked = hits(("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"))
    result = select_negatives("p", "positive", ranked, num_neg=2, start_rank=2)
    assert [h.docid for h in result.hits] == ["c", "d"]


def test_short_hit_lists_give_what_they_have():
    result = select_negatives("p", "positive", hits(("a", "1")), num_neg=3)
    assert len(result.hits) == 1
