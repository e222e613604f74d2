"""A worker node lost mid-run, on a three-node Ray cluster on this machine.

``tests/node_loss_driver.py`` owns the nodes and runs the job as a user would (``rare-ray`` in
a process of its own); it removes a node abruptly, and these tests read what the job made of
it. Each reports the work that was redone: rows searched (or generated) twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest

from rare_ray.engines.index_broadcast import UNPACK_LOG
from tests.helpers import REPO
from tests.node_loss_driver import (
    COPIES,
    PUBLISH_ROWS_PER_FILE,
    QUESTIONS,
    RUN_DOCS,
    UNAVAILABLE_TIMEOUT_S,
)


def lose_a_node(scenario: str, workdir: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "tests.node_loss_driver", scenario, str(workdir)]
    driver = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert driver.returncode == 0, driver.stderr[-4000:]
    return json.loads((workdir / "result.json").read_text())


def read_column(path: Path, column: str) -> list[Any]:
    """``column`` of the Parquet files under ``path`` (none when nothing is there)."""
    if not path.exists():
        return []
    return pads.dataset(path, partitioning="hive").to_table(columns=[column])[column].to_pylist()


def read_ids(path: Path) -> list[str]:
    return read_column(path, "id")


def read_lines(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines log's records (none when it is not there)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = pads.dataset(path, partitioning="hive").to_table().to_pylist()
    return rows


def test_losing_the_node_that_built_the_index_mid_bm25_loses_no_row(tmp_path, capsys):
    result = lose_a_node("index-builder", tmp_path)
    assert result["returncode"] == 0, result["log_tail"]
    removed, searches = result["removed"], result["searches"]
    survivors = set(result["workers"]) - {removed}
    # The loss came mid-stage: searchers served batches after it, on the other node only.
    assert result["searched_before_removal"] < QUESTIONS
    after = [b for b in searches if b["t"] > result["removed_at"] + 1]
    assert after and {b["node_id"] for b in after} <= survivors
    out = Path(result["output"])
    ids = read_ids(out / "data")
    assert sorted(ids) == sorted(set(ids)) and len(ids) == QUESTIONS  # each once, none lost
    assert read_ids(out / "rejects") == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["output_rows"] == QUESTIONS
    # Work redone: rows searched twice, at most what the lost node had searched.
    redone = sum(b["rows"] for b in searches) - QUESTIONS
    on_lost_node = sum(b["rows"] for b in searches if b["node_id"] == removed)
    assert on_lost_node > 0 and 0 <= redone <= on_lost_node
    # Each node that searched unpacked the one index once, in its own directory ...
    nodes = tmp_path / "nodes"  # the job's bm25.local_dir, one directory a node
    unpacks = {d.name: read_lines(d / UNPACK_LOG) for d in nodes.iterdir() if d.is_dir()}
    assert {b["node_id"] for b in searches} <= set(unpacks)
    assert all(len(u) == 1 and u[0]["node_id"] == node for node, u in unpacks.items()), unpacks
    assert len({u[0]["fingerprint"] for u in unpacks.values()}) == 1
    # ... and found the same negatives there: the copies of a question (searched on both
    # nodes, before and after the loss) all got the same ones.
    negatives: dict[str, set[tuple[str, ...]]] = {}
    for row in read_rows(out / "data"):
        question = row["id"].rsplit("-", 1)[0]
        negatives.setdefault(question, set()).add(tuple(row["hard_negatives_ids"]))
    assert len(negatives) == QUESTIONS // COPIES
    assert all(len(found) == 1 for found in negatives.values())
    with capsys.disabled():
        print(
            f"\n[node loss: index builder mid-BM25] {redone} of {QUESTIONS} rows searched "
            f"twice; {on_lost_node} had been searched on the lost node"
        )


def assert_each_row_once(out: Path, rows: int) -> dict[str, Any]:
    """Every input id exactly once in data/ or rejects/, none rejected for the loss (a lost
    batch is asked again, not given up on); returns the manifest's counts."""
    data, rejects = read_ids(out / "data"), read_ids(out / "rejects")
    assert sorted(data + rejects) == sorted(set(data + rejects)) and len(data + rejects) == rows
    counts: dict[str, Any] = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["output_rows"] + counts["rejected_rows"] == rows
    reasons = read_column(out / "rejects", "reason")
    assert not [r for r in reasons if "Actor" in r or "retries" in r], reasons
    return counts


def verify_asks(stages: dict[str, Any]) -> int:
    """The engine requests of the verify stage: one a row with a finished answer, plus re-asks."""
    verify = stages["verify"]
    return int(verify["in"] - verify["unfinished"] + verify["reasked"])


@pytest.mark.slow
def test_losing_the_engines_node_mid_doc2query_loses_no_row(tmp_path, capsys):
    result = lose_a_node("engine-node", tmp_path)
    assert result["returncode"] == 0, result["log_tail"]
    out = Path(result["output"])
    committed = result["committed_before_removal"]
    assert 0 < len(committed) < RUN_DOCS  # the loss came mid-Doc2Query
    stages = assert_each_row_once(out, RUN_DOCS)["stages"]
    # Work redone: the Doc2Query asks the engine, restarted on the node left, answered beyond
    # those of the rows that no part file held when the node went.
    manifest = json.loads((out / "manifest.json").read_text())
    (engine,) = manifest["engines"]  # the report of the replica since its restart
    written = set(result["written_before_removal"])
    asks_left = sum(
        r["doc2query_attempts"] for r in read_rows(out / "data") if r["id"] not in written
    ) + sum(
        r["attempts"]
        for r in read_rows(out / "rejects")
        if r["stage"] == "doc2query" and r["id"] not in written
    )
    redone = engine["requests"] - stages["distill"]["in"] - verify_asks(stages) - asks_left
    assert redone >= 0
    with capsys.disabled():
        print(
            f"\n[node loss: engine node mid-Doc2Query] {len(committed)} of {RUN_DOCS} rows "
            f"committed before the loss; {redone} requests redone after it"
        )


@pytest.mark.slow
def test_losing_the_engines_node_mid_reason_distill_loses_no_row(tmp_path, capsys):
    result = lose_a_node("distill-node", tmp_path)
    assert result["returncode"] == 0, result["log_tail"]
    out = Path(result["output"])
    stages = assert_each_row_once(out, RUN_DOCS)["stages"]
    committed = result["committed_before_removal"]
    assert 0 < len(committed) < stages["distill"]["in"]  # the loss came mid-ReasonDistill
    # Work redone: the asks of the engine, restarted on the node left, beyond one for each row
    # that no ReasonDistill part file held when the node went, and the verify stage's.
    manifest = json.loads((out / "manifest.json").read_text())
    (engine,) = manifest["engines"]  # the report of the replica since its restart
    asks_left = stages["distill"]["in"] - len(set(result["written_before_removal"]))
    redone = engine["requests"] - asks_left - verify_asks(stages)
    assert redone >= 0
    with capsys.disabled():
        print(
            f"\n[node loss: engine node mid-ReasonDistill] {len(committed)} of "
            f"{stages['distill']['in']} rows committed before the loss; {redone} requests "
            "redone after it"
        )


@pytest.mark.slow
def test_losing_a_node_while_publishing_keeps_the_publication_whole(tmp_path, capsys):
    result = lose_a_node("publish", tmp_path)
    # The run finished by itself (the lost node's publishing tasks retried on the other), or
    # its rerun finished the publication.
    finished = result["returncode"] == 0 or result.get("rerun_returncode") == 0
    assert finished, result["log_tail"] + result.get("rerun_log_tail", "")
    assert result["published_before_removal"] and not result["manifest_before_removal"]
    out = Path(result["output"])
    assert_each_row_once(out, QUESTIONS)
    # Nothing but the manifest's files under data/ and rejects/: no temporary file of a task
    # killed with its node, no file of a group written twice under another name.
    manifest = json.loads((out / "manifest.json").read_text())
    listed = set(manifest["publication"]["files"])
    present = {
        str(f.relative_to(out))
        for top in ("data", "rejects")
        for f in (out / top).rglob("*")
        if f.is_file()
    }
    assert present == listed
    assert len(listed) >= QUESTIONS // PUBLISH_ROWS_PER_FILE
    with capsys.disabled():
        how = "the run went on" if result["returncode"] == 0 else "a rerun finished it"
        print(
            f"\n[node loss: during publishing] the node of a task writing a file went with "
            f"{len(result['published_before_removal'])} of {len(listed)} files under data/ "
            f"begun; {how}"
        )


@pytest.mark.slow
def test_with_no_node_left_for_the_engine_the_run_stops_and_a_rerun_resumes(tmp_path, capsys):
    result = lose_a_node("no-engine-node", tmp_path)
    # It stopped by itself, soon after the timeout, saying what and that a rerun resumes.
    assert result["returncode"] != 0, result["log_tail"]
    log = result["log_tail"]
    assert "EnginesLost" in log and "engine.unavailable_timeout_s" in log, log
    assert "shards were committed; rerun the same command to resume from there" in log, log
    waited = result["ended_at"] - result["removed_at"]
    assert waited < UNAVAILABLE_TIMEOUT_S + 120, waited
    committed = result["committed_before_rerun"]
    assert 0 < len(committed) < RUN_DOCS
    # A node joined; the same command finished the run, every row once.
    assert result["rerun_returncode"] == 0, result["rerun_log_tail"]
    assert_each_row_once(Path(result["output"]), RUN_DOCS)
    with capsys.disabled():
        print(
            f"\n[node loss: no node left for the engine] stopped {waited:.0f} s after the "
            f"loss with {len(committed)} of {RUN_DOCS} rows committed; the rerun completed"
        )
