"""``rare-ray bench bm25 --job``: the whole command against plain pyserini (real pyserini).

Both sides run in processes of their own, as the bench runs them for users; the command on a
Ray of 2 CPUs (CI's machine), where the searcher and the Ray tasks that feed it must share
them without waiting on each other forever.
"""

import pyarrow.parquet as pq
import yaml

from rare_ray.bench.bm25_job import plain_job
from tests.helpers import REPO, rare_ray, sample_questions, sample_rows, write_jsonl

ROWS = 120


def _questions_and_texts(tmp_path):
    questions = {q["id"]: q["question"] for q in sample_questions()}
    rows = [{**r, "question": questions[r["id"]]} for r in sample_rows(ROWS)]
    return write_jsonl(tmp_path / "questions.jsonl", rows)


def test_plain_pyserini_mines_negatives_that_are_never_the_rows_own_document(tmp_path):
    path = _questions_and_texts(tmp_path)
    seconds = plain_job(str(REPO / "configs/local.yaml"), str(path), str(tmp_path))
    assert seconds > 0
    table = pq.read_table(tmp_path / "negatives.parquet").to_pylist()
    assert len(table) == ROWS
    for row in table:
        assert len(row["negative_ids"]) <= 3  # num_neg in the local config
        assert row["id"] not in row["negative_ids"]
        assert len(row["negatives"]) == len(row["negative_ids"])
    # A question whose words only its own abstract holds finds fewer: a handful at most.
    assert sum(len(r["negative_ids"]) == 3 for r in table) >= 0.9 * ROWS


def test_the_bench_prints_a_row_per_file_with_the_command_and_the_floor(tmp_path):
    path = _questions_and_texts(tmp_path)
    config = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    config["ray"]["num_cpus"] = 2
    (tmp_path / "two-cpus.yaml").write_text(yaml.safe_dump(config))
    bench = ["bench", "bm25", "--job", str(path), "--config", str(tmp_path / "two-cpus.yaml")]
    result = rare_ray(*bench, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| this tree")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{ROWS:,}"
    ours, plain, ratio = float(cells[2]), float(cells[6]), float(cells[7])
    # The ratio is of the two wall times (printed to 0.1 s, so only near it).
    assert abs(ratio - ours / plain) <= 0.05 * ratio + 0.01
