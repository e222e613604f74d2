"""Shard commits, ingest's cut into shards and the settings a rerun must match, on real files."""

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rare_ray.config import RunConfig
from rare_ray.io.checkpoints import (
    Checkpoints,
    Pass,
    ResumeError,
    ShardCommitter,
    settings_diff,
    write_parts,
)
from rare_ray.io.writers import OutputDir
from tests.helpers import stage_settings


def _rows(ids, shard, reasons=None):
    return pa.table(
        {
            "id": ids,
            "shard": pa.array([shard] * len(ids), pa.int32()),
            "reject_reason": pa.array(reasons or [None] * len(ids), pa.string()),
        }
    )


def test_parts_are_named_by_their_ids_and_a_rewrite_replaces_them(tmp_path):
    fs = pafs.LocalFileSystem()
    batch = pa.concat_tables([_rows(["a", "b"], 0), _rows(["c"], 1, ["bad"])])
    first = write_parts(batch, str(tmp_path), fs)
    again = write_parts(batch, str(tmp_path), fs)  # a retried task writes the same names
    assert first.to_pylist() == again.to_pylist()
    assert sorted(first["shard"].to_pylist()) == [0, 1]
    assert len(list(tmp_path.glob("shard-*/part-*.parquet"))) == 2
    by_shard = {r["shard"]: r for r in first.to_pylist()}
    assert (by_shard[0]["kept"], by_shard[0]["rejected"]) == (2, 0)
    assert (by_shard[1]["kept"], by_shard[1]["rejected"]) == (0, 1)
    assert pq.read_table(tmp_path / by_shard[0]["file"])["id"].to_pylist() == ["a", "b"]


def test_a_shard_commits_when_its_last_row_is_written_and_never_twice(tmp_path):
    fs = pafs.LocalFileSystem()
    step = Pass(fs, str(tmp_path / "stage"))
    committer = ShardCommitter(step, {0: 3, 1: 1, 2: 0})
    assert committer.committed == {2}  # nothing to write: committed at once
    committer.add(write_parts(_rows(["a", "b"], 0), step.path, fs))
    assert committer.committed == {2} and committer.short() == {0: 1, 1: 1}
    committer.add(write_parts(_rows(["c"], 0, ["why"]), step.path, fs))
    assert committer.committed == {0, 2}
    # The empty shard cost no request: only the pass's own record will list it.
    assert set(step.committed()) == {0} and not (tmp_path / "stage" / "shard-00002").exists()
    record = json.loads((tmp_path / "stage" / "shard-00000" / "_SUCCESS").read_text())
    assert (record["kept"], record["rejected"], len(record["files"])) == (2, 1, 2)
    with pytest.raises(ResumeError, match="written twice"):
        committer.add(write_parts(_rows(["d"], 0), step.path, fs))
    committer.add(write_parts(_rows(["e"], 1), step.path, fs))
    step.commit(committer.written)
    assert set(step.committed()) == {0, 1, 2} and step.committed()[2].rows == 0


def test_a_shard_whose_count_comes_later_commits_once_it_is_known_and_whole(tmp_path):
    """A stage beside the one before it learns a shard's count when that stage commits it."""
    fs = pafs.LocalFileSystem()
    step = Pass(fs, str(tmp_path / "stage"))
    heard: list[tuple[int, int]] = []
    committer = ShardCommitter(step, {0: None, 1: None}, lambda k, s: heard.append((k, s.rows)))
    committer.add(write_parts(_rows(["a", "b"], 0), step.path, fs))
    assert not committer.committed and committer.short() == {0: None, 1: None}
    committer.expect(0, 3)  # one row to come
    assert not committer.committed and committer.short() == {0: 1, 1: None}
    committer.add(write_parts(_rows(["c"], 0), step.path, fs))
    committer.expect(1, 0)  # the stage before kept nothing of shard 1
    assert committer.committed == {0, 1} and heard == [(0, 3), (1, 0)]
    assert set(step.committed()) == {0}  # the empty one costs no request
    late = ShardCommitter(step, {2: None})
    late.add(write_parts(_rows(["d", "e"], 2), step.path, fs))
    with pytest.raises(ResumeError, match="written twice"):
        late.expect(2, 1)


def test_uncommitted_shards_are_cleared_and_committed_ones_kept(tmp_path):
    fs = pafs.LocalFileSystem()
    step = Pass(fs, str(tmp_path / "stage"))
    committer = ShardCommitter(step, {0: 1, 1: 2})
    committer.add(write_parts(pa.concat_tables([_rows(["a"], 0), _rows(["b"], 1)]), step.path, fs))
    assert step.clear_uncommitted() == 1  # shard 1 had a part but not all of its rows
    assert not (tmp_path / "stage" / "shard-00001").exists()
    assert set(step.committed()) == {0} and not step.complete()
    step.commit(step.committed())
    assert step.complete() and set(step.committed()) == {0}


def test_changed_settings_are_refused_with_what_changed(tmp_path):
    ckpt = Checkpoints(pafs.LocalFileSystem(), str(tmp_path))
    old = {"doc2query": {"max_attempts": 3, "sampling": {"max_tokens": 512}}, "seed": 0}
    ckpt.record_settings("doc2query", old)
    ckpt.check_settings({"doc2query": old})  # the same settings resume
    new = {"doc2query": {"max_attempts": 3, "sampling": {"max_tokens": 256}}, "seed": 0}
    with pytest.raises(ResumeError, match=r"doc2query.sampling.max_tokens: 512 -> 256") as e:
        ckpt.check_settings({"doc2query": new})
    assert "--fresh" in str(e.value)
    assert settings_diff({"a": 1}, {"a": 1, "b": [2]}) == ["b: null -> [2]"]
    OutputDir(str(tmp_path)).clear()
    ckpt.check_settings({"doc2query": new})  # nothing left to contradict


def test_stage_settings_leave_out_what_only_changes_speed():
    base = {"input": "c.jsonl", "output": "o", "engine": {"model": "m"}}
    slow = RunConfig.model_validate(base)
    fast = RunConfig.model_validate(
        {**base, "engine": {"model": "m", "replicas": 8, "batch_size": 256},
         "bm25": {"searchers_per_node": 16}}
    )  # fmt: skip
    for stage in ("ingest", "doc2query", "bm25", "distill"):
        assert stage_settings(slow, stage) == stage_settings(fast, stage)
    hotter = RunConfig.model_validate({**base, "seed": 1})
    assert stage_settings(hotter, "doc2query") != stage_settings(slow, "doc2query")
    assert stage_settings(hotter, "bm25") == stage_settings(slow, "bm25")


def test_ingest_is_cut_into_shards_of_shard_rows_rows_kept_or_rejected(ray_local, tmp_path):
    import ray.data

    reasons = [None if i % 7 else "bad" for i in range(250)]
    rows = [{"id": str(i), "text": f"t{i}", "reject_reason": r} for i, r in enumerate(reasons)]
    ckpt = Checkpoints(pafs.LocalFileSystem(), str(tmp_path))
    shards = ckpt.write_ingest(ray.data.from_items(rows, override_num_blocks=3), 100)
    assert [s.rows for _, s in sorted(shards.items())] == [100, 100, 50]
    assert sum(s.rejected for s in shards.values()) == reasons.count("bad")
    ingest = ckpt.pass_of("ingest")
    assert ingest.committed() == shards  # the pass's record, as a rerun reads it
    seen = []
    for k, shard in shards.items():
        for name in shard.files:
            part = pq.read_table(f"{ingest.path}/{name}")
            assert set(part["shard"].to_pylist()) == {k}
            seen += part["id"].to_pylist()
    assert sorted(seen) == sorted(r["id"] for r in rows)  # every row once
    assert not (tmp_path / "ingest" / "_rows").exists()
