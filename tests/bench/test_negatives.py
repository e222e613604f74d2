"""``rare-ray bench negatives``, the measurement behind the strict preset (real pyserini).

In a process of its own, as users run it: it starts a JVM without Ray, and a JVM started in
this test process before the session's Ray would be crashed by it (rare_ray/engines/jvm.py).
"""

from rare_ray.config import STRICT_PRESET
from tests.helpers import rare_ray


def test_the_strict_near_duplicate_threshold_separates_own_chunks_from_other_abstracts():
    result = rare_ray("bench", "negatives", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
    }
    abstracts, chunks = rows["abstracts"], rows["chunks"]
    assert abstracts[0] == "1,000" and chunks[0] == "2,510"  # every question, every chunk
    other_max, own_min = float(chunks[2]), float(chunks[4])
    assert max(float(abstracts[2]), other_max) < STRICT_PRESET["near_duplicate"] < own_min
    shares = [float(c.rstrip("%")) for c in chunks[5:]]
    assert shares == sorted(shares, reverse=True)  # a higher margin skips fewer hits
