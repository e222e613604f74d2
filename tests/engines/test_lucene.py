"""Our searcher against pyserini's: the same hits in the same order, and Lucene's scores."""

import pytest

from rare_ray.bench.common import PyseriniSearch
from rare_ray.engines.lucene import LuceneIndexWriter, LuceneSearcher
from tests.helpers import sample_questions, sample_rows


@pytest.fixture(scope="module")
def corpus_index(tmp_path_factory):
    """The sample abstracts indexed as pyserini indexes them: texts stored in Lucene."""
    rows = sample_rows()
    path = tmp_path_factory.mktemp("lucene") / "index"
    writer = LuceneIndexWriter(path, threads=2)
    writer.add([r["id"] for r in rows], [r["text"] for r in rows])
    writer.close()
    return path, {r["id"]: r["text"] for r in rows}


@pytest.mark.parametrize("threads", [1, 3])
def test_hits_equal_pyserini_batch_search_in_order_and_score(corpus_index, threads):
    path, text_of = corpus_index
    # Questions, short common words where many documents tie at the cut, a query of stopwords
    # only and an empty one (no terms left: no hits).
    queries = [q["question"] for q in sample_questions()[:60]]
    queries += ["patients", "the cells", "of the", ""]
    ours = LuceneSearcher(path, threads=threads)
    theirs = PyseriniSearch(path, 0.9, 0.4, threads=1)
    try:
        our_hits, their_hits = ours.search(queries, 30), theirs.search(queries, 30)
    finally:
        theirs.close()
    assert len(our_hits) == len(their_hits) == len(queries)
    for query, a, b in zip(queries, our_hits, their_hits, strict=True):
        assert [h.docid for h in a] == [h.docid for h in b], query
        # Lucene's own scores; pyserini's are rounded to 1e-4, less 1e-6 for each tie above.
        assert all(abs(x.score - y.score) <= 5e-5 + 30e-6 for x, y in zip(a, b, strict=True)), query
    assert our_hits[-1] == [] and our_hits[-2] == []
    assert len(our_hits[-4]) == 30 and sum(map(len, our_hits)) > 50 * 30
    # Without texts beside the index, a hit's text is Lucene's stored copy.
    assert ours.texts is None
    for hit in our_hits[0][:5] + our_hits[-4][:5]:
        assert hit.text == text_of[hit.docid]
    ours.close()


def test_an_error_in_a_search_thread_reaches_the_caller(corpus_index):
    path, _ = corpus_index
    searcher = LuceneSearcher(path, threads=2)
    with pytest.raises(Exception, match="numHits must be > 0"):
        searcher.search(["patients", "cells"], 0)
    assert len(searcher.search(["patients", "cells"], 2)[1]) == 2  # still searches after it
    searcher.close()
