"""One actor builds the index of the whole corpus; every node unpacks its own copy once.

The built index is tarred and cut into chunks of ``chunk_bytes``, each its own object in Ray's
object store, so no object and no process ever holds the whole index. The holder actor owns
those objects: it stays alive for as long as searchers may need them.

On a node, the first searcher to arrive takes a file lock keyed by the index fingerprint,
streams the chunks to disk one at a time, unpacks them into a temporary directory and renames
it into place; the others wait on the lock and find the directory there. An interrupted
unpack leaves only ``*.partial`` files, which the next attempt removes and redoes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray

from rare_ray.engines.lucene import ANALYZER, LuceneIndexWriter
from rare_ray.rows import ID

UNPACK_LOG = "unpack.log"


@dataclass(frozen=True)
class IndexHandle:
    """What a searcher needs to get a node-local copy of the index."""

    fingerprint: str
    num_docs: int
    nbytes: int
    build_seconds: float
    chunks: list[ray.ObjectRef] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    # The actor that owns the chunks: whoever holds this handle keeps it (and them) alive.
    holder: Any = field(default=None, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "num_docs": self.num_docs,
            "bytes": self.nbytes,
            "chunks": len(self.chunks),
            "build_seconds": round(self.build_seconds, 3),
            **self.params,
        }


def index_params(k1: float, b: float) -> dict[str, Any]:
    from importlib.metadata import version

    return {"analyzer": ANALYZER, "k1": k1, "b": b, "pyserini": version("pyserini")}


@ray.remote
class LuceneIndexHolder:
    """Builds the Lucene index of a corpus and holds it, in chunks, in the object store."""

    def __init__(self, heap: str | None = None, threads: int = 1):
        self.heap = heap
        self.threads = threads
        self.workdir = Path(tempfile.mkdtemp(prefix="rare-ray-index-"))

    def build(
        self,
        corpus: ray.data.Dataset,
        id_column: str,
        text_column: str,
        k1: float,
        b: float,
        chunk_bytes: int,
    ) -> IndexHandle:
        start = time.perf_counter()
        index_dir = self.workdir / "index"
        writer = LuceneIndexWriter(index_dir, threads=self.threads, heap=self.heap)
        # An order-independent digest of the corpus: the sum of per-document hashes.
        digest = 0
        for batch in corpus.iter_batches(batch_size=4096, batch_format="pyarrow"):
            ids, texts = batch[id_column].to_pylist(), batch[text_column].to_pylist()  # type: ignore[union-attr]
            writer.add(ids, texts)
            for i, t in zip(ids, texts, strict=True):
                h = hashlib.sha256(f"{i}\0{t}".encode()).digest()
                digest = (digest + int.from_bytes(h, "big")) % (1 << 256)
        writer.close()
        params = index_params(k1, b)
        fingerprint = hashlib.sha256(
            json.dumps({"corpus": f"{digest:064x}", "docs": writer.count, **params}).encode()
        ).hexdigest()[:24]
        chunks, nbytes = self._chunk(index_dir, chunk_bytes)
        return IndexHandle(
            fingerprint=fingerprint,
            num_docs=writer.count,
            nbytes=nbytes,
            build_seconds=time.perf_counter() - start,
            chunks=chunks,
            params={**params, "corpus_hash": f"{digest:064x}"},
        )

    def _chunk(self, index_dir: Path, chunk_bytes: int) -> tuple[list[ray.ObjectRef], int]:
        archive = self.workdir / "index.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(index_dir, arcname=".")
        shutil.rmtree(index_dir)
        chunks = []
        with archive.open("rb") as f:
            while piece := f.read(chunk_bytes):
                chunks.append(ray.put(piece))
        nbytes = archive.stat().st_size
        archive.unlink()
        return chunks, nbytes

    def ping(self) -> bool:
        return True


@dataclass
class IndexBuild:
    """An index being built by its holder actor; ``result()`` waits for it."""

    holder: Any
    ref: ray.ObjectRef

    @classmethod
    def start(
        cls, corpus: ray.data.Dataset, text_column: str, k1: float, b: float,
        chunk_bytes: int, heap: str | None = None,
    ) -> IndexBuild:  # fmt: skip
        holder = LuceneIndexHolder.options(num_cpus=1).remote(heap=heap)  # type: ignore[attr-defined]
        ref = holder.build.remote(
            corpus.select_columns([ID, text_column]), ID, text_column, k1, b, chunk_bytes
        )
        return cls(holder, ref)

    def result(self) -> IndexHandle:
        # The handle carries the holder's (owning) actor handle: searchers that hold it keep
        # the holder, and so the chunks, alive.
        return replace(ray.get(self.ref), holder=self.holder)


def local_index(handle: IndexHandle, local_dir: str | Path) -> Path:
    """The node-local directory of ``handle``'s index, unpacked by the first caller only."""
    root = Path(local_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / handle.fingerprint
    if target.is_dir():
        return target
    with (root / f"{handle.fingerprint}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if target.is_dir():
                return target
            _unpack(handle, root, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _unpack(handle: IndexHandle, root: Path, target: Path) -> None:
    archive = root / f"{handle.fingerprint}.tar.partial"
    staging = root / f"{handle.fingerprint}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    with archive.open("wb") as f:
        for ref in handle.chunks:
            f.write(ray.get(ref))
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    archive.unlink()
    os.rename(staging, target)
    # One line per unpack: how tests (and curious operators) see that it happened once.
    record = {
        "fingerprint": handle.fingerprint,
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    with (root / UNPACK_LOG).open("a") as log:
        log.write(json.dumps(record) + "\n")
