"""An engine that dies on every batch: bounded restarts, then rejects, and the run goes on.

The failure is real: a thread sends SIGKILL to the vLLM engine actor of this session's Ray
whenever it is working on a batch (as an OOM killer that keeps striking would), never while it
is starting. ``ray.data.llm`` alone would restart it and retry the batch forever; here the
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
                if "MapBatches(vLLMEngineStageUDF)" in title and "__init__" not in title:
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
