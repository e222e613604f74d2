"""The output directory: stage checkpoints, the published data, rejects and the manifest.

Layout of ``DIR``::

    _stages/<stage>/      every row a stage produced, kept and rejected, as Parquet;
                          the next stage reads the kept rows from here
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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from rare_ray.config import ALL_STAGES
from rare_ray.rows import ID, LINE, REJECT_REASON, SOURCE, SPLIT, counter_columns, kept, rejected

SUCCESS = "_SUCCESS"

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


class OutputError(RuntimeError):
    """The output location cannot be used."""


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def split_of(row_id: str, validation_fraction: float) -> str:
    """'train' or 'validation', from a hash of the id: stable across reruns and corpus growth."""
    bucket = int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big")
    return "validation" if bucket / 2**64 < validation_fraction else "train"


def _publishable(batch: pa.Table, validation_fraction: float) -> pa.Table:
    drop = [REJECT_REASON, SOURCE, LINE, *counter_columns(batch.schema)]
    out = batch.drop_columns([c for c in drop if c in batch.column_names])
    splits = [split_of(i, validation_fraction) for i in batch[ID].to_pylist()]
    return out.append_column(SPLIT, pa.array(splits, pa.string()))


class OutputDir:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = _filesystem(uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def stage_path(self, stage: str) -> str:
        return self.path("_stages", stage)

    def check_writable(self) -> None:
        probe = self.path(".rare-ray-write-probe")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as e:
            raise OutputError(f"output directory {self.uri!r} is not writable: {e}") from e

    # Stage checkpoints ------------------------------------------------------------------

    def write_stage(self, stage: str, ds: ray.data.Dataset) -> None:
        path = self.stage_path(stage)
        self._delete(path)
        ds.write_parquet(path, filesystem=self.fs)
        self.fs.create_dir(path, recursive=True)  # a stage with no rows still gets its dir
        with self.fs.open_output_stream(self.path("_stages", stage, SUCCESS)) as f:
            f.write(b"")

    def read_stage(
        self, stage: str, rows: Literal["kept", "rejected", "all"] = "kept"
    ) -> ray.data.Dataset:
        ds = ray.data.read_parquet(self.stage_path(stage), filesystem=self.fs)
        if rows == "all":
            return ds
        return ds.map_batches(kept if rows == "kept" else rejected, batch_format="pyarrow")

    def _stage_dataset(self, stage: str) -> pads.Dataset:
        return pads.dataset(
            self.stage_path(stage), filesystem=self.fs, format="parquet",
            exclude_invalid_files=True,
        )  # fmt: skip

    def stage_counts(self, stage: str) -> dict[str, int]:
        """Rows written by a stage: kept, rejected, and the sums of its counters."""
        data = self._stage_dataset(stage)
        if not data.files:
            return {"out": 0, "rejected": 0}
        counts = {
            "out": data.count_rows(filter=pc.field(REJECT_REASON).is_null()),
            "rejected": data.count_rows(filter=pc.field(REJECT_REASON).is_valid()),
        }
        counters = counter_columns(data.schema)
        if counters:
            totals = data.to_table(columns=counters)
            prefix = f"_{stage}_"
            for name in counters:
                key = name.removeprefix(prefix) if name.startswith(prefix) else name.lstrip("_")
                counts[key] = int(pc.sum(totals[name]).as_py() or 0)
        return counts

    # Publishing ---------------------------------------------------------------------------

    def publish_data(self, stage: str, validation_fraction: float) -> None:
        staging = self.path("data.partial")
        self._delete(staging)
        ds = self.read_stage(stage, "kept").map_batches(
            functools.partial(_publishable, validation_fraction=validation_fraction),
            batch_format="pyarrow",
        )
        ds.write_parquet(staging, filesystem=self.fs, partition_cols=[SPLIT])
        self._swap(staging, self.path("data"))

    def publish_rejects(self, text_keys: Mapping[str, str]) -> None:
        """Collect every stage's rejected rows into ``rejects/stage=<stage>/``."""
        staging = self.path("rejects.partial")
        self._delete(staging)
        for stage, text_key in text_keys.items():
            data = self._stage_dataset(stage)
            if not data.files:
                continue
            attempts = f"{stage}_attempts"
            columns = {
                ID: pc.field(ID),
                "reason": pc.field(REJECT_REASON),
                "attempts": pc.field(attempts) if attempts in data.schema.names else None,
                "text": pc.field(text_key) if text_key in data.schema.names else None,
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

    def status(self) -> dict[str, Any]:
        """What a (possibly unfinished) run has written: each stage, complete or not, and counts."""
        stages: dict[str, Any] = {}
        listing = self.fs.get_file_info(
            pafs.FileSelector(self.path("_stages"), allow_not_found=True)
        )
        rank = {name: n for n, name in enumerate(["ingest", *ALL_STAGES])}
        for info in sorted(listing, key=lambda i: (rank.get(i.base_name, len(rank)), i.base_name)):
            if info.type != pafs.FileType.Directory:
                continue
            done = self.fs.get_file_info(self.path("_stages", info.base_name, SUCCESS))
            complete = done.type == pafs.FileType.File
            stages[info.base_name] = {
                "complete": complete,
                **(self.stage_counts(info.base_name) if complete else {}),
            }
        has_manifest = self.fs.get_file_info(self.path("manifest.json")).type
        return {
            "output": self.uri,
            "stages": stages,
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

    def read_manifest(self) -> dict[str, Any]:
        with self.fs.open_input_stream(self.path("manifest.json")) as f:
            manifest: dict[str, Any] = json.loads(f.read())
        return manifest

    # Helpers -------------------------------------------------------------------------------

    def _delete(self, path: str) -> None:
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(path)

    def _swap(self, staging: str, final: str) -> None:
        self._delete(final)
        self.fs.move(staging, final)
