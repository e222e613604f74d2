"""BM25HardNeg: documents that BM25 ranks high for a question but that are not its source.

One actor indexes the whole corpus (every document, with or without a question); searcher
actors, each on a node-local copy of that index, run the questions in batches. From each
question's hits we drop the positive (by id, and any document with the same text), skip the
top ``start_rank`` ranks, and keep the first ``num_neg`` distinct texts. We also record where
the positive itself ranked: a free signal of how answerable the question is from its source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
import ray.data

from rare_ray.config import BM25Config
from rare_ray.engines.index_broadcast import IndexBuild, IndexHandle, local_index
from rare_ray.engines.lucene import Hit, LuceneSearcher
from rare_ray.io.readers import ColumnKind
from rare_ray.operators.base import Operator
from rare_ray.rows import ID, content_key


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
    positive_key = content_key(positive_text)
    seen = {positive_key}
    chosen: list[Hit] = []
    positive_rank = None
    for rank, hit in enumerate(hits, start=1):
        if hit.docid == positive_id:
            positive_rank = positive_rank or rank
            continue
        key = content_key(hit.text)
        if key == positive_key or rank <= start_rank or key in seen or len(chosen) == num_neg:
            continue
        seen.add(key)
        chosen.append(hit)
    return Negatives(chosen, positive_rank)


class _HardNegativeMiner:
    """A Ray Data actor: opens the node-local index once, then mines batch after batch."""

    def __init__(self, index: IndexHandle, operator: BM25HardNeg):
        cfg = operator.config
        self.operator = operator
        self.searcher = LuceneSearcher(
            local_index(index, cfg.local_dir),
            k1=cfg.k1,
            b=cfg.b,
            threads=cfg.threads_per_searcher,
            heap=cfg.heap_per_searcher,
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
        return self.operator.to_columns(batch, mined)


class BM25HardNeg(Operator):
    """Mines ``num_neg`` BM25 hard negatives per question from the whole corpus."""

    name = "bm25"

    def __init__(self, config: BM25Config | None = None, **keys: Any):
        self.config = config or BM25Config(**keys)
        key = self.config.output_negatives_key
        self.ids_column = f"{key}_ids"
        self.scores_column = f"{key}_scores"

    @property
    def input_columns(self) -> Mapping[str, ColumnKind]:
        return {self.config.input_question_key: "text", self.config.input_text_key: "text"}

    @property
    def output_fields(self) -> Sequence[pa.Field]:
        return [
            pa.field(self.config.output_negatives_key, pa.list_(pa.string())),
            pa.field(self.ids_column, pa.list_(pa.string())),
            pa.field(self.scores_column, pa.list_(pa.float32())),
            pa.field("positive_rank", pa.int32()),
            pa.field(self.counter("short"), pa.int32()),
        ]

    def start_index(self, corpus: ray.data.Dataset) -> IndexBuild:
        """Start indexing ``corpus`` in its own actor, and return at once.

        The build runs while the caller goes on (the pipeline runs Doc2Query meanwhile).
        """
        cfg = self.config
        return IndexBuild.start(
            corpus, cfg.input_text_key, cfg.k1, cfg.b, cfg.chunk_bytes, cfg.heap_per_searcher
        )

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

    def run(
        self,
        ds: ray.data.Dataset,
        index: IndexHandle | None = None,
        corpus: ray.data.Dataset | None = None,
    ) -> ray.data.Dataset:
        """Mine negatives for ``ds``; the index is built from ``corpus`` (default: ``ds``)."""
        if index is None:
            index = self.start_index(corpus if corpus is not None else ds).result()
        cfg = self.config
        return ds.map_batches(
            _HardNegativeMiner,
            fn_constructor_kwargs={"index": index, "operator": self},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.searchers),
            num_cpus=cfg.cpus_per_searcher,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
        )
