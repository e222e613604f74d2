"""The texts' compiled kernels (rare_ray.engines.text_kernels) are compiled once per machine."""

from tests.helpers import numba_cache_use

USE = """
import numpy as np
offsets, data = np.array([0, 1, 3], np.int64), np.frombuffer(b"abc", np.uint8)
lookup(offsets, data, build(offsets, data), offsets, data)
"""


def test_a_new_process_loads_every_kernel_from_the_cache() -> None:
    numba_cache_use("rare_ray.engines.text_kernels", USE)  # compiles, if nothing has yet
    used = numba_cache_use("rare_ray.engines.text_kernels", USE)
    # Each kernel the calls reach, loaded and not compiled: a kernel that calls another and
    # missed the cache cost every searcher and index builder seconds of compiling.
    assert {"build", "lookup"} <= used.keys()
    assert all(misses == 0 for _, misses in used.values()), used
    assert used["build"][0] >= 1 and used["lookup"][0] >= 1
