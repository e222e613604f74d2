"""Runs a stage pass by pass, each over the shards it has not committed yet.

The rows stream from the operator into part files, bundled up to ``checkpoint.part_rows`` rows
each and written by Ray tasks (not one file per engine batch); the driver commits each shard as soon as all of its rows are on disk. When Ray gives up on a
batch (an engine or searcher that kept dying, past its restarts and retries), Ray Data drops it,
up to ``checkpoint.max_failed_batches`` of them; the rows it held are then written to the shard
as rejects with the error, so the stage goes on and no row is lost.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from rare_ray.io.checkpoints import Checkpoints, Pass, ShardCommitter, write_parts
from rare_ray.operators.base import Operator, StageContext
from rare_ray.rows import ID, kept, rejected
from rare_ray.vocabulary import StageError

Rows = Literal["kept", "rejected"]

# Rows per read task of a stage's input.
_READ_TASK_ROWS = 4096


@dataclass(frozen=True)
class Source:
    """Where a pass reads its rows: the kept rows of the stage before (or of ingest), or the
    rows the pass before rejected."""

    passes: tuple[Pass, ...]
    rows: Rows

    def expected(self) -> dict[int, int]:
        """Rows per shard this source holds (from the commit records, not the files)."""
        return {k: rows for k, (_, rows) in self._shards().items()}

    def _shards(self) -> dict[int, tuple[list[str], int]]:
        """Each committed shard's files (in every pass) and the rows it holds for this source,
        from the commit records, each read once."""
        shards: dict[int, tuple[list[str], int]] = {}
        for p in self.passes:
            for k, shard in p.committed().items():
                files, rows = shards.get(k, ([], 0))
                files.extend(f"{p.path}/{name}" for name in shard.files)
                shards[k] = (files, rows + (shard.kept if self.rows == "kept" else shard.rejected))
        return shards

    def read(self, shards: Iterable[int]) -> ray.data.Dataset:
        """The rows of ``shards``, read by Ray tasks of consecutive shards, about
        ``_READ_TASK_ROWS`` rows each (the stages cut them into batches of their own).

        Not ``ray.data.read_parquet``: the commit records already name every file, and Ray
        Data's listing (a task, and footer-reading actors that are never restarted) fails the
        whole read when a node it ran on is lost, and prints a traceback into a successful run
        when it is cut short. A plain task that reads its files is retried like any other, and
        its input lives on the driver's node. Tasks of a few thousand rows, not one per shard:
        each task costs a scheduling round and a block, whatever its size.
        """
        committed, wanted = self._shards(), set(shards)
        tasks: list[list[str]] = [[]]
        rows = 0
        for k in sorted(wanted & committed.keys()):
            files, n = committed[k]
            if tasks[-1] and rows + n > _READ_TASK_ROWS:
                tasks.append([])
                rows = 0
            tasks[-1].extend(files)
            rows += n
        items = [{"files": files} for files in tasks if files]
        read = functools.partial(_read_task, fs=self.passes[0].fs, rows=self.rows)
        return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            read, batch_size=1, batch_format="pyarrow"
        )

    def read_local(self, shard: int) -> pa.Table:
        """The shard's rows, read here (a shard is small): to find rows a failed batch held."""
        files, _ = self._shards().get(shard, ([], 0))
        return _read_files(files, self.passes[0].fs, self.rows)


def _read_task(item: pa.Table, fs: pafs.FileSystem, rows: Rows) -> pa.Table:
    """The rows of the files ``item`` names (one row of ``from_items``)."""
    return _read_files(item["files"].to_pylist()[0], fs, rows)


def _read_files(files: list[str], fs: pafs.FileSystem, rows: Rows) -> pa.Table:
    """The kept or rejected rows of ``files``."""
    tables = [_pick(pq.read_table(f, filesystem=fs), rows) for f in files]
    return pa.concat_tables(tables, promote_options="permissive")


def _pick(batch: pa.Table, rows: Rows) -> pa.Table:
    """The kept or the rejected rows of ``batch``."""
    return kept(batch) if rows == "kept" else rejected(batch)


def run_stage(
    ckpt: Checkpoints,
    op: Operator,
    source: Source,
    context: StageContext,
    max_failed_batches: int,
    part_rows: int | None = None,
) -> Source:
    """Runs every pass of ``op`` that is not complete; returns where the next stage reads.
    ``part_rows``: see ``run_pass``."""
    start = time.perf_counter()
    for attempt in range(1, op.passes + 1):
        step = ckpt.pass_of(op.name, attempt)
        label = op.name if attempt == 1 else f"{op.name} (attempt {attempt})"
        if step.complete():
            context.log(f"{label}: complete, skipped")
        else:
            context.log(f"{label}: starting ({op.resources.describe()})")
            process = functools.partial(op.run_pass, attempt=attempt, context=context)
            done = run_pass(step, source, process, op, max_failed_batches, part_rows)
            failed = done["failed_rows"]
            context.log(
                f"{label}: {done['rows']} rows in {done['run']} shards, "
                f"{done['skipped']} shards committed before"
                + (f"; {failed} rows of failed batches rejected" if failed else "")
            )
        source = Source((step,), "rejected")  # the next pass redoes what this one rejected
    counts = ckpt.counts(op.name, op.passes)
    context.log(
        f"stage {op.name}: {counts['out']} kept, {counts['rejected']} rejected "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return Source(tuple(ckpt.passes(op.name, op.passes)), "kept")


def run_pass(
    step: Pass,
    source: Source,
    process: Callable[[ray.data.Dataset], ray.data.Dataset],
    op: Operator,
    max_failed_batches: int,
    part_rows: int | None = None,
) -> dict[str, int]:
    """Runs ``process`` over the shards ``step`` has not committed; commits the pass.

    Rows are written in parts of about ``part_rows`` rows, bundled from the operator's
    batches by Ray Data; None writes each batch as it comes, in the task that made it.

    Returns what it did: shards skipped (committed earlier) and run, the rows run, and the
    rows rejected because their batch failed.
    """
    step.clear_uncommitted()
    done = step.committed()
    pending = {k: n for k, n in source.expected().items() if k not in done}
    committer = ShardCommitter(step, pending)
    todo = sorted(k for k, n in pending.items() if n > 0)
    failed_rows = 0
    if todo:
        written = process(source.read(todo)).map_batches(
            functools.partial(write_parts, directory=step.path, fs=step.fs),
            batch_format="pyarrow",
            batch_size=part_rows,
        )
        written.context.max_errored_blocks = max_failed_batches
        with _failed_batches() as errors:
            try:
                for parts in written.iter_batches(batch_format="pyarrow", batch_size=None):
                    committer.add(parts)
            except Exception as e:
                first_line = (str(e).strip().splitlines() or [""])[0][:500]
                raise StageError(
                    f"stage {op.name} stopped: {type(e).__name__}: {first_line}\n"
                    f"{len(committer.committed)} of {len(pending)} shards were committed; rerun "
                    "the same command to resume from there."
                ) from e
        reason = f"{op.name}: the batch holding this row failed after its retries" + (
            f" ({errors[-1]})" if errors else ""
        )
        for shard in committer.short():
            failed_rows += _reject_unwritten(step, source, shard, committer, op, reason)
    if committer.short():
        raise StageError(f"stage {op.name}: rows missing from shards {committer.short()}")
    step.commit({**done, **committer.written})
    return {
        "skipped": len(done),
        "run": len(pending),
        "rows": sum(pending.values()),
        "failed_rows": failed_rows,
    }


def _reject_unwritten(
    step: Pass, source: Source, shard: int, committer: ShardCommitter, op: Operator, reason: str
) -> int:
    """Writes the rows of ``shard`` that no part holds as rejects with ``reason``."""
    rows = source.read_local(shard)
    written = [f"{step.path}/{name}" for name in committer.written[shard].files]
    ids = pa.concat_arrays(
        [pq.read_table(f, columns=[ID], filesystem=step.fs)[ID].combine_chunks() for f in written]
    ) if written else pa.array([], pa.string())  # fmt: skip
    missing = rows.filter(pc.invert(pc.is_in(rows[ID], value_set=ids)))
    n: int = missing.num_rows
    table = op.with_outputs(missing, {f.name: [None] * n for f in op.output_fields}, [reason] * n)
    committer.add(write_parts(table, step.path, step.fs))
    return n


# A line of a traceback that names an exception: "ray.exceptions.ActorDiedError: The actor ..."
_EXCEPTION_LINE = re.compile(r"^(?:[\w]+\.)*(?P<name>\w+(?:Error|Exception)): (?P<message>.*)$")


def batch_error(e: BaseException) -> str:
    """What a batch failed with, as ``Name: message``: the first error of the chain that the
    worker's traceback text shows (Ray Data wraps a UDF's error in ``UserCodeException``, whose
    own message is only advice), else ``e`` itself."""
    text = str(e).strip()
    first = text.split("The above exception was the direct cause of the following exception")[0]
    for line in reversed(first.splitlines()):
        match = _EXCEPTION_LINE.match(line.strip())
        if match:
            return f"{match['name']}: {match['message'][:300]}"
    return f"{type(e).__name__}: {(text.splitlines() or [''])[-1][:300]}"


@contextmanager
def _failed_batches() -> Iterator[list[str]]:
    """Collects the errors of the batches Ray Data gives up on (``max_errored_blocks``)."""
    errors: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                errors.append(batch_error(record.exc_info[1]))

    handler = Collect(level=logging.ERROR)
    logger = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    logger.addHandler(handler)
    try:
        yield errors
    finally:
        logger.removeHandler(handler)
