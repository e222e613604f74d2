"""The stage contract: everything the pipeline knows about a stage is declared here.

A stage (``Operator``) declares

- ``input_columns``: the columns it reads and what they must hold (checked before any engine
  starts), and ``text_key``, the one shown with its rejects;
- ``output_fields``: the columns it adds, typed, its ``counters`` among them (``_<stage>_<name>``
  integer columns that the manifest sums);
- ``resources``: what one of its workers reserves, and how many run;
- ``settings()``: what its output depends on, so that a resumed run can refuse other ones;
- ``passes``: how often it goes over rows (a stage may redo, in a pass of its own, the rows
  the pass before rejected; the LLM stages instead ask again inside the batch, on the engine
  that is already running: ``LLMOperator.asks``), and ``pass_column``, the column that says
  which pass (or ask) wrote a row;

and has a lifecycle: ``check()`` on the driver before Ray starts (a model path that is not
there), ``prepare(context)`` on the driver once Ray is up and before any stage runs (BM25
starts building its index there, while the stages before it run), then ``run_pass(ds,
attempt, context)``, lazy, once per pass. A stage that generates declares its LLM ``engines``:
the pipeline starts them before ingest, once per run, and every stage finds them in
``context.engines``. Workers set themselves up once in their actor's constructor (a client on
an engine, a searcher), then take batch after batch.

A pass never drops a row: every row of ``ds`` comes back with the stage's columns, failures
carrying ``reject_reason``. ``run(ds)`` runs every pass in memory for Python users; the
pipeline runs the same passes checkpointed, shard by shard (``rare_ray.runner``).

A new stage is a subclass with those members; ``tests/operators/test_custom_stage.py`` has a
whole one (a length filter) that runs through the real pipeline.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import pyarrow as pa
from pydantic import BaseModel

from rare_ray.config import EngineConfig, OpenAIEngineConfig, output_settings
from rare_ray.engines import Engines, map_with_engine
from rare_ray.preflight import check_gpus, check_model
from rare_ray.rows import REJECT_REASON, kept, rejected
from rare_ray.vocabulary import ColumnKind

if TYPE_CHECKING:
    import ray.data

    from rare_ray.engines.contract import Client, Fit, Generation, Messages


@dataclass(frozen=True)
class Resources:
    """What each worker of a stage reserves, and how many workers run (``None``: Ray Data
    decides, or the stage sizes its pool from the cluster in ``prepare``)."""

    cpus: float = 1.0
    gpus: float = 0.0
    workers: int | None = None

    def describe(self) -> str:
        count = "workers sized by the stage" if self.workers is None else f"workers: {self.workers}"
        each = f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        return f"{count}, {each} each"


def _print(message: str) -> None:
    print(f"[rare-ray] {message}", flush=True)


@dataclass
class StageContext:
    """What the driver hands a stage: the corpus (for a stage that needs all of it, like
    BM25's index, built lazily: only a stage that asks reads it), the cluster's resources,
    the run's LLM engines (started by the first stage that asks, shared by the others, closed
    by whoever made the context), where to say what it is doing, and where a stage may keep
    files of its own that must outlive any node."""

    corpus: Callable[[], ray.data.Dataset]
    cluster_resources: Mapping[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = _print
    engines: Engines = field(default_factory=Engines)
    # The run's checkpoint tree (``<output>/_stages``): storage that every node reads and
    # writes, and that no node's loss takes away. None for an in-memory run.
    stages_root: str | None = None
    # What identifies the corpus before it is read (a digest of ingest's commit record, or
    # of a separate corpus's listing), so that work derived from it can be found again by a
    # rerun. Set by the pipeline once ingest is done; None for an in-memory run.
    corpus_key: str | None = None

    def stage_files(self, stage: str) -> str | None:
        """A directory for ``stage``'s own files on durable shared storage, or None."""
        return None if self.stages_root is None else f"{self.stages_root}/{stage}/files"

    @classmethod
    def of(cls, ds: ray.data.Dataset) -> StageContext:
        """The context of an in-memory run: the rows themselves are the corpus."""
        import ray

        return cls(corpus=lambda: ds, cluster_resources=ray.cluster_resources())


class Operator(ABC):
    name: ClassVar[str]
    # Names of the per-row integer counters this stage writes (as ``_<name>_<counter>``).
    counters: ClassVar[tuple[str, ...]] = ()
    # True for a stage that needs the whole corpus besides its rows (``context.corpus``):
    # the corpus then belongs to the settings a resumed run must not change.
    reads_corpus: ClassVar[bool] = False

    @property
    @abstractmethod
    def input_columns(self) -> Mapping[str, ColumnKind]:
        """Columns this operator reads, and what they must hold."""

    @property
    @abstractmethod
    def text_key(self) -> str:
        """The column with the document itself (shown with this operator's rejects)."""

    @property
    @abstractmethod
    def own_fields(self) -> Sequence[pa.Field]:
        """Columns this operator adds, counters aside, with their types."""

    @property
    @abstractmethod
    def resources(self) -> Resources:
        """What one worker of this stage reserves, and how many run."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What this stage's output depends on, as JSON: a rerun whose settings differ from
        the ones that made the rows already there is refused (speed knobs stay out)."""

    @abstractmethod
    def run_pass(
        self, ds: ray.data.Dataset, attempt: int, context: StageContext
    ) -> ray.data.Dataset:
        """One pass, lazy: ``ds`` is the input (attempt 1) or the rows the pass before
        rejected; every row comes back with this operator's columns."""

    @property
    def passes(self) -> int:
        """Passes over the rows; each after the first gets the rows the one before rejected."""
        return 1

    @property
    def pass_column(self) -> str | None:
        """The column that records which pass wrote a row (shown with rejects), if any."""
        return None

    def check(self) -> None:
        """Driver-side checks that need no Ray (raise ``InputError`` and the like)."""
        return None

    def prepare(self, context: StageContext) -> None:
        """Driver-side set-up once Ray is up, before any stage runs; must not block on work
        that can run in the background (start it and wait for it in ``run_pass``)."""
        return None

    def manifest_entries(self) -> dict[str, Any]:
        """What this stage adds to the manifest's top level (e.g. BM25's index)."""
        return {}

    @property
    def engines(self) -> Sequence[EngineConfig]:
        """The LLM engines this stage generates on: the pipeline starts them (once per engine
        config and run, shared with every other stage that names the same one) before ingest,
        and the stage finds them in ``context.engines``."""
        return ()

    @property
    def output_fields(self) -> Sequence[pa.Field]:
        """Every column this operator adds, counters included."""
        return [*self.own_fields, *(pa.field(self.counter(c), pa.int32()) for c in self.counters)]

    def counter(self, name: str) -> str:
        return f"_{self.name}_{name}"

    def run(self, ds: ray.data.Dataset, context: StageContext | None = None) -> ray.data.Dataset:
        """Every pass in memory; all rows come back (lazy when there is one pass)."""
        context = context or StageContext.of(ds)
        self.prepare(context)
        done: list[ray.data.Dataset] = []
        pending = ds
        for attempt in range(1, self.passes + 1):
            answered = self.run_pass(pending, attempt, context)
            if attempt == self.passes:
                done.append(answered)
                break
            # Materialized so that the rows that go on and the ones to redo come from one run.
            answered = answered.materialize()
            done.append(answered.map_batches(kept, batch_format="pyarrow"))
            pending = answered.map_batches(rejected, batch_format="pyarrow")
            if pending.count() == 0:
                break
        return done[0].union(*done[1:]) if len(done) > 1 else done[0]

    def with_outputs(
        self,
        batch: pa.Table,
        outputs: Mapping[str, Sequence[Any]],
        reasons: Sequence[str | None],
    ) -> pa.Table:
        """``batch``'s own columns followed by this operator's, typed by ``output_fields``.

        Earlier counters and this operator's scratch columns (``_*``) are dropped: each stage's
        counters are summed from that stage's own output.
        """
        ours = {f.name for f in self.output_fields}
        base = batch.drop_columns(
            [c for c in batch.column_names if c.startswith("_") or c in ours or c == REJECT_REASON]
        )
        for f in self.output_fields:
            base = base.append_column(f, pa.array(outputs[f.name], f.type))
        return base.append_column(REJECT_REASON, pa.array(reasons, pa.string()))


ConfigT = TypeVar("ConfigT", bound=BaseModel)

# Every LLM stage's token use, re-asks included: what its engine time (or its bill) is for.
TOKEN_COUNTERS = ("prompt_tokens", "generated_tokens")


class LLMOperator(Operator, Generic[ConfigT]):
    """An operator that generates with an LLM engine; its keys come as a config or keywords.

    A subclass says how to ask (``render``) and how to read an answer (``read``), and may
    settle a row without asking (``decided``: AnswerVerify's cut-off reasoning); this class
    runs the asking, and counts every ask's prompt and generated tokens (``TOKEN_COUNTERS``,
    summed per stage in the manifest). Each batch's rows are asked on the run's engine (``context.engines``, one
    for every stage with the same engine config), and a row whose answer cannot be used is
    asked again at once, on the same engine, up to ``asks`` times in all (a request that
    failed in the engine or on the way is not: the backends retry those themselves). The row
    keeps its last answer's outputs and reason, and ``pass_column`` (if any) says how many
    asks it took.
    """

    config_class: ClassVar[type[BaseModel]]

    def __init__(
        self,
        engine: EngineConfig,
        config: ConfigT | None = None,
        seed: int = 0,
        **keys: Any,
    ):
        self.engine = engine
        self.config: ConfigT = config or self.config_class(**keys)  # type: ignore[assignment]
        self.seed = seed

    @abstractmethod
    def render(
        self, row: dict[str, Any], fit: Fit, attempt: int = 1
    ) -> tuple[Messages, dict[str, Any]]:
        """The request for ``row``'s ``attempt``-th ask: chat messages and sampling."""

    @abstractmethod
    def read(
        self, row: dict[str, Any], answer: Generation, attempt: int
    ) -> tuple[dict[str, Any], str | None]:
        """``row``'s values of ``output_fields`` from ``answer``, and the reason it cannot be
        used (None when it can)."""

    @property
    def output_fields(self) -> Sequence[pa.Field]:
        return [
            *super().output_fields,
            *(pa.field(self.counter(c), pa.int32()) for c in TOKEN_COUNTERS),
        ]

    @property
    def asks(self) -> int:
        """Asks per row at most: the first, and the re-asks of unusable answers."""
        return 1

    def decided(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """``row``'s values of ``output_fields`` when it needs no ask at all (kept, no tokens
        spent), or None to ask the engine."""
        return None

    @property
    def resources(self) -> Resources:
        engine = self.engine
        if isinstance(engine, OpenAIEngineConfig):
            return Resources(cpus=engine.cpus_per_worker, workers=engine.workers)
        if engine.device == "cpu":
            return Resources(cpus=engine.cpus_per_replica, workers=engine.replicas)
        gpus = engine.workers_per_replica
        return Resources(cpus=1, gpus=gpus, workers=engine.replicas)

    def settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "engine": output_settings(self.engine),
            self.name: output_settings(self.config),
        }

    def check(self) -> None:
        check_model(self.engine.model)

    @property
    def engines(self) -> Sequence[EngineConfig]:
        return (self.engine,)

    def prepare(self, context: StageContext) -> None:
        check_gpus(self.engine, dict(context.cluster_resources))
        # Started now unless the pipeline already did (then this finds it), so that the
        # engines load while the stages before this one run.
        context.engines.get(self.engine)

    def run_pass(
        self, ds: ray.data.Dataset, attempt: int, context: StageContext
    ) -> ray.data.Dataset:
        # The columns are dropped batch by batch, not with ``select_columns(ds.columns())``:
        # asking a Dataset for its columns runs a read of its own, cut short once one block
        # is in, whose interrupted listing task prints a traceback into a successful run.
        inputs = functools.partial(_inputs_of, ours=frozenset(f.name for f in self.output_fields))
        handle = context.engines.get(self.engine)
        rows = ds.map_batches(inputs, batch_format="pyarrow", zero_copy_batch=True)
        return map_with_engine(rows, self.engine, handle, self.answer)

    async def answer(self, batch: pa.Table, client: Client) -> pa.Table:
        """Every row of ``batch`` with this operator's columns, each asked up to ``asks``
        times."""
        rows = batch.to_pylist()
        results: list[tuple[dict[str, Any], str | None]] = [({}, None)] * len(rows)
        used = {self.counter(c): [0] * len(rows) for c in TOKEN_COUNTERS}
        prompt, generated = (
            used[self.counter("prompt_tokens")],
            used[self.counter("generated_tokens")],
        )
        pending = []
        for i, row in enumerate(rows):
            known = self.decided(row)
            if known is None:
                pending.append(i)
            else:
                results[i] = (known, None)
        for attempt in range(1, self.asks + 1):
            if not pending:
                break
            render = functools.partial(self.render, attempt=attempt)
            answers = await client.generate([rows[i] for i in pending], render)
            again = []
            for i, answer in zip(pending, answers, strict=True):
                results[i] = self.read(rows[i], answer, attempt)
                prompt[i] += answer.prompt_tokens
                generated[i] += answer.tokens
                if results[i][1] is not None and answer.error is None:
                    again.append(i)
            pending = again
        outputs = {name: [r[0][name] for r in results] for name in self._read_fields}
        return self.with_outputs(batch, {**outputs, **used}, [r[1] for r in results])

    @property
    def _read_fields(self) -> list[str]:
        """The columns ``read`` fills: all but the token counters, which ``answer`` does."""
        tokens = {self.counter(c) for c in TOKEN_COUNTERS}
        return [f.name for f in self.output_fields if f.name not in tokens]


def _inputs_of(batch: pa.Table, ours: frozenset[str]) -> pa.Table:
    """``batch`` without what a pass must not carry in: the reason an earlier pass rejected
    a row, this stage's own columns from that pass, and other stages' counters."""
    drop = [c for c in batch.column_names if c == REJECT_REASON or c in ours or c.startswith("_")]
    return batch.drop_columns(drop)
