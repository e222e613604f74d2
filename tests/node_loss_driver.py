"""Runs a ``rare-ray`` job on a three-node Ray cluster on this machine and removes a worker
node abruptly at a chosen moment; writes what happened as JSON.

A process of its own (``python -m tests.node_loss_driver SCENARIO WORKDIR``): it owns the
cluster's nodes (``ray.cluster_utils.Cluster``) and is never a Ray driver itself, while the job
runs as users run it, ``rare-ray`` in another process connected to the cluster's address.
``remove_node(node, allow_graceful=False)`` kills the node's raylet, workers and object store
at once, as a spot preemption or a failed health check does.

Scenarios:
- ``index-builder``: ``rare-ray bm25`` over the sample questions; the node whose actor built
  the BM25 index is removed once a searcher on it has served a batch.
- ``engine-node``: ``rare-ray run`` over the first ``RUN_DOCS`` sample abstracts with the test
  model; the node of the vLLM engine replica is removed once Doc2Query has committed a shard.
- ``distill-node``: the same run; the engine replica's node is removed once ReasonDistill has
  committed a shard.
- ``no-engine-node``: the same run with ``engine.unavailable_timeout_s`` of
  ``UNAVAILABLE_TIMEOUT_S``; once Doc2Query has committed a shard, both worker nodes are
  removed (the head has no CPU: no node is left for the engine). The run must stop by itself;
  then a new worker node joins and the same command is run again.
- ``publish``: ``rare-ray bm25`` as in ``index-builder``, publishing files of
  ``PUBLISH_ROWS_PER_FILE`` rows; the node of a publishing task caught writing one of them is
  removed. If the job stops, the same command is run again on the node left, as the
  publication protocol's rerun rule says a user would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from ray.cluster_utils import Cluster

from rare_ray.operators.bm25_hardneg import SEARCH_LOG
from tests.helpers import (
    LOCAL_CONFIG,
    REPO,
    TEST_MODEL,
    local_config_in,
    sample_questions,
    sample_rows,
    write_jsonl,
)

WORKERS = 2
WORKER_CPUS = 3
COPIES = 20
QUESTIONS = 1000 * COPIES  # the sample holds 1,000 questions
RUN_DOCS = 60
# 20,000 rows in shards and files of 250: 80 publishing tasks, for the loss to land among.
PUBLISH_ROWS_PER_FILE = 250
# The stage whose first committed shard is the moment an engine scenario removes the node.
ENGINE_SCENARIOS = {"engine-node": "doc2query", "distill-node": "distill",
                    "no-engine-node": "doc2query"}  # fmt: skip
UNAVAILABLE_TIMEOUT_S = 20


def _searches(nodes_dir: Path) -> list[dict[str, Any]]:
    """Every batch a searcher served, from the search logs of all nodes."""
    return [
        json.loads(line)
        for log in nodes_dir.glob(f"*/{SEARCH_LOG}")
        for line in log.read_text().splitlines()
    ]


def _actor_node(cluster: Cluster, class_name: str) -> str | None:
    """The node id of the (first) actor of ``class_name``, alive or dead, from the GCS."""
    for actor in cluster.global_state.actor_table(None).values():
        if actor["ActorClassName"] == class_name and actor["Address"]["NodeID"]:
            return str(actor["Address"]["NodeID"])
    return None


def _wait_for(condition: Any, timeout: float, job: subprocess.Popen, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if job.poll() is not None:
            raise RuntimeError(f"the job ended (exit {job.returncode}) before {what}")
        time.sleep(0.1)
    raise TimeoutError(f"no {what} after {timeout:.0f} s")


def bm25_job(
    workdir: Path, address: str, publish_rows: int | None = None
) -> tuple[list[str], Path]:
    """The ``rare-ray bm25`` command, with its config written: the sample's questions, each
    asked ``COPIES`` times (one searcher answers the sample's 1,000 in about 3 s, too soon
    for a loss to land mid-stage), against the sample's abstracts."""
    texts = {r["id"]: r["text"] for r in sample_rows()}
    table = [
        {"id": f"{q['id']}-{copy}", "question": q["question"], "text": texts[q["id"]]}
        for copy in range(COPIES)
        for q in sample_questions()
    ]
    questions = write_jsonl(workdir / "questions.jsonl", table)
    corpus = write_jsonl(workdir / "corpus.jsonl", [{"id": k, "text": t} for k, t in texts.items()])
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["ray"] = {"address": address}
    config["checkpoint"] = {**config.get("checkpoint", {}), "shard_rows": publish_rows or 1000}
    if publish_rows:  # a publishing task, and a file, per shard of that many rows
        config["output_layout"] = {**config.get("output_layout", {}), "rows_per_file": publish_rows}
    config["bm25"].update(
        local_dir=str(workdir / "nodes" / "{node_id}"),
        searchers_per_node=1,
        cpus_per_searcher=1,
        heap_per_searcher="512m",
        debug_logs=True,
    )
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    out = workdir / "out"
    command = [sys.executable, "-m", "rare_ray.cli", "bm25", "--config", str(path),
               "--input", str(questions), "--corpus", str(corpus),
               "--output", str(out)]  # fmt: skip
    return command, out


def run_job(
    workdir: Path, address: str, unavailable_timeout_s: float | None = None
) -> tuple[list[str], Path]:
    """The ``rare-ray run`` command over the first ``RUN_DOCS`` abstracts, config written."""
    config = local_config_in(workdir, TEST_MODEL).model_dump(mode="json")
    if unavailable_timeout_s is not None:
        config["engine"]["unavailable_timeout_s"] = unavailable_timeout_s
    config["ray"]["address"] = address
    config["ray"].pop("num_cpus", None)  # the cluster's nodes say how many they have
    config["checkpoint"]["shard_rows"] = 10
    # Batches of 8 rows: shards commit one after another, so the loss lands mid-Doc2Query.
    config["engine"]["batch_size"] = 8
    config["bm25"].update(local_dir=str(workdir / "nodes" / "{node_id}"), debug_logs=True)
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    out = Path(config["output"])
    command = [sys.executable, "-m", "rare_ray.cli", "run", "--config", str(path),
               "--limit", str(RUN_DOCS)]  # fmt: skip
    return command, out


def _committed(out: Path, stage: str) -> list[str]:
    """Ids of the rows in ``stage``'s committed shards (those with a ``_SUCCESS``)."""
    ids = []
    for done in (out / "_stages" / stage).glob("shard-*/_SUCCESS"):
        for name in json.loads(done.read_text())["files"]:
            # The record names its files from the pass's directory: shard-NNNNN/part-....
            ids += pq.read_table(done.parent.parent / name, columns=["id"])["id"].to_pylist()
    return ids


def _published(out: Path) -> list[str]:
    """Files under ``data/`` now, hidden ones (being written) included."""
    return [str(f.relative_to(out)) for f in (out / "data").glob("*/*") if f.is_file()]


def _writers(out: Path) -> list[int]:
    """Pids of the processes writing a file under ``data/`` now: a file being written is
    hidden, ``.<name>.tmp-<pid>`` (``write_parquet_whole``)."""
    return [int(f.name.rsplit("-", 1)[1]) for f in (out / "data").glob("*/.*.tmp-*")]


def _node_of(pid: int, nodes: dict[str, Any]) -> str | None:
    """The node whose raylet started process ``pid`` (a Ray worker's parent is its raylet)."""
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):  # it has already finished
        return None
    for node_id, node in nodes.items():
        if any(p.process.pid == parent for p in node.all_processes.get("raylet", [])):
            return node_id
    return None


def _written(out: Path, stage: str) -> list[str]:
    """Ids in every part file of ``stage`` that can be read now, committed or not."""
    ids = []
    for part in (out / "_stages" / stage).glob("shard-*/*.parquet"):
        try:
            ids += pq.read_table(part, columns=["id"])["id"].to_pylist()
        except (OSError, pa.ArrowInvalid):  # being written: its rows count as not done
            continue
    return ids


def main(scenario: str, workdir_arg: str) -> None:
    workdir = Path(workdir_arg)
    workdir.mkdir(parents=True, exist_ok=True)
    # No work on the head, as in cluster/: whatever the lost node ran, the others must redo.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {}
    for _ in range(WORKERS):
        node = cluster.add_node(num_cpus=WORKER_CPUS, object_store_memory=300 << 20)
        nodes[node.node_id] = node
    cluster.wait_for_nodes()
    result: dict[str, Any] = {"scenario": scenario, "workers": list(nodes)}
    try:
        if scenario == "index-builder":
            command, out = bm25_job(workdir, cluster.address)
        elif scenario == "publish":
            command, out = bm25_job(workdir, cluster.address, PUBLISH_ROWS_PER_FILE)
        elif scenario == "no-engine-node":
            command, out = run_job(workdir, cluster.address, UNAVAILABLE_TIMEOUT_S)
        elif scenario in ENGINE_SCENARIOS:
            command, out = run_job(workdir, cluster.address)
        else:
            raise ValueError(f"no scenario {scenario!r}")
        nodes_dir = workdir / "nodes"
        with (workdir / "job.log").open("w") as log:
            job = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            try:
                if scenario == "index-builder":
                    doomed = _wait_for(
                        lambda: _actor_node(cluster, "LuceneIndexHolder"), 600, job, "builder"
                    )
                    # Once a searcher on that node has served a batch: it has rows in flight.
                    _wait_for(
                        lambda: [b for b in _searches(nodes_dir) if b["node_id"] == doomed],
                        600, job, "search batch on the builder's node",
                    )  # fmt: skip
                    result["searched_before_removal"] = sum(b["rows"] for b in _searches(nodes_dir))
                elif scenario == "publish":
                    # The node of a process caught writing a publication file.
                    doomed = _wait_for(
                        lambda: next(
                            (n for pid in _writers(out) if (n := _node_of(pid, nodes))), None
                        ),
                        900, job, "publishing task writing a file",
                    )  # fmt: skip
                    result["published_before_removal"] = _published(out)
                    result["manifest_before_removal"] = (out / "manifest.json").exists()
                else:
                    stage = ENGINE_SCENARIOS[scenario]
                    doomed = _wait_for(
                        lambda: _actor_node(cluster, "EngineReplica"), 600, job, "engine"
                    )
                    _wait_for(lambda: _committed(out, stage), 900, job, f"{stage} shard")
                    result["committed_before_removal"] = _committed(out, stage)
                    result["written_before_removal"] = _written(out, stage)
                result["removed"] = doomed
                result["removed_at"] = time.time()
                cluster.remove_node(nodes[doomed], allow_graceful=False)
                if scenario == "no-engine-node":  # and the other: no node left with CPUs
                    for other in set(nodes) - {doomed}:
                        cluster.remove_node(nodes[other], allow_graceful=False)
                result["returncode"] = job.wait(timeout=1200)
                result["ended_at"] = time.time()
            finally:
                if job.poll() is None:
                    job.kill()
        if scenario == "no-engine-node":  # a node joins; the same command resumes
            result["committed_before_rerun"] = _committed(out, "doc2query")
            cluster.add_node(num_cpus=WORKER_CPUS, object_store_memory=300 << 20)
            cluster.wait_for_nodes()
        if scenario == "no-engine-node" or (scenario == "publish" and result["returncode"]):
            # The rerun rule: the same command again finishes the publication.
            with (workdir / "rerun.log").open("w") as log:
                rerun = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            result["rerun_returncode"] = rerun.returncode
            result["rerun_log_tail"] = (workdir / "rerun.log").read_text()[-6000:]
        result["searches"] = _searches(nodes_dir)
        result["output"] = str(out)
    finally:
        result["log_tail"] = (workdir / "job.log").read_text()[-6000:] if (
            workdir / "job.log"
        ).exists() else ""  # fmt: skip
        (workdir / "result.json").write_text(json.dumps(result, indent=1))
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
