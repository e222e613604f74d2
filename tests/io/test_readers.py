"""Reading corpora: every input row comes back once, bad ones with a reason and a location."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rare_ray.io.readers import InputError, check_input, read_documents
from rare_ray.rows import content_key
from tests.helpers import write_jsonl

TEXT = {"text": "text"}


def _by_line(rows):
    return {r["line"]: r for r in rows}


def test_missing_text_column_is_an_error_before_reading(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "body": "x"}])
    with pytest.raises(InputError, match=r"no 'text' field .*fields seen: body, id"):
        check_input(str(path), TEXT, "id")


def test_missing_parquet_column_and_wrong_type_are_errors(tmp_path):
    pq.write_table(pa.table({"id": ["1"], "body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match="no column 'text'"):
        check_input(str(tmp_path / "a.parquet"), TEXT, "id")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match="column 'text' is int64"):
        check_input(str(tmp_path / "b.parquet"), TEXT, "id")


def test_missing_path_and_empty_directory_are_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_input(str(tmp_path / "nope.jsonl"), TEXT, "id")
    with pytest.raises(InputError, match=r"no \.jsonl, \.json or \.parquet"):
        check_input(str(tmp_path), TEXT, "id")


def test_bad_rows_are_rejected_with_their_reason_and_line(ray_local, tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [
        json.dumps({"id": "a", "text": "first"}),
        json.dumps({"id": "a", "text": "same id again"}),
        json.dumps({"id": "b", "text": ""}),
        json.dumps({"id": "c", "text": "   \n\t "}),
        json.dumps({"id": "d", "text": 42}),
        json.dumps({"id": "e"}),
        json.dumps({"id": ["x"], "text": "id is a list"}),
        "",
        json.dumps({"text": "no id, so one is derived"}),
        json.dumps([1, 2]),
    ]
    raw = "\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n" + b'{"id": "z", "text": "cut'
    path.write_bytes(raw)
    rows = read_documents(str(path), TEXT).take_all()
    assert len(rows) == 12  # one row per input line, good or bad
    by_line = _by_line(rows)
    assert by_line[1]["reject_reason"] is None
    assert "duplicate id 'a'" in by_line[2]["reject_reason"]
    assert by_line[2]["reject_reason"].endswith(f"{path}:1)")
    assert by_line[3]["reject_reason"] == "'text' is empty"
    assert by_line[4]["reject_reason"] == "'text' is empty"
    assert by_line[5]["reject_reason"] == "'text' is int, expected string"
    assert by_line[6]["reject_reason"] == "'text' is missing"
    assert "'id' is list" in by_line[7]["reject_reason"]
    assert by_line[8]["reject_reason"] == "blank line"
    assert by_line[9]["reject_reason"] is None
    assert by_line[9]["id"] == content_key("no id, so one is derived")
    assert by_line[10]["reject_reason"] == "expected a JSON object, got list"
    assert by_line[11]["reject_reason"].startswith("invalid UTF-8")
    assert by_line[12]["reject_reason"].startswith("invalid JSON")
    assert all(r["source"] == str(path) for r in rows)


def test_json_array_and_parquet_inputs(ray_local, tmp_path):
    docs = [{"id": str(i), "text": f"document {i}"} for i in range(5)]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    rows = read_documents(str(tmp_path / "docs.json"), TEXT).take_all()
    assert sorted(r["id"] for r in rows) == [d["id"] for d in docs]

    pq.write_table(
        pa.Table.from_pylist([*docs, {"id": "0", "text": "dup"}]), tmp_path / "d.parquet"
    )
    rows = read_documents(str(tmp_path / "d.parquet"), TEXT).take_all()
    assert len(rows) == 6
    # Parquet rows are numbered like JSON lines: the later of the two "0"s is the reject.
    (bad,) = [r for r in rows if r["reject_reason"] is not None]
    assert (bad["line"], bad["text"]) == (6, "dup")
    assert bad["reject_reason"].endswith("d.parquet:1)")


def test_integer_ids_become_strings_and_limit_applies(ray_local, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": f"t{i}"} for i in range(10)])
    rows = read_documents(str(path), TEXT, limit=4).take_all()
    assert len(rows) == 4
    assert all(isinstance(r["id"], str) for r in rows)


def test_same_text_without_ids_is_a_duplicate(ray_local, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "same words"}, {"text": "same  words"}])
    rows = read_documents(str(path), TEXT).take_all()
    assert sorted(r["reject_reason"] is None for r in rows) == [False, True]


def test_ids_derive_from_the_named_document_column(ray_local, tmp_path):
    rows = [{"question": "same question?", "text": f"document {i}"} for i in range(2)]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    columns = {"question": "text", "text": "text"}
    out = read_documents(str(path), columns, id_from="text").take_all()
    assert sorted(r["id"] for r in out) == sorted(content_key(r["text"]) for r in rows)
    assert all(r["reject_reason"] is None for r in out)


def test_a_later_json_array_that_does_not_parse_is_one_reject(ray_local, tmp_path):
    """The first file is checked before the run starts; a broken later one must not fail it."""
    write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "text": "one"}])
    (tmp_path / "b.json").write_text(json.dumps([{"id": "2", "text": "two"}])[:-5])
    rows = sorted(read_documents(str(tmp_path), TEXT).take_all(), key=lambda r: r["source"])
    assert [r["reject_reason"] for r in rows[:1]] == [None]
    [bad] = rows[1:]
    assert bad["source"] == str(tmp_path / "b.json") and bad["line"] is None
    assert bad["reject_reason"].startswith("not a valid JSON array (Unterminated string")


def test_parquet_files_are_all_checked_before_reading(tmp_path):
    pq.write_table(pa.table({"id": ["1"], "text": ["one"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["2"], "text": [2]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet: column 'text' is int64, expected string"):
        check_input(str(tmp_path), TEXT, "id")
    pq.write_table(pa.table({"id": [2], "body": ["no text"]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet: column 'id' is int64, but string in"):
        check_input(str(tmp_path), TEXT, "id")
    # A later file without the column, or with large_string, is readable: its rows are checked.
    pq.write_table(pa.table({"id": ["2"], "body": ["no text"]}), tmp_path / "b.parquet")
    pq.write_table(
        pa.table({"id": ["3"], "text": pa.array(["three"], pa.large_string())}),
        tmp_path / "c.parquet",
    )
    check_input(str(tmp_path), TEXT, "id")


def test_carried_columns_travel_as_text_and_never_reject_a_row(ray_local, tmp_path):
    rows = [
        {"id": "a", "text": "one", "source_id": "doc-1"},
        {"id": "b", "text": "two", "source_id": 7},
        {"id": "c", "text": "three", "source_id": {"url": "x", "page": 2}},
        {"id": "d", "text": "four"},
        {"id": "e", "text": "five", "source_id": None},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    columns = {"text": "text", "source_id": "carried"}
    read = {r["id"]: r for r in read_documents(str(path), columns).take_all()}
    assert {k: r["source_id"] for k, r in read.items()} == {
        "a": "doc-1", "b": "7", "c": '{"url": "x", "page": 2}', "d": None, "e": None
    }  # fmt: skip
    assert all(r["reject_reason"] is None for r in read.values())
    pq.write_table(pa.table({"text": ["x"], "source_id": [3]}), tmp_path / "p.parquet")
    (row,) = read_documents(str(tmp_path / "p.parquet"), columns).take_all()
    assert row["source_id"] == "3"


def test_a_carried_column_no_record_has_is_an_error_before_reading(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "text": "x"}])
    with pytest.raises(InputError, match=r"no 'source_id' field"):
        check_input(str(path), {"text": "text", "source_id": "carried"}, "id")


def test_repeated_ids_across_files_keep_the_first_by_file_and_line(ray_local, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "one"}, {"id": "y", "text": "two"}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "y", "text": "3"}, {"id": "x", "text": "4"}])
    rows = read_documents(str(tmp_path), TEXT).take_all()
    kept = sorted((r["id"], r["text"]) for r in rows if r["reject_reason"] is None)
    assert kept == [("x", "one"), ("y", "two")]
    reasons = sorted(r["reject_reason"] for r in rows if r["reject_reason"] is not None)
    assert [r.split(" (")[0] for r in reasons] == ["duplicate id 'x'", "duplicate id 'y'"]
    assert all(f"{tmp_path}/a.jsonl:" in r for r in reasons)
