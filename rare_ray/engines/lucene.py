"""BM25 over a Lucene index, through Anserini's Java classes (as shipped in pyserini).

A hit carries its document's text, so the index doubles as the document store the searchers
need: nothing else has to travel with it. An index that rare-ray builds keeps its texts in
Arrow files inside it (``rare_ray.engines.texts``), where a hit's text costs a slice instead of
a trip through the JVM, and Lucene stores none; an index built by pyserini (or by Anserini's
indexer with ``-storeContents``) gives them from Lucene.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rare_ray.engines.jvm import java_class, java_list
from rare_ray.engines.texts import Bytes, IndexTexts

# Anserini's default analyzer for English: Lucene's standard tokenizer, English stopwords and
# the Porter stemmer. Named in the index fingerprint; change it and indexes are rebuilt.
ANALYZER = "anserini-default-en (porter, english stopwords)"


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
    ``scored``, Anserini's hit (a ``ScoredDoc``), whose Lucene document is read only with the
    text: handing a Java object to Python costs about 10 µs, and most of a query's ``depth``
    hits are never looked at (three of fifty per question with the default filters).
    """

    __slots__ = ("_row", "_scored", "_text", "_texts", "docid", "group", "score")

    def __init__(
        self,
        docid: str,
        score: float,
        text: str | None = None,
        scored: Any = None,
        group: str | None = None,
    ):
        self.docid = docid
        self.score = score
        self.group = group
        self._text = text
        self._scored = scored
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
            else:
                document = None if self._scored is None else self._scored.lucene_document
                self._text = (None if document is None else document.get("contents")) or ""
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


class LuceneSearcher:
    """BM25 search over an index directory; one per process, thread-safe on the Java side.

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
        self._searcher: Any = java_class("io.anserini.search.SimpleSearcher", heap)(str(index_dir))
        self._searcher.set_bm25(float(k1), float(b))
        self._index_dir = str(index_dir)
        self._k1, self._b = float(k1), float(b)
        self._scorer: Any = None
        self.threads = threads
        self.grouped = grouped
        self.num_docs = int(self._searcher.get_total_num_docs())
        self.texts = IndexTexts.of_index(index_dir)

    def score(self, query: str, docid: str, group: str | None = None) -> float | None:
        """The BM25 score of one document for ``query`` (0.0 when it matches no term), as
        ``search`` would give it at any depth; None when the index has no such document."""
        if self._scorer is None:  # a reader of its own: SimpleSearcher's is not public
            utils = java_class("io.anserini.index.IndexReaderUtils")
            reader = utils.getReader(self._index_dir)
            similarity = java_class("org.apache.lucene.search.similarities.BM25Similarity")
            self._scorer = (utils, reader, similarity(self._k1, self._b))
        utils, reader, similarity = self._scorer
        key = grouped_docid(docid, group) if self.grouped else docid
        if utils.convertDocidToLuceneDocid(reader, key) < 0:
            return None
        return float(utils.computeQueryDocumentScoreWithSimilarity(reader, key, query, similarity))

    def search(self, queries: list[str], depth: int) -> list[list[Hit]]:
        """The top ``depth`` hits of each query, best first."""
        if not queries:
            return []
        qids = [str(i) for i in range(len(queries))]
        results = self._searcher.batch_search(
            java_list(queries), java_list(qids), int(depth), int(self.threads)
        )
        out = [
            [Hit(hit.docid, float(hit.score), scored=hit) for hit in results.get(qid)]
            for qid in qids
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
        self._searcher.close()
