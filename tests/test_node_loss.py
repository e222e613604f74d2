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

from tests.helpers import REPO
from tests.node_loss_driver import QUESTIONS


def lose_a_node(scenario: str, workdir: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "tests.node_loss_driver", scenario, str(workdir)]
    driver = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert driver.returncode == 0, driver.stderr[-4000:]
    return json.loads((workdir / "result.json").read_text())


def read_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return pads.dataset(path, partitioning="hive").to_table(columns=["id"])["id"].to_pylist()


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
    with capsys.disabled():
        print(
            f"\n[node loss: index builder mid-BM25] {redone} of {QUESTIONS} rows searched "
            f"twice; {on_lost_node} had been searched on the lost node"
        )

