"""Publishing a run's rows into ``data/`` and ``rejects/`` on a store without rename.

S3 and its kin have no directories and no rename: an object is written whole by one PUT, or
not at all, and nothing can be moved. So a publication is never staged and swapped in; it is
a set of final files plus the manifest that lists them:

1. **Write the files** under names that no other publication uses,
   ``data/split=<split>/part-<publication>-<group>.parquet`` and
   ``rejects/stage=<stage>/part-<publication>-<group>.parquet``, where ``<publication>`` is a
   fingerprint of what is published (the committed checkpoint files it reads, the split) and
   ``<group>`` a run of consecutive shards. Ray tasks write them, a group each: rows never
   pass through the driver. Each file appears whole (one PUT; on local disk a hidden
   temporary file renamed into place), so a reader never meets half a file.
2. **Write the manifest**, one object, last. It lists the publication's files and counts.
   The dataset card (``README.md``, ``rare_ray.io.card``) follows it, made from it.
3. **Delete every other file** under ``data/`` and ``rejects/``: earlier publications and
   what a killed run left (a rerun that finds its publication complete does this again),
   and SFT exports made from an earlier publication.

Why that holds at every moment:

- A reader that follows the manifest sees exactly one complete publication: the manifest
  is replaced whole, and the files it lists are deleted only after a newer manifest that
  does not list them is in place (step 3 comes after step 2).
- A crash before step 2 leaves the earlier manifest and every file it lists untouched (new
  names never overwrite old ones); a crash in step 3 leaves only files no manifest lists.
  The earlier complete publication is never deleted without its replacement.
- A rerun computes the same fingerprint from the same committed checkpoints, so it writes
  the same names (overwriting any a killed run wrote), then steps 2 and 3: the publication
  finishes. A rerun whose publication is already complete (the manifest names it and all of
  its files exist) writes no file at all.
- After a successful run a plain directory read of ``data/`` (pyarrow, DuckDB, Spark, HF
  ``datasets``) sees exactly that run's rows. During one, or after a crash, it may see files
  of two publications: those readers should follow the manifest, or wait for the rerun.

The same code serves local disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from rare_ray.io.card import CARD, EXPORT_RECORD, EXPORTS, render_card
from rare_ray.io.checkpoints import (
    fingerprint,
    read_json,
    write_json,
    write_parquet_whole,
    write_whole,
)
from rare_ray.rows import ID, LINE, REJECT_REASON, SHARD, SOURCE, SPLIT, counter_columns, kept

MANIFEST = "manifest.json"
PUBLISHED = ("data", "rejects")

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


class RejectSource(NamedTuple):
    """A stage's final pass, as rejects/ shows it: its files, the column with the document,
    and the column (if any) that says which pass rejected a row."""

    stage: str
    files: Sequence[str]
    text_key: str
    pass_column: str | None = None


class Group(NamedTuple):
    """A run of consecutive shards, published by one task into one file per split and stage."""

    data: Sequence[str]  # files holding the last stage's kept rows (and perhaps rejects)
    rejects: Sequence[RejectSource]


@dataclass
class Publication:
    """What one publication wrote: its files (relative to the output root) and row counts."""

    id: str
    files: list[str] = field(default_factory=list)
    data: dict[str, int] = field(default_factory=dict)  # rows per split
    rejects: dict[str, int] = field(default_factory=dict)  # rows per stage
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # per stage, per reason

    def add(self, other: Mapping[str, Any]) -> None:
        self.files.extend(other["files"])
        for key in ("data", "rejects"):
            mine = getattr(self, key)
            for name, rows in other[key].items():
                mine[name] = mine.get(name, 0) + rows
        for stage, reasons in other.get("reasons", {}).items():
            mine = self.reasons.setdefault(stage, {})
            for reason, rows in reasons.items():
                mine[reason] = mine.get(reason, 0) + rows

    @property
    def data_rows(self) -> int:
        return sum(self.data.values())

    @property
    def reject_rows(self) -> int:
        return sum(self.rejects.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "files": sorted(self.files)}


def publication_id(groups: Sequence[Group], validation_fraction: float) -> str:
    """A fingerprint of what is published: equal for equal committed checkpoints."""
    what = [[list(g.data), [list(r) for r in g.rejects]] for g in groups]
    return fingerprint({"groups": what, "validation_fraction": validation_fraction})[:16]


def publish(
    fs: pafs.FileSystem,
    root: str,
    groups: Sequence[Group],
    validation_fraction: float,
) -> tuple[Publication, bool]:
    """Writes the files of the publication of ``groups`` (step 1); returns it, and whether
    anything was written (not when the manifest already names it and its files all exist)."""
    pub = Publication(publication_id(groups, validation_fraction))
    earlier = complete_manifest(fs, root, pub.id)
    if earlier is not None:
        return Publication(**earlier["publication"]), False
    import ray  # here: reading a publication (``rare-ray export``) needs no Ray

    task = ray.remote(num_cpus=1)(_publish_group)
    results = ray.get(
        [
            task.remote(fs, root, f"{pub.id}-{n:05d}", group, validation_fraction)
            for n, group in enumerate(groups)
        ]
    )
    for result in results:
        pub.add(result)
    return pub, True


def complete_manifest(fs: pafs.FileSystem, root: str, pub_id: str) -> dict[str, Any] | None:
    """The manifest in ``root``, if it names the publication ``pub_id`` and every file of it
    exists (a rerun then has nothing to publish); else None."""
    manifest = read_json(fs, f"{root}/{MANIFEST}") or {}
    done = manifest.get("publication") or {}
    if done.get("id") == pub_id and set(done["files"]) <= published_files(fs, root):
        return dict(manifest)
    return None


def commit(fs: pafs.FileSystem, root: str, manifest: Mapping[str, Any]) -> None:
    """Steps 2 and 3: the manifest (which lists the publication's files under
    ``publication``) and the dataset card made from it, then every other file under data/
    and rejects/ is deleted, and SFT exports of an earlier publication."""
    write_json(fs, f"{root}/{MANIFEST}", manifest)
    write_card(fs, root, manifest)
    tidy(fs, root, manifest)


def tidy(fs: pafs.FileSystem, root: str, manifest: Mapping[str, Any]) -> None:
    """Step 3 (again, on a rerun that found its publication complete: a run killed during
    step 3 leaves files that a directory read would see)."""
    keep = set(manifest["publication"]["files"])
    stale = [f for f in published_files(fs, root, hidden=True) if f not in keep]
    for name in stale:
        fs.delete_file(f"{root}/{name}")
    if exports_of(fs, root, manifest) is None:
        exports = f"{root}/{EXPORTS}"
        if fs.get_file_info(exports).type == pafs.FileType.Directory:
            fs.delete_dir(exports)


def exports_of(
    fs: pafs.FileSystem, root: str, manifest: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The record of the SFT exports made from ``manifest``'s publication, if any."""
    record = read_json(fs, f"{root}/{EXPORT_RECORD}")
    if record and record.get("publication") == manifest["publication"]["id"]:
        return dict(record)
    return None


def write_card(fs: pafs.FileSystem, root: str, manifest: Mapping[str, Any]) -> None:
    """The dataset card of ``manifest``'s publication and its exports (``README.md``)."""
    card = render_card(manifest, exports_of(fs, root, manifest))
    write_whole(fs, f"{root}/{CARD}", card.encode("utf-8"))


def published_files(fs: pafs.FileSystem, root: str, hidden: bool = False) -> set[str]:
    """Files under data/ and rejects/, relative to ``root`` (one listing each)."""
    found: set[str] = set()
    for name in PUBLISHED:
        selector = pafs.FileSelector(f"{root}/{name}", recursive=True, allow_not_found=True)
        for info in fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            if not hidden and info.base_name.startswith((".", "_")):
                continue
            found.add(info.path[len(root.rstrip("/")) + 1 :])
    return found


# In Ray tasks ------------------------------------------------------------------------------


def _publish_group(
    fs: pafs.FileSystem, root: str, name: str, group: Group, validation_fraction: float
) -> dict[str, Any]:
    written: dict[str, Any] = {"files": [], "data": {}, "rejects": {}, "reasons": {}}
    if group.data:
        table = kept(pads.dataset(list(group.data), filesystem=fs, format="parquet").to_table())
        table = _publishable(table, validation_fraction)
        for split in sorted(set(table[SPLIT].to_pylist())):
            rows = table.filter(pc.equal(table[SPLIT], split)).drop_columns([SPLIT])
            path = f"data/{SPLIT}={split}/part-{name}.parquet"
            write_parquet_whole(rows, f"{root}/{path}", fs)
            written["files"].append(path)
            written["data"][split] = rows.num_rows
    for source in group.rejects:
        rows = _rejects(fs, source)
        if rows.num_rows:
            path = f"rejects/stage={source.stage}/part-{name}.parquet"
            write_parquet_whole(rows, f"{root}/{path}", fs)
            written["files"].append(path)
            written["rejects"][source.stage] = rows.num_rows
            written["reasons"][source.stage] = {
                r["values"]: r["counts"] for r in pc.value_counts(rows["reason"]).to_pylist()
            }
    return written


def split_of(row_id: str, validation_fraction: float) -> str:
    """'train' or 'validation', from a hash of the id: stable across reruns and corpus growth."""
    bucket = int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big")
    return "validation" if bucket / 2**64 < validation_fraction else "train"


def _publishable(batch: pa.Table, validation_fraction: float) -> pa.Table:
    drop = [REJECT_REASON, SOURCE, LINE, SHARD, *counter_columns(batch.schema)]
    out = batch.drop_columns([c for c in drop if c in batch.column_names])
    splits = [split_of(i, validation_fraction) for i in batch[ID].to_pylist()]
    return out.append_column(SPLIT, pa.array(splits, pa.string()))


def _rejects(fs: pafs.FileSystem, source: RejectSource) -> pa.Table:
    """A stage's finally rejected rows, in REJECT_SCHEMA."""
    if not source.files:
        return REJECT_SCHEMA.empty_table()
    data = pads.dataset(list(source.files), filesystem=fs, format="parquet")
    names = data.schema.names
    wanted = {
        ID: ID,
        "reason": REJECT_REASON,
        "attempts": source.pass_column,
        "text": source.text_key,
        SOURCE: SOURCE,
        LINE: LINE,
    }
    table = data.to_table(
        columns={k: pc.field(v) for k, v in wanted.items() if v is not None and v in names},
        filter=pc.field(REJECT_REASON).is_valid(),
    )
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in REJECT_SCHEMA
    ]  # fmt: skip
    return pa.Table.from_arrays(columns, schema=REJECT_SCHEMA)
