"""The compiled kernels behind ``rare_ray.engines.texts`` (see there), in a module of their own:
it imports numba, so only a process that opens an index's texts loads it, and its functions
are module-level, the only kind whose compiled code numba's cache finds again in the next
process (kernels defined inside a function and calling one another were compiled anew in
every process).
"""

from typing import Any

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
def hash_of(offsets: Any, data: Any, i: int) -> Any:
    h = np.uint64(14695981039346656037)
    for j in range(offsets[i], offsets[i + 1]):
        h = (h ^ np.uint64(data[j])) * np.uint64(1099511628211)
    return h


@numba.njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
def build(offsets: Any, data: Any) -> Any:
    # Slots hold row + 1 (0: free), at most half of them used.
    n = len(offsets) - 1
    size = 2
    while size < 2 * n:
        size *= 2
    table = np.zeros(size, np.int64)
    mask = np.uint64(size - 1)
    for row in range(n):
        slot = hash_of(offsets, data, row) & mask
        while table[slot] != 0:
            slot = (slot + np.uint64(1)) & mask
        table[slot] = row + 1
    return table


@numba.njit(cache=True, nogil=True)  # type: ignore[untyped-decorator]
def lookup(key_offsets: Any, key_data: Any, table: Any, offsets: Any, data: Any) -> Any:
    mask = np.uint64(len(table) - 1)
    found = np.full(len(key_offsets) - 1, -1, np.int64)
    for k in range(len(key_offsets) - 1):
        start, end = key_offsets[k], key_offsets[k + 1]
        slot = hash_of(key_offsets, key_data, k) & mask
        while table[slot] != 0:
            row = table[slot] - 1
            if offsets[row + 1] - offsets[row] == end - start:
                same = True
                for j in range(end - start):
                    if data[offsets[row] + j] != key_data[start + j]:
                        same = False
                        break
                if same:
                    found[k] = row
                    break
            slot = (slot + np.uint64(1)) & mask
    return found
