"""One actor builds the index of the whole corpus; every node unpacks its own copy once.

The built index is tarred and reaches the nodes in one of two ways:
- through Ray's object store, cut into chunks of ``chunk_bytes``, each its own object, so no
  object and no process ever holds the whole index (the holder actor owns the chunks and stays
  alive for as long as searchers may need them);
- through a shared location (a path every node can read, or a URI pyarrow's filesystems
  support) when ``share_uri`` is set: the holder writes ``<fingerprint>.tar`` and
  ``<fingerprint>.json`` there. Such a pair can be given back later as a prebuilt index, so
  many runs over one corpus index it once.

A pipeline run always takes the second way (into ``<output>/_stages/bm25/files/`` unless
``share_uri`` says where), and lets the holder go once the tar is written. Chunks in the object
store belong to the holder: when its node is lost they are lost with it (Ray does not rebuild
objects made by ``ray.put``), and a searcher started afterwards, the replacement of one on the
lost node included, could never get the index. The run's output is storage that every node
already writes its checkpoints to and that outlives any node, so it costs one upload of the tar
and one download per node, about what the object store moves anyway. The object store remains
the way for an in-memory ``op.run(ds)``, which has no output directory.

On a node, the first searcher to arrive takes a file lock keyed by the index fingerprint,
streams the tar to disk a chunk at a time, unpacks it into a temporary directory and renames
that into place; the others wait on the lock and find the directory there. A copy of another
index has another fingerprint, so it is never reused; an interrupted unpack leaves only
``*.partial`` files, which the next attempt removes and redoes.
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray

from rare_ray.engines.lucene import ANALYZER, LuceneIndexWriter
from rare_ray.engines.texts import IDS_FILE, TEXTS_FILE, TextsWriter
from rare_ray.rows import ID
from rare_ray.vocabulary import filesystem

UNPACK_LOG = "unpack.log"
_COPY_BYTES = 64 << 20


@dataclass(frozen=True)
class IndexHandle:
    """What a searcher needs to get a node-local copy of the index."""

    fingerprint: str
    num_docs: int
    nbytes: int
    build_seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    chunks: list[ray.ObjectRef[bytes]] = field(default_factory=list, repr=False)
    # A tar of the index on storage every node can read, instead of the chunks.
    uri: str | None = None
    # The actor that owns the chunks: whoever holds this handle keeps it (and them) alive.
    holder: Any = field(default=None, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "num_docs": self.num_docs,
            "bytes": self.nbytes,
            "build_seconds": round(self.build_seconds, 3),
            "transport": f"shared storage ({self.uri})" if self.uri else "ray object store",
            "uri": self.uri,
            "chunks": len(self.chunks),
            **self.params,
        }

    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in {"chunks", "holder", "uri"}}


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
        text_column: str,
        k1: float,
        b: float,
        chunk_bytes: int,
        share_uri: str | None = None,
        group_column: str | None = None,
        build_key: str | None = None,
    ) -> IndexHandle:
        start = time.perf_counter()
        index_dir = self.workdir / "index"
        # The texts go into Arrow files beside Lucene's (``engines.texts``), moved into the
        # index once Lucene is done, and not into Lucene as well.
        writer = LuceneIndexWriter(
            index_dir, threads=self.threads, heap=self.heap, store_contents=False
        )
        side = TextsWriter(self.workdir / "texts")
        # An order-independent digest of the corpus: the sum of per-document hashes.
        digest = 0
        for batch in corpus.iter_batches(batch_size=4096, batch_format="pyarrow"):
            ids, texts = batch[ID].to_pylist(), batch[text_column].to_pylist()  # type: ignore[union-attr]
            groups = batch[group_column].to_pylist() if group_column else None  # type: ignore[union-attr]
            side.add(writer.add(ids, texts, groups), batch[text_column])
            for i, t, g in zip(ids, texts, groups or [None] * len(ids), strict=True):
                h = hashlib.sha256(f"{i}\0{t}\0{g or ''}".encode()).digest()
                digest = (digest + int.from_bytes(h, "big")) % (1 << 256)
        writer.close()
        side.close()
        for name in (TEXTS_FILE, IDS_FILE):
            os.rename(side.index_dir / name, index_dir / name)
        params = {**index_params(k1, b), "corpus_hash": f"{digest:064x}", "texts": TEXTS_FILE}
        if group_column:  # ids in the index carry their groups (``grouped_docid``)
            params["group_key"] = group_column
        fingerprint = hashlib.sha256(
            json.dumps({"docs": writer.count, **params}, sort_keys=True).encode()
        ).hexdigest()[:24]
        archive = self.workdir / "index.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(index_dir, arcname=".")
        shutil.rmtree(index_dir)
        handle = IndexHandle(
            fingerprint=fingerprint,
            num_docs=writer.count,
            nbytes=archive.stat().st_size,
            build_seconds=time.perf_counter() - start,
            params=params,
        )
        if share_uri:
            handle = replace(handle, uri=_share(archive, handle, share_uri, build_key))
        else:
            handle = replace(handle, chunks=list(_put_chunks(archive, chunk_bytes)))
        archive.unlink()
        return handle


def _put_chunks(archive: Path, chunk_bytes: int) -> Iterator[ray.ObjectRef[bytes]]:
    with archive.open("rb") as f:
        while piece := f.read(chunk_bytes):
            yield ray.put(piece)


def _share(archive: Path, handle: IndexHandle, share_uri: str, build_key: str | None = None) -> str:
    """Copy the tar and its metadata to shared storage; returns the tar's URI. With
    ``build_key``, a record under that key then names the tar (``built_index`` reads it)."""
    fs, root = filesystem(share_uri)
    fs.create_dir(root, recursive=True)
    tar_path = f"{root.rstrip('/')}/{handle.fingerprint}.tar"
    with archive.open("rb") as src, fs.open_output_stream(tar_path) as dst:
        shutil.copyfileobj(src, dst, _COPY_BYTES)
    # The metadata last: its presence says the tar beside it is complete.
    with fs.open_output_stream(f"{root.rstrip('/')}/{handle.fingerprint}.json") as f:
        f.write(json.dumps(handle.metadata(), indent=2).encode())
    uri = f"{share_uri.rstrip('/')}/{handle.fingerprint}.tar" if "://" in share_uri else tar_path
    if build_key:  # last of all: it says the tar and its metadata are complete
        with fs.open_output_stream(_built_record(root, build_key)) as f:
            f.write(json.dumps({"index": uri}).encode())
    return uri  # a local path is absolute, so that every node finds it


def _built_record(root: str, build_key: str) -> str:
    return f"{root.rstrip('/')}/built-{build_key}.json"


def build_key(corpus_key: str, text_column: str, group_column: str | None, k1: float,
              b: float) -> str:  # fmt: skip
    """What names an index before it is built: the corpus (as ``StageContext.corpus_key``
    identifies it), the indexed columns and the index parameters."""
    params = {"corpus": corpus_key, "text": text_column, "group": group_column,
              **index_params(k1, b)}  # fmt: skip
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:24]


def built_index(share_uri: str, key: str) -> IndexHandle | None:
    """The index built earlier under ``key`` in ``share_uri`` (by a run that then died), or
    None when there is none, or it is incomplete."""
    fs, root = filesystem(share_uri)
    try:
        with fs.open_input_stream(_built_record(root, key)) as f:
            return prebuilt_index(json.loads(f.read())["index"])
    except (OSError, FileNotFoundError, KeyError, ValueError):
        return None


def prebuilt_index(uri: str) -> IndexHandle:
    """A handle for an index written earlier to shared storage (``<fingerprint>.tar``)."""
    fs, path = filesystem(uri)
    meta_path = path.removesuffix(".tar") + ".json"
    try:
        with fs.open_input_stream(meta_path) as f:
            meta = json.loads(f.read())
    except (OSError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"prebuilt index {uri!r}: no metadata at {meta_path} (is the tar complete?)"
        ) from e
    return IndexHandle(**meta, uri=uri)


@dataclass
class IndexBuild:
    """An index being built by its holder actor (or a prebuilt one); ``result()`` waits."""

    holder: Any
    ref: ray.ObjectRef[IndexHandle] | None
    prebuilt: IndexHandle | None = None

    @classmethod
    def start(
        cls,
        corpus: ray.data.Dataset,
        text_column: str,
        k1: float,
        b: float,
        chunk_bytes: int,
        heap: str | None = None,
        share_uri: str | None = None,
        group_column: str | None = None,
        build_key: str | None = None,
        threads: int = 1,
    ) -> IndexBuild:
        """Starts the build in a holder actor that indexes on ``threads`` Lucene threads.

        An actor holds what it reserves for its whole life. A builder that writes the index to
        ``share_uri`` is let go once it is built, so it reserves its ``threads`` CPUs. One that
        keeps the index's chunks lives as long as the searchers that read them, so it reserves
        none once placed (Ray's default for an actor): holding even one CPU would leave a
        2-CPU machine's searchers and the tasks that feed them waiting for it forever.
        """
        options = {"num_cpus": threads} if share_uri else {}
        holder = LuceneIndexHolder.options(**options).remote(  # type: ignore[attr-defined]
            heap=heap, threads=threads
        )
        columns = [ID, text_column, *([group_column] if group_column else [])]
        ref = holder.build.remote(
            corpus.select_columns(columns), text_column, k1, b, chunk_bytes, share_uri,
            group_column, build_key,
        )  # fmt: skip
        return cls(holder, ref)

    @classmethod
    def of(cls, handle: IndexHandle) -> IndexBuild:
        return cls(holder=None, ref=None, prebuilt=handle)

    def result(self) -> IndexHandle:
        if self.prebuilt is not None:
            return self.prebuilt
        assert self.ref is not None, "an IndexBuild has a build or a prebuilt index"
        handle = ray.get(self.ref)
        if handle.uri:
            # On shared storage the index needs its builder no more: letting go of the actor
            # gives its CPU back (and no searcher depends on the node it ran on).
            self.holder = None
            return handle
        # The handle carries the holder's (owning) actor handle: searchers that hold it keep
        # the holder, and so the chunks, alive.
        return replace(handle, holder=self.holder)


def resolve_local_dir(local_dir: str) -> Path:
    """The node-local directory: ``{node_id}`` in the setting becomes this node's id."""
    node_id = ray.get_runtime_context().get_node_id() if "{node_id}" in local_dir else ""
    return Path(os.path.expandvars(local_dir.replace("{node_id}", node_id))).expanduser()


def local_index(handle: IndexHandle, local_dir: str | Path, debug_logs: bool = False) -> Path:
    """The node-local directory of ``handle``'s index, unpacked by the first caller only;
    with ``debug_logs`` each unpack adds a line to ``unpack.log`` beside it."""
    root = resolve_local_dir(str(local_dir))
    root.mkdir(parents=True, exist_ok=True)
    target = root / handle.fingerprint
    if target.is_dir():
        return target
    with (root / f"{handle.fingerprint}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not target.is_dir():
                _unpack(handle, root, target, debug_logs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _tar_pieces(handle: IndexHandle) -> Iterator[bytes]:
    if handle.uri:
        fs, path = filesystem(handle.uri)
        with fs.open_input_stream(path) as f:
            while piece := f.read(_COPY_BYTES):
                yield piece
    else:
        for ref in handle.chunks:
            yield ray.get(ref)


def _unpack(handle: IndexHandle, root: Path, target: Path, debug_logs: bool) -> None:
    archive = root / f"{handle.fingerprint}.tar.partial"
    staging = root / f"{handle.fingerprint}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    with archive.open("wb") as f:
        for piece in _tar_pieces(handle):
            f.write(piece)
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    archive.unlink()
    os.rename(staging, target)
    if not debug_logs:
        return
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
