"""The output directory: stage checkpoints, the published data, rejects and the manifest.

Layout of ``DIR``::

    _stages/              every row each stage produced, kept and rejected, in committed
                          shards (see ``rare_ray.io.checkpoints``); the next stage reads from here
    data/split=train/     the final rows (hive-partitioned Parquet)
    data/split=validation/
    rejects/stage=<stage>/  every input row that did not make it, with the reason
    manifest.json

``data/`` and ``rejects/`` are written to temporary directories and then swapped in, so a
rerun replaces them instead of adding files next to the old ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from rare_ray.io.checkpoints import Checkpoints
from rare_ray.rows import (
    ID,
    LINE,
    REJECT_REASON,
    SHARD,
    SOURCE,
    SPLIT,
    counter_columns,
    kept,
)
from rare_ray.vocabulary import ALL_STAGES, INGEST, OutputError, filesystem

# The columns of rejects/ files; `stage` is in the hive path (rejects/stage=<stage>/).
REJECT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field("reason", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("text", pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(LINE, pa.int64()),
    ]
)


def split_of(row_id: str, validation_fraction: float) -> str:
    """'train' or 'validation', from a hash of the id: stable across reruns and corpus growth."""
    bucket = int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big")
    return "validation" if bucket / 2**64 < validation_fraction else "train"


def _publishable(batch: pa.Table, validation_fraction: float) -> pa.Table:
    drop = [REJECT_REASON, SOURCE, LINE, SHARD, *counter_columns(batch.schema)]
    out = batch.drop_columns([c for c in drop if c in batch.column_names])
    splits = [split_of(i, validation_fraction) for i in batch[ID].to_pylist()]
    return out.append_column(SPLIT, pa.array(splits, pa.string()))


class RejectSource(NamedTuple):
    """A stage's final pass, as rejects/ shows it: its files, the column with the document,
    and the column (if any) that says which pass rejected a row."""

    stage: str
    files: Sequence[str]
    text_key: str
    pass_column: str | None = None


class OutputDir:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem(uri)
        self.checkpoints = Checkpoints(self.fs, self.root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def check_writable(self) -> None:
        probe = self.path(".rare-ray-write-probe")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as e:
            raise OutputError(f"output directory {self.uri!r} is not writable: {e}") from e

    def clear(self) -> None:
        """Deletes what an earlier run wrote (``--fresh``)."""
        for name in ("_stages", "data", "data.partial", "rejects", "rejects.partial"):
            self._delete(self.path(name))
        manifest = self.path("manifest.json")
        if self.fs.get_file_info(manifest).type == pafs.FileType.File:
            self.fs.delete_file(manifest)

    # Publishing ---------------------------------------------------------------------------

    def publish_data(self, files: Sequence[str], validation_fraction: float) -> None:
        """The kept rows of ``files`` (the last stage's) into ``data/split=.../``."""
        staging = self.path("data.partial")
        self._delete(staging)
        if files:
            ds = ray.data.read_parquet(list(files), filesystem=self.fs).map_batches(
                kept, batch_format="pyarrow"
            )
            ds.map_batches(
                functools.partial(_publishable, validation_fraction=validation_fraction),
                batch_format="pyarrow",
            ).write_parquet(staging, filesystem=self.fs, partition_cols=[SPLIT])
        self.fs.create_dir(staging, recursive=True)
        self._swap(staging, self.path("data"))

    def publish_rejects(self, stages: Iterable[RejectSource]) -> None:
        """Every stage's final rejects into ``rejects/stage=<stage>/``.

        ``stages``: (stage, files holding its final rejected rows, the column with its text).
        """
        staging = self.path("rejects.partial")
        self._delete(staging)
        for stage, files, text_key, pass_column in stages:
            if not files:
                continue
            data = pads.dataset(list(files), filesystem=self.fs, format="parquet")
            names = data.schema.names
            columns = {
                ID: pc.field(ID),
                "reason": pc.field(REJECT_REASON),
                "attempts": pc.field(pass_column) if pass_column in names else None,
                "text": pc.field(text_key) if text_key in names else None,
                SOURCE: pc.field(SOURCE) if SOURCE in data.schema.names else None,
                LINE: pc.field(LINE) if LINE in data.schema.names else None,
            }
            scan = data.scanner(
                columns={k: v for k, v in columns.items() if v is not None},
                filter=pc.field(REJECT_REASON).is_valid(),
            )
            self._write_rejects(stage, scan.to_batches(), staging)
        self.fs.create_dir(staging, recursive=True)
        self._swap(staging, self.path("rejects"))

    def _write_rejects(self, stage: str, batches: Iterable[pa.RecordBatch], staging: str) -> None:
        writer = None
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                columns = [
                    batch.column(f.name).cast(f.type)
                    if f.name in batch.schema.names
                    else pa.nulls(batch.num_rows, f.type)
                    for f in REJECT_SCHEMA
                ]
                if writer is None:
                    directory = f"{staging}/stage={stage}"
                    self.fs.create_dir(directory, recursive=True)
                    writer = pq.ParquetWriter(
                        f"{directory}/part-0.parquet", REJECT_SCHEMA, filesystem=self.fs
                    )
                writer.write_table(pa.Table.from_arrays(columns, schema=REJECT_SCHEMA))
        finally:
            if writer is not None:
                writer.close()

    def counter_totals(
        self, stage: str, kept_files: Sequence[str], rejected_files: Sequence[str]
    ) -> dict[str, int]:
        """Sums of a stage's counter columns over its final rows (kept, and finally rejected)."""
        totals: dict[str, int] = {}
        prefix = f"_{stage}_"
        for files, rows in ((kept_files, pc.field(REJECT_REASON).is_null()),
                            (rejected_files, pc.field(REJECT_REASON).is_valid())):  # fmt: skip
            if not files:
                continue
            data = pads.dataset(list(files), filesystem=self.fs, format="parquet")
            counters = counter_columns(data.schema)
            if not counters:
                continue
            table = data.to_table(columns=counters, filter=rows)
            for name in counters:
                key = name.removeprefix(prefix) if name.startswith(prefix) else name.lstrip("_")
                totals[key] = totals.get(key, 0) + int(pc.sum(table[name]).as_py() or 0)
        return totals

    def status(self) -> dict[str, Any]:
        """What a (possibly unfinished) run has written: each pass, its shards and counts."""
        ckpt = self.checkpoints
        ingest = ckpt.pass_of(INGEST)
        shards = ingest.committed()
        passes: dict[str, Any] = {}
        if ingest.complete():
            passes[INGEST] = {
                "complete": True,
                "shards": len(shards),
                "committed": len(shards),
                "kept": sum(s.kept for s in shards.values()),
                "rejected": sum(s.rejected for s in shards.values()),
            }
        rank: dict[str, int] = {name: n for n, name in enumerate(ALL_STAGES)}
        for stage in sorted(set(ckpt.stages()) - {INGEST}, key=lambda s: (rank.get(s, 99), s)):
            attempt = 1
            while True:
                step = ckpt.pass_of(stage, attempt)
                if self.fs.get_file_info(step.path).type == pafs.FileType.NotFound:
                    break
                done = step.committed()
                name = stage if attempt == 1 else f"{stage}/attempt-{attempt}"
                passes[name] = {
                    "complete": step.complete(),
                    "shards": len(shards),
                    "committed": len(done),
                    "kept": sum(s.kept for s in done.values()),
                    "rejected": sum(s.rejected for s in done.values()),
                }
                attempt += 1
        has_manifest = self.fs.get_file_info(self.path("manifest.json")).type
        return {
            "output": self.uri,
            "passes": passes,
            "published": {"data": self.count_rows("data"), "rejects": self.count_rows("rejects")},
            "finished": has_manifest == pafs.FileType.File,
        }

    def count_rows(self, name: str) -> int:
        """Rows in a published directory (``data`` or ``rejects``)."""
        path = self.path(name)
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return 0
        data = pads.dataset(path, filesystem=self.fs, format="parquet", partitioning="hive")
        return int(data.count_rows())

    # Manifest -----------------------------------------------------------------------------

    def write_manifest(self, manifest: Mapping[str, Any]) -> str:
        path = self.path("manifest.json")
        with self.fs.open_output_stream(path) as f:
            f.write(json.dumps(manifest, indent=2, default=str).encode("utf-8"))
        return path

    # Helpers -------------------------------------------------------------------------------

    def _delete(self, path: str) -> None:
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(path)

    def _swap(self, staging: str, final: str) -> None:
        self._delete(final)
        self.fs.move(staging, final)
