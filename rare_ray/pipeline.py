"""The RARE job: ingest, then the stages (Doc2Query -> BM25HardNeg -> ReasonDistill), each
checkpointed; then publishing and the manifest.

The pipeline drives every stage through the ``Operator`` contract alone
(``rare_ray.operators.base``): it checks their columns and settings before Ray starts, starts
the LLM engines before ingest (once per run, shared by every stage that names them), lets
every stage with work left ``prepare`` before the first runs (so BM25's index builds on CPUs
while Doc2Query generates), then runs the stages side by side with ``rare_ray.runner``: each
reads the kept rows of the stage before it from Parquet as that stage commits them, shard by
shard (``rare_ray.io.checkpoints``), and writes all of its own rows back, so BM25 searches
while Doc2Query generates, a later stage never holds a reference into an earlier one's
execution, and a rerun picks up at the first shard that was not committed. Any subset of the
stages can run (in order), which is how each operator also runs alone; ``run_operators`` runs
any operators.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import ray

from rare_ray.config import RayConfig, RunConfig
from rare_ray.driver_cpu import DriverCPU
from rare_ray.io.checkpoints import Checkpoints, Shard, fingerprint
from rare_ray.io.manifest import estimated_cost, versions
from rare_ray.io.publication import (
    Group,
    Publication,
    RejectSource,
    complete_manifest,
    publication_id,
)
from rare_ray.io.readers import check_input, input_listing, read_documents
from rare_ray.io.writers import OutputDir
from rare_ray.operators import Operator, StageContext, build_operators
from rare_ray.preflight import check_gpus
from rare_ray.rows import kept
from rare_ray.runner import Source, run_stages
from rare_ray.vocabulary import (
    ALL_STAGES,
    INGEST,
    ColumnKind,
    ReconciliationError,
    StageName,
    redact,
)


def init_ray(config: RayConfig, log_to_driver: bool = True, attempts: int = 1) -> None:
    """Joins the cluster a `ray job submit` points at; otherwise starts a private local Ray
    rather than attach to whatever `ray start` left running on this machine.

    The benches pass ``log_to_driver=False`` (so workers' logs do not break up their tables)
    and a few ``attempts`` (a busy machine can time a local Ray's start-up out).
    """
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS") or "local"
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                address=address,
                num_cpus=config.num_cpus if address == "local" else None,
                runtime_env=config.runtime_env or None,
                include_dashboard=False if address == "local" else None,
                log_to_driver=log_to_driver,
            )
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts:
                raise
            time.sleep(5)


def ingest_columns(config: RunConfig, operators: Sequence[Operator]) -> dict[str, ColumnKind]:
    """The columns ingest reads: each column a stage reads that no stage before it writes
    (a stage's group key, say), and the columns the config carries through to ``data/``."""
    columns: dict[str, ColumnKind] = {}
    written: set[str] = set()
    for op in operators:
        for name, kind in op.input_columns.items():
            if name not in written:
                columns.setdefault(name, kind)
        written.update(f.name for f in op.output_fields)
    for name in config.carry_columns:
        columns.setdefault(name, "carried")
    return columns


def stage_settings(
    config: RunConfig, operators: Sequence[Operator], corpus: str | None
) -> dict[str, dict[str, Any]]:
    """What each stage's output depends on: its own settings and everything upstream.

    The input is identified by its files' names, sizes and modification times.
    """
    ingest = {
        **config.ingest_settings(),
        "columns": ingest_columns(config, operators),
        "files": input_listing(config.input),
    }
    settings = {INGEST: ingest}
    upstream = ingest
    for op in operators:
        own = op.settings()
        if op.reads_corpus and corpus is not None:
            own["corpus"] = input_listing(corpus)
        settings[op.name] = upstream = {**own, "upstream": fingerprint(upstream)}
    return settings


def run(
    config: RunConfig,
    stages: Sequence[StageName] = ALL_STAGES,
    corpus: str | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run ``stages`` over ``config.input``; returns the manifest (also in the output dir).

    A rerun into the same output directory resumes: stages and shards that an earlier run
    committed are skipped. It refuses an earlier run made with other settings, unless ``fresh``
    (then the output directory is cleared first). ``corpus`` (for a stage that reads the whole
    corpus, BM25) names another file than the input, e.g. a table of questions mined against
    a separate document collection.
    """
    started = datetime.now(UTC)
    operators = build_operators(config, stages)
    if not operators:
        raise ValueError(f"no stage to run among {list(stages)}")
    return run_operators(config, operators, corpus=corpus, fresh=fresh, started=started)


def run_operators(
    config: RunConfig,
    operators: Sequence[Operator],
    corpus: str | None = None,
    fresh: bool = False,
    started: datetime | None = None,
) -> dict[str, Any]:
    """``run`` with the stages given as operators, any ``Operator`` subclass among them."""
    started = started or datetime.now(UTC)
    # CPU seconds of this process (all its threads: Ray's driver-side ones too), for the
    # manifest: what the driver costs, which must stay small next to the run's wall time.
    with DriverCPU() as driver_cpu:
        return _run_operators(config, operators, corpus, fresh, started, driver_cpu)


def _run_operators(
    config: RunConfig,
    operators: Sequence[Operator],
    corpus: str | None,
    fresh: bool,
    started: datetime,
    driver_cpu: DriverCPU,
) -> dict[str, Any]:
    out = OutputDir(config.output)
    ckpt = out.checkpoints
    settings = _preflight(config, operators, corpus, out, fresh)
    done = _already_published(config, operators, out)
    if done is not None:
        return done

    init_ray(config.ray)
    timings: dict[str, float] = {}

    ingest = ckpt.pass_of(INGEST)
    # Each pass reads its rows from here: ingest's kept rows, then the pass before's.
    source = Source((ingest,), "kept")
    context = StageContext(
        corpus=functools.partial(_corpus, source, corpus, operators),
        cluster_resources=ray.cluster_resources(),
        log=_log,
        stages_root=f"{config.output.rstrip('/')}/_stages",
    )
    pending = [op for op in operators if not ckpt.pass_of(op.name, op.passes).complete()]
    # The LLM engines of the stages with work left start first, so that they load while
    # ingest reads; every stage that names the same engine config shares them
    # (``context.engines``), and they are closed once the last stage is done, whatever happens.
    try:
        for op in pending:
            for engine in op.engines:
                check_gpus(engine, dict(context.cluster_resources))
                context.engines.get(engine)

        t = time.perf_counter()
        if ingest.complete():
            _log(f"ingest: complete in {config.output}, resuming after it")
        else:
            _log(f"reading {config.input}")
            columns = ingest_columns(config, operators)
            id_from = operators[0].text_key
            documents = read_documents(config.input, columns, config.id_key, config.limit, id_from)
            ckpt.write_ingest(documents, config.checkpoint.shard_rows)
            ckpt.record_settings(INGEST, settings[INGEST])
        timings[INGEST] = time.perf_counter() - t
        context.corpus_key = fingerprint(
            {str(k): asdict(v) for k, v in ingest.committed().items()}
            if corpus is None
            else input_listing(corpus)
        )

        # Every stage with work left sets up before the first one runs, so background work
        # (BM25's index) overlaps the stages before it and bad settings stop the run early.
        for op in pending:
            op.prepare(context)
        timings.update(
            run_stages(
                ckpt,
                operators,
                source,
                context,
                config.checkpoint.max_failed_batches,
                # No part needs more rows than a shard holds; bigger bundles only hold back
                # the commits of the shards they would hold (a killed run would redo them).
                min(config.checkpoint.part_rows, config.checkpoint.shard_rows),
                # A stage's settings are recorded as it starts, before it writes anything.
                before_stage=lambda op: ckpt.record_settings(op.name, settings[op.name]),
            )
        )
        engines = _engine_report(context, started)
    finally:
        context.engines.close()

    t = time.perf_counter()
    shards = ingest.committed()
    pub, wrote = out.publish(
        _groups(ckpt, operators, shards, config.output_layout.rows_per_file),
        config.output_layout.validation_fraction,
    )
    if not wrote:
        _log(f"publish: publication {pub.id} is complete in {config.output}, nothing to write")
    timings["publish"] = time.perf_counter() - t

    t = time.perf_counter()
    counts = _reconcile(out, operators, pub)
    timings["reconcile"] = time.perf_counter() - t
    manifest = {
        "rare_ray_version": versions()["rare-ray"],
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "input": config.input,
        "output": config.output,
        "stages_run": [op.name for op in operators],
        "engine": config.engine.model_dump(include={"kind", "model", "device"}),
        "versions": versions(),
        **{k: v for op in operators for k, v in op.manifest_entries().items()},
        "shards": len(shards),
        "engines": engines,
        "counts": counts,
        "estimated_cost": estimated_cost(
            config.engine.model_dump()["price_per_million_tokens"], counts["stages"]
        ),
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        # Of those, the driver's time writing commit records (each shard's, each pass's).
        "commit_seconds": {
            name: round(ckpt.commit_seconds(name), 3)
            for name in (INGEST, *(op.name for op in operators))
        },
        "driver_cpu_seconds": round(driver_cpu.seconds(), 3),
        # Whose it is: Ray Data's executors (a thread each), the stages' threads, the rest.
        "driver_cpu_by_thread": driver_cpu.by_thread(),
        "config": redact(config.model_dump(mode="json")),
        "publication": pub.to_json(),
    }
    _log(f"manifest: {out.commit(manifest)}")
    return manifest


def _preflight(
    config: RunConfig,
    operators: Sequence[Operator],
    corpus: str | None,
    out: OutputDir,
    fresh: bool,
) -> dict[str, dict[str, Any]]:
    """Everything that can be checked without Ray or an engine; returns the stages' settings."""
    out.check_writable()
    check_input(config.input, ingest_columns(config, operators), config.id_key)
    for op in operators:
        op.check()
    if corpus is not None:
        check_input(corpus, _corpus_columns(operators), config.id_key)
    settings = stage_settings(config, operators, corpus)
    if fresh:
        out.clear()
    out.checkpoints.check_settings(settings)
    return settings


def _already_published(
    config: RunConfig, operators: Sequence[Operator], out: OutputDir
) -> dict[str, Any] | None:
    """The manifest, when every stage is complete and its publication too: a rerun with
    nothing to do starts no Ray and writes nothing."""
    ckpt = out.checkpoints
    ingest = ckpt.pass_of(INGEST)
    if not ingest.complete():
        return None
    if not all(ckpt.pass_of(op.name, op.passes).complete() for op in operators):
        return None
    groups = _groups(ckpt, operators, ingest.committed(), config.output_layout.rows_per_file)
    pub_id = publication_id(groups, config.output_layout.validation_fraction)
    manifest = complete_manifest(out.fs, out.root, pub_id)
    if manifest is not None:
        out.finish(manifest)
        for op in operators:
            _log(f"{op.name}: complete, skipped")
        _log(f"publish: publication {pub_id} is complete in {config.output}, nothing to write")
    return manifest


def _groups(
    ckpt: Checkpoints, operators: Sequence[Operator], shards: Mapping[int, Shard], rows: int
) -> list[Group]:
    """What publishing reads: runs of consecutive shards of about ``rows`` input rows each,
    with the last stage's kept rows and every stage's final rejects of those shards."""
    last, ingest = operators[-1], ckpt.pass_of(INGEST)
    runs: list[list[int]] = [[]]
    for k in sorted(shards):
        if runs[-1] and sum(shards[j].rows for j in runs[-1]) + shards[k].rows > rows:
            runs.append([])
        runs[-1].append(k)
    kept = [(p, p.committed()) for p in ckpt.passes(last.name, last.passes)]
    committed = {op.name: ckpt.pass_of(op.name, op.passes).committed() for op in operators}
    return [
        Group(
            [f for p, done in kept for f in p.files(run, done)],
            [
                RejectSource(INGEST, ingest.files(run, shards), operators[0].text_key),
                *(
                    RejectSource(
                        op.name,
                        ckpt.pass_of(op.name, op.passes).files(run, committed[op.name]),
                        op.text_key,
                        op.pass_column,
                    )
                    for op in operators
                ),
            ],
        )
        for run in runs
        if run
    ]


def _corpus(source: Source, corpus: str | None, operators: Sequence[Operator]) -> ray.data.Dataset:
    """The whole corpus, for a stage that needs it: ingest's kept rows, or ``corpus``."""
    if corpus is None:
        return source.read(source.expected())
    columns = _corpus_columns(operators)
    return read_documents(corpus, columns).map_batches(kept, batch_format="pyarrow")


def _corpus_columns(operators: Sequence[Operator]) -> dict[str, ColumnKind]:
    """What a separate corpus must hold: the text of the stage that reads it, and the
    columns it carries (BM25's group key)."""
    op = next(op for op in operators if op.reads_corpus)
    carried = {name: kind for name, kind in op.input_columns.items() if kind == "carried"}
    return {op.text_key: "text", **carried}


def _engine_report(context: StageContext, started: datetime) -> list[dict[str, Any]]:
    """What each of the run's engines did, its times in seconds after the run started."""
    t0 = started.timestamp()
    out = []
    for report in context.engines.reports():
        entry = {k: v for k, v in report.items() if not k.endswith("_at")}
        for key, at in report.items():
            if key.endswith("_at"):
                entry[key.replace("_at", "_after_s")] = None if at is None else round(at - t0, 3)
        out.append(entry)
    return out


def _reconcile(out: OutputDir, operators: Sequence[Operator], pub: Publication) -> dict[str, Any]:
    """Counts per stage; checks that in = out + rejected everywhere, and that the publication
    holds every input row once."""
    ckpt = out.checkpoints
    ingest = ckpt.pass_of(INGEST).committed()
    per_stage: dict[str, dict[str, int]] = {
        INGEST: {
            "in": sum(s.rows for s in ingest.values()),
            "out": sum(s.kept for s in ingest.values()),
            "rejected": sum(s.rejected for s in ingest.values()),
        }
    }
    incoming = per_stage[INGEST]["out"]
    for op in operators:
        counts = ckpt.counts(op.name, op.passes)
        if counts["in"] != incoming:
            raise ReconciliationError(
                f"stage {op.name}: {incoming} rows came in, but {counts['out']} kept + "
                f"{counts['rejected']} rejected"
            )
        per_stage[op.name] = counts
        incoming = counts["out"]
    input_rows = per_stage[INGEST]["in"]
    rejected = sum(c["rejected"] for c in per_stage.values())
    published = {"data": pub.data_rows, "rejects": pub.reject_rows}
    if input_rows != published["data"] + published["rejects"] or published["data"] != incoming:
        raise ReconciliationError(
            f"{input_rows} input rows, but {published['data']} in data/ + "
            f"{published['rejects']} in rejects/ (last stage kept {incoming})"
        )
    return {
        "input_rows": input_rows,
        "output_rows": incoming,
        "rejected_rows": rejected,
        "stages": per_stage,
    }


def _log(message: str) -> None:
    print(f"[rare-ray] {message}", flush=True)
