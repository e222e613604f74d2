"""Stage checkpoints: every stage's rows in shards, each committed once its files are durable.

Layout of ``DIR/_stages/``::

    ingest/shard-00007/part-<hash>.parquet  the eighth 100 rows of the corpus as read
                                            (shard_rows 100), bad ones with their reason
    ingest/_SUCCESS                         every shard, with its files and counts
    <stage>/_SETTINGS.json                  what the stage's output depends on
    <stage>/shard-00007/part-<hash>.parquet rows of shard 7, kept and rejected
    <stage>/shard-00007/_SUCCESS            the shard's files and counts, written last
    <stage>/attempt-2/shard-00007/...       a re-ask pass over the rows that failed before
    <stage>/_SUCCESS                        every shard of the pass, with its counts (a
                                            shard with no rows in the pass has no record
                                            of its own: only this one lists it)

Shards are cut once, at ingest, by row count: ``shard_rows`` rows of the corpus as read (kept
or rejected) make a shard, and a row keeps its shard number (column ``shard``) through every
stage. Each stage streams its rows into part files named by a hash of the ids they hold, and
the driver commits a shard as soon as all the rows it expects have been written (on a local
disk, the files are fsync'ed first). Only the files a shard's ``_SUCCESS`` lists are ever
read, so a part left by a killed run, or by a task that Ray retried, is never read twice; a
rerun clears the shards that were not committed and redoes just those.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rare_ray.rows import ID, REJECT_REASON, SHARD, counter_columns
from rare_ray.vocabulary import INGEST, ResumeError

SUCCESS = "_SUCCESS"
# Requests in flight when the driver reads many small objects (shard records, file footers).
_PARALLEL_READS = 16
SETTINGS = "_SETTINGS.json"


@dataclass
class Shard:
    """A committed shard of one pass: its part files (relative to the pass) and row counts."""

    files: list[str] = field(default_factory=list)
    kept: int = 0
    rejected: int = 0
    # The stage's counter columns summed over the shard's kept and its rejected rows, taken
    # when the parts are written, so the manifest's totals never read the rows again.
    counters: dict[str, dict[str, int]] = field(default_factory=dict)

    def add_counters(self, counters: Mapping[str, Mapping[str, int]]) -> None:
        for rows, sums in counters.items():
            mine = self.counters.setdefault(rows, {})
            for name, value in sums.items():
                mine[name] = mine.get(name, 0) + value

    @property
    def rows(self) -> int:
        return self.kept + self.rejected


def shard_dir(shard: int) -> str:
    return f"shard-{shard:05d}"


def write_json(fs: pafs.FileSystem, path: str, value: Any) -> None:
    """Writes ``value`` so that a reader sees the whole file or none of it."""
    write_whole(fs, path, json.dumps(value, indent=1, sort_keys=True, default=str).encode("utf-8"))


def write_whole(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Writes ``data`` so that a reader sees the whole file or none of it."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:  # object stores publish an object whole
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_json(fs: pafs.FileSystem, path: str) -> Any | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def write_parts(batch: pa.Table, directory: str, fs: pafs.FileSystem, tag: str = "") -> pa.Table:
    """Writes ``batch`` into its shards' directories; returns one row per file written.

    Runs in Ray tasks: those that cut ingest's shards, and those a stage's batches are bundled
    into (``checkpoint.part_rows`` rows each, see ``rare_ray.runner.run_pass``).
    A part is named by a hash of ``tag`` and its rows' ids: rows without an id (ingest's
    rejects) need a ``tag`` that tells their parts apart.
    """
    written: dict[str, list[Any]] = {name: [] for name in PART_SCHEMA.names}
    if batch.num_rows == 0:
        return pa.table(written, schema=PART_SCHEMA)
    shards = batch[SHARD]
    counters = counter_columns(batch.schema)
    for shard in pc.unique(shards).to_pylist():
        part = batch.filter(pc.equal(shards, shard))
        ids = "\n".join(i or "" for i in part[ID].to_pylist())
        digest = hashlib.sha1(f"{tag}\n{ids}".encode()).hexdigest()[:20]
        name = f"{shard_dir(shard)}/part-{digest}.parquet"
        write_parquet_whole(part, f"{directory}/{name}", fs)
        is_rejected = pc.is_valid(part[REJECT_REASON])
        rejected = int(pc.sum(is_rejected).as_py() or 0)
        subsets = {
            "kept": part.filter(pc.invert(is_rejected)),
            "rejected": part.filter(is_rejected),
        }
        sums = {
            rows: {c: int(pc.sum(subset[c]).as_py() or 0) for c in counters}
            for rows, subset in subsets.items()
        }
        written[SHARD].append(shard)
        written["file"].append(name)
        written["kept"].append(part.num_rows - rejected)
        written["rejected"].append(rejected)
        written["counters"].append(json.dumps(sums) if counters else "{}")
    return pa.table(written, schema=PART_SCHEMA)


PART_SCHEMA = pa.schema(
    [
        (SHARD, pa.int32()),
        ("file", pa.string()),
        ("kept", pa.int64()),
        ("rejected", pa.int64()),
        ("counters", pa.string()),  # JSON: {"kept"|"rejected": {counter column: sum}}
    ]
)


def write_parquet_whole(table: pa.Table, path: str, fs: pafs.FileSystem) -> None:
    """Writes a Parquet file that readers see whole or not at all, and that survives a crash.

    On local disk: a hidden temporary file (readers skip names that start with '.'), synced,
    then renamed into place. On an object store one PUT does that by itself, and no directory
    is created first: a prefix is not a thing there, and each marker would cost a request.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


class Pass:
    """One pass of a stage over its shards (a stage has one, Doc2Query one per attempt)."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path
        self.commit_s = 0.0  # seconds this process spent committing shards and the pass

    def _shards_from(self, record: Mapping[str, Any]) -> dict[int, Shard]:
        return {int(k): Shard(**v) for k, v in record["shards"].items()}

    def committed(self) -> dict[int, Shard]:
        """The shards whose files are all written, by shard number: the pass's record when it
        is complete, else one listing and the shards' own records, read in parallel."""
        done = read_json(self.fs, f"{self.path}/{SUCCESS}")
        if done is not None:
            return self._shards_from(done)
        records = self._shard_records()
        return {k: Shard(**r) for k, r in records.items() if r is not None}

    def complete(self) -> bool:
        info = self.fs.get_file_info(f"{self.path}/{SUCCESS}")
        return cast(bool, info.type == pafs.FileType.File)

    def _shard_records(self) -> dict[int, Any]:
        """Each shard directory's ``_SUCCESS`` record (None where it has none yet)."""
        listing = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        shards = {
            int(i.base_name.removeprefix("shard-")): i.path
            for i in listing
            if i.type == pafs.FileType.Directory and i.base_name.startswith("shard-")
        }
        with ThreadPoolExecutor(max_workers=_PARALLEL_READS) as pool:
            records = pool.map(lambda d: read_json(self.fs, f"{d}/{SUCCESS}"), shards.values())
            return dict(zip(shards, records, strict=True))

    def clear_uncommitted(self) -> int:
        """Deletes the directories of shards that were never committed; returns how many."""
        uncommitted = [k for k, r in self._shard_records().items() if r is None]
        for k in uncommitted:
            self.fs.delete_dir(f"{self.path}/{shard_dir(k)}")
        return len(uncommitted)

    def commit_shard(self, shard: int, record: Shard) -> None:
        start = time.perf_counter()
        directory = f"{self.path}/{shard_dir(shard)}"
        if not record.files:  # else its parts are in it already: no request to make it again
            self.fs.create_dir(directory, recursive=True)
        write_json(self.fs, f"{directory}/{SUCCESS}", asdict(record))
        self.commit_s += time.perf_counter() - start

    def commit(self, shards: Mapping[int, Shard]) -> None:
        """Marks the pass complete; its record lists every shard, so readers need no listing."""
        start = time.perf_counter()
        self.fs.create_dir(self.path, recursive=True)
        record = {"shards": {str(k): asdict(v) for k, v in sorted(shards.items())}}
        write_json(self.fs, f"{self.path}/{SUCCESS}", record)
        self.commit_s += time.perf_counter() - start

    def files(
        self, shards: Iterable[int], committed: Mapping[int, Shard] | None = None
    ) -> list[str]:
        committed = self.committed() if committed is None else committed
        return [f"{self.path}/{f}" for k in shards for f in committed[k].files]


class ShardCommitter:
    """Counts the rows written per shard, and commits each shard once it has all of its rows.

    ``expected`` gives each shard's rows, or None for a shard whose count is not known yet
    (the stage before, running beside this one, has not committed it): ``expect`` gives it
    once it is. ``on_commit`` hears of every shard committed, the empty ones too.
    """

    def __init__(
        self,
        step: Pass,
        expected: Mapping[int, int | None],
        on_commit: Callable[[int, Shard], None] | None = None,
    ):
        self.step = step
        self.on_commit = on_commit
        self.expected: dict[int, int | None] = {}
        self.written: dict[int, Shard] = {k: Shard() for k in expected}
        self.committed: set[int] = set()
        for k, n in expected.items():
            self.expect(k, n)

    def expect(self, shard: int, rows: int | None) -> None:
        """``shard`` holds ``rows`` rows in all: it is committed once they are written (at once
        when there are none: a shard with no rows here, say a re-ask pass's shard that had no
        failures, costs no request; the pass's record lists it)."""
        self.expected[shard] = rows
        self._check(shard)

    def add(self, parts: pa.Table) -> None:
        for shard, name, kept, rejected, counters in zip(
            *(parts[c].to_pylist() for c in PART_SCHEMA.names), strict=True
        ):
            record = self.written[shard]
            record.files.append(name)
            record.kept += kept
            record.rejected += rejected
            record.add_counters(json.loads(counters))
            self._check(shard)

    def _check(self, shard: int) -> None:
        """Commits ``shard`` if it has all of its rows."""
        expected, written = self.expected[shard], self.written[shard].rows
        if expected is None:
            return
        if written > expected:
            raise ResumeError(
                f"{self.step.path}/{shard_dir(shard)}: {written} rows written, but the "
                f"shard has {expected}: a row was written twice"
            )
        if written == expected and shard not in self.committed:
            self._commit(shard, record=expected > 0)

    def _commit(self, shard: int, record: bool = True) -> None:
        if record:
            self.step.commit_shard(shard, self.written[shard])
        self.committed.add(shard)
        if self.on_commit is not None:
            self.on_commit(shard, self.written[shard])

    def short(self) -> dict[int, int | None]:
        """Shards still missing rows, and how many each misses (None: count not known)."""
        return {
            k: None if n is None else n - self.written[k].rows
            for k, n in self.expected.items()
            if k not in self.committed
        }


def settings_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two settings trees, one line each."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            lines += settings_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return lines
    if old != new:
        return [f"{prefix.rstrip('.')}: {json.dumps(old)} -> {json.dumps(new)}"]
    return []


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class Checkpoints:
    """The ``_stages`` tree of an output directory: ingest, then each stage's passes."""

    def __init__(self, fs: pafs.FileSystem, root: str):
        self.fs, self.root = fs, f"{root.rstrip('/')}/_stages"
        # One Pass object per pass, so that each keeps its commit time for the manifest.
        self._passes: dict[str, Pass] = {}

    def stage_path(self, stage: str) -> str:
        return f"{self.root}/{stage}"

    def pass_of(self, stage: str, attempt: int = 1) -> Pass:
        path = self.stage_path(stage)
        path = path if attempt == 1 else f"{path}/attempt-{attempt}"
        return self._passes.setdefault(path, Pass(self.fs, path))

    def commit_seconds(self, stage: str) -> float:
        """Seconds this process spent committing ``stage``'s shards and passes."""
        prefix = self.stage_path(stage)
        return sum(
            p.commit_s
            for path, p in self._passes.items()
            if path == prefix or path.startswith(prefix + "/")
        )

    def passes(self, stage: str, attempts: int) -> list[Pass]:
        return [self.pass_of(stage, a) for a in range(1, attempts + 1)]

    def stages(self) -> list[str]:
        listing = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return [i.base_name for i in listing if i.type == pafs.FileType.Directory]

    # What each stage's output depends on ----------------------------------------------------

    def check_settings(self, settings: Mapping[str, Mapping[str, Any]]) -> None:
        """Refuses to continue stages that an earlier run made with other settings.

        ``settings`` maps each stage of this run to what its output depends on, upstream
        stages included; stages with no record yet get one.
        """
        for stage, wanted in settings.items():
            path = f"{self.stage_path(stage)}/{SETTINGS}"
            found = read_json(self.fs, path)
            if found is None:
                continue
            if found["fingerprint"] != fingerprint(wanted):
                changes = settings_diff(found["settings"], wanted)
                raise ResumeError(
                    f"{self.root} holds the stage {stage!r} of an earlier run with other "
                    f"settings, so its rows cannot be reused:\n  "
                    + "\n  ".join(changes or ["(an upstream stage changed)"])
                    + "\nRun with --fresh to discard it and start over, or write to another "
                    "output directory."
                )

    def record_settings(self, stage: str, settings: Mapping[str, Any]) -> None:
        self.fs.create_dir(self.stage_path(stage), recursive=True)
        path = f"{self.stage_path(stage)}/{SETTINGS}"
        if read_json(self.fs, path) is None:
            write_json(self.fs, path, {"fingerprint": fingerprint(settings), "settings": settings})

    # Rows -----------------------------------------------------------------------------------

    def counts(self, stage: str, attempts: int) -> dict[str, int]:
        """Rows into a stage, kept and finally rejected (by its last pass), and its counters
        summed over those rows (``_<stage>_<name>`` as ``<name>``), from its commit records."""
        passes = [p.committed() for p in self.passes(stage, attempts)]
        kept = sum(s.kept for shards in passes for s in shards.values())
        rejected = sum(s.rejected for s in passes[-1].values())
        totals: dict[str, int] = {}
        final = [(s, "kept") for shards in passes for s in shards.values()]
        final += [(s, "rejected") for s in passes[-1].values()]
        prefix = f"_{stage}_"
        for shard, rows in final:
            for column, value in shard.counters.get(rows, {}).items():
                key = (
                    column.removeprefix(prefix) if column.startswith(prefix) else column.lstrip("_")
                )
                totals[key] = totals.get(key, 0) + value
        return {"in": kept + rejected, "out": kept, "rejected": rejected, **totals}

    # Ingest: the corpus as read, cut into the shards every later stage keeps ----------------

    def write_ingest(self, ds: Any, shard_rows: int) -> dict[int, Shard]:
        """Writes the ingested corpus (a Ray Dataset) in shards of ``shard_rows`` rows each.

        Ray Data first writes the rows as they come (``_rows/``, files of any size: how many
        depends on the reader and the dedupe shuffle, not on ``shard_rows``). The driver reads
        only those files' footers (their row counts; one request per file, in parallel) and
        numbers the rows file by file; Ray tasks then write each shard's rows into the shard's
        directory, and each shard is committed like a stage's, with its counts. A shard's rows
        count kept and rejected rows alike, so every shard but the last has ``shard_rows``.
        """
        ingest = self.pass_of(INGEST)
        if self.fs.get_file_info(ingest.path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(ingest.path)
        staging = f"{ingest.path}/{_STAGING}"
        ds.write_parquet(staging, filesystem=self.fs)
        listing = self.fs.get_file_info(pafs.FileSelector(staging, allow_not_found=True))
        files = sorted(i.path for i in listing if i.base_name.endswith(".parquet"))
        with ThreadPoolExecutor(max_workers=_PARALLEL_READS) as pool:
            sizes = list(
                pool.map(lambda f: pq.read_metadata(f, filesystem=self.fs).num_rows, files)
            )
        total, offsets = sum(sizes), list(itertools.accumulate([0, *sizes[:-1]]))
        expected = {
            k: min(shard_rows, total - k * shard_rows) for k in range(-(-total // shard_rows))
        }
        committer = ShardCommitter(ingest, expected or {0: 0})
        items = [
            {"file": f, "offset": o} for f, o, n in zip(files, offsets, sizes, strict=True) if n
        ]
        if items:
            import ray.data  # here: `rare-ray status` reads checkpoints without starting Ray

            cut = functools.partial(
                _cut_into_shards, shard_rows=shard_rows, directory=ingest.path, fs=self.fs
            )
            written = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                cut, batch_size=1, batch_format="pyarrow"
            )
            for parts in written.iter_batches(batch_format="pyarrow", batch_size=None):
                committer.add(parts)
        if committer.short():
            raise ResumeError(f"{ingest.path}: rows missing from shards {committer.short()}")
        ingest.commit(committer.written)
        if listing:
            self.fs.delete_dir(staging)
        return committer.written


# Where ingest's rows land before they are cut into shards (a name no reader takes for a shard).
_STAGING = "_rows"


def _cut_into_shards(
    item: pa.Table, shard_rows: int, directory: str, fs: pafs.FileSystem
) -> pa.Table:
    """Writes the rows of the one staged ingest file ``item`` names into their shards: row i of
    the file is row ``offset + i`` of the corpus. Returns ``write_parts``' record of files."""
    (path,), (offset,) = item["file"].to_pylist(), item["offset"].to_pylist()
    rows = pq.read_table(path, filesystem=fs)
    position = pa.array(range(offset, offset + rows.num_rows), pa.int64())
    shard = pc.cast(pc.divide(position, shard_rows), pa.int32())
    return write_parts(rows.append_column(SHARD, shard), directory, fs, tag=f"row {offset}")
