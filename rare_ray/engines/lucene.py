"""BM25 over a Lucene index, through Anserini's Java classes (as shipped in pyserini).

The index stores each document's text (``-storeContents``), so a hit carries its text and the
index doubles as the document store the searchers need: nothing else has to travel with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rare_ray.engines.jvm import java_class, java_list

# Anserini's default analyzer for English: Lucene's standard tokenizer, English stopwords and
# the Porter stemmer. Named in the index fingerprint; change it and indexes are rebuilt.
ANALYZER = "anserini-default-en (porter, english stopwords)"


class Hit:
    """A search hit; its text is copied out of Java only when asked for."""

    __slots__ = ("_document", "_text", "docid", "score")

    def __init__(self, docid: str, score: float, text: str | None = None, document: Any = None):
        self.docid = docid
        self.score = score
        self._text = text
        self._document = document

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._document.get("contents") or "" if self._document else ""
        return self._text

    def __repr__(self) -> str:
        return f"Hit({self.docid!r}, {self.score:.3f})"


class LuceneIndexWriter:
    """Adds documents to a new Lucene index in ``index_dir``."""

    def __init__(self, index_dir: str | Path, threads: int = 1, heap: str | None = None):
        indexer = java_class("io.anserini.index.SimpleIndexer", heap)
        self._document = java_class("io.anserini.collection.JsonCollection$Document")
        # Same arguments as Anserini's IndexCollection, plus -storeContents for the texts.
        args = ["-index", str(index_dir), "-storeContents", "-input", "", "-collection",
                "JsonCollection", "-threads", str(threads)]  # fmt: skip
        self._writer = indexer(args)
        self.count = 0

    def add(self, ids: list[str], texts: list[str]) -> None:
        docs = [self._document.fromFields(i, t) for i, t in zip(ids, texts, strict=True)]
        self._writer.addJsonDocuments(docs)
        self.count += len(docs)

    def close(self) -> None:
        self._writer.close()


class LuceneSearcher:
    """BM25 search over an index directory; one per process, thread-safe on the Java side."""

    def __init__(
        self,
        index_dir: str | Path,
        k1: float = 0.9,
        b: float = 0.4,
        threads: int = 1,
        heap: str | None = None,
    ):
        self._searcher: Any = java_class("io.anserini.search.SimpleSearcher", heap)(str(index_dir))
        self._searcher.set_bm25(float(k1), float(b))
        self.threads = threads
        self.num_docs = int(self._searcher.get_total_num_docs())

    def search(self, queries: list[str], depth: int) -> list[list[Hit]]:
        """The top ``depth`` hits of each query, best first."""
        if not queries:
            return []
        qids = [str(i) for i in range(len(queries))]
        results = self._searcher.batch_search(
            java_list(queries), java_list(qids), int(depth), int(self.threads)
        )
        return [
            [
                Hit(hit.docid, float(hit.score), document=hit.lucene_document)
                for hit in results.get(qid)
            ]
            for qid in qids
        ]

    def close(self) -> None:
        self._searcher.close()
