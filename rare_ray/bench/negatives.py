"""Measurements behind ``bm25.preset: strict``: how far apart true and false negatives lie.

Over the 1,000 sample abstracts, and over the same abstracts cut into two or three
overlapping chunks (``chunked_corpus``), each human question is searched (plain pyserini, in
this process) and its top ``TOP`` hits other than the positive are looked at:
- the near-duplicate overlap (``overlap`` of word 5-grams) of each hit with the positive,
  split by whether the hit comes from another abstract or from the positive's own;
- the share of hits from other abstracts that score above m x the positive's own score.
A near-duplicate threshold belongs between the highest overlap of two different abstracts
and the lowest of two chunks of one; a relative margin is judged by how many hits it skips.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

from rare_ray.bench.common import read_jsonl
from rare_ray.engines.lucene import LuceneIndexWriter, LuceneSearcher
from rare_ray.io.readers import SAMPLE_CORPUS, SAMPLE_QUESTIONS
from rare_ray.operators.bm25_hardneg import overlap, positive_in, shingles

TOP = 10
MARGINS = (0.8, 0.9, 0.95, 1.0)


def chunked_corpus() -> list[dict[str, Any]]:
    """The sample abstracts cut into overlapping windows, each with its abstract's human
    question: two chunks of an abstract under 200 words, three of a longer one, each 60% of
    its words, so that any two chunks of one abstract share at least a fifth of it.
    ``source_id`` is the abstract's id, ``part`` the chunk's number (an int)."""
    questions = {q["id"]: q["question"] for q in read_jsonl(SAMPLE_QUESTIONS)}
    rows = []
    for doc in read_jsonl(SAMPLE_CORPUS):
        words = doc["text"].split()
        n, size = len(words), round(0.6 * len(words))
        starts = [0, n - size] if n < 200 else [0, (n - size) // 2, n - size]
        for part, start in enumerate(starts, start=1):
            rows.append({
                "id": f"{doc['id']}#{part}",
                "text": " ".join(words[start : start + size]),
                "question": questions[doc["id"]],
                "source_id": doc["id"],
                "part": part,
            })  # fmt: skip
    return rows


def whole_corpus() -> list[dict[str, Any]]:
    """The sample abstracts, each with its human question, as their own source."""
    questions = {q["id"]: q["question"] for q in read_jsonl(SAMPLE_QUESTIONS)}
    return [
        {**doc, "question": questions[doc["id"]], "source_id": doc["id"]}
        for doc in read_jsonl(SAMPLE_CORPUS)
    ]


@dataclass
class Row:
    corpus: str
    queries: int
    below_depth: int
    other_max: float
    other_p999: float
    own_min: float | None
    above: dict[float, float]

    def markdown(self) -> str:
        own = "n/a" if self.own_min is None else f"{self.own_min:.3f}"
        above = " | ".join(f"{100 * self.above[m]:.1f}%" for m in MARGINS)
        return (
            f"| {self.corpus} | {self.queries:,} | {self.below_depth} | {self.other_max:.3f} | "
            f"{self.other_p999:.3f} | {own} | {above} |"
        )


HEADER = (
    "| corpus | queries | positive below depth 50 | overlap, other abstracts: max | p99.9 "
    "| overlap, own abstract: min | "
    + " | ".join(f"other hits above {m} x positive" for m in MARGINS)
    + " |\n|---|---:|---:|---:|---:|---:|"
    + "---:|" * len(MARGINS)
)


def measure(name: str, rows: list[dict[str, Any]]) -> Row:
    index = tempfile.mkdtemp(prefix="rare-ray-negatives-")
    writer = LuceneIndexWriter(index)
    writer.add([r["id"] for r in rows], [r["text"] for r in rows])
    writer.close()
    searcher = LuceneSearcher(index)
    source = {r["id"]: r["source_id"] for r in rows}
    others: list[float] = []
    own: list[float] = []
    ratios: list[float] = []
    below = 0
    for row, hits in zip(rows, searcher.search([r["question"] for r in rows], 50), strict=True):
        rank, score = positive_in(hits, row["id"])
        if rank is None:
            below += 1
            score = searcher.score(row["question"], row["id"])
        positive = shingles(row["text"])
        for hit in [h for h in hits if h.docid != row["id"]][:TOP]:
            same = source[hit.docid] == row["source_id"]
            (own if same else others).append(overlap(shingles(hit.text), positive))
            if not same and score:
                ratios.append(hit.score / score)
    others.sort()
    return Row(
        corpus=name,
        queries=len(rows),
        below_depth=below,
        other_max=others[-1],
        other_p999=others[int(0.999 * (len(others) - 1))],
        own_min=min(own) if own else None,
        above={m: sum(r > m for r in ratios) / len(ratios) for m in MARGINS},
    )


def main() -> list[Row]:
    print(HEADER, flush=True)
    rows = []
    for name, corpus in [("abstracts", whole_corpus()), ("chunks", chunked_corpus())]:
        rows.append(measure(name, corpus))
        print(rows[-1].markdown(), flush=True)
    return rows
