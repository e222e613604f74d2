"""Choosing negatives from a ranked hit list, filter by filter (hand-made hits, no index)."""

import numpy as np
import pytest

from rare_ray.config import SHINGLE_WORDS, BM25Config
from rare_ray.engines.lucene import Hit, grouped_docid, split_docid
from rare_ray.operators.bm25_hardneg import (
    FILTERS,
    Filters,
    Positive,
    above_margin,
    above_max_score,
    overlap,
    same_source,
    select_negatives,
    shingles,
)
from rare_ray.operators.ngrams import compare, text_print
from tests.helpers import sample_rows


def hits(*pairs, top=10.0):
    return [Hit(docid, top - i, text) for i, (docid, text) in enumerate(pairs)]


def select(positive_id, positive_text, ranked, num_neg=3, **filters):
    return select_negatives(
        Positive(positive_id, positive_text), ranked, Filters(num_neg, **filters)
    )


def test_positive_is_excluded_by_id_and_by_text_and_its_rank_recorded():
    ranked = hits(("n1", "other one"), ("p", "the positive"), ("copy", "the  positive"),
                  ("n2", "other two"), ("n3", "other three"), ("n4", "other four"))  # fmt: skip
    result = select("p", "the positive", ranked)
    assert [h.docid for h in result.hits] == ["n1", "n2", "n3"]
    assert result.positive_rank == 2
    assert result.positive_score == 9.0
    assert result.skipped["same_text"] == 1


def test_negatives_are_deduplicated_by_content():
    ranked = hits(("a", "same text"), ("b", "same   text"), ("c", "different"))
    result = select("p", "positive", ranked)
    assert [h.docid for h in result.hits] == ["a", "c"]
    assert result.positive_rank is None


def test_start_rank_skips_the_top_hits():
    ranked = hits(("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"))
    result = select("p", "positive", ranked, num_neg=2, start_rank=2)
    assert [h.docid for h in result.hits] == ["c", "d"]


def test_short_hit_lists_give_what_they_have():
    result = select("p", "positive", hits(("a", "1")))
    assert len(result.hits) == 1
    assert set(result.skipped) == set(FILTERS) and sum(result.skipped.values()) == 0


# The score filters: margins at the boundary, and the positive below depth.


def test_score_filters_skip_strictly_above_their_bound():
    assert above_max_score(10.01, 10.0) and not above_max_score(10.0, 10.0)
    assert not above_max_score(1e9, None)
    assert above_margin(9.51, 10.0, 0.95) and not above_margin(9.5, 10.0, 0.95)
    assert not above_margin(100.0, None, 0.95)  # the positive's score unknown: off
    assert not above_margin(100.0, 10.0, None)


def test_relative_margin_uses_the_positives_own_hit_score():
    # The positive ranks 2nd with 8.0: a margin of 0.75 keeps hits scoring 6.0 or less.
    ranked = hits(("a", "t a"), ("p", "pos"), ("b", "t b"), ("c", "t c"), ("d", "t d"))
    for hit, score in zip(ranked, [10.0, 8.0, 7.0, 6.0, 5.0], strict=True):
        hit.score = score
    result = select("p", "pos", ranked, num_neg=2, relative_margin=0.75)
    assert [h.docid for h in result.hits] == ["c", "d"]
    assert result.positive_score == 8.0
    assert result.skipped["above_margin"] == 2


def test_relative_margin_with_the_positive_below_depth_uses_its_computed_score():
    ranked = hits(("a", "t a"), ("b", "t b"), ("c", "t c"), ("d", "t d"))  # 10, 9, 8, 7
    positive = Positive("p", "pos", score=8.0)  # not among the hits: scored on its own
    result = select_negatives(positive, ranked, Filters(3, relative_margin=1.0))
    assert result.positive_rank is None and result.positive_score == 8.0
    assert [h.docid for h in result.hits] == ["c", "d"]
    assert result.skipped["above_margin"] == 2


def test_max_score_counts_before_the_margin():
    ranked = hits(("a", "t a"), ("b", "t b"), ("c", "t c"))  # 10, 9, 8
    result = select_negatives(
        Positive("p", "pos", score=8.0), ranked, Filters(3, max_score=9.5, relative_margin=1.0)
    )
    assert [h.docid for h in result.hits] == ["c"]
    assert result.skipped["above_max_score"] == 1 and result.skipped["above_margin"] == 1


# Same source.


def test_same_source_needs_a_shared_group():
    assert same_source("doc-1", "doc-1")
    assert not same_source("doc-1", "doc-2")
    assert not same_source(None, None)  # no group is nobody's group
    assert not same_source("doc-1", None)


def test_chunks_of_the_positives_source_are_skipped():
    ranked = [
        Hit("p#2", 10.0, "chunk two", group="p"),
        Hit("q#1", 9.0, "other", group="q"),
        Hit("x", 8.0, "ungrouped"),
    ]
    result = select_negatives(Positive("p#1", "chunk one", group="p"), ranked, Filters(3))
    assert [h.docid for h in result.hits] == ["q#1", "x"]
    assert result.skipped["same_source"] == 1


def test_grouped_ids_round_trip_whatever_they_hold():
    for docid, group in [("a", "g"), ("1:x", "2:y"), ("", "g"), ("id", None), ("äö", "ü:")]:
        assert split_docid(grouped_docid(docid, group)) == (docid, group)
    assert split_docid(grouped_docid("id", "")) == ("id", None)


# Near-duplicates.

ABSTRACT = (
    "Mitochondria in the leaves of lace plants are dismantled during programmed cell death "
    "and the process is tracked with live cell imaging over several days of development"
)


def test_a_near_copy_one_word_apart_overlaps_almost_entirely():
    copy = ABSTRACT.replace("several", "many")
    assert 0.7 < overlap(shingles(ABSTRACT), shingles(copy)) < 1.0


def test_a_text_contained_in_the_other_overlaps_fully():
    first_half = " ".join(ABSTRACT.split()[:14])
    assert overlap(shingles(ABSTRACT), shingles(first_half)) == 1.0


def test_unrelated_and_empty_texts_do_not_overlap():
    other = "Cars drive on roads and trains run on rails across the whole wide country side"
    assert overlap(shingles(ABSTRACT), shingles(other)) == 0.0
    assert overlap(shingles(""), shingles(ABSTRACT)) == 0.0
    assert overlap(shingles("lace plants"), shingles("lace plants")) == 1.0  # shorter than n


def test_near_duplicate_filter_skips_the_copy_and_keeps_the_rest():
    ranked = hits(("copy", ABSTRACT.replace("several", "many")), ("n", "an unrelated text"))
    result = select("p", ABSTRACT, ranked, near_duplicate=0.5)
    assert [h.docid for h in result.hits] == ["n"]
    assert result.skipped["near_duplicate"] == 1
    assert [h.docid for h in select("p", ABSTRACT, ranked).hits] == ["copy", "n"]  # off


# Settings.


def test_the_reference_preset_has_every_filter_off_and_strict_turns_them_on():
    reference = Filters.of(BM25Config())
    assert reference == Filters(3)
    strict = BM25Config(preset="strict")
    assert strict.near_duplicate is not None and strict.relative_margin is not None
    assert BM25Config(preset="strict", relative_margin=0.8).relative_margin == 0.8
    dumped = BM25Config(preset="strict").model_dump()  # every field, the filters' too
    assert BM25Config.model_validate({**dumped, "relative_margin": None}) == strict


@pytest.mark.parametrize("bad", [{"near_duplicate": 0}, {"near_duplicate": 1.5},
                                 {"relative_margin": 0}, {"max_score": -1}])  # fmt: skip
def test_filter_bounds_are_checked(bad):
    with pytest.raises(ValueError):
        BM25Config(**bad)


# What is searched, and what the stage reads.


def test_query_is_the_question_or_the_scenario_then_the_question():
    import pyarrow as pa

    from rare_ray.operators import BM25HardNeg

    batch = pa.table({"question": ["why?"], "scenario": ["a patient"], "text": ["doc"]})
    assert BM25HardNeg().queries(batch) == ["why?"]
    both = BM25HardNeg(query="scenario_question", group_key="source_id")
    assert both.queries(batch) == ["a patient\nwhy?"]
    assert both.input_columns == {
        "question": "text", "text": "text", "scenario": "text", "source_id": "carried"
    }  # fmt: skip


@pytest.mark.parametrize("n", [0, 1, 2, SHINGLE_WORDS])
def test_compare_counts_what_the_fingerprints_hold(n):
    """The one-pass kernel the filters use agrees with the fingerprints it stands for: the
    text's hash, its distinct n-grams, and how many the other text has."""
    texts = [*(r["text"] for r in sample_rows(60)), "", " ", "one", "A b C", "Ünï wörds  x\ty"]
    for i, text in enumerate(texts):
        other = text_print(texts[(i + 1) % len(texts)] + " " + text[: len(text) // 2], n)
        ours = text_print(text, n)
        shared = len(np.intersect1d(ours.grams, other.grams))
        assert compare(text, n, other) == (ours.text_hash, ours.grams.size, shared)
