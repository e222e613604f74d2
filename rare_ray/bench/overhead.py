"""Benchmark: what the job itself costs around its engines, from thousands to millions of rows.

Each size is one whole ``rare-ray run`` (a process of its own, as a user starts it) over a
synthetic corpus of that many documents, with every LLM stage answered by a **zero-cost
engine**: ``rare_ray.testing.instant_server``, a test double of an OpenAI-compatible server
that answers each request at once (in a process of its own, so its CPU is not the driver's).
BM25 is real: pyserini indexes the corpus and searches every question. So the run's wall time
is the job's own machinery (ingest, Ray Data, HTTP clients, checkpoints and commits,
publishing, reconciling, the driver) plus BM25's real work.

Stores: ``local`` writes input and output on local disk; ``s3`` on an S3-compatible store:
with ``--s3-root s3://bucket/prefix`` the store the environment names (``AWS_*`` variables, as
pyarrow reads them: a user's cluster and bucket), else a SeaweedFS server started for the bench
on loopback (``rare_ray.testing.object_store``, the ``dev`` extra), whose own counters give the
number of S3 requests the run made.

Per size and store it reports the wall time split by ingest, each stage, the driver's commits
(shard and pass records), publishing and reconciling (from the manifest); the driver process's
CPU seconds (the manifest's ``driver_cpu_seconds``) and the share of them spent in Ray Data's
executors (its ``driver_cpu_by_thread``); the files the run left under its output directory
and, on the loopback server, its S3 requests, per 1,000 rows; and the time per row outside
BM25's searching, where the searching is plain pyserini (``batch_search`` on the index the run
built, as many threads as the stage's searchers had CPUs, in a process of its own)
over the run's questions, timed after the run.

The synthetic documents are 30 to 90 words drawn from a Zipf-distributed vocabulary of
pseudo-words (seeded: both stores read the same corpus of a size), written as Parquet files of
100,000 rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from rare_ray.config import RunConfig
from rare_ray.vocabulary import ALL_STAGES, INGEST

STORES = ("local", "s3")
ROWS_PER_INPUT_FILE = 100_000
VOCABULARY = 50_000
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def write_corpus(directory: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` synthetic documents (``id``, ``text``) as Parquet files under ``directory``
    (kept: a second call with the same arguments writes nothing)."""
    done = directory / "_COMPLETE"
    if done.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocabulary = _vocabulary(rng)
    weights = 1.0 / (np.arange(VOCABULARY) + 2.7)
    weights /= weights.sum()
    for first in range(0, rows, ROWS_PER_INPUT_FILE):
        n = min(ROWS_PER_INPUT_FILE, rows - first)
        # Each file from its own seed: a file's rows do not depend on how many files follow.
        file_rng = np.random.default_rng([seed, first])
        lengths = file_rng.integers(30, 91, size=n)
        words = vocabulary[file_rng.choice(VOCABULARY, size=int(lengths.sum()), p=weights)]
        ends = np.cumsum(lengths)
        texts = [" ".join(words[e - k : e]) + "." for e, k in zip(ends, lengths, strict=True)]
        ids = [f"doc-{i:08d}" for i in range(first, first + n)]
        table = pa.table({"id": ids, "text": texts})
        pq.write_table(table, directory / f"part-{first // ROWS_PER_INPUT_FILE:05d}.parquet")
    done.write_text(str(rows))
    return directory


def _vocabulary(rng: np.random.Generator) -> np.ndarray:
    """``VOCABULARY`` distinct pseudo-words of two to four syllables."""
    words: set[str] = set()
    while len(words) < VOCABULARY:
        k = int(rng.integers(2, 5))
        words.add("".join(rng.choice(SYLLABLES, size=k)))
    return np.array(sorted(words))


@dataclass
class SizeResult:
    store: str
    rows: int
    output_rows: int
    rejected_rows: int
    wall_s: float
    seconds: dict[str, float]  # the manifest's timings_seconds
    commit_s: float
    driver_cpu_s: float
    driver_cpu_by_thread: dict[str, float]  # the manifest's driver_cpu_by_thread
    search_s: float  # plain pyserini on the run's questions and index
    files: int
    requests: dict[str, int] = field(default_factory=dict)  # S3 requests by type (loopback)
    engine_requests: int = 0
    engine_cpu_s: float = 0.0

    @property
    def outside_search_ms_per_row(self) -> float:
        return 1000 * (self.wall_s - self.search_s) / self.rows

    @property
    def executors_cpu_s(self) -> float:
        """The driver's CPU in Ray Data's executors: each execution's scheduling loop."""
        return sum(
            v for k, v in self.driver_cpu_by_thread.items() if k.startswith(EXECUTOR_THREADS)
        )

    @property
    def publish_and_reconcile_share(self) -> float:
        return (self.seconds.get("publish", 0) + self.seconds.get("reconcile", 0)) / self.wall_s

    def markdown(self, smallest: SizeResult | None) -> str:
        s = self.seconds
        ratio = (
            self.outside_search_ms_per_row / smallest.outside_search_ms_per_row
            if smallest
            else None
        )
        requests = sum(self.requests.values())
        cells = [
            self.store,
            f"{self.rows:,}",
            f"{self.wall_s:.1f}",
            *(f"{s.get(stage, 0):.1f}" for stage in (INGEST, *ALL_STAGES)),
            f"{self.commit_s:.1f}",
            f"{s.get('publish', 0):.1f}",
            f"{s.get('reconcile', 0):.2f}",
            f"{100 * self.publish_and_reconcile_share:.1f}%",
            f"{self.search_s:.1f}",
            f"{self.outside_search_ms_per_row:.2f}",
            "n/a" if ratio is None else f"{ratio:.2f}",
            f"{self.driver_cpu_s:.1f}",
            f"{100 * self.driver_cpu_s / self.wall_s:.1f}%",
            f"{100 * self.executors_cpu_s / self.driver_cpu_s:.0f}%",
            f"{1000 * self.files / self.rows:.2f}",
            f"{1000 * requests / self.rows:.1f}" if self.requests else "n/a",
        ]
        return "| " + " | ".join(cells) + " |"


HEADER = (
    "| store | rows | wall (s) | ingest | doc2query | bm25 | distill | verify | commits "
    "| publish | reconcile | publish+reconcile | BM25 search alone (s) | ms/row outside search "
    "| vs smallest | driver CPU (s) | driver CPU / wall | of it, Ray Data's executors "
    "| files /1k rows | S3 requests /1k rows |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)
# Ray Data runs each execution's scheduling loop in a thread named after its dataset.
EXECUTOR_THREADS = "StreamingExecutor-"


def bench_config(base: RunConfig, input_uri: str, output_uri: str, base_url: str) -> RunConfig:
    """``base`` with every LLM stage sent to the instant server at ``base_url``, reading
    ``input_uri`` and writing ``output_uri``."""
    data = base.model_dump(mode="json")
    engine = {
        **{k: v for k, v in data["engine"].items() if k != "tokenizer"},
        "kind": "openai",
        "base_url": base_url,
        "model": "instant",
        "api_key_env": None,
        "structured_outputs": True,
        "seed_requests": False,
        "tokenizer": None,  # documents are cut by characters: no model's tokenizer is involved
    }
    data.update(input=input_uri, output=output_uri, limit=None, engine=engine)
    return RunConfig.model_validate(data)


def run_one(
    config: RunConfig, store: str, rows: int, env: dict[str, str], log: Path, server: Any
) -> SizeResult:
    """One ``rare-ray run`` of ``config`` in a process of its own; its figures."""
    from rare_ray.io.checkpoints import read_json
    from rare_ray.io.publication import MANIFEST
    from rare_ray.io.writers import OutputDir

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config.model_dump(mode="json"), f)
    before = server.s3.requests() if server.s3 else {}
    engine_before = server.engine.stats()
    start = time.perf_counter()
    with log.open("ab") as run_log:
        done = subprocess.run(
            [sys.executable, "-m", "rare_ray.cli", "run", "--config", f.name],
            env=env,
            stdout=run_log,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - start
    os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"rare-ray run exited {done.returncode}: see {log}")
    after = server.s3.requests() if server.s3 else {}
    engine_after = server.engine.stats()
    out = OutputDir(config.output)
    manifest = read_json(out.fs, out.path(MANIFEST))
    if manifest is None:
        raise RuntimeError(f"no manifest in {config.output}")
    fs, root = out.fs, out.root
    files = [
        i
        for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if i.type == pafs.FileType.File
    ]
    counts = manifest["counts"]
    return SizeResult(
        store=store,
        rows=rows,
        output_rows=counts["output_rows"],
        rejected_rows=counts["rejected_rows"],
        wall_s=wall,
        seconds={k: float(v) for k, v in manifest["timings_seconds"].items()},
        commit_s=sum(manifest["commit_seconds"].values()),
        driver_cpu_s=float(manifest["driver_cpu_seconds"]),
        driver_cpu_by_thread=manifest.get("driver_cpu_by_thread", {}),
        search_s=_search_alone(config, manifest, fs, root),
        files=len(files),
        requests={k: after.get(k, 0) - before.get(k, 0) for k in after},
        engine_requests=engine_after["requests"] - engine_before["requests"],
        engine_cpu_s=engine_after["cpu_seconds"] - engine_before["cpu_seconds"],
    )


def _search_alone(config: RunConfig, manifest: dict[str, Any], fs: Any, root: str) -> float:
    """Plain pyserini's ``batch_search`` of the run's questions on the run's index."""
    import ray

    from rare_ray.bench.bm25 import plain_search_s_apart
    from rare_ray.operators import BM25HardNeg
    from rare_ray.pipeline import init_ray

    init_ray(config.ray, log_to_driver=False, attempts=3)
    plan = BM25HardNeg(config.bm25).plan(ray.nodes())
    ray.shutdown()
    cpus = plan.total * max(config.bm25.cpus_per_searcher, config.bm25.threads_per_searcher)
    key = config.bm25.input_question_key
    data = pads.dataset(f"{root}/data", filesystem=fs, format="parquet", partitioning="hive")
    questions = data.to_table(columns=[key])[key].to_pylist()
    threads = max(1, round(cpus))
    return plain_search_s_apart(manifest["index"]["uri"], config.bm25, questions, threads)


@dataclass
class Servers:
    engine: Any  # InstantServer
    s3: Any = None  # S3Server, when the bench started one


def main(
    config: RunConfig,
    sizes: list[int],
    stores: list[str],
    root: str,
    s3_root: str | None = None,
    json_out: str | None = None,
) -> list[SizeResult]:
    from rare_ray.testing.instant_server import running_instant_server

    work = Path(root)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "runs.log"
    results: list[SizeResult] = []
    with contextlib.ExitStack() as stack:
        servers = Servers(stack.enter_context(running_instant_server()))
        for store in stores:
            env = dict(os.environ)
            if store == "s3" and s3_root is None:
                from rare_ray.testing.object_store import environment_with, running_s3_server

                servers.s3 = stack.enter_context(running_s3_server(work / "s3"))
                env = environment_with(servers.s3.env())
                prefix = servers.s3.uri("overhead")
            elif store == "s3":
                prefix = str(s3_root).rstrip("/")
            for rows in sizes:
                corpus = write_corpus(work / f"corpus-{rows}", rows)
                # The store's variables here too: the plain search reads the index with them.
                aws = {k: v for k, v in env.items() if k.startswith("AWS_")}
                with mock.patch.dict(os.environ, aws):
                    if store == "local":
                        input_uri = str(corpus.resolve())
                        output_uri = tempfile.mkdtemp(prefix=f"out-{rows}-", dir=work)
                    else:
                        input_uri = f"{prefix}/corpus-{rows}"
                        output_uri = f"{prefix}/out-{rows}-{int(time.time())}"
                        _upload(corpus, input_uri)
                    sized = bench_config(config, input_uri, output_uri, servers.engine.base_url)
                    results.append(run_one(sized, store, rows, env, log, servers))
                print(f"{store} {rows:,} rows: {results[-1].wall_s:.1f} s", flush=True)
    _print_table(results)
    if json_out:
        Path(json_out).write_text(json.dumps([_json(r) for r in results], indent=2))
    return results


def _upload(corpus: Path, uri: str) -> None:
    fs, root = pafs.FileSystem.from_uri(uri)
    if fs.get_file_info(f"{root}/_COMPLETE").type == pafs.FileType.File:
        return
    for file in sorted(corpus.glob("*.parquet")):
        pafs.copy_files(str(file), f"{root}/{file.name}", destination_filesystem=fs)
    with fs.open_output_stream(f"{root}/_COMPLETE") as f:
        f.write(b"done")


def _print_table(results: list[SizeResult]) -> None:
    print(HEADER, flush=True)
    for store in STORES:
        mine = sorted((r for r in results if r.store == store), key=lambda r: r.rows)
        for r in mine:
            print(r.markdown(mine[0] if r is not mine[0] else None), flush=True)
    for r in results:  # the driver's CPU seconds by thread, the largest first
        largest = sorted(r.driver_cpu_by_thread.items(), key=lambda kv: -kv[1])[:10]
        split = ", ".join(f"{k} {v:.1f}" for k, v in largest)
        print(f"driver CPU (s) by thread, {r.store} {r.rows:,} rows: {split}", flush=True)


def _json(result: SizeResult) -> dict[str, Any]:
    return {
        **asdict(result),
        "outside_search_ms_per_row": result.outside_search_ms_per_row,
        "publish_and_reconcile_share": result.publish_and_reconcile_share,
    }
