"""Runs the BM25 stage on a Ray cluster of several nodes inside this machine, or on one node.

A separate process (one Ray connection per driver): ``python -m
tests.operators.bm25_cluster_driver cluster|single LOCAL_ROOT OUT.json``. Each node unpacks
the index under ``LOCAL_ROOT/<node id>``.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from rare_ray.config import BM25Config
from rare_ray.operators import BM25HardNeg
from tests.helpers import sample_questions, sample_rows

NODES = 3
CPUS_PER_NODE = 2


def main(mode: str, local_root: str, out_path: str) -> None:
    cluster = None
    if mode == "cluster":
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": CPUS_PER_NODE})
        for _ in range(NODES - 1):
            cluster.add_node(num_cpus=CPUS_PER_NODE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
    else:
        ray.init(address="local", num_cpus=NODES * CPUS_PER_NODE)
    texts = {r["id"]: r["text"] for r in sample_rows()}
    table = [
        {"id": q["id"], "question": q["question"], "text": texts[q["id"]]}
        for q in sample_questions()
    ]
    config = BM25Config(
        local_dir=f"{local_root}/{{node_id}}",
        searchers_per_node=1,
        cpus_per_searcher=1,
        heap_per_searcher="512m",
        batch_size=32,
        debug_logs=True,
    )
    rows = BM25HardNeg(config).run(ray.data.from_items(table)).take_all()
    result = {
        "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
        "negatives": {r["id"]: r["hard_negatives_ids"] for r in rows},
        "rows": len(rows),
    }
    with open(out_path, "w") as f:
        json.dump(result, f)
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
