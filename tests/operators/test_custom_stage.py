"""A stage written against the ``Operator`` contract alone runs through the real pipeline.

``WordCountFilter`` is the smallest useful stage: it rejects documents shorter than a number
of words and counts the words of each. The pipeline knows nothing about it, yet checkpoints
it shard by shard, publishes its rows and rejects, reconciles its counts and resumes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import ray.data

from rare_ray.operators import Operator, Resources, StageContext
from rare_ray.pipeline import run_operators
from rare_ray.vocabulary import ColumnKind, ResumeError
from tests.helpers import sample_rows, write_jsonl

MIN_WORDS = 200


class WordCountFilter(Operator):
    name = "word_filter"
    counters = ("words",)

    def __init__(self, min_words: int):
        self.min_words = min_words

    @property
    def input_columns(self) -> Mapping[str, ColumnKind]:
        return {"text": "text"}

    @property
    def text_key(self) -> str:
        return "text"

    @property
    def own_fields(self) -> Sequence[pa.Field]:
        return [pa.field("words", pa.int32())]

    @property
    def resources(self) -> Resources:
        return Resources(cpus=0.5)

    def settings(self) -> dict[str, Any]:
        return {"min_words": self.min_words}

    def run_pass(
        self, ds: ray.data.Dataset, attempt: int, context: StageContext
    ) -> ray.data.Dataset:
        return ds.map_batches(self._count, batch_format="pyarrow", num_cpus=self.resources.cpus)

    def _count(self, batch: pa.Table) -> pa.Table:
        words = [len(t.split()) for t in batch["text"].to_pylist()]
        reasons = [None if n >= self.min_words else f"only {n} words" for n in words]
        return self.with_outputs(batch, {"words": words, self.counter("words"): words}, reasons)


def _part_files(root) -> dict[str, int]:
    stage = root / "_stages" / WordCountFilter.name
    return {str(p): p.stat().st_mtime_ns for p in stage.rglob("part-*.parquet")}


def test_a_new_stage_is_checkpointed_published_reconciled_and_resumed(
    ray_local, tmp_path, local_config
):
    docs = sample_rows(300)
    config = local_config.model_copy(
        update={
            "input": str(write_jsonl(tmp_path / "docs.jsonl", docs)),
            "checkpoint": local_config.checkpoint.model_copy(update={"shard_rows": 100}),
        }
    )
    long_enough = {d["id"] for d in docs if len(d["text"].split()) >= MIN_WORDS}
    assert 0 < len(long_enough) < len(docs), "the threshold must split the sample"

    manifest = run_operators(config, [WordCountFilter(MIN_WORDS)])

    out = tmp_path / "out"
    counts = manifest["counts"]["stages"][WordCountFilter.name]
    assert counts["in"] == len(docs) == counts["out"] + counts["rejected"]
    assert counts["words"] == sum(len(d["text"].split()) for d in docs)
    data = pads.dataset(out / "data", format="parquet", partitioning="hive").to_table()
    assert sorted(data["id"].to_pylist()) == sorted(long_enough)
    assert min(data["words"].to_pylist()) >= MIN_WORDS
    assert not [c for c in data.column_names if c.startswith("_")]
    rejects = pads.dataset(out / "rejects", format="parquet", partitioning="hive").to_table()
    assert sorted(rejects["id"].to_pylist()) == sorted({d["id"] for d in docs} - long_enough)
    assert all(r.startswith("only ") for r in rejects["reason"].to_pylist())

    # A run killed mid-stage: one shard committed, the stage not. The rerun redoes only the
    # shards that were not committed and leaves the committed one's files as they were.
    stage = out / "_stages" / WordCountFilter.name
    (stage / "_SUCCESS").unlink()
    for shard in sorted(stage.glob("shard-*"))[1:]:
        (shard / "_SUCCESS").unlink()
    kept_shard = sorted(stage.glob("shard-*"))[0]
    before = {p: t for p, t in _part_files(out).items() if p.startswith(str(kept_shard))}

    again = run_operators(config, [WordCountFilter(MIN_WORDS)])

    after = _part_files(out)
    assert before and all(after[p] == t for p, t in before.items())
    assert again["counts"] == manifest["counts"]
    data = pads.dataset(out / "data", format="parquet", partitioning="hive").to_table()
    assert sorted(data["id"].to_pylist()) == sorted(long_enough)

    # Its settings are guarded like a built-in stage's: another threshold is refused.
    with pytest.raises(ResumeError, match="min_words"):
        run_operators(config, [WordCountFilter(MIN_WORDS + 1)])
