"""An engine that dies on every batch: bounded restarts, then rejects, and the run goes on.

The failure is real: a thread sends SIGKILL to the vLLM engine actor of this session's Ray
whenever it is working on a batch (as an OOM killer that keeps striking would), never while it
is starting. Ray's defaults would restart it and retry the batch forever; here the
actor gets ``engine.max_restarts`` restarts, then the batch is given up and its rows become
rejects carrying the error, and the run finishes with counts that reconcile.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray.data

from rare_ray import pipeline
from rare_ray.config import EngineConfig, OpenAIEngineConfig
from rare_ray.engines.vllm import REPLICA_CLASS
from rare_ray.io.checkpoints import Checkpoints, Pass
from rare_ray.io.readers import read_documents
from rare_ray.operators import Operator, Resources, StageContext
from rare_ray.rows import SHARD
from rare_ray.runner import Source, batch_error, run_stages
from rare_ray.vocabulary import INGEST, ColumnKind, StageError
from tests.helpers import local_config_in, sample_rows, write_jsonl


@pytest.fixture
def engine_killer() -> Iterator[list[int]]:
    """Kills this process's engine actors while they serve a batch; yields the pids killed."""
    killed: list[int] = []
    stop = threading.Event()

    def strike() -> None:
        while not stop.wait(0.5):
            for proc in psutil.Process(os.getpid()).children(recursive=True):
                try:
                    title = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                if f"{REPLICA_CLASS}.generate" in title:
                    killed.append(proc.pid)
                    with contextlib.suppress(psutil.Error):
                        engine_core = proc.children(recursive=True)  # vLLM's own processes
                        proc.kill()
                        for child in engine_core:
                            child.kill()

    thread = threading.Thread(target=strike, daemon=True)
    thread.start()
    yield killed
    stop.set()
    thread.join()


def test_a_dying_engine_is_restarted_a_bounded_number_of_times_then_rows_are_rejected(
    ray_local, tmp_path, test_model, engine_killer
):
    docs = sample_rows(5)
    rows = [
        {"id": d["id"], "text": d["text"], "question": "Why?", "scenario": "A case.",
         "hard_negatives": [o["text"] for o in docs if o is not d][:2]}
        for d in docs[:4]
    ]  # fmt: skip
    config = local_config_in(tmp_path, test_model)
    config.input = str(write_jsonl(tmp_path / "questions.jsonl", rows))
    config.engine.max_restarts = 1
    manifest = pipeline.run(config, stages=("distill",))

    # The actor served the batch twice (first start, one restart) and was killed both times.
    assert len(set(engine_killer)) >= 2
    counts = manifest["counts"]
    assert (counts["input_rows"], counts["output_rows"], counts["rejected_rows"]) == (4, 0, 4)
    rejects = pads.dataset(tmp_path / "out" / "rejects", format="parquet", partitioning="hive")
    rejected = rejects.to_table().to_pylist()
    assert sorted(r["id"] for r in rejected) == sorted(r["id"] for r in rows)
    for row in rejected:
        assert row["stage"] == "distill"
        assert row["reason"].startswith("distill: the batch holding this row failed after its")
        assert "ActorDiedError" in row["reason"]


def test_a_batch_error_is_the_first_error_of_the_chain_not_ray_datas_advice():
    text = (
        "ray::MapWorker(MapBatches(EngineWorker)).submit()\n"
        '  File "rare_ray/engines/vllm.py", line 313, in generate\n'
        "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n"
        "\tclass_name: EngineReplica\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
        "To change retry attempts, configure `ray.data.DataContext.get_current()`"
    )
    wrapped = RuntimeError(text)
    assert batch_error(wrapped) == (
        "ActorDiedError: The actor died unexpectedly before finishing this task."
    )
    assert batch_error(ValueError("no traceback in here")) == "ValueError: no traceback in here"


# ---------------------------------------------------------------------------------------------
# Stages side by side: a CPU stage follows the stage before it shard by shard, a stage that
# shares an engine with an earlier one waits for the stage before it to finish.

SHARD_ROWS, N_SHARDS, FIRST_BATCH_S = 20, 6, 1.0


class _Timed(Operator):
    """Records when it handled each row (``<name>_at``); the first stage takes its time, one
    batch (a shard) at a time, and may fail on one shard."""

    name = "timed"
    delay_s = 0.0
    fail_shard: int | None = None
    started_at = 0.0  # when run_pass made its execution

    @property
    def input_columns(self) -> Mapping[str, ColumnKind]:
        return {"text": "text"}

    @property
    def text_key(self) -> str:
        return "text"

    @property
    def own_fields(self) -> Sequence[pa.Field]:
        return [pa.field(f"{self.name}_at", pa.float64())]

    @property
    def resources(self) -> Resources:
        return Resources(cpus=0.5, workers=1)

    def settings(self) -> dict[str, Any]:
        return {}

    def run_pass(
        self, ds: ray.data.Dataset, attempt: int, context: StageContext
    ) -> ray.data.Dataset:
        self.started_at = time.time()
        one_at_a_time = {"compute": ray.data.TaskPoolStrategy(size=1)} if self.delay_s else {}
        return ds.repartition(target_num_rows_per_block=SHARD_ROWS).map_batches(
            self._stamp, batch_format="pyarrow", num_cpus=0.5, **one_at_a_time
        )

    def _stamp(self, batch: pa.Table) -> pa.Table:
        if self.fail_shard is not None and self.fail_shard in batch[SHARD].to_pylist():
            raise ValueError(f"{self.name} fails on shard {self.fail_shard}")
        time.sleep(self.delay_s)
        stamps = [time.time()] * batch.num_rows
        return self.with_outputs(batch, {f"{self.name}_at": stamps}, [None] * batch.num_rows)


def _engine() -> EngineConfig:
    """An engine that two stages share (never started: ``run_stages`` starts none)."""
    return OpenAIEngineConfig(kind="openai", base_url="http://127.0.0.1:9/v1", model="m")


class _First(_Timed):
    name = "first"
    delay_s = FIRST_BATCH_S

    @property
    def engines(self) -> Sequence[EngineConfig]:
        return [_engine()]


class _OnCPUs(_Timed):
    name = "on_cpus"


class _OnTheEngine(_First):
    name = "on_the_engine"
    delay_s = 0.0


def _side_by_side(
    tmp_path: Path, first: Operator
) -> tuple[Checkpoints, dict[str, float], list[Operator]]:
    ckpt = Checkpoints(pafs.LocalFileSystem(), str(tmp_path / "out"))
    docs = [{"id": f"doc-{i}", "text": f"document {i}"} for i in range(SHARD_ROWS * N_SHARDS)]
    if not ckpt.pass_of(INGEST).complete():
        corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
        ckpt.write_ingest(read_documents(str(corpus), {"text": "text"}), SHARD_ROWS)
    context = StageContext(corpus=lambda: None, log=lambda _: None)  # type: ignore[arg-type,return-value]
    source = Source((ckpt.pass_of(INGEST),), "kept")
    operators = [first, _OnCPUs(), _OnTheEngine()]
    seconds = run_stages(
        ckpt, operators, source, context, max_failed_batches=0, part_rows=SHARD_ROWS
    )
    return ckpt, seconds, operators


def _kept(ckpt: Checkpoints, stage: str) -> pa.Table:
    files = ckpt.pass_of(stage).files(ckpt.pass_of(stage).committed())
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_a_cpu_stage_follows_shard_by_shard_and_an_engine_stage_waits_for_the_whole(
    ray_local, tmp_path
):
    ckpt, seconds, operators = _side_by_side(tmp_path, _First())

    assert list(seconds) == ["first", "on_cpus", "on_the_engine"]
    last = _kept(ckpt, "on_the_engine")
    ids = sorted(last["id"].to_pylist())
    assert ids == sorted(f"doc-{i}" for i in range(SHARD_ROWS * N_SHARDS))  # each row once
    first_at, cpus_at, engine_at = (last[f"{s}_at"].to_pylist() for s in seconds)
    # The CPU stage handled rows while the first stage still worked on later shards...
    assert min(cpus_at) < max(first_at) - FIRST_BATCH_S
    # ...and each row only after the first stage had committed its shard.
    assert all(c > f for c, f in zip(cpus_at, first_at, strict=True))
    # The stage on the first stage's engine began once the stage before it had finished: its
    # execution too, not only its rows (an execution waiting idle for 30 minutes is failed by
    # Ray Data, and at scale the stage before can take longer).
    assert min(engine_at) > max(cpus_at)
    assert operators[2].started_at > max(cpus_at)
    assert operators[1].started_at < max(first_at)  # the CPU stage's began before that


def test_a_failing_stage_stops_the_stages_beside_it_and_a_rerun_finishes_every_row_once(
    ray_local, tmp_path
):
    failing = _First()
    failing.fail_shard = N_SHARDS - 2
    started = time.monotonic()
    with pytest.raises(StageError, match="stage first stopped"):
        _side_by_side(tmp_path, failing)
    assert time.monotonic() - started < 120  # the stages beside it did not wait on
    committed = {s: set(ckpt_pass.committed()) for s, ckpt_pass in _passes(tmp_path).items()}
    assert len(committed["first"]) < N_SHARDS and not committed["on_the_engine"]
    assert committed["on_cpus"] <= committed["first"]  # never ahead of the stage before it

    ckpt, _, _ = _side_by_side(tmp_path, _First())
    assert sorted(_kept(ckpt, "on_the_engine")["id"].to_pylist()) == sorted(
        f"doc-{i}" for i in range(SHARD_ROWS * N_SHARDS)
    )


def _passes(tmp_path: Path) -> dict[str, Pass]:
    ckpt = Checkpoints(pafs.LocalFileSystem(), str(tmp_path / "out"))
    return {s: ckpt.pass_of(s) for s in ("first", "on_cpus", "on_the_engine")}
