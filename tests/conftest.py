"""Shared fixtures: one local Ray per test session, the test model, the local config, an API key,
and a real S3-compatible object store.

The plain helpers they build on are in tests/helpers.py (the scripted chat-completions server
in tests/scripted_server.py, the object store in rare_ray/testing/object_store.py); test modules import
those from there, not from here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml

from rare_ray.config import RunConfig
from rare_ray.testing.object_store import S3Server, running_s3_server
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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server (loopback, random keys, one bucket) for the whole session.

    Tests share its bucket: each writes under a prefix of its own (``s3_prefix``)."""
    with running_s3_server(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


@pytest.fixture
def s3_prefix(tmp_path: Path) -> str:
    """A key prefix no other test of the session uses (the name of the test's tmp_path)."""
    return tmp_path.name


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3_server``'s endpoint and keys in this process's environment, and no other AWS_*
    variable (a developer's own profile or keys must not leak into a test)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A cache of `datasets` of the suite's own (read when `datasets` is imported, so set here):
# loads must prove themselves, not hit what an earlier session cached for a same-named path.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="rare-ray-hf-datasets-")
