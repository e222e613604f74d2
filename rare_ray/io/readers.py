"""Reading a corpus into a Ray Dataset with one schema and a reason for every bad row.

Accepted: JSONL (one object a line), a JSON array, or Parquet; a file or a directory of them,
on a local path or any filesystem pyarrow supports. JSON files are parsed by us, one line at a
time, so that a bad line (invalid JSON or UTF-8, a wrong type, an empty document) becomes a
reject with its file and line number instead of failing the whole read. Columns the run
neither reads nor carries (``ColumnKind`` "carried") are dropped.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.aggregate import Count, Min
from ray.data.expressions import col

from rare_ray.rows import ID, LINE, REJECT_REASON, SOURCE, content_key, table
from rare_ray.vocabulary import ColumnKind, InputError, filesystem, storage_problem, store_of

SAMPLE_CORPUS = Path(__file__).resolve().parent.parent / "data" / "pubmedqa" / "corpus.jsonl"
SAMPLE_QUESTIONS = SAMPLE_CORPUS.with_name("questions.jsonl")

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)

# The dedupe shuffle's partitions: one per this much input, at most Ray Data's default count.
_SHUFFLE_BYTES = 128 << 20
_MAX_SHUFFLE_PARTITIONS = 200

# Rows per batch when a Parquet input file is read.
_PARQUET_BATCH_ROWS = 4096

# How much of the first file is looked at before any engine starts.
_PEEK_RECORDS = 200
_PEEK_BYTES = 8 << 20


def input_schema(columns: Mapping[str, ColumnKind]) -> pa.Schema:
    fields = [pa.field(ID, pa.string())]
    for name, kind in columns.items():
        fields.append(pa.field(name, pa.list_(pa.string()) if kind == "text_list" else pa.string()))
    fields += [
        pa.field(REJECT_REASON, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(LINE, pa.int64()),
    ]
    return pa.schema(fields)


def list_input_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """The corpus files under ``path``, sorted, so that every run reads them in one order."""
    fs, infos = _input_files(path)
    return fs, [i.path for i in infos]


def input_listing(path: str) -> list[dict[str, Any]]:
    """The corpus files with their sizes and modification times: what identifies an input
    without reading it (a rerun refuses to resume over an input that changed)."""
    _, infos = _input_files(path)
    return [{"path": i.path, "size": i.size, "mtime_ns": i.mtime_ns} for i in infos]


def _input_files(path: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """The corpus files under ``path`` as one listing returned them (sizes and times too)."""
    fs, root = filesystem(path)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            where = f" (in {store_of(fs)})" if isinstance(fs, pafs.S3FileSystem) else ""
            raise InputError(f"input {path!r} does not exist{where}")
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            selector = pafs.FileSelector(root, recursive=True)
            infos = sorted(
                (
                    i
                    for i in fs.get_file_info(selector)
                    if i.type == pafs.FileType.File
                    and i.path.endswith(JSON_SUFFIXES + PARQUET_SUFFIXES)
                ),
                key=lambda i: i.path,
            )
            if not infos:
                raise InputError(
                    f"input directory {path!r} holds no .jsonl, .json or .parquet file"
                )
    except OSError as e:  # an endpoint that refuses, keys refused, a directory not readable
        raise InputError(f"input {path!r} cannot be read: {storage_problem(e, fs)}") from e
    kinds = {i.path.endswith(PARQUET_SUFFIXES) for i in infos}
    if len(kinds) > 1:
        raise InputError(f"input {path!r} mixes Parquet and JSON files; use one format")
    return fs, infos


def check_input(path: str, columns: Mapping[str, ColumnKind], id_key: str) -> None:
    """Fail fast, in the driver, on an input that no row of which could be used."""
    fs, files = list_input_files(path)
    first = files[0]
    try:
        if first.endswith(PARQUET_SUFFIXES):
            _check_parquet_schemas(fs, files, columns)
            return
        with fs.open_input_stream(first) as f:
            head = f.read(_PEEK_BYTES)
            if len(head) == _PEEK_BYTES and head.lstrip()[:1] == b"[":
                head += f.read()  # a JSON array parses only whole
    except OSError as e:  # listed but not readable (a GET refused where a HEAD was not)
        name = repr(path) if first == path else f"{path!r} (its file {first})"
        raise InputError(f"input {name} cannot be read: {storage_problem(e, fs)}") from e
    seen: set[str] = set()
    if len(head) == _PEEK_BYTES and b"\n" in head:
        head = head[: head.rfind(b"\n") + 1]  # drop a line the peek may have cut short
    records = list(_parse_json_bytes(head, first, limit=_PEEK_RECORDS))
    parsed = [r for r, _ in records if isinstance(r, dict)]
    if not parsed:
        raise InputError(f"{first}: no JSON object in its first {_PEEK_RECORDS} records")
    for record in parsed:
        seen.update(record)
    missing = [name for name in columns if name not in seen]
    if missing:
        raise InputError(
            f"{first}: no {', '.join(map(repr, missing))} field in its first {len(parsed)} "
            f"records (fields seen: {', '.join(sorted(seen)) or 'none'})"
        )


def _check_parquet_schemas(
    fs: pafs.FileSystem, files: list[str], columns: Mapping[str, ColumnKind]
) -> None:
    """The first file has every column; no file has one of the wrong type; the files agree.

    Every file's footer is read (Ray Data reads them all too, and fails deep inside itself,
    with no file named, on files whose column types cannot be merged). A later file without
    a column is fine: its rows are rejected as missing it.
    """
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        schemas = list(pool.map(lambda f: pq.read_schema(f, filesystem=fs), files))
    first, schema = files[0], schemas[0]
    for name in columns:
        if name not in schema.names:
            raise InputError(f"{first}: no column {name!r} (columns: {', '.join(schema.names)})")
    seen: dict[str, tuple[pa.DataType, str]] = {}
    for file, schema in zip(files, schemas, strict=True):
        for field in schema:
            kind = columns.get(field.name)
            if kind is not None and not _holds(kind, field.type):
                want = pa.list_(pa.string()) if kind == "text_list" else pa.string()
                raise InputError(f"{file}: column {field.name!r} is {field.type}, expected {want}")
            if field.name not in seen:
                seen[field.name] = (field.type, file)
                continue
            other, where = seen[field.name]
            try:
                pa.unify_schemas(
                    [pa.schema([field.with_type(other)]), pa.schema([field])],
                    promote_options="permissive",
                )
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                raise InputError(
                    f"{file}: column {field.name!r} is {field.type}, but {other} in {where}; "
                    "the Parquet files of one input must agree on column types"
                ) from None


def _holds(kind: ColumnKind, type_: pa.DataType) -> bool:
    if kind == "carried":
        return True
    if kind == "text":
        return cast(bool, pa.types.is_string(type_) or pa.types.is_large_string(type_))
    return cast(bool, type_ == pa.list_(pa.string()))


def read_documents(
    path: str,
    columns: Mapping[str, ColumnKind],
    id_key: str = ID,
    limit: int | None = None,
    id_from: str | None = None,
) -> ray.data.Dataset:
    """Read a corpus: one row per input record, bad ones marked with a ``reject_reason``.

    Rows come back with the columns ``id``, each of ``columns``, ``reject_reason``, ``source``
    and ``line``. An absent id is derived from the document in ``id_from`` (default: the
    first text column); ids that repeat are rejected after the first occurrence (by file and
    line).
    """
    check_input(path, columns, id_key)
    fs, infos = _input_files(path)
    files = [i.path for i in infos]
    schema = input_schema(columns)
    id_from = id_from or next(n for n, k in columns.items() if k == "text")
    normalize = _Normalizer(columns, id_key, id_from, schema)
    if files[0].endswith(PARQUET_SUFFIXES):
        # A task per file that numbers its rows, as lines are numbered in a JSON file: a
        # reject then says where it is, and the first of two rows with one id is well defined.
        paths = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
        ds = paths.map_batches(
            functools.partial(normalize.parquet_files, fs=fs), batch_size=1, batch_format="pyarrow"
        )
    else:
        ds = ray.data.read_binary_files(files, filesystem=fs, include_paths=True)
        # One file per call: its lines are numbered within it.
        ds = ds.map_batches(normalize.json_files, batch_size=1, batch_format="pyarrow")
    if limit is not None:  # materialized: the two reads below must see the same rows
        # The first ``limit`` rows in the input's order; nothing after this read needs order.
        ds.context.execution_options.preserve_order = True
        ds = ds.limit(limit).materialize()
    # Only ids and positions travel in the shuffle that finds repeated ids; the documents'
    # texts stay where they are read, and are read a second time instead. A shuffle partition
    # per _SHUFFLE_BYTES of input (Ray's default is 200 whatever the size).
    partitions = min(_MAX_SHUFFLE_PARTITIONS, 1 + sum(i.size or 0 for i in infos) // _SHUFFLE_BYTES)
    firsts = (
        ds.map_batches(_id_and_position, batch_format="pyarrow")
        .groupby(ID, num_partitions=partitions)
        .aggregate(Count(alias_name="n"), Min(_POSITION, alias_name=_POSITION))
        .filter(expr=col("n") > 1)
    )
    repeated = [t for t in ray.get(firsts.to_arrow_refs()) if t.num_rows]  # one row per id
    if not repeated:
        return ds
    first_seen = pa.concat_tables(repeated).select([ID, _POSITION]).combine_chunks()
    mark = functools.partial(_reject_repeated_ids, first_seen=first_seen)
    return ds.map_batches(mark, batch_format="pyarrow")


class _Normalizer:
    """Turns raw records into rows of the input schema, with a reason where one is bad."""

    def __init__(
        self, columns: Mapping[str, ColumnKind], id_key: str, id_from: str, schema: pa.Schema
    ):
        self.columns = dict(columns)
        self.id_key = id_key
        self.id_from = id_from
        self.schema = schema

    def json_files(self, batch: pa.Table) -> pa.Table:
        rows = []
        for path, data in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist(), strict=True):
            try:
                records = list(_parse_json_bytes(data, path))
            except _BadArray as e:
                # The first file fails the run before it starts (check_input); a later one
                # becomes a reject for the whole file rather than a failed job.
                rows.append(self.reject(e.reason, path, None))
                continue
            for line, (record, error) in enumerate(records, start=1):
                if error is None:
                    rows.append(self.row(record, path, line))
                else:
                    rows.append(self.reject(error, path, line))
        return table(rows, self.schema)

    def parquet_files(self, batch: pa.Table, fs: pafs.FileSystem) -> Iterator[pa.Table]:
        """The rows of the one Parquet file ``batch`` names, numbered from 1, in batches."""
        (path,) = batch["path"].to_pylist()
        parquet = pq.ParquetFile(path, filesystem=fs)
        wanted = {*self.columns, self.id_key}
        columns = [name for name in parquet.schema_arrow.names if name in wanted]
        line = 0
        for records in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            rows = []
            for record in records.to_pylist():
                line += 1
                rows.append(self.row(record, path, line))
            yield table(rows, self.schema)

    def reject(self, reason: str, source: str | None, line: int | None) -> dict[str, Any]:
        return {
            **dict.fromkeys(self.schema.names),
            REJECT_REASON: reason,
            SOURCE: source,
            LINE: line,
        }

    def row(self, record: Any, source: str | None, line: int | None) -> dict[str, Any]:
        if not isinstance(record, dict):
            return self.reject(f"expected a JSON object, got {type(record).__name__}", source, line)
        out: dict[str, Any] = {SOURCE: source, LINE: line, REJECT_REASON: None}
        problems = []
        for name, kind in self.columns.items():
            value, problem = _check_value(record.get(name, _MISSING), name, kind)
            out[name] = value
            if problem:
                problems.append(problem)
        raw_id = record.get(self.id_key)
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int | type(None)):
            problems.append(f"{self.id_key!r} is {type(raw_id).__name__}, expected string or int")
        elif raw_id is not None and str(raw_id).strip():
            out[ID] = str(raw_id).strip()
        if ID not in out and isinstance(out.get(self.id_from), str):
            out[ID] = content_key(out[self.id_from])
        if problems:
            out[REJECT_REASON] = "; ".join(problems)
        return out


_MISSING = object()


def _check_value(value: Any, name: str, kind: ColumnKind) -> tuple[Any, str | None]:
    if kind == "carried":
        if value is _MISSING or value is None or isinstance(value, str):
            return None if value is _MISSING else value, None
        return json.dumps(value, ensure_ascii=False, default=str), None
    if value is _MISSING or value is None:
        return None, f"{name!r} is missing"
    if kind == "text":
        if not isinstance(value, str):
            return None, f"{name!r} is {type(value).__name__}, expected string"
        if not value.strip():
            return value, f"{name!r} is empty"
        return value, None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None, f"{name!r} must be a list of strings"
    return value, None


class _BadArray(InputError):
    """A JSON array file that does not parse: nothing in it can be read."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def _parse_json_bytes(
    data: bytes, path: str, limit: int | None = None
) -> Iterator[tuple[Any, str | None]]:
    """Yield (record, error) per record: a JSON array's items, or one per non-blank line.

    For JSONL, the k-th yield is line k of the file (blank lines yield an error too, so line
    numbers stay right and every line is accounted for).
    """
    if data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _BadArray(path, f"not a valid JSON array ({e})") from e
        yield from ((item, None) for item in items[:limit])
        return
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    for raw in lines[:limit] if limit else lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield None, f"invalid UTF-8 at byte {e.start} of the line"
            continue
        if not text.strip():
            yield None, "blank line"
            continue
        try:
            yield json.loads(text), None
        except json.JSONDecodeError as e:
            yield None, f"invalid JSON: {e.msg} at column {e.colno}"


# A row's place in the input as one string that sorts in input order: file, then line.
_POSITION = "_position"
_LINE_DIGITS = 12


def _position(batch: pa.Table) -> pa.Array:
    line = pc.utf8_lpad(pc.cast(pc.fill_null(batch[LINE], 0), pa.string()), _LINE_DIGITS, "0")
    return pc.binary_join_element_wise(pc.fill_null(batch[SOURCE], ""), line, "\x1f")


def _id_and_position(batch: pa.Table) -> pa.Table:
    """The id and position of each good row (a rejected row repeats nothing)."""
    good = batch.filter(pc.and_(pc.is_null(batch[REJECT_REASON]), pc.is_valid(batch[ID])))
    return pa.table({ID: good[ID], _POSITION: _position(good)})


def _reject_repeated_ids(batch: pa.Table, first_seen: pa.Table) -> pa.Table:
    """Rejects every good row whose id ``first_seen`` (one row per repeated id: its id and
    first position) lists at an earlier position than the row's own."""
    first = pc.take(first_seen[_POSITION], pc.index_in(batch[ID], value_set=first_seen[ID]))
    repeat = pc.and_(
        pc.and_(pc.is_null(batch[REJECT_REASON]), pc.is_valid(first)),
        pc.not_equal(first, _position(batch)),
    )
    indices = pc.indices_nonzero(pc.fill_null(repeat, False)).to_pylist()
    if not indices:
        return batch
    reasons, ids = batch[REJECT_REASON].to_pylist(), batch[ID].to_pylist()
    for i in indices:
        source, line = first[i].as_py().rsplit("\x1f", 1)
        where = f"{source}:{int(line)}" if int(line) else source
        reasons[i] = f"duplicate id {ids[i]!r} (first seen at {where})"
    column = batch.schema.get_field_index(REJECT_REASON)
    return batch.set_column(column, REJECT_REASON, pa.array(reasons, pa.string()))
