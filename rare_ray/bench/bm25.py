"""Benchmark: the BM25HardNeg stage through Ray against plain pyserini, at several corpus sizes.

For each corpus size, in one run and on the same queries:
- index build: time and documents/s of the holder actor (the stage's own build path);
- the Ray stage: ``BM25HardNeg.run`` over the queries (searcher actors on node-local copies,
  actor start-up included), queries/s and queries/s per CPU reserved;
- plain pyserini: the same queries through Anserini's ``SimpleSearcher.batch_search`` (what
  pyserini's ``LuceneSearcher.batch_search`` calls) in this one process, with as many threads as
  the stage had CPUs, reading each hit's id and score (what pyserini's batch_search returns);
  the stage does that, then picks negatives, fetches their texts and writes Arrow rows;
- their ratio per CPU (the target is at least 0.8);
- the stage again with ``bm25.preset: strict`` (the filters against false negatives) on the
  same index and queries, and its query throughput over the default settings' (the target
  is at least 0.9). The two run in turns, ``rounds`` times, with the one that goes first
  swapped every round; the row gives the median of each and the median of the rounds'
  ratios, since two runs of the same settings on a small machine differ by more than the
  filters cost.

Corpora: the 1,000 PubMedQA abstracts, plus (for larger sizes) documents made from their
sentences: document i takes 3 to 8 sentences drawn by ``random.Random(i)`` from the pool of all
sentences, so every size is the same on every run. Queries: the 1,000 human-written PubMedQA
questions, whose gold abstracts are in every corpus.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from rare_ray.bench.common import PyseriniSearch, read_jsonl
from rare_ray.config import STRICT_PRESET, BM25Config
from rare_ray.engines.index_broadcast import IndexHandle, local_index, prebuilt_index
from rare_ray.io.readers import SAMPLE_CORPUS, SAMPLE_QUESTIONS
from rare_ray.operators import BM25HardNeg, StageContext

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def corpus(size: int) -> list[dict[str, str]]:
    """The sample abstracts, then synthetic documents from their sentences, ``size`` in all."""
    real = read_jsonl(SAMPLE_CORPUS)
    if size <= len(real):
        return real[:size]
    sentences = [s for doc in real for s in _SENTENCE.split(doc["text"]) if len(s) > 20]
    synthetic = []
    for i in range(size - len(real)):
        rng = random.Random(i)
        text = " ".join(rng.choice(sentences) for _ in range(rng.randint(3, 8)))
        synthetic.append({"id": f"syn-{i}", "text": text})
    return real + synthetic


def queries() -> list[dict[str, str]]:
    texts = {d["id"]: d["text"] for d in read_jsonl(SAMPLE_CORPUS)}
    return [
        {"id": q["id"], "question": q["question"], "text": texts[q["id"]]}
        for q in read_jsonl(SAMPLE_QUESTIONS)
    ]


@dataclass
class Row:
    docs: int
    build_s: float
    stage_qps: float
    stage_cpus: float
    plain_qps: float
    plain_threads: int
    strict_qps: float
    strict_ratio: float  # median over the rounds of strict q/s / default q/s

    @property
    def ratio_per_cpu(self) -> float:
        return (self.stage_qps / self.stage_cpus) / (self.plain_qps / self.plain_threads)

    def markdown(self) -> str:
        return (
            f"| {self.docs:,} | {self.build_s:.1f} | {self.docs / self.build_s:,.0f} | "
            f"{self.stage_qps:,.0f} | {self.plain_qps:,.0f} | {self.ratio_per_cpu:.2f} | "
            f"{self.strict_qps:,.0f} | {self.strict_ratio:.2f} |"
        )


HEADER = (
    "| docs | index build (s) | build docs/s | Ray stage q/s | plain pyserini q/s "
    "| ratio per CPU | strict preset q/s | strict / default |"
    "\n|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def stage_seconds(op: BM25HardNeg, ds: ray.data.Dataset, context: StageContext) -> float:
    """Seconds ``op`` takes to mine every row of ``ds`` (searcher start-up included)."""
    start = time.perf_counter()
    mined = op.run_pass(ds, 1, context).materialize()
    seconds = time.perf_counter() - start
    assert mined.count() == ds.count()
    return seconds


def bench_size(size: int, config: BM25Config, repeats: int, rounds: int) -> Row:
    op = BM25HardNeg(config)
    start = time.perf_counter()
    context = StageContext(corpus=lambda: ray.data.from_items(corpus(size)), log=lambda _: None)
    op.prepare(context)
    index = op.wait_for_index(context)
    build_s = time.perf_counter() - start

    query_rows = queries() * repeats
    ds = ray.data.from_items(query_rows).materialize()
    strict = BM25HardNeg(config.model_copy(update={"preset": "strict", **STRICT_PRESET}))
    strict.use_index(index)
    default_s: list[float] = []
    strict_s: list[float] = []
    for i in range(rounds):
        # Every other round strict goes first: a machine that drifts (slower or faster over
        # the minutes of a run) then favours neither setting.
        for timed, times in [(op, default_s), (strict, strict_s)][:: 1 if i % 2 == 0 else -1]:
            times.append(stage_seconds(timed, ds, context))
    ratio = statistics.median(d / s for d, s in zip(default_s, strict_s, strict=True))
    searchers = op.plan(ray.nodes()).total
    stage_cpus = searchers * max(config.cpus_per_searcher, config.threads_per_searcher)

    threads = max(1, round(stage_cpus))
    plain_s = plain_search_s(index, config, [q["question"] for q in query_rows], threads)
    n = len(query_rows)
    return Row(size, build_s, n / statistics.median(default_s), stage_cpus, n / plain_s,
               threads, n / statistics.median(strict_s), ratio)  # fmt: skip


def plain_search_s(
    index: IndexHandle, config: BM25Config, questions: list[str], threads: int
) -> float:
    """Seconds plain pyserini takes to search ``questions`` (``batch_search`` in batches of
    ``config.batch_size``, ``config.depth`` hits each) on ``threads`` threads, in this process."""
    searcher = PyseriniSearch(local_index(index, config.local_dir), config.k1, config.b, threads)
    try:
        start = time.perf_counter()
        for i in range(0, len(questions), config.batch_size):
            searcher.search(questions[i : i + config.batch_size], config.depth)
        return time.perf_counter() - start
    finally:
        searcher.close()


def plain_search_s_apart(
    index_uri: str, config: BM25Config, questions: list[str], threads: int
) -> float:
    """``plain_search_s`` on the index written to ``index_uri``, in a process of its own: a
    JVM started in a process that has run Ray and vLLM beside it has crashed it (SIGSEGV)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work.json"
        work.write_text(json.dumps({"config": config.model_dump(mode="json"),
                                    "questions": questions}))  # fmt: skip
        command = [sys.executable, "-m", "rare_ray.bench.bm25", index_uri, str(work), str(threads)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def _plain_search_main(index_uri: str, work_path: str, threads: str) -> None:
    work = json.loads(Path(work_path).read_text())
    config = BM25Config.model_validate(work["config"])
    print(plain_search_s(prebuilt_index(index_uri), config, work["questions"], int(threads)))


def main(
    sizes: list[int], searchers_per_node: int | None, repeats: int, local_dir: str, rounds: int = 3
) -> list[Row]:
    config = BM25Config(
        searchers_per_node=searchers_per_node,
        cpus_per_searcher=1,
        threads_per_searcher=1,
        heap_per_searcher="1g",
        local_dir=local_dir,
        batch_size=256,
    )
    rows = []
    print(HEADER, flush=True)
    for size in sizes:
        row = bench_size(size, config, repeats, rounds)
        rows.append(row)
        print(row.markdown(), flush=True)
    return rows


if __name__ == "__main__":  # plain_search_s_apart's process
    _plain_search_main(*sys.argv[1:4])
