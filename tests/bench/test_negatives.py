"""The measurement behind the strict preset, on part of the chunked sample (real pyserini)."""

from rare_ray.bench.negatives import chunked_corpus, measure
from rare_ray.config import STRICT_PRESET


def test_the_strict_near_duplicate_threshold_separates_own_chunks_from_other_abstracts():
    row = measure("chunks", chunked_corpus()[:600])
    assert row.queries == 600 and row.own_min is not None
    assert row.other_max < STRICT_PRESET["near_duplicate"] < row.own_min
    assert 0 <= row.above[0.95] <= row.above[0.8] <= 1
