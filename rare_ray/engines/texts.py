"""The texts of a Lucene index that rare-ray builds, in Arrow files that searchers memory-map.

Reading a text out of Lucene (``-storeContents``) costs two calls through the JVM bridge and a
Java object handed to Python, about 10 µs a hit. The filters against false negatives read the
text of every candidate they look at (tens a question under ``bm25.preset: strict``), and that
copying was most of what they cost. So the index builder writes the texts into the index
directory as two Arrow files instead: ``TEXTS_FILE``, the texts in record batches as they were
indexed, and ``IDS_FILE``, their ids as the index stores them, in one contiguous column. They
travel with the index (the same tar), every searcher of a node maps the same pages, and a hit's
text is a slice of that mapping: its UTF-8 bytes go to the fingerprint kernels without becoming
a Python string at all, and only the chosen negatives' texts are decoded. In single-process
profiles (the 1,000 sample questions, 20,000 and 100,000 documents) picking negatives went
from 84-125 to 28-41 µs a question with the default filters and from 321-468 to 110-166 µs
with the strict preset. The files are stored uncompressed, so that they can be mapped: at
100,000 documents the index is 88 MB where Lucene with its compressed texts was 62 MB.

A hit is found in the files by its stored id, through an open-addressing hash table that each
searcher builds when it opens them (one pass over the ids, compiled; 8 bytes a slot, at most
half of them used). An index without the files (one built by pyserini, or by an older
rare-ray) is read through Lucene as before.
"""

from __future__ import annotations

from bisect import bisect_right
from functools import cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa

# Lucene leaves files in its directory alone unless their names look like its own (``_*``,
# ``segments*``, ``write.lock``).
TEXTS_FILE = "rare_ray_texts.arrow"  # the texts, in batches as indexed
IDS_FILE = "rare_ray_ids.arrow"  # their stored ids, in one batch: one contiguous column

Bytes = npt.NDArray[np.uint8]
Rows = npt.NDArray[np.int64]


class TextsWriter:
    """Writes the (stored id, text) pairs of an index being built into ``index_dir``."""

    def __init__(self, index_dir: str | Path):
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.index_dir / TEXTS_FILE), "wb")
        self._texts = pa.ipc.new_file(self._sink, pa.schema([("text", pa.large_string())]))
        self._ids: list[pa.Array] = []

    def add(self, docids: list[str], texts: pa.Array | pa.ChunkedArray) -> None:
        column = texts.cast(pa.large_string())
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        self._texts.write_batch(pa.record_batch([column], ["text"]))
        self._ids.append(pa.array(docids, pa.large_string()))

    def close(self) -> None:
        self._texts.close()
        self._sink.close()
        ids = pa.concat_arrays(self._ids) if self._ids else pa.array([], pa.large_string())
        schema = pa.schema([("docid", pa.large_string())])
        with (
            pa.OSFile(str(self.index_dir / IDS_FILE), "wb") as sink,
            pa.ipc.new_file(sink, schema) as writer,
        ):
            writer.write_batch(pa.record_batch([ids], ["docid"]))


class _Strings:
    """A large_string array as numpy views: offsets (int64) and UTF-8 bytes."""

    __slots__ = ("data", "offsets")

    def __init__(self, array: pa.Array):
        _, offsets, data = array.buffers()
        start = array.offset
        self.offsets: Rows = np.frombuffer(offsets, np.int64)[start : start + len(array) + 1]
        self.data: Bytes = (
            np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _mapped(path: Path, column: str) -> list[pa.Array]:
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return list(table[column].chunks)


class IndexTexts:
    """The texts of an index, memory-mapped, found by the ids its hits carry.

    Memory of its own: the hash table, 8-byte slots, two to four per document (256 MiB at 10
    million); the ids and texts are pages of the files, shared by every searcher of the node.
    """

    def __init__(self, index_dir: str | Path):
        index_dir = Path(index_dir)
        (ids,) = _mapped(index_dir / IDS_FILE, "docid") or [pa.array([], pa.large_string())]
        self._ids = _Strings(ids)
        self._texts = [_Strings(chunk) for chunk in _mapped(index_dir / TEXTS_FILE, "text")]
        self._starts = np.cumsum([0] + [len(t) for t in self._texts]).tolist()
        self.num_docs = len(self._ids)
        if self._starts[-1] != self.num_docs:
            raise ValueError(f"{index_dir}: {self.num_docs} ids but {self._starts[-1]} texts")
        build, _ = _kernels()
        self._table: Rows = build(self._ids.offsets, self._ids.data)

    @classmethod
    def of_index(cls, index_dir: str | Path) -> IndexTexts | None:
        """The texts beside the index in ``index_dir``, or None when it has none."""
        index_dir = Path(index_dir)
        if (index_dir / TEXTS_FILE).is_file() and (index_dir / IDS_FILE).is_file():
            return cls(index_dir)
        return None

    def rows(self, docids: list[str]) -> Rows:
        """Each stored id's row, or -1 for an id the file does not hold."""
        keys = _Strings(pa.array(docids, pa.large_string()))
        _, lookup = _kernels()
        return cast(Rows, lookup(keys.offsets, keys.data, self._table, self._ids.offsets,
                                 self._ids.data))  # fmt: skip

    def utf8(self, row: int) -> Bytes:
        """Row ``row``'s text as UTF-8 bytes: a view of the mapping, no copy."""
        chunk = bisect_right(self._starts, row) - 1
        texts = self._texts[chunk]
        i = row - self._starts[chunk]
        return texts.data[texts.offsets[i] : texts.offsets[i + 1]]

    def text(self, row: int) -> str:
        return self.utf8(row).tobytes().decode()


@cache
def _kernels() -> tuple[Any, Any]:
    from rare_ray.engines import text_kernels as kernels

    return kernels.build, kernels.lookup
