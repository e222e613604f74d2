"""The fingerprints' compiled kernels (rare_ray.operators.ngram_kernels) are compiled once per
machine."""

from tests.helpers import numba_cache_use

USE = """
import numpy as np
text = np.frombuffer(b"one two three four five six", np.uint8)
_, grams = fingerprint(text, 2)
compare(text, 2, set_of(grams), False)
"""


def test_a_new_process_loads_every_kernel_from_the_cache() -> None:
    numba_cache_use("rare_ray.operators.ngram_kernels", USE)  # compiles, if nothing has yet
    used = numba_cache_use("rare_ray.operators.ngram_kernels", USE)
    # Each kernel the calls reach, loaded and not compiled (``fingerprint`` and ``compare``
    # call ``grams_of``: defined inside a function, such kernels missed the cache each time).
    assert {"fingerprint", "compare", "set_of"} <= used.keys()
    assert all(misses == 0 for _, misses in used.values()), used
    assert all(used[k][0] >= 1 for k in ("fingerprint", "compare", "set_of"))
