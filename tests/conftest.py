"""Shared fixtures: one local Ray per test session, the test model, the sample corpus."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml

from rare_ray.config import RunConfig
from rare_ray.io.readers import SAMPLE_CORPUS, SAMPLE_QUESTIONS

REPO = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = REPO / "configs" / "local.yaml"
TEST_MODEL = REPO / "models" / "tiny-llama"


@pytest.fixture(scope="session")
def test_model() -> Path:
    """The local test model (built once, as `rare-ray build-test-model` would)."""
    if not (TEST_MODEL / "config.json").is_file():
        from rare_ray.testing.tiny_llama import build_tiny_llama

        build_tiny_llama(TEST_MODEL)
    return TEST_MODEL


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A private local Ray with the local config's settings; never attaches to another one."""
    settings = yaml.safe_load(LOCAL_CONFIG.read_text())["ray"]
    ray.init(
        address="local",
        num_cpus=settings["num_cpus"],
        runtime_env=settings["runtime_env"],
        include_dashboard=False,
    )
    yield
    ray.shutdown()


def local_config_in(tmp_path: Path, test_model: Path) -> RunConfig:
    """The local config, writing under ``tmp_path``, with small generation budgets."""
    data = yaml.safe_load(LOCAL_CONFIG.read_text())
    data["output"] = str(tmp_path / "out")
    data["engine"]["model"] = str(test_model)
    data["doc2query"]["sampling"]["max_tokens"] = 320
    data["doc2query"]["max_field_chars"] = 120
    data["distill"]["sampling"]["max_tokens"] = 64
    data["bm25"]["local_dir"] = str(tmp_path / "indexes")
    return RunConfig.model_validate(data)


@pytest.fixture
def local_config(tmp_path: Path, test_model: Path) -> RunConfig:
    return local_config_in(tmp_path, test_model)


def sample_rows(n: int | None = None) -> list[dict]:
    with SAMPLE_CORPUS.open() as f:
        rows = [json.loads(line) for line in f]
    return rows[:n] if n else rows


def sample_questions() -> list[dict]:
    with SAMPLE_QUESTIONS.open() as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
