"""Benchmark: the ``rare-ray bm25`` command as a whole process against plain pyserini doing the
same work as a whole process, on a file of questions and texts (``debian_N.jsonl``).

- **rare-ray**: ``rare-ray bm25 --config CONFIG --input FILE --output DIR`` in a process of its
  own, as a user runs it: Ray's start, ingest, the index build, the searchers, the shard commits
  and publishing, all inside the wall time.
- **plain pyserini**: one process, no Ray: read the file, index every text with Anserini's
  ``SimpleIndexer`` (what pyserini's ``LuceneIndexer`` drives) on as many threads as the machine
  has cores, ``batch_search`` every question at the config's depth (one hit more, for the row's
  own document) with Anserini's ``SimpleSearcher`` (what pyserini's ``LuceneSearcher`` calls),
  keep the first ``num_neg`` hits that are not the row's own document, copy their texts out of
  the index and write one Parquet file of id, question, negative ids and texts. No dedupe, no
  checkpoints, no rejects: the floor the command is measured against.

Both run back to back on the same file, so their ratio carries the machine's load at the time.
``--baseline-tree PATH`` also runs the command with another checkout's code, for a before/after
table from one bench run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rare_ray.config import RunConfig

HEADER = (
    "| code | rows | rare-ray bm25 wall (s) | ingest | bm25 stage | publish | plain pyserini wall (s) "
    "| rare-ray / plain | rare-ray ms/row |"
    "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


@dataclass
class JobRow:
    code: str  # "this tree", or the baseline tree's path
    rows: int
    ours_s: float
    timings: dict[str, float]
    plain_s: float

    def markdown(self) -> str:
        t = self.timings
        return (
            f"| {self.code} | {self.rows:,} | {self.ours_s:.1f} | {t.get('ingest', 0):.1f} | "
            f"{t.get('bm25', 0):.1f} | {t.get('publish', 0):.1f} | {self.plain_s:.1f} | "
            f"{self.ours_s / self.plain_s:.2f} | {1000 * self.ours_s / self.rows:.2f} |"
        )


def rare_ray_job(
    config: str, input_path: str, output: str, tree: str | None = None
) -> tuple[float, dict[str, Any]]:
    """Wall seconds of ``rare-ray bm25`` over ``input_path`` in its own process (with the code
    of the checkout ``tree``, if given); its manifest."""
    command = [sys.executable, "-m", "rare_ray.cli", "bm25", "--config", str(Path(config).resolve()),
               "--input", str(Path(input_path).resolve()), "--output", output]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": tree} if tree else None
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    seconds = time.perf_counter() - start
    manifest = json.loads((Path(output) / "manifest.json").read_text())
    return seconds, manifest


def plain_job(config: str, input_path: str, output: str) -> float:
    """Wall seconds of ``_plain_main`` over ``input_path`` in its own process."""
    bm25 = RunConfig.from_yaml(config).bm25
    command = [sys.executable, "-m", "rare_ray.bench.bm25_job", input_path, output,
               str(os.cpu_count() or 1), str(bm25.depth), str(bm25.num_neg),
               str(bm25.k1), str(bm25.b)]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _plain_main(input_path: str, output: str, threads: str, depth: str, num_neg: str,
                k1: str, b: str) -> None:  # fmt: skip
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rare_ray.bench.common import PyseriniSearch
    from rare_ray.engines.lucene import LuceneIndexWriter

    with open(input_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ids = [r["id"] for r in rows]
    index_dir = Path(output) / "index"
    writer = LuceneIndexWriter(index_dir, threads=int(threads))
    for i in range(0, len(rows), 10_000):
        writer.add(ids[i : i + 10_000], [r["text"] for r in rows[i : i + 10_000]])
    writer.close()
    searcher = PyseriniSearch(index_dir, float(k1), float(b), int(threads))
    neg_ids: list[list[str]] = []
    negatives: list[list[str]] = []
    for i in range(0, len(rows), 1_000):
        hits = searcher.search([r["question"] for r in rows[i : i + 1_000]], int(depth) + 1)
        for own, found in zip(ids[i : i + 1_000], hits, strict=True):
            picked = [h for h in found if h.docid != own][: int(num_neg)]
            neg_ids.append([h.docid for h in picked])
            negatives.append([searcher.text(h) for h in picked])
    searcher.close()
    table = pa.table({"id": ids, "question": [r["question"] for r in rows],
                      "negative_ids": neg_ids, "negatives": negatives})  # fmt: skip
    pq.write_table(table, Path(output) / "negatives.parquet")


def main(config: str, inputs: list[str], baseline_tree: str | None = None) -> list[JobRow]:
    """Each input through plain pyserini, then through rare-ray's command (the baseline
    tree's first, if given), back to back."""
    out = []
    print(HEADER, flush=True)
    for input_path in inputs:
        with tempfile.TemporaryDirectory() as plain:
            plain_s = plain_job(config, input_path, plain)
        for tree in ([baseline_tree] if baseline_tree else []) + [None]:
            with tempfile.TemporaryDirectory() as ours:
                ours_s, manifest = rare_ray_job(config, input_path, ours, tree)
            counts = manifest["counts"]
            assert counts["output_rows"] + counts["rejected_rows"] == counts["input_rows"]
            row = JobRow(tree or "this tree", counts["input_rows"], ours_s,
                         manifest["timings_seconds"], plain_s)  # fmt: skip
            out.append(row)
            print(row.markdown(), flush=True)
    return out


if __name__ == "__main__":  # plain_job's process
    _plain_main(*sys.argv[1:8])
