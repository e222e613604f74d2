"""`rare-ray bench llm` and `bench pipeline` on the real CPU engine, at a tiny size.

Structure only: timings on a shared 2-core machine prove nothing in a test. The bench runs in
a subprocess of its own, as a user runs it: it shuts Ray down and starts its own, which must
not touch the test session's Ray.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import LOCAL_CONFIG, REPO


def _small_config(tmp_path: Path, test_model: Path) -> Path:
    data = yaml.safe_load(LOCAL_CONFIG.read_text())
    data["engine"]["model"] = str(test_model)
    data["engine"]["batch_size"] = 4
    data["doc2query"]["sampling"]["max_tokens"] = 320
    data["doc2query"]["max_field_chars"] = 120
    data["distill"]["sampling"]["max_tokens"] = 32
    data["distill"]["max_doc_tokens"] = 256
    data["bm25"]["local_dir"] = str(tmp_path / "indexes")
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rare_ray.cli", "bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _check_comparison(result: dict, stage: str, docs: int) -> None:
    assert result["stage"] == stage
    bare, ray = result["bare"], result["ray"]
    assert bare["rows"] == ray["rows"] == docs
    assert bare["output_tokens"] > 0 and ray["output_tokens"] > 0
    assert ray["errors"] == 0
    # Both sides were sent the same prompts, token for token.
    assert bare["prompt_tokens"] == ray["prompt_tokens"] > 0
    for side in (bare, ray):
        assert side["generate_s"] > 0 and side["engine_start_s"] > 0
        assert math.isfinite(side["tokens_per_s"]) and side["tokens_per_s"] > 0
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0


def _bench_llm(config: Path, stage: str, tmp_path: Path) -> str:
    """Runs ``bench llm`` over 6 rows of ``stage``, checks its result; returns its stdout."""
    out = tmp_path / f"llm-{stage}.json"
    proc = _bench("llm", "--config", str(config), "--docs", "6", "--stages", stage,
                  "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = json.loads(out.read_text())
    _check_comparison(result, stage, 6)
    return proc.stdout


@pytest.mark.slow  # two engine starts and a warm-up for 6 rows: a bench, not a check
def test_bench_llm_doc2query(tmp_path: Path, test_model: Path) -> None:
    stdout = _bench_llm(_small_config(tmp_path, test_model), "doc2query", tmp_path)
    assert "| doc2query | 6 |" in stdout


@pytest.mark.slow
def test_bench_llm_distill_and_pipeline(tmp_path: Path, test_model: Path) -> None:
    config = _small_config(tmp_path, test_model)
    _bench_llm(config, "distill", tmp_path)

    out = tmp_path / "pipeline.json"
    proc = _bench("pipeline", "--config", str(config), "--sizes", "10", "20",
                  "--output", str(tmp_path / "runs"), "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    sizes = json.loads(out.read_text())
    assert [s["docs"] for s in sizes] == [10, 20]
    for s in sizes:
        assert s["output_rows"] + s["rejected_rows"] == s["docs"]
        assert set(s["seconds"]) >= {"ingest", "doc2query", "bm25", "distill", "publish"}
        assert s["engine_starts"] == 1  # one replica for both stages and every re-ask
        assert 0 < s["first_token_s"] < s["wall_s"] and 0 < s["busy_fraction"] <= 1
        bare = s["bare"]
        assert min(bare["doc2query_s"], bare["bm25_s"], bare["distill_s"]) > 0
        assert 0 < s["efficiency"] < 1  # the bare engines are faster than the whole job
