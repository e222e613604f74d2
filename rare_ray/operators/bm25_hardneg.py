"""BM25HardNeg: documents that BM25 ranks high for a question but that are not its source.

One actor indexes the whole corpus (every document, with or without a question); searcher
actors, each on a node-local copy of that index, run the questions in batches. From each
question's hits we drop the positive (by id, and any document with the same text), skip the
top ``start_rank`` ranks, and keep the first ``num_neg`` distinct texts. We also record where
the positive itself ranked: a free signal of how answerable the question is from its source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
import ray.data

from rare_ray.config import BM25Config, output_settings
from rare_ray.engines.index_broadcast import IndexBuild, IndexHandle, local_index, prebuilt_index
from rare_ray.engines.lucene import Hit, LuceneSearcher
from rare_ray.operators.base import Operator, Resources, StageContext
from rare_ray.rows import ID, content_key
from rare_ray.vocabulary import ColumnKind

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
    node a quarter of its memory (each JVM between 256 MiB and 4 GiB).
    """
    workers = [n["Resources"] for n in nodes if n.get("Alive") and n["Resources"].get("CPU")]
    if not workers:
        raise RuntimeError("no alive Ray node has CPUs for BM25 searchers")
    cpus = min(r["CPU"] for r in workers)
    per_node = config.searchers_per_node or max(1, int(cpus / 2 / config.cpus_per_searcher))
    memory_mib = min(r.get("memory", 4 << 30) for r in workers) / (1 << 20)
    heap = config.heap_per_searcher or f"{int(min(4096, max(256, memory_mib / 4 / per_node)))}m"
    return SearcherPlan(per_node=per_node, nodes=len(workers), heap=heap)


def _spread_over_nodes() -> dict[str, Any]:
    return {"scheduling_strategy": "SPREAD"}


@dataclass(frozen=True)
class Negatives:
    hits: list[Hit]
    positive_rank: int | None


def select_negatives(
    positive_id: str,
    positive_text: str,
    hits: Sequence[Hit],
    num_neg: int,
    start_rank: int = 0,
) -> Negatives:
    """Pick hard negatives from ``hits`` (best first); ranks are 1-based over all hits."""
    seen = {content_key(positive_text)}  # the positive's text, under any id, is no negative
    chosen: list[Hit] = []
    positive_rank = None
    for rank, hit in enumerate(hits, start=1):
        if hit.docid == positive_id:
            positive_rank = positive_rank or rank
        elif len(chosen) == num_neg:
            if positive_rank is not None:
                break  # nothing left to learn from the hits below
        elif rank > start_rank:
            # Hashing a text is most of the cost here: only for hits that may be chosen.
            key = content_key(hit.text)
            if key not in seen:
                seen.add(key)
                chosen.append(hit)
    return Negatives(chosen, positive_rank)


class _HardNegativeMiner:
    """A Ray Data actor: opens the node-local index once, then mines batch after batch."""

    def __init__(self, index: IndexHandle, operator: BM25HardNeg, heap: str):
        cfg = operator.config
        self.operator = operator
        path = local_index(index, cfg.local_dir, debug_logs=cfg.debug_logs)
        self.search_log = path.parent / SEARCH_LOG if cfg.debug_logs else None
        self.node_id = ray.get_runtime_context().get_node_id()
        self.searcher = LuceneSearcher(
            path,
            k1=cfg.k1,
            b=cfg.b,
            threads=cfg.threads_per_searcher,
            heap=heap,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.operator.config
        questions = batch[cfg.input_question_key].to_pylist()
        results = self.searcher.search(questions, cfg.depth)
        mined = [
            select_negatives(pid, text, hits, cfg.num_neg, cfg.start_rank)
            for pid, text, hits in zip(
                batch[ID].to_pylist(), batch[cfg.input_text_key].to_pylist(), results, strict=True
            )
        ]
        if self.search_log is not None:  # one line per batch: where searches ran
            record = {"node_id": self.node_id, "pid": os.getpid(), "rows": len(mined)}
            with self.search_log.open("a") as log:
                log.write(json.dumps(record) + "\n")
        return self.operator.to_columns(batch, mined)


class BM25HardNeg(Operator):
    """Mines ``num_neg`` BM25 hard negatives per question from the whole corpus."""

    name = "bm25"
    counters = ("short",)
    reads_corpus = True

    def __init__(self, config: BM25Config | None = None, **keys: Any):
        self.config = config or BM25Config(**keys)
        key = self.config.output_negatives_key
        self.ids_column = f"{key}_ids"
        self.scores_column = f"{key}_scores"
        self._build: IndexBuild | None = None
        self.index: IndexHandle | None = None
        self._plan: SearcherPlan | None = None

    @property
    def input_columns(self) -> Mapping[str, ColumnKind]:
        return {self.config.input_question_key: "text", self.config.input_text_key: "text"}

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
            self._build = IndexBuild.of(prebuilt_index(cfg.prebuilt_index))
            return
        context.log("building the BM25 index in the background")
        self._build = IndexBuild.start(
            context.corpus(), cfg.input_text_key, cfg.k1, cfg.b, cfg.chunk_bytes,
            heap=cfg.heap_per_searcher or "2g", share_uri=cfg.share_uri,
        )  # fmt: skip

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
                self.counter("short"): [int(len(m.hits) < cfg.num_neg) for m in mined],
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
        return ds.map_batches(
            _HardNegativeMiner,
            fn_constructor_kwargs={"index": index, "operator": self, "heap": plan.heap},
            # A fixed pool spread over the nodes: every node's CPUs add query throughput.
            compute=ray.data.ActorPoolStrategy(size=plan.total),
            num_cpus=self.resources.cpus,
            ray_remote_args_fn=_spread_over_nodes,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_restarts,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
        )
