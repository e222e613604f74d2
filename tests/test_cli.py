"""The rare-ray command as a user runs it: a real process, real exit codes and messages."""

import json
import time
from pathlib import Path

import pyarrow.dataset as pads
import yaml

from tests.helpers import LOCAL_CONFIG, rare_ray, sample_questions, sample_rows, write_jsonl


def test_missing_text_column_fails_fast_before_any_engine(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "body": "no text field"}])
    start = time.perf_counter()
    result = rare_ray("run", "--config", str(LOCAL_CONFIG), "--input", str(corpus),
                      "--output", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2
    assert "no 'text' field" in result.stderr and str(corpus) in result.stderr
    assert "Traceback" not in result.stderr
    assert time.perf_counter() - start < 60  # no Ray, no vLLM was started
    assert not (tmp_path / "out" / "_stages").exists()


def test_missing_input_and_missing_model_are_clear_errors(tmp_path):
    result = rare_ray("run", "--config", str(LOCAL_CONFIG), "--input", str(tmp_path / "nope"),
                      "--output", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "does not exist" in result.stderr

    config = tmp_path / "c.yaml"
    text = LOCAL_CONFIG.read_text().replace("models/tiny-llama", str(tmp_path / "no-model"))
    config.write_text(text)
    result = rare_ray("run", "--config", str(config), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "no-model" in result.stderr
    assert "build-test-model" in result.stderr


def test_bad_config_is_reported_with_the_field(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(LOCAL_CONFIG.read_text().replace("num_neg: 3", "num_negs: 3"))
    result = rare_ray("run", "--config", str(config))
    assert result.returncode == 2 and "num_negs" in result.stderr


def test_bm25_alone_then_the_same_again_a_changed_setting_and_fresh(tmp_path: Path):
    """``rare-ray bm25`` over a table of questions, its corpus given apart (``--corpus``);
    the same command again has nothing to do; a changed setting is refused; ``--fresh``
    starts over."""
    texts = {r["id"]: r["text"] for r in sample_rows()}
    table = [
        {"id": q["id"], "question": q["question"], "text": texts[q["id"]]}
        for q in sample_questions()[:100]
    ]
    questions = write_jsonl(tmp_path / "questions.jsonl", table)
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl", [{"id": r["id"], "text": r["text"]} for r in table]
    )
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["bm25"]["local_dir"] = str(tmp_path / "indexes")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    args = ["bm25", "--config", str(path), "--input", str(questions), "--corpus", str(corpus),
            "--output", str(out)]  # fmt: skip
    result = rare_ray(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages_run"] == ["bm25"]
    assert manifest["counts"]["output_rows"] == 100
    rows = pads.dataset(out / "data", partitioning="hive").to_table().to_pylist()
    short = sum(len(r["hard_negatives"]) < 3 for r in rows)
    assert manifest["counts"]["stages"]["bm25"]["short"] == short
    assert short <= 5  # a few questions share no term with any other abstract
    assert "100 rows in" in result.stdout

    started = time.perf_counter()
    again = rare_ray(*args)
    assert again.returncode == 0 and "bm25: complete, skipped" in again.stdout
    assert "Started a local Ray instance" not in again.stderr  # nothing to do, so no Ray
    assert time.perf_counter() - started < 60

    config["bm25"]["num_neg"] = 2
    path.write_text(yaml.safe_dump(config))
    refused = rare_ray(*args)
    assert refused.returncode == 2 and "bm25.num_neg: 3 -> 2" in refused.stderr
    fresh = rare_ray(*args, "--fresh")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    data = pads.dataset(out / "data", format="parquet", partitioning="hive")
    negatives = data.to_table(columns=["hard_negatives"])["hard_negatives"].to_pylist()
    assert len(negatives) == 100 and max(len(n) for n in negatives) == 2
