"""The compiled kernels behind ``rare_ray.operators.ngrams`` (see there), in a module of their
own: it imports numba, so only a process that fingerprints texts loads it, and its functions
are module-level, the only kind whose compiled code numba's cache finds again in the next
process (a kernel defined inside a function that calls another such kernel missed the cache
every time: each process compiled it anew, about 5 s, and left one more copy in the cache).
"""

from typing import Any

import numba
import numpy as np


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
