"""The RARE job: ingest, then Doc2Query -> BM25HardNeg -> ReasonDistill, each checkpointed.

Each stage reads the kept rows of the stage before it from Parquet and writes all of its own
rows back, so an LLM stage has the cluster's accelerators to itself, and a later stage never
holds a reference into an earlier one's execution. The BM25 index is built on CPUs by its own
actor while Doc2Query runs. Any subset of the stages can run (in this order), which is how
each operator also runs alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import ray

from rare_ray.config import ALL_STAGES, RayConfig, RunConfig, StageName
from rare_ray.io.manifest import redact, versions
from rare_ray.io.readers import check_input, read_documents
from rare_ray.io.writers import OutputDir
from rare_ray.operators import BM25HardNeg, Doc2Query, Operator, ReasonDistill
from rare_ray.preflight import check_gpus, check_model
from rare_ray.rows import kept

logger = logging.getLogger("rare_ray")

INGEST = "ingest"


class ReconciliationError(RuntimeError):
    """Rows were lost or duplicated between stages: never expected, always fatal."""


def build_operators(config: RunConfig, stages: Sequence[StageName]) -> list[Operator]:
    make: dict[StageName, Callable[[], Operator]] = {
        "doc2query": lambda: Doc2Query(config.engine, config.doc2query, seed=config.seed),
        "bm25": lambda: BM25HardNeg(config.bm25),
        "distill": lambda: ReasonDistill(config.engine, config.distill, seed=config.seed),
    }
    return [make[name]() for name in ALL_STAGES if name in stages]


def init_ray(config: RayConfig) -> None:
    if ray.is_initialized():
        return
    # Join the cluster a `ray job submit` points at; otherwise start a private local Ray
    # rather than attach to whatever `ray start` left running on this machine.
    address = config.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        num_cpus=config.num_cpus if address == "local" else None,
        runtime_env=config.runtime_env or None,
        include_dashboard=False if address == "local" else None,
        log_to_driver=True,
    )


def run(
    config: RunConfig,
    stages: Sequence[StageName] = ALL_STAGES,
    corpus: str | None = None,
) -> dict[str, Any]:
    """Run ``stages`` over ``config.input``; returns the manifest (also in the output dir).

    ``corpus`` (BM25 only) indexes another file than the input, e.g. a table of questions
    mined against a separate document collection.
    """
    started = datetime.now(UTC)
    operators = build_operators(config, stages)
    if not operators:
        raise ValueError(f"no stage to run among {list(stages)}")
    out = OutputDir(config.output)

    # Everything that can be checked without an engine is checked before one starts.
    out.check_writable()
    required = dict(operators[0].input_columns)
    check_input(config.input, required, config.id_key)
    uses_llm = any(isinstance(op, Doc2Query | ReasonDistill) for op in operators)
    if uses_llm:
        check_model(config.engine.model)
    if corpus is not None:
        check_input(corpus, {"text": "text"}, config.id_key)

    init_ray(config.ray)
    if uses_llm:
        check_gpus(config.engine, ray.cluster_resources())
    if config.limit is not None:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    timings: dict[str, float] = {}

    t = time.perf_counter()
    _log(f"reading {config.input}")
    documents = read_documents(
        config.input, required, config.id_key, config.limit, id_from=operators[0].text_key
    )
    out.write_stage(INGEST, documents)
    timings[INGEST] = time.perf_counter() - t

    index_build = None
    bm25 = next((op for op in operators if isinstance(op, BM25HardNeg)), None)
    if bm25 is not None:
        if corpus is None:
            index_corpus = out.read_stage(INGEST)
        else:
            index_corpus = read_documents(corpus, {bm25.config.input_text_key: "text"})
            index_corpus = index_corpus.map_batches(kept, batch_format="pyarrow")
        _log("building the BM25 index in the background")
        index_build = bm25.start_index(index_corpus)

    index_info: dict[str, Any] | None = None
    previous = INGEST
    for op in operators:
        t = time.perf_counter()
        _log(f"stage {op.name}: starting")
        ds = out.read_stage(previous)
        if isinstance(op, BM25HardNeg):
            assert index_build is not None
            index = index_build.result()
            index_info = index.describe()
            _log(f"BM25 index ready: {index.num_docs} documents in {index.build_seconds:.1f} s")
            result = op.run(ds, index=index)
        else:
            result = op.run(ds)
        out.write_stage(op.name, result)
        timings[op.name] = time.perf_counter() - t
        counts = out.stage_counts(op.name)
        _log(
            f"stage {op.name}: {counts['out']} kept, {counts['rejected']} rejected "
            f"({timings[op.name]:.1f} s)"
        )
        previous = op.name

    t = time.perf_counter()
    out.publish_data(previous, config.output_layout.validation_fraction)
    out.publish_rejects(
        {INGEST: operators[0].text_key, **{op.name: op.text_key for op in operators}}
    )
    timings["publish"] = time.perf_counter() - t

    stage_names = [INGEST, *(op.name for op in operators)]
    manifest = {
        "rare_ray_version": versions()["rare-ray"],
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "input": config.input,
        "output": config.output,
        "stages_run": [op.name for op in operators],
        "engine": config.engine.model_dump(include={"kind", "model", "device"}),
        "versions": versions(),
        "index": index_info,
        "counts": _reconcile(out, stage_names),
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        "config": redact(config.model_dump(mode="json")),
    }
    path = out.write_manifest(manifest)
    _log(f"manifest: {path}")
    return manifest


def _reconcile(out: OutputDir, stages: list[str]) -> dict[str, Any]:
    """Counts per stage; checks that in = out + rejected everywhere and overall."""
    per_stage: dict[str, dict[str, int]] = {}
    incoming = None
    for stage in stages:
        counts = out.stage_counts(stage)
        written = counts["out"] + counts["rejected"]
        counts = {"in": written if incoming is None else incoming, **counts}
        if counts["in"] != written:
            raise ReconciliationError(
                f"stage {stage}: {counts['in']} rows in, but {counts['out']} kept + "
                f"{counts['rejected']} rejected"
            )
        per_stage[stage] = counts
        incoming = counts["out"]
    input_rows = per_stage[stages[0]]["in"]
    rejected = sum(c["rejected"] for c in per_stage.values())
    output_rows = per_stage[stages[-1]]["out"]
    published = {"data": out.count_rows("data"), "rejects": out.count_rows("rejects")}
    if input_rows != published["data"] + published["rejects"] or published["data"] != output_rows:
        raise ReconciliationError(
            f"{input_rows} input rows, but {published['data']} in data/ + "
            f"{published['rejects']} in rejects/ (last stage kept {output_rows})"
        )
    return {
        "input_rows": input_rows,
        "output_rows": output_rows,
        "rejected_rows": rejected,
        "stages": per_stage,
    }


def _log(message: str) -> None:
    print(f"[rare-ray] {message}", flush=True)
