"""A searcher actor killed mid-stage: Ray Data replaces it and the stage still mines every row
exactly once."""

import json
import os
import signal
import threading
import time

import ray

from rare_ray.config import BM25Config
from rare_ray.operators import BM25HardNeg
from rare_ray.operators.bm25_hardneg import SEARCH_LOG
from tests.helpers import sample_questions, sample_rows


def _kill_first_searcher(log_path, killed: list[int], deadline: float) -> None:
    while time.monotonic() < deadline:
        if log_path.exists() and (lines := log_path.read_text().splitlines()):
            pid = json.loads(lines[0])["pid"]
            os.kill(pid, signal.SIGKILL)  # a real signal to a real searcher process
            killed.append(pid)
            return
        time.sleep(0.02)


def test_killed_searcher_is_replaced_and_every_row_mined_once(ray_local, tmp_path):
    texts = {r["id"]: r["text"] for r in sample_rows()}
    table = [
        {"id": q["id"], "question": q["question"], "text": texts[q["id"]]}
        for q in sample_questions()
    ]
    config = BM25Config(
        local_dir=str(tmp_path), searchers_per_node=2, batch_size=8, debug_logs=True
    )
    op = BM25HardNeg(config)
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_first_searcher, args=(tmp_path / SEARCH_LOG, killed, time.monotonic() + 300)
    )
    killer.start()
    rows = op.run(ray.data.from_items(table)).take_all()
    killer.join()
    assert killed, "no searcher was killed: the test did not test anything"
    assert len(rows) == len(table)
    assert sorted(r["id"] for r in rows) == sorted(t["id"] for t in table)
    assert all(r["reject_reason"] is None for r in rows)
    pids = {json.loads(line)["pid"] for line in (tmp_path / SEARCH_LOG).read_text().splitlines()}
    assert len(pids - set(killed)) >= 1  # the work went on in other (or replacement) searchers
