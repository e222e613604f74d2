"""Runs the stages: each pass over the shards it has not committed yet, the stages side by side.

The rows stream from the operator into part files, bundled up to ``checkpoint.part_rows`` rows
each and written by Ray tasks (not one file per engine batch); the driver commits each shard as
soon as all of its rows are on disk. When Ray gives up on a batch (an engine or searcher that
kept dying, past its restarts and retries), Ray Data drops it, up to
``checkpoint.max_failed_batches`` of them; the rows it held are then written to the shard as
rejects with the error, so the stage goes on and no row is lost.

Side by side (``run_stages``). Every stage runs in a thread of the driver, with its own Ray Data
execution, and reads the shards of the stage before it as that stage commits them
(``ShardFeed``: the driver keeps their row counts, a small Ray actor, ``ShardBoard``, hands
their files to the read tasks that wait for them). A stage on CPUs (BM25) follows the stage
before it shard by shard, so it searches while Doc2Query still generates; a stage that
generates on an engine an earlier stage also uses waits for the stage before it to finish
(``whole``): the engine is busy either way, and an engine that serves one stage at a time
finishes that stage's shards first, so a killed run leaves whole stages behind it. Each stage
starts its execution once the stage before it has committed a shard, so its workers (clients
on the engines, searchers with their index) start while that stage runs, not after it, and
not while the engines themselves start; a stage that waits for the whole of the stage before
starts once that stage has finished (an execution that waits idle for longer than Ray Data's
no-progress limit, 30 minutes, is failed by Ray Data). Commits and resume are as for one
stage alone: a shard is committed once all its rows are written, and a stage's shard is only
ever read once the stage before committed it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from rare_ray.io.checkpoints import Checkpoints, Pass, Shard, ShardCommitter, write_parts
from rare_ray.operators.base import Operator, StageContext
from rare_ray.rows import ID, SHARD, kept, rejected
from rare_ray.vocabulary import EnginesLost, StageError

Rows = Literal["kept", "rejected"]

# Rows per read task of a stage's input.
_READ_TASK_ROWS = 4096
# Read tasks of a stage that follows the one before it, waiting at once: each holds a worker
# process while it waits (and no CPU, see ``Source._read_as_committed``).
_WAITING_READS = 4
# A shard's files and the rows it holds for the stage after it.
Holding = tuple[list[str], int]


class ShardBoard:
    """Where the read tasks of a stage wait for the shards of the stage before it, while both
    run (a Ray actor, async: every waiting read is a coroutine here, not a thread)."""

    def __init__(self) -> None:
        self.files: dict[str, dict[int, list[str]]] = {}
        self.complete: set[str] = set()
        self.failed: dict[str, str] = {}
        self.changed = asyncio.Condition()

    async def post(self, stage: str, files: Mapping[int, list[str]], complete: bool) -> None:
        async with self.changed:
            self.files.setdefault(stage, {}).update(files)
            if complete:
                self.complete.add(stage)
            self.changed.notify_all()

    async def fail(self, stage: str, why: str) -> None:
        async with self.changed:
            self.failed[stage] = why
            self.changed.notify_all()

    async def wait(self, stage: str, shards: Sequence[int]) -> list[str]:
        """The files of ``shards`` of ``stage`` once it committed them all."""
        async with self.changed:
            while True:
                if stage in self.failed:
                    raise StageError(self.failed[stage])
                have = self.files.get(stage, {})
                if stage in self.complete or all(k in have for k in shards):
                    return [f for k in shards for f in have.get(k, [])]
                await self.changed.wait()


class ShardFeed:
    """A running stage's shards, as it commits them, for the stage after it.

    The driver keeps each shard's rows (the next stage's committer needs them to know when a
    shard of its own is whole) and posts its files to the board, in that order: a read task can
    only get a shard's files once the driver knows its count.
    """

    def __init__(self, stage: str, planned: Mapping[int, int], board: Any):
        self.stage = stage
        # Every shard of the run, with the rows ingest kept in it: the most any stage holds.
        self.planned = dict(sorted(planned.items()))
        self.board = board
        self._holding: dict[int, Holding] = {}
        self._complete = False
        self._error: str | None = None
        self._changed = threading.Condition()

    def post(self, shards: Mapping[int, Holding], complete: bool = False) -> None:
        with self._changed:
            self._holding.update(shards)
            self._complete = self._complete or complete
            self._changed.notify_all()
        files = {k: files for k, (files, _) in shards.items()}
        self.board.post.remote(self.stage, files, complete)

    def fail(self, why: str) -> None:
        with self._changed:
            self._error = why
            self._changed.notify_all()
        self.board.fail.remote(self.stage, why)

    def rows(self, shards: Iterable[int] | None = None) -> dict[int, int | None]:
        """Rows per shard, of all or of ``shards`` (None: not committed yet)."""
        with self._changed:
            return {
                k: self._holding[k][1] if k in self._holding else None
                for k in (self.planned if shards is None else shards)
            }

    def files(self, shard: int) -> list[str]:
        with self._changed:
            return list(self._holding.get(shard, ([], 0))[0])

    def wait_started(self) -> None:
        """Until the stage has committed a shard or finished; raises if it failed."""
        self._wait(lambda: bool(self._holding) or self._complete)

    def wait_finished(self) -> None:
        """Until the stage has committed all its shards; raises if it failed."""
        self._wait(lambda: self._complete)

    def _wait(self, ready: Callable[[], bool]) -> None:
        with self._changed:
            self._changed.wait_for(lambda: ready() or self._error is not None)
            if self._error is not None:
                raise StageError(self._error)


@dataclass(frozen=True)
class Source:
    """Where a pass reads its rows: the kept rows of the stage before (or of ingest), or the
    rows the pass before rejected. With a ``feed``, the stage before is still running: its
    shards are read as it commits them (``whole``: once it has finished)."""

    passes: tuple[Pass, ...]
    rows: Rows
    feed: ShardFeed | None = None
    whole: bool = False

    def expected(self) -> dict[int, int | None]:
        """Rows per shard this source holds, from the commit records (not the files); None
        for a shard the stage before has not committed yet."""
        if self.feed is not None:
            return self.feed.rows()
        return {k: rows for k, (_, rows) in self._shards().items()}

    def rows_of(self, shards: Iterable[int]) -> dict[int, int | None]:
        """``expected`` of ``shards`` alone (a feed's in time proportional to them)."""
        wanted = set(shards)
        if not wanted:
            return {}
        if self.feed is not None:
            return self.feed.rows(wanted)
        return {k: n for k, n in self.expected().items() if k in wanted}

    def _shards(self) -> dict[int, Holding]:
        """Each committed shard's files (in every pass) and the rows it holds for this source,
        from the commit records, each read once."""
        shards: dict[int, Holding] = {}
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
        each task costs a scheduling round and a block, whatever its size. A stage that
        follows the one before shard by shard (a feed, not ``whole``) reads one shard a task,
        each task first waiting for its shard.
        """
        if self.feed is not None and not self.whole:
            return self._read_as_committed(shards, self.feed)
        # A whole source is read once the stage before has finished (``run_stages``): from
        # its commit records, as if this were a rerun, in tasks that fuse with the stage's own.
        committed, wanted = self._shards(), set(shards)
        tasks = _runs(sorted(wanted & committed.keys()), {k: n for k, (_, n) in committed.items()})
        items = [{"files": [f for k in run for f in committed[k][0]]} for run in tasks]
        read = functools.partial(_read_task, fs=self.passes[0].fs, rows=self.rows)
        return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            read, batch_size=1, batch_format="pyarrow"
        )

    def _read_as_committed(self, shards: Iterable[int], feed: ShardFeed) -> ray.data.Dataset:
        items = [{"shards": [k]} for k in sorted(shards)]
        read = functools.partial(
            _read_when_committed,
            board=feed.board,
            stage=feed.stage,
            fs=self.passes[0].fs,
            rows=self.rows,
        )
        # No CPU: a read mostly waits, and Ray Data counts a task's CPU against every other
        # execution's budget while it waits, so that waiting reads with a CPU each would
        # starve the running stage's writers.
        return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            read,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=min(_WAITING_READS, len(items)) or 1),
        )

    def read_local(self, shard: int) -> pa.Table:
        """The shard's rows, read here (a shard is small): to find rows a failed batch held."""
        if self.feed is not None:
            return _read_files(self.feed.files(shard), self.passes[0].fs, self.rows)
        files, _ = self._shards().get(shard, ([], 0))
        return _read_files(files, self.passes[0].fs, self.rows)


def _runs(
    shards: Sequence[int], rows: Mapping[int, int], most: int = _READ_TASK_ROWS
) -> list[list[int]]:
    """``shards`` (in order) cut into runs of consecutive ones holding at most ``most`` rows
    (a shard holding more is a run of its own)."""
    runs: list[list[int]] = [[]]
    total = 0
    for k in shards:
        if runs[-1] and total + rows[k] > most:
            runs.append([])
            total = 0
        runs[-1].append(k)
        total += rows[k]
    return [run for run in runs if run]


def _read_when_committed(
    item: pa.Table, board: Any, stage: str, fs: pafs.FileSystem, rows: Rows
) -> pa.Table:
    """The rows of the shards ``item`` names, once the stage before has committed them."""
    import ray

    shards = item["shards"].to_pylist()[0]
    files = ray.get(board.wait.remote(stage, shards))
    # No file: shards with no rows at all. An empty block passes Ray Data's UDFs untouched.
    return _read_files(files, fs, rows) if files else pa.table({})


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


def run_stages(
    ckpt: Checkpoints,
    operators: Sequence[Operator],
    source: Source,
    context: StageContext,
    max_failed_batches: int,
    part_rows: int | None = None,
    before_stage: Callable[[Operator], None] | None = None,
) -> dict[str, float]:
    """Runs ``operators`` in order over ``source`` (ingest's kept rows), side by side (see the
    module's doc); returns each stage's seconds (they overlap). ``before_stage`` is called in
    a stage's thread before it starts. The first stage to fail stops the run: the others' reads
    stop waiting, and the error is raised here."""
    import ray

    board: Any = ray.remote(ShardBoard).options(num_cpus=0).remote()
    planned = {k: n or 0 for k, n in source.expected().items()}
    feeds = [ShardFeed(op.name, planned, board) for op in operators]
    seconds: dict[str, float] = {}
    finished: queue.Queue[tuple[str, BaseException | None]] = queue.Queue()

    def run_one(op: Operator, reads: Source, feed: ShardFeed, upstream: ShardFeed | None) -> None:
        try:
            if upstream is not None and not ckpt.pass_of(op.name, op.passes).complete():
                # A stage that reads its input whole starts once it is whole, not before:
                # Ray Data fails an execution that moves no block for 30 minutes, and at
                # scale the stage before can take longer than that.
                upstream.wait_finished() if reads.whole else upstream.wait_started()
            if before_stage is not None:
                before_stage(op)
            start = time.perf_counter()
            run_stage(ckpt, op, reads, context, max_failed_batches, part_rows, feed)
            seconds[op.name] = time.perf_counter() - start
            finished.put((op.name, None))
        except BaseException as e:  # reported to the driver's main thread, raised there
            finished.put((op.name, e))

    threads: list[threading.Thread] = []
    engines_before: set[str] = set()
    reads, upstream = source, None
    for i, (op, feed) in enumerate(zip(operators, feeds, strict=True)):
        engines = {engine.model_dump_json() for engine in op.engines}
        if i > 0:
            before = operators[i - 1]
            passes = tuple(ckpt.passes(before.name, before.passes))
            whole = bool(engines & engines_before)
            reads, upstream = Source(passes, "kept", feed=feeds[i - 1], whole=whole), feeds[i - 1]
        engines_before |= engines
        # Daemon threads: a stage left running after another failed must not hold the exit.
        args = (op, reads, feed, upstream)
        threads.append(
            threading.Thread(target=run_one, args=args, name=f"stage-{op.name}", daemon=True)
        )
    for thread in threads:
        thread.start()
    running = {op.name for op in operators}
    try:
        while running:
            name, error = finished.get()
            running.discard(name)
            if error is not None:
                raise error
    except BaseException as e:
        for feed in feeds:
            feed.fail(f"stage {feed.stage} stopped: the run stopped ({type(e).__name__})")
        if isinstance(e, EnginesLost):  # raised in this thread, by the engines' watchdog
            committed = ", ".join(
                f"{op.name} {len(ckpt.pass_of(op.name, op.passes).committed())} of {len(planned)}"
                for op in operators
                if op.name in running
            )
            raise EnginesLost(
                f"{e}\n{committed}: those shards were committed; rerun the same command to "
                "resume from there."
            ) from e
        raise
    finally:
        ray.kill(board)
    return {op.name: seconds[op.name] for op in operators}


def run_stage(
    ckpt: Checkpoints,
    op: Operator,
    source: Source,
    context: StageContext,
    max_failed_batches: int,
    part_rows: int | None = None,
    feed: ShardFeed | None = None,
) -> Source:
    """Runs every pass of ``op`` that is not complete; returns where the next stage reads.
    ``part_rows``: see ``run_pass``. ``feed`` hears of the stage's shards: each as it is
    committed (a stage of one pass), all of them once the stage is complete."""
    start = time.perf_counter()
    for attempt in range(1, op.passes + 1):
        step = ckpt.pass_of(op.name, attempt)
        label = op.name if attempt == 1 else f"{op.name} (attempt {attempt})"
        if step.complete():
            context.log(f"{label}: complete, skipped")
        else:
            context.log(f"{label}: starting ({op.resources.describe()})")
            process = functools.partial(op.run_pass, attempt=attempt, context=context)
            on_commit = None
            if feed is not None and op.passes == 1:  # else a shard is final after the last pass
                on_commit = functools.partial(_post_shard, feed, step)
            done = run_pass(step, source, process, op, max_failed_batches, part_rows, on_commit)
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
    final = Source(tuple(ckpt.passes(op.name, op.passes)), "kept")
    if feed is not None:
        feed.post(final._shards(), complete=True)
    return final


def _post_shard(feed: ShardFeed, step: Pass, shard: int, record: Shard) -> None:
    feed.post({shard: ([f"{step.path}/{name}" for name in record.files], record.kept)})


def run_pass(
    step: Pass,
    source: Source,
    process: Callable[[ray.data.Dataset], ray.data.Dataset],
    op: Operator,
    max_failed_batches: int,
    part_rows: int | None = None,
    on_commit: Callable[[int, Shard], None] | None = None,
) -> dict[str, int]:
    """Runs ``process`` over the shards ``step`` has not committed; commits the pass.

    Rows are written in parts of about ``part_rows`` rows, bundled from the operator's
    batches by Ray Data; None writes each batch as it comes, in the task that made it.
    ``on_commit`` hears of each shard committed, those committed before included.

    Returns what it did: shards skipped (committed earlier) and run, the rows run, and the
    rows rejected because their batch failed.
    """
    step.clear_uncommitted()
    done = step.committed()
    if on_commit is not None:
        for k, record in done.items():
            on_commit(k, record)
    pending = {k: n for k, n in source.expected().items() if k not in done}
    committer = ShardCommitter(step, pending, on_commit)
    todo = sorted(k for k, n in pending.items() if n is None or n > 0)
    failed_rows = 0
    if todo:
        written = process(source.read(todo)).map_batches(
            functools.partial(write_parts, directory=step.path, fs=step.fs),
            batch_format="pyarrow",
            batch_size=part_rows,
        )
        written.context.max_errored_blocks = max_failed_batches
        # Named after the stage: Ray Data's logs and metrics say which stage's execution they
        # are about, and the errors collected below are this execution's alone.
        written.set_name(op.name)
        with _failed_batches(op.name) as errors:
            try:
                for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
                    parts = cast(pa.Table, batch)
                    if parts.num_rows:
                        _learn_counts(committer, source, parts)
                        committer.add(parts)
            except Exception as e:
                first_line = (str(e).strip().splitlines() or [""])[0][:500]
                raise StageError(
                    f"stage {op.name} stopped: {type(e).__name__}: {first_line}\n"
                    f"{len(committer.committed)} of {len(pending)} shards were committed; rerun "
                    "the same command to resume from there."
                ) from e
        # Every read got its shards, so the stage before has committed them: all counts known.
        _learn_counts(committer, source)
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
        "rows": sum(n or 0 for n in committer.expected.values()),
        "failed_rows": failed_rows,
    }


def _learn_counts(committer: ShardCommitter, source: Source, parts: pa.Table | None = None) -> None:
    """Tells ``committer`` the rows of the shards whose counts it lacks (of ``parts``' shards,
    or of all), from the stage before, which has committed them."""
    unknown = {k for k, n in committer.expected.items() if n is None}
    if parts is not None:
        unknown &= set(parts[SHARD].to_pylist())
    for k, n in source.rows_of(unknown).items():
        committer.expect(k, n)


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
def _failed_batches(dataset_name: str) -> Iterator[list[str]]:
    """Collects the errors of the batches Ray Data gives up on (``max_errored_blocks``) in the
    execution of the Dataset named ``dataset_name``.

    Ray Data logs them from the thread of that execution, which Ray 2.60 names
    ``StreamingExecutor-<name>_<id>_<run>``; the stages beside it log theirs from their own.
    """
    errors: list[str] = []
    thread = re.compile(rf"StreamingExecutor-{re.escape(dataset_name)}_[0-9A-Za-z]+_\d+")

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not thread.fullmatch(record.threadName or ""):
                return
            if record.exc_info and record.exc_info[1] is not None:
                errors.append(batch_error(record.exc_info[1]))

    handler = Collect(level=logging.ERROR)
    logger = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    logger.addHandler(handler)
    try:
        yield errors
    finally:
        logger.removeHandler(handler)
