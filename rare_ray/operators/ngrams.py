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
machine (``ngram_kernels``, ``cache=True``: the first process compiles, about 5 s, and writes
the result beside that module or in numba's per-user cache; later ones load it).
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
    from rare_ray.operators import ngram_kernels as kernels

    return kernels.fingerprint, kernels.compare, kernels.set_of


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
