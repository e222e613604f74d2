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
from collections.abc import Iterator

import psutil
import pyarrow.dataset as pads
import pytest

from rare_ray import pipeline
from rare_ray.engines.vllm import REPLICA_CLASS
from rare_ray.runner import batch_error
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
