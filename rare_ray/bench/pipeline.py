"""Benchmark: the whole job at several corpus sizes, time per document by stage.

Each size is one ``rare_ray.pipeline.run`` of the given config with ``limit`` set to the size,
into a new output directory, in a Ray started for it alone (so every size pays its own Ray,
actor and engine starts, as a user's run does). Stage times are the manifest's
``timings_seconds``; the engine starts inside the LLM stages come from Ray's own task events
(``ray.timeline()``: the ``__init__`` of each vLLM engine actor), so that generation can be
told apart from starting engines. Doc2Query starts one engine per ask (the first ask and each
round of re-asks); ReasonDistill starts one.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rare_ray.bench.common import engine_starts
from rare_ray.config import RunConfig

STAGES = ("ingest", "doc2query", "bm25", "distill", "publish")


@dataclass
class SizeResult:
    docs: int
    output_rows: int
    rejected_rows: int
    seconds: dict[str, float]  # manifest timings_seconds
    doc2query_engine_starts: list[float]
    distill_engine_start: float
    wall_s: float

    @property
    def total_s(self) -> float:
        return sum(self.seconds.get(s, 0.0) for s in STAGES)

    @property
    def engine_s(self) -> float:
        return sum(self.doc2query_engine_starts) + self.distill_engine_start

    def per_doc_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.docs

    def markdown(self) -> str:
        s = self.seconds
        d2q_gen = s.get("doc2query", 0.0) - sum(self.doc2query_engine_starts)
        dist_gen = s.get("distill", 0.0) - self.distill_engine_start
        cells = [
            f"{self.docs:,}",
            f"{s.get('ingest', 0):.1f}",
            f"{sum(self.doc2query_engine_starts):.1f} ({len(self.doc2query_engine_starts)})",
            f"{d2q_gen:.1f}",
            f"{s.get('bm25', 0):.1f}",
            f"{self.distill_engine_start:.1f}",
            f"{dist_gen:.1f}",
            f"{s.get('publish', 0):.1f}",
            f"{self.total_s:.1f}",
            f"{self.per_doc_ms(self.total_s):.0f}",
            f"{self.per_doc_ms(self.total_s - self.engine_s):.0f}",
            f"{self.per_doc_ms(d2q_gen):.0f} / {self.per_doc_ms(dist_gen):.0f}",
        ]
        return "| " + " | ".join(cells) + " |"


HEADER = (
    "| docs | ingest (s) | doc2query engine starts (s, count) | doc2query rest (s) | bm25 (s) "
    "| distill engine start (s) | distill rest (s) | publish (s) | job total (s) "
    "| ms/doc | ms/doc without engine starts | ms/doc doc2query / distill rest |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def run_size(config: RunConfig, docs: int, output_root: Path) -> SizeResult:
    import ray

    from rare_ray.pipeline import run

    output_root.mkdir(parents=True, exist_ok=True)
    out = tempfile.mkdtemp(prefix=f"n{docs}-", dir=output_root)
    sized = config.model_copy(update={"limit": docs, "output": out})
    if ray.is_initialized():
        ray.shutdown()
    since, start = time.time(), time.perf_counter()
    manifest = run(sized)
    wall = time.perf_counter() - start
    # Task events reach the timeline within about a second.
    time.sleep(2)
    starts = engine_starts(since)
    ray.shutdown()
    if not starts:
        raise RuntimeError("no vLLM engine actor start found in ray.timeline()")
    counts = manifest["counts"]
    return SizeResult(
        docs=docs,
        output_rows=counts["output_rows"],
        rejected_rows=counts["rejected_rows"],
        seconds={k: float(v) for k, v in manifest["timings_seconds"].items()},
        # The last engine is ReasonDistill's; Doc2Query started all the others.
        doc2query_engine_starts=[d for _, d in starts[:-1]],
        distill_engine_start=starts[-1][1],
        wall_s=wall,
    )


def main(
    config: RunConfig, sizes: list[int], output_root: str, json_out: str | None = None
) -> list[SizeResult]:
    results = []
    for size in sizes:
        result = run_size(config, size, Path(output_root))
        results.append(result)
    # After all the runs: the job's own log lines would break up a table printed as it goes.
    print(HEADER, flush=True)
    for r in results:
        print(r.markdown(), flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps([_json(r) for r in results], indent=2))
    return results


def _json(result: SizeResult) -> dict[str, Any]:
    return {**asdict(result), "total_s": result.total_s, "engine_s": result.engine_s}
