"""BM25HardNeg: documents that BM25 ranks high for a question but that are not its source.

One actor indexes the whole corpus (every document, with or without a question); searcher
actors, each on a node-local copy of that index, run the queries (``bm25.query``) in batches.
From each query's hits we drop the positive (by id, and any document with the same text), skip
the top ``start_rank`` ranks, and keep the first ``num_neg`` distinct texts that no filter
against false negatives skips (``FILTERS``: score caps, the positive-aware margin, the same
source, near-copies; all off by default, as in the reference). We also record where the
positive itself ranked and its score: a free signal of how answerable the question is from
its source. The filters are the small functions below; the searcher stays a searcher.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from rare_ray.config import SHINGLE_WORDS, BM25Config, output_settings
from rare_ray.engines.index_broadcast import (
    IndexBuild,
    IndexHandle,
    build_key,
    built_index,
    local_index,
    prebuilt_index,
)
from rare_ray.engines.lucene import Hit, LuceneSearcher
from rare_ray.operators.base import Operator, Resources, StageContext
from rare_ray.operators.ngrams import Grams, TextPrint, compare, text_print
from rare_ray.rows import ID
from rare_ray.vocabulary import ColumnKind, SettingsError

SEARCH_LOG = "search.log"


@dataclass(frozen=True)
class SearcherPlan:
    """How many searchers run, on how many nodes, and with what JVM heap."""

    per_node: int
    nodes: int
    heap: str

    @property
    def total(self) -> int:
        return self.per_node * self.nodes


def plan_searchers(config: BM25Config, nodes: list[dict[str, Any]]) -> SearcherPlan:
    """Size the searcher pool from the config and the cluster's alive nodes with CPUs.

    Defaults leave half of a node's CPUs to the rest of the job, and give the searchers of a
    node a quarter of its memory (each JVM between 256 MiB and 4 GiB). Searchers that would
    take every CPU of a node are refused: the Ray tasks that read and cut their blocks need
    one, and without it the stage waits forever.
    """
    workers = [n["Resources"] for n in nodes if n.get("Alive") and n["Resources"].get("CPU")]
    if not workers:
        raise RuntimeError("no alive Ray node has CPUs for BM25 searchers")
    cpus = min(r["CPU"] for r in workers)
    wanted = config.searchers_per_node
    if wanted and wanted * config.cpus_per_searcher > cpus - 1:
        raise SettingsError(
            f"bm25.searchers_per_node={wanted} x bm25.cpus_per_searcher="
            f"{config.cpus_per_searcher:g} takes every CPU of a node with {cpus:g}: leave at "
            "least one to the tasks that feed the searchers (or leave searchers_per_node unset)"
        )
    per_node = wanted or max(1, int(cpus / 2 / config.cpus_per_searcher))
    memory_mib = min(r.get("memory", 4 << 30) for r in workers) / (1 << 20)
    heap = config.heap_per_searcher or f"{int(min(4096, max(256, memory_mib / 4 / per_node)))}m"
    return SearcherPlan(per_node=per_node, nodes=len(workers), heap=heap)


def _spread_over_nodes() -> dict[str, Any]:
    return {"scheduling_strategy": "SPREAD"}


# The filters' counters, in the order a candidate meets them: a skipped candidate counts
# under the first filter that skips it. ``same_text`` is the reference's own rule (the
# positive's text, or a negative already chosen, under another id).
FILTERS = ("above_max_score", "above_margin", "same_source", "same_text", "near_duplicate")


@dataclass(frozen=True)
class Positive:
    """What the filters know of a row's positive document."""

    id: str
    text: str
    group: str | None = None
    # Its BM25 score for the row's query, whether or not it ranked within ``depth``; None
    # when the index does not hold it (a separate corpus).
    score: float | None = None


@dataclass(frozen=True)
class Filters:
    """Which candidates are no negative, besides the positive itself (``bm25`` settings).
    Same-source hits are always skipped: only an index built with ``group_key`` gives hits
    a group."""

    num_neg: int
    start_rank: int = 0
    near_duplicate: float | None = None
    relative_margin: float | None = None
    max_score: float | None = None

    @classmethod
    def of(cls, config: BM25Config) -> Filters:
        return cls(config.num_neg, config.start_rank, config.near_duplicate,
                   config.relative_margin, config.max_score)  # fmt: skip


def above_max_score(score: float, max_score: float | None) -> bool:
    """An absolute cap: a hit scoring above it is too close to the query to be a negative."""
    return max_score is not None and score > max_score


def above_margin(score: float, positive_score: float | None, margin: float | None) -> bool:
    """Positive-aware: a hit scoring above ``margin`` times the positive's own score is more
    likely relevant than not (NV-Retriever keeps hits below 95% of it). Off when the
    positive's score is unknown."""
    return margin is not None and positive_score is not None and score > margin * positive_score


def same_source(group: str | None, positive_group: str | None) -> bool:
    """Two documents of one source (the chunks of one document) are never negatives of each
    other; a document without a group shares one with nobody."""
    return group is not None and group == positive_group


def shingles(text: str, n: int = SHINGLE_WORDS) -> Grams:
    """``text``'s word n-grams, hashed (ASCII letters lower-cased, split on whitespace); a text
    shorter than ``n`` words is one n-gram."""
    return text_print(text, n).grams


def overlap(a: Grams, b: Grams) -> float:
    """The share of the smaller set found in the other (the overlap coefficient): 1.0 for a
    text contained in the other, whatever their lengths, where Jaccard would dilute it."""
    return share(len(np.intersect1d(a, b, assume_unique=True)), a.size, b.size)


def share(shared: int, size_a: int, size_b: int) -> float:
    """``overlap`` from the counts: shared n-grams over the smaller set's size."""
    return shared / min(size_a, size_b) if size_a and size_b else 0.0


@dataclass(frozen=True)
class Negatives:
    hits: list[Hit]
    positive_rank: int | None
    positive_score: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)


def positive_in(hits: Sequence[Hit], positive_id: str) -> tuple[int | None, float | None]:
    """The positive's 1-based rank among ``hits`` and its score there, if it is there."""
    for rank, hit in enumerate(hits, start=1):
        if hit.docid == positive_id:
            return rank, hit.score
    return None, None


def select_negatives(positive: Positive, hits: Sequence[Hit], filters: Filters) -> Negatives:
    """Pick hard negatives from ``hits`` (best first); ranks are 1-based over all hits.

    Candidates are the hits ranked below ``start_rank`` that are not the positive; each is
    kept unless a filter skips it (``FILTERS``, in order), until ``num_neg`` are kept.
    """
    rank, score = positive_in(hits, positive.id)
    if score is None:
        score = positive.score
    n = SHINGLE_WORDS if filters.near_duplicate is not None else 0
    ours = text_print(positive.text, n)
    seen = {ours.text_hash}  # the positive's text, under any id, is no negative
    skipped = dict.fromkeys(FILTERS, 0)
    chosen: list[Hit] = []
    for i, hit in enumerate(hits, start=1):
        if len(chosen) == filters.num_neg:
            break
        if i <= filters.start_rank or hit.docid == positive.id:
            continue
        reason = _skip(hit, positive.group, score, seen, ours, n, filters)
        if reason is None:
            chosen.append(hit)
        else:
            skipped[reason] += 1
    return Negatives(chosen, rank, score, skipped)


def _skip(
    hit: Hit,
    positive_group: str | None,
    positive_score: float | None,
    seen: set[int],
    positive: TextPrint,
    n: int,
    filters: Filters,
) -> str | None:
    """The first filter that skips ``hit``, or None; a kept hit's text joins ``seen``."""
    if above_max_score(hit.score, filters.max_score):
        return "above_max_score"
    if above_margin(hit.score, positive_score, filters.relative_margin):
        return "above_margin"
    if same_source(hit.group, positive_group):
        return "same_source"
    # Reading a text is most of the cost: only for hits that got this far, in one pass for
    # both text filters, from its UTF-8 bytes (a view of the index's texts, not a string).
    text_hash, grams, shared = compare(hit.utf8, n, positive)
    if text_hash in seen:
        return "same_text"
    if filters.near_duplicate is not None and (
        share(shared, grams, positive.grams.size) > filters.near_duplicate
    ):
        return "near_duplicate"
    seen.add(text_hash)
    return None


class _HardNegativeMiner:
    """A Ray Data actor: opens the node-local index once, then mines batch after batch."""

    def __init__(self, index: IndexHandle, operator: BM25HardNeg, heap: str):
        cfg = operator.config
        self.operator = operator
        self.filters = Filters.of(cfg)
        path = local_index(index, cfg.local_dir, debug_logs=cfg.debug_logs)
        self.search_log = path.parent / SEARCH_LOG if cfg.debug_logs else None
        self.node_id = ray.get_runtime_context().get_node_id()
        self.searcher = LuceneSearcher(
            path,
            k1=cfg.k1,
            b=cfg.b,
            threads=cfg.threads_per_searcher,
            heap=heap,
            grouped=cfg.group_key is not None,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.operator.config
        queries = self.operator.queries(batch)
        results = self.searcher.search(queries, cfg.depth)
        groups = batch[cfg.group_key].to_pylist() if cfg.group_key else [None] * batch.num_rows
        mined = []
        for query, pid, text, group, hits in zip(
            queries, batch[ID].to_pylist(), batch[cfg.input_text_key].to_pylist(), groups, results,
            strict=True,
        ):  # fmt: skip
            rank, score = positive_in(hits, pid)
            if rank is None:  # ranked below depth: its score costs one more (filtered) query
                score = self.searcher.score(query, pid, group)
            mined.append(select_negatives(Positive(pid, text, group, score), hits, self.filters))
        if self.search_log is not None:  # one line per batch: where searches ran
            record = {
                "node_id": self.node_id, "pid": os.getpid(), "rows": len(mined), "t": time.time(),
            }  # fmt: skip
            with self.search_log.open("a") as log:
                log.write(json.dumps(record) + "\n")
        return self.operator.to_columns(batch, mined)


class BM25HardNeg(Operator):
    """Mines ``num_neg`` BM25 hard negatives per question from the whole corpus."""

    name = "bm25"
    # Rows left with fewer than ``num_neg`` negatives, and candidates each filter skipped.
    counters = ("short", *FILTERS)
    reads_corpus = True

    def __init__(self, config: BM25Config | None = None, **keys: Any):
        self.config = config or BM25Config(**keys)
        key = self.config.output_negatives_key
        self.ids_column = f"{key}_ids"
        self.scores_column = f"{key}_scores"
        self.skipped_column = f"{key}_skipped"
        self._build: IndexBuild | None = None
        self.index: IndexHandle | None = None
        self._plan: SearcherPlan | None = None

    @property
    def input_columns(self) -> Mapping[str, ColumnKind]:
        cfg = self.config
        columns: dict[str, ColumnKind] = {
            cfg.input_question_key: "text",
            cfg.input_text_key: "text",
        }
        if cfg.query == "scenario_question":
            columns[cfg.input_scenario_key] = "text"
        if cfg.group_key:
            columns[cfg.group_key] = "carried"
        return columns

    def queries(self, batch: pa.Table) -> list[str]:
        """What is searched for each row of ``batch`` (``bm25.query``)."""
        cfg = self.config
        questions: list[str] = batch[cfg.input_question_key].to_pylist()
        if cfg.query == "question":
            return questions
        scenarios = batch[cfg.input_scenario_key].to_pylist()
        return [f"{s}\n{q}" for s, q in zip(scenarios, questions, strict=True)]

    @property
    def text_key(self) -> str:
        return self.config.input_text_key

    @property
    def own_fields(self) -> Sequence[pa.Field]:
        return [
            pa.field(self.config.output_negatives_key, pa.list_(pa.string())),
            pa.field(self.ids_column, pa.list_(pa.string())),
            pa.field(self.scores_column, pa.list_(pa.float32())),
            pa.field("positive_rank", pa.int32()),
            pa.field("positive_score", pa.float32()),
            pa.field(self.skipped_column, pa.struct([(f, pa.int32()) for f in FILTERS])),
        ]

    @property
    def resources(self) -> Resources:
        """One searcher actor per ``cpus_per_searcher`` CPUs; the pool is sized in ``prepare``."""
        return Resources(
            cpus=self.config.cpus_per_searcher,
            workers=self._plan.total if self._plan else None,
        )

    def settings(self) -> dict[str, Any]:
        return {"bm25": output_settings(self.config)}

    def prepare(self, context: StageContext) -> None:
        """Starts indexing the corpus in its own actor, and returns at once.

        The build runs while the stages before this one run; ``run_pass`` waits for it.
        """
        cfg = self.config
        self._plan = self.plan(ray.nodes())
        if cfg.prebuilt_index:
            handle = prebuilt_index(cfg.prebuilt_index)
            built_with = handle.params.get("group_key")
            if built_with != cfg.group_key:
                raise SettingsError(
                    f"bm25.prebuilt_index {cfg.prebuilt_index!r} was built with group_key "
                    f"{built_with!r}, but bm25.group_key is {cfg.group_key!r}: build it again "
                    "(leave prebuilt_index unset) or set the same group_key"
                )
            self._build = IndexBuild.of(handle)
            return
        # In a pipeline run the index goes to the run's own durable storage unless share_uri
        # names a place: chunks in the object store die with their holder's node, and a
        # searcher started after that loss (on any node) could then never get the index.
        share_uri = cfg.share_uri or context.stage_files(self.name)
        key = None
        if share_uri and context.corpus_key:
            # A run that died after building the index (BM25 not finished) left it here.
            key = build_key(context.corpus_key, cfg.input_text_key, cfg.group_key, cfg.k1, cfg.b)
            found = built_index(share_uri, key)
            if found is not None:
                context.log(f"BM25 index: using the one built before for this corpus ({found.uri})")
                self._build = IndexBuild.of(found)
                return
        context.log(
            "building the BM25 index in the background"
            + (f", for the searchers in {share_uri}" if share_uri else "")
        )
        self._build = IndexBuild.start(
            context.corpus(), cfg.input_text_key, cfg.k1, cfg.b, cfg.chunk_bytes,
            heap=cfg.heap_per_searcher or "2g", share_uri=share_uri, group_column=cfg.group_key,
            build_key=key, threads=cfg.index_threads,
        )  # fmt: skip

    def use_index(self, index: IndexHandle) -> None:
        """Search ``index`` as it is (one another operator built) instead of ``prepare``'s."""
        self._build = IndexBuild.of(index)

    def wait_for_index(self, context: StageContext) -> IndexHandle:
        """The index ``prepare`` started, once it is built."""
        if self._build is None:
            raise RuntimeError("BM25HardNeg.prepare(context) must run before its index is used")
        if self.index is None:
            self.index = self._build.result()
            context.log(
                f"BM25 index ready: {self.index.num_docs} documents in "
                f"{self.index.build_seconds:.1f} s"
            )
        return self.index

    def manifest_entries(self) -> dict[str, Any]:
        return {"index": self.index.describe() if self.index else None}

    def plan(self, nodes: list[dict[str, Any]]) -> SearcherPlan:
        """The searcher pool this operator would start on a cluster of ``nodes``."""
        return plan_searchers(self.config, nodes)

    def to_columns(self, batch: pa.Table, mined: list[Negatives]) -> pa.Table:
        cfg = self.config
        return self.with_outputs(
            batch,
            {
                cfg.output_negatives_key: [[h.text for h in m.hits] for m in mined],
                self.ids_column: [[h.docid for h in m.hits] for m in mined],
                self.scores_column: [[h.score for h in m.hits] for m in mined],
                "positive_rank": [m.positive_rank for m in mined],
                "positive_score": [m.positive_score for m in mined],
                self.skipped_column: [m.skipped for m in mined],
                self.counter("short"): [int(len(m.hits) < cfg.num_neg) for m in mined],
                **{self.counter(f): [m.skipped[f] for m in mined] for f in FILTERS},
            },
            [None] * batch.num_rows,
        )

    def run_pass(
        self, ds: ray.data.Dataset, attempt: int, context: StageContext
    ) -> ray.data.Dataset:
        """Mines negatives for ``ds`` once the index that ``prepare`` started is ready."""
        index = self.wait_for_index(context)
        self._plan = plan = self.plan(ray.nodes())  # again: nodes may have come or gone since
        cfg = self.config
        # Blocks of one batch: Ray Data hands a searcher whole blocks (several in flight), and
        # a stage's input comes in blocks of up to a few thousand rows, so that without this
        # one searcher would search a whole read's rows alone, and a lost node would take all
        # of them with it. Not bigger: beside Doc2Query the blocks come a shard at a time, and
        # a block waits for its rows.
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
        return ds.map_batches(
            _HardNegativeMiner,
            fn_constructor_kwargs={"index": index, "operator": self, "heap": plan.heap},
            # A fixed pool spread over the nodes: every node's CPUs add query throughput.
            compute=ray.data.ActorPoolStrategy(size=plan.total),
            num_cpus=self.resources.cpus,
            ray_remote_args_fn=_spread_over_nodes,
            max_restarts=cfg.max_restarts,
            # A block whose searcher died waits for its restart (on any node with room),
            # however long the cluster takes to declare the old node dead: retries while an
            # actor is only "unavailable" are spent in seconds. max_restarts still bounds a
            # searcher that keeps dying.
            max_task_retries=-1,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
        )
