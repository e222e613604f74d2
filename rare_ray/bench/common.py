"""What the benches share: reading the sample files, reading engine starts from Ray's own
task events (Ray itself starts through ``rare_ray.pipeline.init_ray``), and plain pyserini's
search, the baseline the BM25 benches measure against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from rare_ray.engines.vllm import REPLICA_CLASS


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def engine_starts(since: float) -> list[tuple[float, float]]:
    """(start, seconds) of every vLLM engine actor ``__init__`` begun after ``since``
    (``time.time()``), from Ray's task events (``ray.timeline()``), earliest first."""
    import ray

    starts = []
    for event in ray.timeline():
        what = f"{event.get('cat', '')} {event.get('name', '')}"
        if REPLICA_CLASS in what and "__init__" in what and "ts" in event:
            start = float(event["ts"]) / 1e6
            if start >= since:
                starts.append((start, float(event.get("dur", 0)) / 1e6))
    return sorted(starts)


class PlainHit(NamedTuple):
    docid: str
    score: float
    java: Any  # Anserini's ScoredDoc, for its stored document


class PyseriniSearch:
    """The baseline: a Lucene index searched as pyserini searches it, with Anserini's
    ``SimpleSearcher.batch_search`` (what pyserini's ``LuceneSearcher.batch_search`` calls,
    given ``threads`` as its thread count), each hit's id and score read from the objects it
    returns, and a text read from the hit's stored Lucene document when asked for.

    Kept apart from ``rare_ray.engines.lucene.LuceneSearcher``, which searches the same way in
    fewer bridge crossings: a change there must not move the line it is measured against.
    """

    def __init__(self, index_dir: str | Path, k1: float, b: float, threads: int):
        from rare_ray.engines.jvm import java_class

        self._searcher = java_class("io.anserini.search.SimpleSearcher")(str(index_dir))
        self._searcher.set_bm25(float(k1), float(b))
        self.threads = threads

    def search(self, queries: list[str], depth: int) -> list[list[PlainHit]]:
        from rare_ray.engines.jvm import java_list

        qids = [str(i) for i in range(len(queries))]
        results = self._searcher.batch_search(
            java_list(queries), java_list(qids), int(depth), int(self.threads)
        )
        return [
            [PlainHit(hit.docid, float(hit.score), hit) for hit in results.get(qid)] for qid in qids
        ]

    @staticmethod
    def text(hit: PlainHit) -> str:
        return str(hit.java.lucene_document.get("contents") or "")

    def close(self) -> None:
        self._searcher.close()
