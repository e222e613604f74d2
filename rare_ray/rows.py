"""Conventions every stage shares: bookkeeping columns, content identity, kept vs. rejected.

A stage never drops a row. It writes every row it was given, and a row that failed carries its
reason in ``reject_reason`` (null for rows that go on). Columns starting with ``_`` are per-row
counters that the manifest sums and the published data leaves out.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

ID = "id"
REJECT_REASON = "reject_reason"
# Where an input row came from: kept so that a rejected row can be found in the input.
SOURCE = "source"
LINE = "line"
SPLIT = "split"
# The checkpoint shard a row belongs to, fixed at ingest (see rare_ray.io.checkpoints).
SHARD = "shard"
# Chat messages as a column: what ReasonDistill's teacher got, and the SFT exports.
# The verify stage's label (rare_ray.operators.answer_verify), which the export filters on.
ANSWER_VERIFIED = "answer_verified"
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def normalized(text: str) -> str:
    """Text with runs of whitespace collapsed: two copies that differ only in spacing match."""
    return " ".join(text.split())


def content_key(text: str) -> str:
    """A short, stable hash of a document's content (also the id of rows that have none)."""
    return hashlib.sha1(normalized(text).encode("utf-8")).hexdigest()[:16]


def kept(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch[REJECT_REASON]))


def rejected(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch[REJECT_REASON]))


def counter_columns(schema: pa.Schema) -> list[str]:
    return [name for name in schema.names if name.startswith("_")]


def table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows to a table with an explicit schema, so every block of a stage agrees on types."""
    return pa.Table.from_pylist(rows, schema=schema)
