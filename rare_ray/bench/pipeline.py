"""Benchmark: the whole job at several corpus sizes, against the engines' own speed.

Each size is one ``rare_ray.pipeline.run`` of the given config with ``limit`` set to the size,
into a new output directory, in a Ray started for it alone (so every size pays its own Ray,
actor and engine starts, as a user's run does). For each run it reports:

- **engine starts**: the ``__init__`` of every vLLM engine replica begun during the run, from
  Ray's own task events (``ray.timeline()``);
- **first token**: seconds from the job's start to the first token any engine generated, and
  the **busy fraction**: seconds the engines had requests running over the seconds between
  their first and last generated token (both from the manifest's ``engines``);
- the **whole-job efficiency**: the bare engines' time for the same work, over the job's wall
  time. The bare time is measured after the run, on this machine, with nothing else running:
  bare vLLM (``vllm.LLM.chat`` in a process of its own, with the stage's engine arguments, as
  ``rare-ray bench llm`` runs it) on the Doc2Query prompts of the run's documents (one ask
  each), on the ReasonDistill prompts of the rows it published and, when the config verifies
  answers, on AnswerVerify's prompts for those rows whose reasoning finished (the ones it
  asks about), plus plain pyserini ``batch_search`` (Anserini's, with as many threads as the
  stage had CPUs, in a process of its own) for their questions, on the index the run wrote.
  Engine starts and index builds are not in the bare time: they are what the job has to hide.

``--baseline-tree PATH`` also runs every size with the code of another checkout (for example
the revision before a change: ``git worktree add /tmp/base <rev>``), as ``rare-ray run`` in a
process of its own, so that a before/after table comes from one bench run on one machine; its
engine starts, first token and busy fraction come from its manifest's ``engines`` (a revision
older than the run's own engines has none: its starts are read from its rows, one per
Doc2Query pass that ran and one for ReasonDistill), and its efficiency uses the same bare
time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rare_ray.bench.common import engine_starts
from rare_ray.config import RunConfig, VLLMEngineConfig
from rare_ray.vocabulary import ALL_STAGES, INGEST

# The manifest timings the table shows.
TIMED = (INGEST, *ALL_STAGES, "publish")


@dataclass
class Bare:
    """The engines' own time for a run's work (seconds), engine starts and index builds aside."""

    doc2query_s: float
    bm25_s: float
    distill_s: float
    # AnswerVerify's asks (the rows whose reasoning finished), when the config runs it.
    verify_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.doc2query_s + self.bm25_s + self.distill_s + self.verify_s


@dataclass
class SizeResult:
    code: str  # "this tree", or the baseline tree's path
    docs: int
    output_rows: int
    rejected_rows: int
    seconds: dict[str, float]  # manifest timings_seconds
    wall_s: float
    engine_starts: int
    first_token_s: float | None = None
    busy_fraction: float | None = None
    bare: Bare | None = None
    engines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def efficiency(self) -> float | None:
        return self.bare.total_s / self.wall_s if self.bare else None

    def markdown(self) -> str:
        s = self.seconds
        cells = [
            self.code,
            f"{self.docs:,}",
            f"{self.engine_starts}",
            _fmt(self.first_token_s),
            *(f"{s.get(stage, 0):.1f}" for stage in TIMED),
            f"{self.wall_s:.1f}",
            f"{1000 * self.wall_s / self.docs:.0f}",
            _fmt(self.bare.total_s if self.bare else None),
            _fmt(self.efficiency, 2),
            _fmt(self.busy_fraction, 2),
        ]
        return "| " + " | ".join(cells) + " |"


HEADER = (
    "| code | docs | engine starts | first token (s) | ingest (s) | doc2query (s) | bm25 (s) "
    "| distill (s) | verify (s) | publish (s) | job wall (s) | ms/doc | bare engines (s) "
    "| whole-job efficiency | engine busy fraction |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def with_max_tokens(config: RunConfig, max_tokens: int) -> RunConfig:
    """``config`` with both stages' ``sampling.max_tokens`` set to ``max_tokens`` and
    ``doc2query.max_field_chars`` lowered, if it must be, to what that budget holds (the limit
    ``rare-ray run`` names when it refuses the combination)."""
    from rare_ray.operators import Doc2Query

    data = config.model_dump()
    data["doc2query"]["sampling"]["max_tokens"] = max_tokens
    data["distill"]["sampling"]["max_tokens"] = max_tokens
    doc2query = Doc2Query(config.engine, config.doc2query)
    ratio, _ = doc2query.chars_per_token()
    data["doc2query"]["max_field_chars"] = min(
        config.doc2query.max_field_chars,
        Doc2Query.max_field_chars_for(max_tokens, ratio, len(doc2query.fields)),
    )
    return RunConfig.model_validate(data)


def run_size(config: RunConfig, docs: int, output_root: Path) -> tuple[SizeResult, RunConfig]:
    """One run of this tree's job over the first ``docs`` documents."""
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
    time.sleep(2)  # task events reach the timeline within about a second
    starts = engine_starts(since)
    ray.shutdown()
    engines = manifest.get("engines", [])
    return _result("this tree", docs, manifest, wall, len(starts), engines), sized


def run_baseline(config: RunConfig, docs: int, output_root: Path, tree: Path) -> SizeResult:
    """The same run with another checkout's code, as ``rare-ray run`` in a process of its own."""
    output_root.mkdir(parents=True, exist_ok=True)
    out = tempfile.mkdtemp(prefix=f"base-n{docs}-", dir=output_root)
    sized = config.model_copy(update={"limit": docs, "output": out}).model_dump(mode="json")
    # The other tree runs in its own directory: paths relative to this one are made absolute.
    sized["input"] = str(Path(sized["input"]).resolve())
    if Path(sized["engine"]["model"]).exists():
        sized["engine"]["model"] = str(Path(sized["engine"]["model"]).resolve())
    config_path = Path(out) / "run.yaml"
    config_path.write_text(yaml.safe_dump(sized))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "rare_ray.cli", "run", "--config", str(config_path)],
        env=env,
        check=True,
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    # A revision whose run owns its engines reports them (a replica each); an older one
    # started one per pass.
    engines = manifest.get("engines", [])
    starts = len(engines) if engines else _passes_started(Path(out))
    return _result(str(tree), docs, manifest, wall, starts, engines)


def _passes_started(out: Path) -> int:
    """Engines a revision with one engine per pass started: Doc2Query's passes (as many as
    the most asks any row took) and ReasonDistill's one."""
    import pyarrow.dataset as pads

    most = 1
    for part in ("data", "rejects"):
        if not (out / part).is_dir():  # no rejects at all
            continue
        table = pads.dataset(out / part, format="parquet", partitioning="hive").to_table()
        if "doc2query_attempts" in table.column_names:
            values = [v for v in table["doc2query_attempts"].to_pylist() if v is not None]
            most = max([most, *values])
    return most + 1


def _result(
    code: str,
    docs: int,
    manifest: dict[str, Any],
    wall: float,
    starts: int,
    engines: list[dict[str, Any]],
) -> SizeResult:
    counts = manifest["counts"]
    result = SizeResult(
        code=code,
        docs=docs,
        output_rows=counts["output_rows"],
        rejected_rows=counts["rejected_rows"],
        seconds={k: float(v) for k, v in manifest["timings_seconds"].items()},
        wall_s=wall,
        engine_starts=starts,
        engines=engines,
    )
    first = [e["first_token_after_s"] for e in engines if e.get("first_token_after_s") is not None]
    spans = [
        e["last_token_after_s"] - e["first_token_after_s"]
        for e in engines
        if e.get("first_token_after_s") is not None
    ]
    if first:
        result.first_token_s = min(first)
    if spans and sum(spans) > 0:
        result.busy_fraction = sum(e["busy_s"] for e in engines) / sum(spans)
    return result


def bare_time(config: RunConfig) -> Bare:
    """The bare engines on the work of the run into ``config.output`` (see the module doc)."""
    import pyarrow.dataset as pads
    import ray

    from rare_ray.bench.bm25 import plain_search_s_apart
    from rare_ray.bench.llm import bare_engine_kwargs, requests, run_bare
    from rare_ray.io.readers import read_documents
    from rare_ray.operators import (
        AnswerVerify,
        BM25HardNeg,
        Doc2Query,
        ReasonDistill,
        build_operators,
    )
    from rare_ray.pipeline import init_ray

    engine = config.engine
    if not isinstance(engine, VLLMEngineConfig):
        raise ValueError("the pipeline bench needs engine.kind: vllm")
    init_ray(config.ray, log_to_driver=False, attempts=3)
    documents = read_documents(config.input, {"text": "text"}, config.id_key, config.limit)
    doc_rows = documents.take_all()
    cpus = BM25HardNeg(config.bm25).plan(ray.nodes()).total * max(
        config.bm25.cpus_per_searcher, config.bm25.threads_per_searcher
    )
    ray.shutdown()
    data = pads.dataset(Path(config.output) / "data", format="parquet", partitioning="hive")
    rows = data.to_table().to_pylist()

    # BM25: plain pyserini on the index the run wrote to its own storage.
    manifest = json.loads((Path(config.output) / "manifest.json").read_text())
    questions = [r[config.bm25.input_question_key] for r in rows]
    bm25_s = plain_search_s_apart(
        manifest["index"]["uri"], config.bm25, questions, max(1, round(cpus))
    )

    kwargs = bare_engine_kwargs(engine)
    env = {str(k): str(v) for k, v in config.ray.runtime_env.get("env_vars", {}).items()}
    d2q = Doc2Query(engine, config.doc2query, seed=config.seed)
    distill = ReasonDistill(engine, config.distill, seed=config.seed)
    d2q_side = run_bare(engine.model, kwargs, requests(doc_rows, d2q.render, engine.model), env)
    distill_side = run_bare(engine.model, kwargs, requests(rows, distill.render, engine.model), env)
    verify_s = 0.0
    verify = next((op for op in build_operators(config, ALL_STAGES) if op.name == "verify"), None)
    if isinstance(verify, AnswerVerify):  # the rows it asks about: the finished answers
        asked = [r for r in rows if verify.decided(r) is None]
        if asked:
            verify_side = run_bare(
                engine.model, kwargs, requests(asked, verify.render, engine.model), env
            )
            verify_s = verify_side.generate_s
    return Bare(d2q_side.generate_s, bm25_s, distill_side.generate_s, verify_s)


def main(
    config: RunConfig,
    sizes: list[int],
    output_root: str,
    json_out: str | None = None,
    baseline_tree: str | None = None,
) -> list[SizeResult]:
    results = []
    for size in sizes:
        result, sized = run_size(config, size, Path(output_root))
        result.bare = bare_time(sized)
        results.append(result)
        if baseline_tree:
            base = run_baseline(config, size, Path(output_root), Path(baseline_tree))
            base.bare = result.bare
            results.append(base)
    # After all the runs: the job's own log lines would break up a table printed as it goes.
    print(HEADER, flush=True)
    for r in results:
        print(r.markdown(), flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps([_json(r) for r in results], indent=2))
    return results


def _json(result: SizeResult) -> dict[str, Any]:
    return {**asdict(result), "efficiency": result.efficiency}
