"""``rare-ray bench bm25 --sizes``: the stage through Ray, default and strict, against plain
pyserini, on a local Ray of 2 CPUs (CI's machine), where the searchers and the tasks that feed
them must share the CPUs without waiting on each other forever."""

import pytest

from tests.helpers import rare_ray


# A bench, three runs of the stage at a tiny size. The default suite checks what it guards in
# test_bm25_job.py: the whole command on a Ray of 2 CPUs, searcher and feeding tasks beside.
@pytest.mark.slow
def test_the_bench_completes_on_two_cpus_and_prints_a_row_per_size():
    result = rare_ray(
        "bench",
        "bm25",
        "--sizes",
        "1000",
        "--repeats",
        "1",
        "--rounds",
        "1",
        "--num-cpus",
        "2",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| 1,000 |")]
    cells = [float(c.strip().replace(",", "")) for c in row.strip("|").split("|")]
    docs, build_s, build_rate, stage_qps, plain_qps, per_cpu, strict_qps, strict_ratio = cells
    assert docs == 1000 and build_s > 0 and build_rate > 0
    assert stage_qps > 0 and plain_qps > 0 and strict_qps > 0
    assert per_cpu > 0 and strict_ratio > 0
