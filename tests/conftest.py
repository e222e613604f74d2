"""Shared fixtures: one local Ray per test session, the test model, the local config, an API key.

The plain helpers they build on are in tests/helpers.py (and the scripted chat-completions
server in tests/scripted_server.py); test modules import those from there, not from here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml

from rare_ray.config import RunConfig
from tests import scripted_server
from tests.helpers import LOCAL_CONFIG, TEST_MODEL, local_config_in


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


@pytest.fixture
def local_config(tmp_path: Path, test_model: Path) -> RunConfig:
    return local_config_in(tmp_path, test_model)


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The key ``tests.scripted_server.engine_for``'s config reads, set in the environment."""
    monkeypatch.setenv(scripted_server.KEY_ENV, scripted_server.KEY)
    return scripted_server.KEY


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
