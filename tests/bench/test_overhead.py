"""``rare-ray bench overhead``: the whole job on synthetic corpora, its LLM stages answered by
the zero-cost engine (rare_ray.testing.instant_server, a test double), on a SeaweedFS server
the bench starts itself; BM25 is real pyserini. The suite runs it on S3 only: local disk is
the one store the rest of the suite runs the job on, and each store costs a whole run."""

import json

import pyarrow.parquet as pq
import pytest

from rare_ray.bench.overhead import write_corpus
from rare_ray.testing.instant_server import reply_text
from tests.helpers import rare_ray

ROWS = 300


def test_the_synthetic_corpus_is_seeded_and_its_documents_differ(tmp_path):
    first = pq.read_table(write_corpus(tmp_path / "a", ROWS)).to_pylist()
    again = pq.read_table(write_corpus(tmp_path / "b", ROWS)).to_pylist()
    assert first == again
    assert [r["id"] for r in first] == [f"doc-{i:08d}" for i in range(ROWS)]
    assert len({r["text"] for r in first}) == ROWS
    assert all(30 <= len(r["text"].split()) <= 90 for r in first)


def test_the_instant_engine_answers_each_stage_in_the_shape_it_parses():
    def body(prompt, schema=None):
        request = {"messages": [{"role": "user", "content": prompt}]}
        if schema is not None:
            request["response_format"] = {"json_schema": {"schema": schema}}
        return request

    question = {"properties": {"question": {}, "scenario": {}, "answer": {}}}
    one = json.loads(reply_text(body("alpha beta gamma delta", question)))
    assert set(one) == {"question", "scenario", "answer"}
    assert set(one["question"].split()) <= {"alpha", "beta", "gamma", "delta"}
    assert json.loads(reply_text(body("alpha beta gamma delta", question))) == one
    assert json.loads(reply_text(body("other words here", question))) != one
    verdict = json.loads(reply_text(body("x", {"properties": {"reason": {}, "verdict": {}}})))
    assert verdict["verdict"] == "agrees"
    assert reply_text(body("x")).startswith("<think>")


def test_the_bench_runs_the_job_on_s3_and_counts_what_it_costs(tmp_path):
    out = tmp_path / "results.json"
    command = ["bench", "overhead", "--sizes", str(ROWS), "--stores", "s3"]
    result = rare_ray(*command, "--work", str(tmp_path / "work"), "--json", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    assert r["store"] == "s3" and r["rows"] == ROWS
    assert r["output_rows"] + r["rejected_rows"] == ROWS
    assert r["output_rows"] >= 0.95 * ROWS  # the instant answers parse
    # Every kept row was asked by Doc2Query, ReasonDistill and AnswerVerify at least once.
    assert r["engine_requests"] >= 3 * r["output_rows"]
    assert set(r["seconds"]) >= {"ingest", "doc2query", "bm25", "distill", "publish"}
    assert 0 < r["driver_cpu_s"] < r["wall_s"]
    # Split by thread: it adds up, and each stage's Ray Data executor has its share.
    split = r["driver_cpu_by_thread"]
    assert sum(split.values()) == pytest.approx(r["driver_cpu_s"], abs=0.01 * len(split) + 0.05)
    assert {f"StreamingExecutor-{stage}" for stage in ("doc2query", "bm25")} <= set(split)
    assert 0 < r["search_s"] < r["wall_s"]
    assert 0 < r["commit_s"] < r["wall_s"]
    # data/ and rejects/, the manifest and card, each stage's parts and commit records, each
    # written by at least one PUT of the server's own count.
    assert r["files"] >= 10
    assert r["requests"].get("PUT", 0) >= r["files"] // 2
    # The table row, after the run, with as many cells as the header.
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| s3")]
    assert f"{ROWS:,}" in row
    assert len(row.split("|")) == len(table_header(result.stdout).split("|"))


def table_header(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("| store"))
