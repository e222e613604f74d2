"""BM25 over a Lucene index, through Anserini's Java classes (as shipped in pyserini).

A hit carries its document's text, so the index doubles as the document store the searchers
need: nothing else has to travel with it. An index that rare-ray builds keeps its texts in
Arrow files inside it (``rare_ray.engines.texts``), where a hit's text costs a slice instead of
a trip through the JVM, and Lucene stores none; an index built by pyserini (or by Anserini's
indexer with ``-storeContents``) gives them from Lucene.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import numpy as np

from rare_ray.engines.jvm import java_class
from rare_ray.engines.texts import Bytes, IndexTexts

# Anserini's default analyzer for English: Lucene's standard tokenizer, English stopwords and
# the Porter stemmer. Named in the index fingerprint; change it and indexes are rebuilt.
ANALYZER = "anserini-default-en (porter, english stopwords)"
# The fields Anserini's indexer writes: a document's stored id and its indexed text.
ID_FIELD = "id"
CONTENTS_FIELD = "contents"


def grouped_docid(docid: str, group: str | None) -> str:
    """The id a document has in an index built with groups: its group and its own id.

    Anserini's indexer stores a document's id and contents but none of its other fields, and
    its raw JSON (``-storeRaw``) would store every text twice and cost a parse per hit. So
    the group rides in the id, length-prefixed so that any two strings decode unambiguously;
    a searcher gets it with the hit at no cost. No group (None or "") is length 0.
    """
    group = group or ""
    return f"{len(group)}:{group}{docid}"


def split_docid(docid: str) -> tuple[str, str | None]:
    """``grouped_docid``'s inverse: (id, group or None)."""
    colon = docid.index(":")
    end = colon + 1 + int(docid[:colon])
    return docid[end:], docid[colon + 1 : end] or None


class Hit:
    """A search hit; its text is read only when asked for. ``group`` is the document's group
    in an index built with groups, else None.

    The text comes from the index's ``IndexTexts`` when it has them (``locate``), else from
    Lucene's stored fields through ``source`` (one read per hit asked for: most of a query's
    ``depth`` hits are never looked at, three of fifty per question with the default filters).
    """

    __slots__ = ("_row", "_source", "_text", "_texts", "docid", "group", "lucene_docid", "score")

    def __init__(
        self,
        docid: str,
        score: float,
        text: str | None = None,
        group: str | None = None,
        lucene_docid: int = -1,
        source: LuceneSearcher | None = None,
    ):
        self.docid = docid
        self.score = score
        self.group = group
        self.lucene_docid = lucene_docid
        self._text = text
        self._source = source
        self._texts: IndexTexts | None = None
        self._row = -1

    def locate(self, texts: IndexTexts, row: int) -> None:
        """Read the text from ``texts``, at ``row`` (-1: not there, read it from Lucene)."""
        if row >= 0:
            self._texts, self._row = texts, row

    @property
    def text(self) -> str:
        if self._text is None:
            if self._texts is not None:
                self._text = self._texts.text(self._row)
            elif self._source is not None:
                self._text = self._source.stored_contents(self.lucene_docid)
            else:
                self._text = ""
        return self._text

    @property
    def utf8(self) -> Bytes:
        """The text's UTF-8 bytes, for the fingerprint kernels: a view of the texts' file
        when the index has one (no string made), else the encoded ``text``."""
        if self._texts is not None:
            return self._texts.utf8(self._row)
        return np.frombuffer(self.text.encode(), np.uint8)

    def __repr__(self) -> str:
        return f"Hit({self.docid!r}, {self.score:.3f})"


class LuceneIndexWriter:
    """Adds documents to a new Lucene index in ``index_dir``."""

    def __init__(
        self,
        index_dir: str | Path,
        threads: int = 1,
        heap: str | None = None,
        store_contents: bool = True,
    ):
        indexer = java_class("io.anserini.index.SimpleIndexer", heap)
        self._document = java_class("io.anserini.collection.JsonCollection$Document")
        # Same arguments as Anserini's IndexCollection; -storeContents keeps the texts in
        # Lucene (compressed), for searchers that have no other copy of them.
        args = ["-index", str(index_dir), "-input", "", "-collection", "JsonCollection",
                "-threads", str(threads), *(["-storeContents"] if store_contents else [])]  # fmt: skip
        self._writer = indexer(args)
        self.count = 0

    def add(
        self, ids: list[str], texts: list[str], groups: list[str | None] | None = None
    ) -> list[str]:
        """Adds documents; with ``groups``, their ids become ``grouped_docid``s. Returns the
        ids as the index stores them."""
        if groups is not None:
            ids = [grouped_docid(i, g) for i, g in zip(ids, groups, strict=True)]
        docs = [self._document.fromFields(i, t) for i, t in zip(ids, texts, strict=True)]
        self._writer.addJsonDocuments(docs)
        self.count += len(docs)
        return ids

    def close(self) -> None:
        self._writer.close()


# One query's hits, as three arrays: stored ids, scores, Lucene's own document numbers.
Found = tuple[list[str], list[float], list[int]]


class LuceneSearcher:
    """BM25 search over an index directory, as Anserini's ``SimpleSearcher`` searches it (its
    analyzer, its bag-of-words query, ties broken by document id), one JVM call per query.

    Why not ``SimpleSearcher.batch_search``, which pyserini calls: it hands each hit to Python
    as a Java object (a bridge round trip per object, and two more for its id and score).
    Here Anserini's ``ScoredDocs`` collects a query's hits into arrays, which cross the bridge
    in bulk. Over 20,000 Debian synopses at depth 51 in one process (warm JVM): 15.2
    CPU-seconds where ``batch_search`` and reading its hits took 19.6, for the same hits in
    the same order. The scores are Lucene's own, as ``score`` gives them; pyserini rounds its
    to 1e-4 (and takes 1e-6 off each tie, for trec_eval).

    ``threads``: queries searched at once. The bridge lets go of Python's lock while Java
    runs, so threads search in parallel; Lucene's searcher is thread-safe.
    ``grouped``: the index was built with groups (``grouped_docid``); hits then carry their
    own id and group, and ``score`` takes ids with their groups.
    """

    def __init__(
        self,
        index_dir: str | Path,
        k1: float = 0.9,
        b: float = 0.4,
        threads: int = 1,
        heap: str | None = None,
        grouped: bool = False,
    ):
        utils = java_class("io.anserini.index.IndexReaderUtils", heap)
        self._reader: Any = utils.getReader(str(index_dir))
        self._similarity: Any = java_class("org.apache.lucene.search.similarities.BM25Similarity")(
            float(k1), float(b)
        )
        self._lucene: Any = java_class("org.apache.lucene.search.IndexSearcher")(self._reader)
        self._lucene.setSimilarity(self._similarity)
        # What SimpleSearcher searches with by default: its English analyzer (as the index was
        # built), a bag-of-words query over the contents, and results sorted by score and then
        # by stored id, so that ties do not depend on the order documents were indexed in.
        self._analyzer: Any = java_class(
            "io.anserini.analysis.DefaultEnglishAnalyzer"
        ).newDefaultInstance()
        self._query: Any = java_class("io.anserini.search.query.BagOfWordsQueryGenerator")()
        sort_field = java_class("org.apache.lucene.search.SortField")
        string_val = java_class("org.apache.lucene.search.SortField$Type").STRING_VAL
        self._sort: Any = java_class("org.apache.lucene.search.Sort")(
            sort_field.FIELD_SCORE, sort_field(ID_FIELD, string_val)
        )
        self._scored_docs: Any = java_class("io.anserini.search.ScoredDocs")
        self._utils = utils
        self.threads = threads
        self.grouped = grouped
        self.num_docs = int(self._reader.maxDoc())
        self.texts = IndexTexts.of_index(index_dir)

    def score(self, query: str, docid: str, group: str | None = None) -> float | None:
        """The BM25 score of one document for ``query`` (0.0 when it matches no term), as
        ``search`` would give it at any depth; None when the index has no such document."""
        key = grouped_docid(docid, group) if self.grouped else docid
        if self._utils.convertDocidToLuceneDocid(self._reader, key) < 0:
            return None
        return float(
            self._utils.computeQueryDocumentScoreWithSimilarity(
                self._reader, key, query, self._similarity
            )
        )

    def stored_contents(self, lucene_docid: int) -> str:
        """A document's text as Lucene stored it (``-storeContents``), or "" without it."""
        document = self._lucene.storedFields().document(int(lucene_docid))
        return str(document.get(CONTENTS_FIELD) or "")

    def _search_one(self, query: str, depth: int) -> Found:
        top = self._lucene.search(
            self._query.buildQuery(CONTENTS_FIELD, self._analyzer, query), depth, self._sort, True
        )
        scored = self._scored_docs.fromTopDocs(top, self._lucene)
        return scored.docids, scored.scores, scored.lucene_docids

    def _search_all(self, queries: list[str], depth: int) -> list[Found]:
        threads = min(self.threads, len(queries))
        if threads <= 1:
            return [self._search_one(q, depth) for q in queries]
        found: list[Found | None] = [None] * len(queries)
        errors: list[BaseException] = []

        def work(first: int) -> None:
            try:
                for i in range(first, len(queries), threads):
                    found[i] = self._search_one(queries[i], depth)
            except BaseException as e:  # raised again in the caller's thread
                errors.append(e)
            finally:  # a thread the JVM knows must say when it is gone
                from jnius import detach

                detach()

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if errors:
            raise errors[0]
        return cast(list[Found], found)

    def search(self, queries: list[str], depth: int) -> list[list[Hit]]:
        """The top ``depth`` hits of each query, best first."""
        if not queries:
            return []
        out = [
            [
                Hit(docid, score, lucene_docid=lucene_docid, source=self)
                for docid, score, lucene_docid in zip(docids, scores, lucene_docids, strict=True)
            ]
            for docids, scores, lucene_docids in self._search_all(queries, int(depth))
        ]
        hits = [hit for query_hits in out for hit in query_hits]
        if self.texts is not None:  # where each text is: one lookup for the whole batch
            rows = self.texts.rows([hit.docid for hit in hits]).tolist()
            for hit, row in zip(hits, rows, strict=True):
                hit.locate(self.texts, row)
        if self.grouped:
            for hit in hits:
                hit.docid, hit.group = split_docid(hit.docid)
        return out

    def close(self) -> None:
        self._reader.close()
