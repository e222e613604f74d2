"""What the test modules share: the repository's paths, the sample corpus, the local config,
and the ``rare-ray`` command run as a user runs it.

Plain functions and constants, imported by the test modules (``from tests.helpers import ...``);
the fixtures built on them are in tests/conftest.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from rare_ray.config import RunConfig
from rare_ray.engines.contract import Generation, Render
from rare_ray.io.readers import SAMPLE_CORPUS, SAMPLE_QUESTIONS

REPO = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = REPO / "configs" / "local.yaml"
TEST_MODEL = REPO / "models" / "tiny-llama"


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


def stage_settings(config: RunConfig, stage: str) -> dict:
    """What a stage's output depends on ('ingest' or a stage name), as the pipeline records it."""
    from rare_ray.operators import build_operators

    if stage == "ingest":
        return config.ingest_settings()
    (op,) = build_operators(config, [stage])  # type: ignore[list-item]
    return op.settings()


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


def rare_ray(
    *args: str, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The ``rare-ray`` command in a process of its own, from the repository root.

    ``env``: the process's whole environment (as ``subprocess.run`` takes it); by default
    this process's."""
    return subprocess.run(
        [sys.executable, "-m", "rare_ray.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def numba_cache_use(module: str, calls: str) -> dict[str, tuple[int, int]]:
    """Runs ``calls`` in a new Python process after ``from <module> import *``; returns each of
    the module's compiled kernels' cache (hits, misses) there: what a Ray worker that starts
    and uses them pays."""
    script = (
        f"import json, {module} as m\nfrom {module} import *\n{calls}\n"
        "print(json.dumps({k: [sum(f.stats.cache_hits.values()), "
        "sum(f.stats.cache_misses.values())] for k, f in vars(m).items() "
        "if hasattr(f, 'stats') and hasattr(f, 'py_func')}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {k: (hits, misses) for k, (hits, misses) in json.loads(done.stdout).items()}


class ScriptedClient:
    """A test double for an engine client (``rare_ray.engines.contract.Client``), for the
    operators' own logic: answers every request at once with ``reply(row, messages,
    sampling)`` and records each request as ``(row id, messages, sampling)``."""

    def __init__(self, reply: Callable[[dict, list, dict], Generation]):
        self.reply = reply
        self.asked: list[tuple[Any, list, dict]] = []

    async def generate(self, rows: Sequence[dict[str, Any]], render: Render) -> list[Generation]:
        answers = []
        for row in rows:
            messages, sampling = render(row, lambda text, _: text)
            self.asked.append((row.get("id"), messages, sampling))
            answer = self.reply(row, messages, sampling)
            answer.messages = messages  # as a real client gives back the rendered request
            answers.append(answer)
        return answers
