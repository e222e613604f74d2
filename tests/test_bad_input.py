"""Bad input, as a user meets it through the ``rare-ray`` command (issue 4).

Each case ends in a clear error before any engine starts (exit code 2, a message that names
what is wrong and where, no traceback, no Ray started, nothing under ``_stages``), or in a
reject with its reason, and no row is ever lost. The issue's list, and where each is covered:

- missing ``text`` column: JSONL -- tests/test_cli.py::test_missing_text_column_fails_fast_before_any_engine;
  Parquet -- test_parquet_without_a_text_column
- wrong type: a number for a text, a list for an id -- tests/test_pipeline.py::test_bad_rows_become_rejects_with_their_reason;
  a Parquet column of numbers -- test_parquet_text_column_of_numbers; Parquet files that
  disagree on a column's type -- test_parquet_files_that_disagree_on_a_type
- empty and whitespace documents (and a blank line), invalid UTF-8 in a JSONL line, duplicate
  ids -- tests/test_pipeline.py::test_bad_rows_become_rejects_with_their_reason
- a truncated JSONL file -- the same test (its last line is cut);
  a truncated JSON array -- test_truncated_json_array (the first file: an error) and
  tests/io/test_readers.py::test_a_later_json_array_that_does_not_parse_is_one_reject
- a document far longer than the model's context --
  tests/test_pipeline.py::test_a_document_far_longer_than_the_context
  (kept, its text whole, cut to the token budget only inside the prompts)
- an input path that does not exist -- test_input_path_that_does_not_exist
- an output directory that is not writable -- test_output_directory_not_writable
- an unreachable model path: a path that does not exist, a directory without config.json --
  test_unreachable_model_path
- and over all of them: data/ + rejects/ hold every input line exactly once --
  tests/test_pipeline.py::test_every_input_line_is_in_data_or_rejects_exactly_once

The rejects are checked there, on the one whole run of the job that the suite makes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import LOCAL_CONFIG, rare_ray, write_jsonl

# ---------------------------------------------------------------------------------------------
# Errors before any engine starts


def fails_before_any_engine(tmp_path: Path, *args: str, config: Path = LOCAL_CONFIG) -> str:
    """Run ``rare-ray run`` expecting exit code 2 before Ray starts; its stderr."""
    out = tmp_path / "out"
    argv = ["run", "--config", str(config), *args]
    if "--output" not in args:
        argv += ["--output", str(out)]
    started = time.perf_counter()
    result = rare_ray(*argv, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith("rare-ray: ")
    # Ray was never started, so neither was an engine.
    assert "Started a local Ray instance" not in result.stderr
    assert "[rare-ray] reading" not in result.stdout
    assert time.perf_counter() - started < 60
    assert not (out / "_stages").exists()
    return result.stderr


def good_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "ok.jsonl", [{"id": "1", "text": "a usable document"}])


def test_parquet_without_a_text_column(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": ["1"], "body": ["no text column"]}), path)
    stderr = fails_before_any_engine(tmp_path, "--input", str(path))
    assert f"{path}: no column 'text' (columns: id, body)" in stderr


def test_parquet_text_column_of_numbers(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": ["1", "2"], "text": [1, 2]}), path)
    stderr = fails_before_any_engine(tmp_path, "--input", str(path))
    assert f"{path}: column 'text' is int64, expected string" in stderr


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"id": ["3"], "text": [3]}, "column 'text' is int64, expected string"),
        (
            {"id": [3], "text": ["three"]},
            "column 'id' is int64, but string in {first}; the Parquet files of one input "
            "must agree on column types",
        ),
    ],
    ids=["text", "id"],
)
def test_parquet_files_that_disagree_on_a_type(
    tmp_path: Path, second: dict[str, list], message: str
) -> None:
    """Only the later file is wrong: Ray Data's own schema merge would fail with no file named."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    first, later = corpus / "a.parquet", corpus / "b.parquet"
    pq.write_table(pa.table({"id": ["1", "2"], "text": ["one", "two"]}), first)
    pq.write_table(pa.table(second), later)
    stderr = fails_before_any_engine(tmp_path, "--input", str(corpus))
    assert f"{later}: {message.format(first=first)}" in stderr


def test_truncated_json_array(tmp_path: Path) -> None:
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"id": "1", "text": "one"}, {"id": "2", "text": "two"}])[:-12])
    stderr = fails_before_any_engine(tmp_path, "--input", str(path))
    assert f"{path}: not a valid JSON array (Unterminated string" in stderr


def test_input_path_that_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "corpus.jsonl"
    stderr = fails_before_any_engine(tmp_path, "--input", str(path))
    assert f"input {str(path)!r} does not exist" in stderr


def test_output_directory_not_writable(tmp_path: Path) -> None:
    """A directory without write permission; as root, which writes there anyway, a path under a
    regular file (mkdir fails with ENOTDIR whoever runs it). Both are real filesystem errors."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        output, why = locked / "out", "Permission denied"
    else:
        (tmp_path / "a-file").write_text("not a directory")
        output, why = tmp_path / "a-file" / "out", "Not a directory"
    try:
        stderr = fails_before_any_engine(
            tmp_path, "--input", str(good_jsonl(tmp_path)), "--output", str(output)
        )
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o700)
    assert f"output directory {str(output)!r} is not writable" in stderr
    assert why in stderr
    assert not output.exists()


def test_output_path_that_is_a_regular_file(tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.write_text("a file where the output directory should be")
    stderr = fails_before_any_engine(
        tmp_path, "--input", str(good_jsonl(tmp_path)), "--output", str(output)
    )
    assert f"output directory {str(output)!r} is not writable" in stderr
    assert output.read_text() == "a file where the output directory should be"


@pytest.mark.parametrize("kind", ["missing", "no config.json"])
def test_unreachable_model_path(tmp_path: Path, kind: str) -> None:
    model = tmp_path / "model"
    if kind == "no config.json":
        model.mkdir()
        (model / "model.safetensors").write_bytes(b"weights without a config")
    config = tmp_path / "config.yaml"
    config.write_text(LOCAL_CONFIG.read_text().replace("models/tiny-llama", str(model)))
    stderr = fails_before_any_engine(tmp_path, "--input", str(good_jsonl(tmp_path)), config=config)
    problem = "does not exist" if kind == "missing" else "has no config.json"
    assert f"model {str(model)!r} {problem}" in stderr
    assert "rare-ray build-test-model" in stderr
