"""``rare-ray export`` on its own: its filters and formats, and the inputs it refuses.

The output directories here are written by hand in the layout a finished run leaves (a
manifest listing its data files, rows with ReasonDistill's columns); the export of a real
run, loaded by ``datasets`` and trained on by TRL, is in tests/test_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rare_ray.cli import main
from rare_ray.export import FORMATS, Columns, ExportOptions, completion_of, export, select
from rare_ray.io.card import render_card
from rare_ray.rows import MESSAGES_TYPE
from rare_ray.vocabulary import InputError

PROMPT = [{"role": "system", "content": "be careful"}, {"role": "user", "content": "[1] doc\nQ?"}]


def _rows() -> list[dict]:
    return [
        # finished, with a <think> block; 100 + 20 tokens
        {"id": "a", "reasoning": "<think>hmm</think>yes", "reasoning_answer": "yes",
         "reasoning_finished": True, "reasoning_prompt_tokens": 100, "reasoning_tokens": 20},
        # cut off at max_tokens
        {"id": "b", "reasoning": "and then", "reasoning_answer": None,
         "reasoning_finished": False, "reasoning_prompt_tokens": 100, "reasoning_tokens": 64},
        # finished, long
        {"id": "c", "reasoning": "a long one", "reasoning_answer": None,
         "reasoning_finished": True, "reasoning_prompt_tokens": 900, "reasoning_tokens": 200},
        # finished, from a server that does not count tokens
        {"id": "d", "reasoning": "no usage", "reasoning_answer": None,
         "reasoning_finished": True, "reasoning_prompt_tokens": 0, "reasoning_tokens": 5},
    ]  # fmt: skip


def _finished_run(root: Path, with_prompt: bool = True) -> Path:
    rows = [{**r, "reasoning_prompt": PROMPT} if with_prompt else r for r in _rows()]
    path = "data/split=train/part-0123456789abcdef-00000.parquet"
    (root / path).parent.mkdir(parents=True)
    fields = [("reasoning_prompt", MESSAGES_TYPE)] if with_prompt else []
    schema = pa.schema(
        [("id", pa.string()), ("reasoning", pa.string()), ("reasoning_answer", pa.string()),
         ("reasoning_finished", pa.bool_()), ("reasoning_prompt_tokens", pa.int32()),
         ("reasoning_tokens", pa.int32()), *fields]
    )  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / path)
    manifest = {
        "input": "corpus.jsonl",
        "engine": {"kind": "vllm", "model": "tiny", "device": "cpu"},
        "config": {"distill": {"output_key": "reasoning"}},
        "counts": {"input_rows": 4, "output_rows": 4, "rejected_rows": 0, "stages": {}},
        "publication": {"id": "0123456789abcdef", "files": [path], "data": {"train": 4},
                        "rejects": {}},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_filters_count_every_row_they_leave_out_and_the_rest_is_exported() -> None:
    table = pa.Table.from_pylist(_rows())
    columns = Columns("reasoning")
    chosen, filtered = select(table, columns, ExportOptions())
    assert chosen["id"].to_pylist() == ["a", "c", "d"] and filtered == {"unfinished": 1}
    chosen, filtered = select(table, columns, ExportOptions(max_tokens=120))
    # "a" is exactly 120 tokens: kept; "d" has no prompt count: left out, not guessed.
    assert chosen["id"].to_pylist() == ["a"]
    assert filtered == {"unfinished": 1, "length unknown": 1, "over 120 tokens": 1}
    chosen, filtered = select(table, columns, ExportOptions(finished_only=False))
    assert chosen.num_rows == 4 and not filtered


def test_think_strip_trains_on_the_answer_and_keeps_a_response_without_a_block() -> None:
    assert completion_of("<think>hmm</think>yes", "yes", "strip") == "yes"
    assert completion_of("<think>hmm</think>yes", "yes", "keep") == "<think>hmm</think>yes"
    assert completion_of("plain", None, "strip") == "plain"


def test_every_format_holds_the_stored_prompt_and_the_card_lists_it(tmp_path: Path) -> None:
    out = _finished_run(tmp_path / "run")
    record = export(str(out), ExportOptions(think="strip"))
    assert record["rows"] + sum(record["filtered"].values()) == record["data_rows"] == 4
    read = {f: pq.read_table(out / record["formats"][f]["files"][0]).to_pylist() for f in FORMATS}
    first = {f: rows[0] for f, rows in read.items()}
    assert first["messages"]["messages"] == [*PROMPT, {"role": "assistant", "content": "yes"}]
    assert first["prompt_completion"]["prompt"] == PROMPT
    assert first["prompt_completion"]["completion"] == [{"role": "assistant", "content": "yes"}]
    assert first["rare"] == {"id": "a", "system": "be careful", "instruction": "[1] doc\nQ?",
                             "output": "yes"}  # fmt: skip
    card = (out / "README.md").read_text()
    for name in FORMATS:
        assert (
            f"config_name: {name}" in card
            and f"path: export/{name}/split=train/part-{record['id']}-*.parquet" in card
        )
    # Exporting again with other options replaces the files and the record.
    again = export(str(out), ExportOptions(formats=("rare",)))
    assert list(again["formats"]) == ["rare"]
    assert not (out / "export" / "messages").exists() or not any(
        (out / "export" / "messages").rglob("*.parquet")
    )


def test_an_export_that_filters_out_every_row_still_writes_its_record(tmp_path: Path) -> None:
    out = _finished_run(tmp_path / "run")
    record = export(str(out), ExportOptions(max_tokens=10))
    assert record["rows"] == 0 and sum(record["filtered"].values()) == 4
    assert json.loads((out / "export" / "_export.json").read_text()) == record
    assert not list((out / "export").rglob("*.parquet"))  # `datasets` fails on empty files
    assert "config_name: messages" not in (out / "README.md").read_text()


def test_a_card_names_no_secret_even_when_the_config_held_one() -> None:
    manifest = json.loads(json.dumps({
        "input": "s3://bucket/corpus.jsonl", "engine": {"kind": "openai", "model": "m"},
        "config": {"engine": {"api_key": "<redacted>"}, "output_layout": {"license": "mit"}},
        "counts": {"input_rows": 1, "output_rows": 1, "rejected_rows": 0, "stages": {}},
        "publication": {"id": "x", "files": [], "data": {"train": 1}, "rejects": {}},
    }))  # fmt: skip
    card = render_card(manifest)
    assert "license: mit" in card and "api_key" not in card


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda root: root, "is not a finished rare-ray run"),
        (lambda root: _finished_run(root, with_prompt=False), "did not store the teacher's prompt"),
    ],
    ids=["not-a-run", "older-version"],
)
def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys, make, expected) -> None:
    root = tmp_path / "run"
    root.mkdir()
    make(root)
    assert main(["export", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
    assert not (root / "export").exists()


def test_a_place_the_export_cannot_be_written_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    root = _finished_run(tmp_path / "run")
    (root / "export").write_text("a file where the export's folder would go")
    assert main(["export", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rare-ray: cannot write the export into {root}")
    assert len(err.splitlines()) == 1
    assert not (root / "README.md").exists()  # nothing was published


def test_load_dataset_reads_each_export_and_not_its_cache_of_the_one_before(
    tmp_path: Path,
) -> None:
    """``datasets`` caches a local directory by the card's globs: the export's id in them is
    what makes a new export load as itself."""
    out = _finished_run(tmp_path / "run")
    export(str(out), ExportOptions(finished_only=False))
    assert sorted(datasets.load_dataset(str(out), "rare", split="train")["id"]) == list("abcd")
    export(str(out), ExportOptions())
    assert sorted(datasets.load_dataset(str(out), "rare", split="train")["id"]) == list("acd")


def test_a_verified_run_exports_only_verified_rows_unless_told_otherwise(tmp_path: Path) -> None:
    out = _finished_run(tmp_path / "run")
    path = next((out / "data").rglob("*.parquet"))
    table = pq.read_table(path)
    # a: agrees; b: cut off (never verified); c: disagrees; d: unreadable verdict.
    verified = pa.array([True, False, False, None], pa.bool_())
    pq.write_table(table.append_column("answer_verified", verified), path)
    record = export(str(out))
    assert record["options"]["verified_only"] is True
    assert record["filtered"] == {"unfinished": 1, "not verified": 2} and record["rows"] == 1
    assert record["rows"] + sum(record["filtered"].values()) == record["data_rows"]
    everything = export(str(out), ExportOptions(verified_only=False))
    assert everything["rows"] == 3 and everything["filtered"] == {"unfinished": 1}


def test_verified_only_on_a_run_that_did_not_verify_is_refused(tmp_path, capsys) -> None:
    out = _finished_run(tmp_path / "run")
    assert export(str(out))["options"]["verified_only"] is False  # the default adapts
    with pytest.raises(InputError, match="no answer_verified column"):
        export(str(out), ExportOptions(verified_only=True))
