"""Fingerprints of texts for the negatives' filters, compiled with numba.

One pass over a text's UTF-8 bytes gives both what the filters compare:
- ``text_hash``: a hash of its words in order, so that two texts that differ only in
  whitespace hash alike (the reference's "identical text" rule);
- ``grams``: the sorted, distinct hashes of its word n-grams, ASCII letters lower-cased (the
  near-duplicate filter's sets; a text of fewer than n words is one n-gram).
Words are the runs of bytes above ASCII space. The hashes are 64-bit (FNV-1a per word, then
polynomial): among the few texts one row compares, a collision is never expected.

Why compiled: the near-duplicate filter fingerprints every candidate it looks at, and on a
corpus full of near-copies that is tens of candidates a question. In Python (split into word
objects, hash their n-grams, intersect sets) it cost about 90 µs a candidate of 200 words and
took the strict preset to 0.73 of the default settings' throughput at 100,000 documents; here
a candidate costs about 4 µs, and the same bench gives 0.85 (BENCHMARKS.md). Compiled once per
machine (``cache=True``: the first process compiles, a few seconds, and writes the result
beside this module or in numba's per-user cache; later ones load it in about 1.5 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, cast

import numpy as np
import numpy.typing as npt

Grams = npt.NDArray[np.uint64]
Bytes = npt.NDArray[np.uint8]
_NO_GRAMS: Grams = np.empty(0, np.uint64)


@dataclass(frozen=True)
class TextPrint:
    text_hash: int
    grams: Grams

    @cached_property
    def lookup(self) -> Grams:
        """``grams`` as a hash set, for ``compare``: built once, probed by every candidate."""
        return cast(Grams, _kernels()[2](self.grams))

    @property
    def has_zero(self) -> bool:
        return bool(self.grams.size and self.grams[0] == 0)


@cache
def _kernels() -> tuple[Any, Any, Any]:
    import numba

    @numba.njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
    def grams_of(text: Any, n: int) -> Any:
        # (text_hash, the hashes of its n-grams in order, repeats kept).
        offset = np.uint64(14695981039346656037)
        prime = np.uint64(1099511628211)
        words = np.empty(len(text) // 2 + 1 if n else 0, np.uint64)
        count = 0
        text_hash = offset
        h = folded = offset
        in_word = False
        for byte in text:
            if byte <= 32:
                if in_word:
                    text_hash = (text_hash ^ h) * prime
                    if n:
                        words[count] = folded
                    count += 1
                    in_word = False
                    h = folded = offset
                continue
            h = (h ^ np.uint64(byte)) * prime
            if n:
                low = byte + 32 if 65 <= byte <= 90 else byte
                folded = (folded ^ np.uint64(low)) * prime
            in_word = True
        if in_word:
            text_hash = (text_hash ^ h) * prime
            if n:
                words[count] = folded
            count += 1
        if not n or count == 0:
            return text_hash, np.empty(0, np.uint64)
        width = min(n, count)
        grams = np.empty(count - width + 1, np.uint64)
        for i in range(count - width + 1):
            g = np.uint64(0)
            for j in range(width):
                g = (g * np.uint64(1000003)) ^ words[i + j]
            grams[i] = g
        return text_hash, grams

    @numba.njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
    def fingerprint(text: Any, n: int) -> Any:
        text_hash, grams = grams_of(text, n)
        return text_hash, np.unique(grams)

    @numba.njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
    def set_of(grams: Any) -> Any:
        # An open-addressing hash set of ``grams`` (distinct; 0 marks a free slot, so a gram
        # that is 0 itself is not stored: ``compare`` is told of it apart).
        size = 1
        while size < 2 * len(grams):
            size *= 2
        table = np.zeros(size, np.uint64)
        mask = np.uint64(size - 1)
        for g in grams:
            slot = g & mask
            while table[slot] != 0:
                slot = (slot + np.uint64(1)) & mask
            table[slot] = g
        return table

    @numba.njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
    def compare(text: Any, n: int, other: Any, other_has_zero: bool) -> Any:
        # (text_hash, its distinct n-grams, how many of them the set ``other`` holds): a
        # small hash set finds the distinct ones, a probe of ``other`` each one's match. (A
        # binary search of the sorted grams instead cost more than the rest of the pass.)
        text_hash, grams = grams_of(text, n)
        size = 1
        while size < 2 * len(grams):
            size *= 2
        table = np.empty(size, np.uint64)
        used = np.zeros(size, np.bool_)
        other_mask = np.uint64(len(other) - 1)
        distinct = shared = 0
        for g in grams:
            slot = g & np.uint64(size - 1)
            while used[slot] and table[slot] != g:
                slot = (slot + np.uint64(1)) & np.uint64(size - 1)
            if used[slot]:
                continue
            used[slot] = True
            table[slot] = g
            distinct += 1
            if g == 0:
                shared += other_has_zero
                continue
            probe = g & other_mask
            while other[probe] != 0:
                if other[probe] == g:
                    shared += 1
                    break
                probe = (probe + np.uint64(1)) & other_mask
        return text_hash, distinct, shared

    return fingerprint, compare, set_of


def text_print(text: str, n: int = 0) -> TextPrint:
    """``text``'s hash and, for ``n`` > 0, its distinct word ``n``-grams, sorted."""
    fingerprint, _, _ = _kernels()
    text_hash, grams = fingerprint(np.frombuffer(text.encode(), np.uint8), n)
    return TextPrint(int(text_hash), grams if n else _NO_GRAMS)


def compare(text: str | Bytes, n: int, other: TextPrint) -> tuple[int, int, int]:
    """``text``'s hash, how many distinct word ``n``-grams it has, and how many of those
    ``other`` has: what the filters need of a candidate, in one pass. ``text`` may be its
    UTF-8 bytes already (``Hit.utf8``)."""
    _, kernel, _ = _kernels()
    array = np.frombuffer(text.encode(), np.uint8) if isinstance(text, str) else text
    text_hash, distinct, shared = kernel(array, n, other.lookup, other.has_zero)
    return int(text_hash), int(distinct), int(shared)
