"""BM25HardNeg on a three-node Ray cluster (``ray.cluster_utils.Cluster``) on this machine.

Each node has its own node-local directory. The index must be unpacked exactly once on every
node that searched, searches must run on more than one node, and the negatives must be the
same as a single-node run's.

``slow``: two clusters of Ray of their own. The default suite checks the same on the run of
tests/test_node_loss.py that loses a node mid-BM25 (one unpack a node; the copies of each
question, searched on both nodes, all get the same negatives).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rare_ray.engines.index_broadcast import UNPACK_LOG
from rare_ray.operators.bm25_hardneg import SEARCH_LOG
from tests.helpers import REPO
from tests.operators.bm25_cluster_driver import NODES

pytestmark = pytest.mark.slow


def _drive(mode: str, local_root: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "tests.operators.bm25_cluster_driver", mode, str(local_root),
           str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    cluster = _drive("cluster", tmp / "cluster", tmp / "cluster.json")
    single = _drive("single", tmp / "single", tmp / "single.json")
    return tmp, cluster, single


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_searching_node_unpacked_the_index_exactly_once(runs):
    tmp, cluster, _ = runs
    assert len(cluster["nodes"]) == NODES
    node_dirs = [d for d in (tmp / "cluster").iterdir() if d.is_dir()]
    searched = {d.name for d in node_dirs if _lines(d / SEARCH_LOG)}
    for d in node_dirs:
        unpacks = _lines(d / UNPACK_LOG)
        assert len(unpacks) == 1, f"node {d.name} unpacked {len(unpacks)} times"
        assert unpacks[0]["node_id"] == d.name  # each node used its own directory
    assert searched <= {d.name for d in node_dirs}
    assert len({u["fingerprint"] for d in node_dirs for u in _lines(d / UNPACK_LOG)}) == 1


def test_searches_ran_on_more_than_one_node(runs):
    tmp, cluster, _ = runs
    rows_by_node = {
        d.name: sum(line["rows"] for line in _lines(d / SEARCH_LOG))
        for d in (tmp / "cluster").iterdir()
        if d.is_dir()
    }
    assert sum(rows_by_node.values()) == cluster["rows"] == 1000  # every row searched once
    assert sum(1 for n in rows_by_node.values() if n > 0) >= 2, rows_by_node


def test_negatives_match_a_single_node_run(runs):
    _, cluster, single = runs
    assert cluster["negatives"] == single["negatives"]
