"""Keys given through the environment never appear in the manifest, logs or output.

The job runs as a user runs it (the ``rare-ray`` command in its own process, a private local
Ray) with ``engine.kind: openai``, against tests/scripted_server.py's ScriptedServer standing in
for a hosted API (the test double: no hosted API can be reached from a test), reading its input
from and writing its output to the tests' real S3-compatible server (rare_ray/testing/object_store.py),
whose keys come from the ``AWS_*`` variables as pyarrow and boto users give them. The server answers only
requests that carry the key, and for one document answers "401: bad key Bearer <the key>", as
some APIs do, so the key comes back to the client inside an error that ends up in a reject.

Then neither the API key nor the S3 secret key may be anywhere in: manifest.json; any object
under the output prefix (copied back, Parquet scanned as raw bytes and as decoded values, since
pages are compressed) and the BM25 index
directory; the driver's stdout and stderr; any file of the Ray session directory (logs of the
raylet, GCS, workers, actors, Ray Data and the runtime-env agent), which the driver looks up
through Ray's own API (``ray._private.worker._global_node.get_session_dir_path()``) after the
run and writes to a file for the test.

The documented way in is the driver's environment (a whole run, in the default suite). The
other, the config's ``ray.runtime_env.env_vars``, would put the key in Ray's own runtime-env
agent log, so the config refuses it before anything starts.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from rare_ray.testing.object_store import S3Server
from tests.helpers import REPO, local_config_in, rare_ray, sample_rows, write_jsonl
from tests.scripted_server import Reply, ScriptedServer, answer, failure

ECHO = "Please echo the key back"  # in one document: the server answers it with the key


def new_key() -> str:
    return "sk-rare-ray-" + secrets.token_hex(20)


def hosted_api(key: str) -> ScriptedServer:
    """Answers Doc2Query (JSON) and ReasonDistill (text); 401 without the key."""

    def reply(body: dict[str, Any]) -> Reply:
        auth = server.requests[-1]["headers"].get("Authorization", "")
        prompt = json.dumps(body["messages"])
        if auth != f"Bearer {key}":
            return failure(401, "Incorrect API key provided")
        if ECHO in prompt:
            return failure(401, f"bad key {auth}")
        if "response_format" in body and "verdict" in json.dumps(body["response_format"]):
            return answer(json.dumps({"reason": "Same.", "verdict": "agrees"}), tokens=8)
        if "response_format" in body:  # Doc2Query's JSON schema
            text = json.dumps(
                {"question": "What does it show?", "scenario": "A reader asks.", "answer": "It."}
            )
            return answer(text, tokens=20)
        return answer("<think>Document 1 is the one.</think> Document 1.", tokens=20)

    server = ScriptedServer(reply)
    return server


# Like `python -m rare_ray.cli`, then the session directory from Ray's API, for the test.
DRIVER = """
import sys
import ray
from rare_ray.cli import main
code = main(sys.argv[2:])
node = ray._private.worker._global_node
with open(sys.argv[1], "w") as f:
    f.write(node.get_session_dir_path() if node is not None else "")
sys.exit(code)
"""


def run_driver(
    tmp: Path, *args: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess, Path | None]:
    """The command, and the session directory of the Ray it started (None if it started
    none: a rerun with nothing to do)."""
    session_file = tmp / "session-dir.txt"
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(session_file), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    if not session_file.read_text():
        return result, None
    session = Path(session_file.read_text())
    assert (session / "logs").is_dir(), session
    return result, session


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():  # not sockets, not links out
                yield path


def where_is(needle: str, roots: list[Path], texts: dict[str, str]) -> list[str]:
    """Every file under ``roots`` and every named text that holds ``needle``."""
    raw = needle.encode()
    found = [name for name, text in texts.items() if needle in text]
    for path in files_under(*roots):
        try:
            data = path.read_bytes()
        except OSError:
            continue  # gone while scanning (a log rotated away)
        if raw in data:
            found.append(str(path))
        elif path.suffix == ".parquet" and needle in json.dumps(
            pq.read_table(path).to_pylist(), default=str
        ):
            found.append(f"{path} (decoded)")
    return found


def config_file(tmp: Path, test_model: Path, base_url: str, key_env: str) -> dict[str, Any]:
    config = local_config_in(tmp, test_model).model_dump(mode="json")
    config["engine"] = {
        "kind": "openai",
        "base_url": base_url,
        "model": "hosted-model",
        "api_key_env": key_env,
        "tokenizer": str(test_model),
        "max_model_len": 8192,
        "seed_requests": False,
        "max_retries": 1,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 60,
    }
    config["doc2query"]["max_doc_tokens"] = 512
    # One ask: the echo document's 401 would come back on every re-ask (tests/operators/
    # test_doc2query_reask.py is where re-asking is tested).
    config["doc2query"]["max_attempts"] = 1
    config["distill"]["max_doc_tokens"] = 256
    return config


def corpus(tmp: Path) -> Path:
    rows = [{"id": r["id"], "text": r["text"]} for r in sample_rows(8)]
    rows.append({"id": "echo", "text": f"{ECHO}. " + sample_rows(9)[-1]["text"]})
    return write_jsonl(tmp / "corpus.jsonl", rows)


def scrubbed_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RARE_RAY_TEST")}
    return {**env, **extra}


def test_a_key_in_the_environment_is_nowhere_but_in_the_requests(
    tmp_path: Path, test_model: Path, s3_server: S3Server
) -> None:
    key, key_env = new_key(), "RARE_RAY_TEST_API_KEY"
    s3 = s3_server.filesystem()
    prefix = f"{s3_server.bucket}/secrets-{tmp_path.name}"
    with s3.open_output_stream(f"{prefix}/corpus.jsonl") as f:
        f.write(corpus(tmp_path).read_bytes())
    env = scrubbed_env(**{key_env: key}, **s3_server.env())
    with hosted_api(key) as server:
        config = config_file(tmp_path, test_model, server.base_url, key_env)
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        command = [
            "run", "--config", str(tmp_path / "config.yaml"),
            "--input", f"s3://{prefix}/corpus.jsonl", "--output", f"s3://{prefix}/out",
        ]  # fmt: skip
        result, session = run_driver(tmp_path, *command, env=env)
        written = objects(s3, f"{prefix}/out")
        # The same command again: everything is committed and published, so it starts no Ray
        # and no object changes.
        again, no_session = run_driver(tmp_path, *command, env=env)
    assert session is not None and no_session is None
    assert "nothing to write" in again.stdout
    assert objects(s3, f"{prefix}/out") == written
    # data/ read back through pyarrow's S3 filesystem: every kept id once.
    data = pads.dataset(f"{prefix}/out/data", filesystem=s3, format="parquet", partitioning="hive")
    ids = data.to_table(columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 8

    out = tmp_path / "out"  # the output prefix, copied back to scan it
    pafs.copy_files(f"{prefix}/out", str(out), source_filesystem=s3)
    # The key did its job: every request carried it, and one error came back with it.
    assert server.requests
    assert all(r["headers"]["Authorization"] == f"Bearer {key}" for r in server.requests)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["output_rows"] == 8 and manifest["counts"]["rejected_rows"] == 1
    [reject] = pq.read_table(out / "rejects" / "stage=doc2query").to_pylist()
    assert reject["id"] == "echo"
    assert reject["reason"].startswith("engine error: HTTP 401: bad key Bearer <redacted>")

    roots = [out, Path(config["bm25"]["local_dir"]), session]
    texts = {"stdout": result.stdout + again.stdout, "stderr": result.stderr + again.stderr}
    for secret in (key, key.removeprefix("sk-rare-ray-"), s3_server.secret_key):
        assert where_is(secret, roots, texts) == []  # nor a piece of the API key
    # The scan did look at this run's files: its Ray Data logs and output are there.
    assert where_is("MapBatches(EngineWorker)", [session / "logs"], {})
    assert where_is("hosted-model", [out / "manifest.json"], {})
    assert where_is("What does it show?", [out / "data"], {})


def objects(s3: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` (relative name -> modification time in ns)."""
    listing = s3.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return {
        info.path[len(prefix) + 1 :]: info.mtime_ns
        for info in listing
        if info.type == pafs.FileType.File
    }


# Through the config's runtime_env: Ray's runtime-env agent logs every runtime env it creates,
# env_vars and all, at INFO (Ray 2.60), so a key there would be in Ray's logs whatever we do.
# The config refuses it before anything starts, under the engine's variable or any name that
# looks like a secret's.
@pytest.mark.parametrize("name", ["RARE_RAY_TEST_GATEWAY_KEY", "HF_TOKEN", "OTHER_API_KEY"])
def test_a_key_in_the_runtime_env_is_refused_before_anything_starts(
    tmp_path: Path, test_model: Path, name: str
) -> None:
    key = new_key()
    config = config_file(tmp_path, test_model, "http://127.0.0.1:9", "RARE_RAY_TEST_GATEWAY_KEY")
    config["ray"]["runtime_env"]["env_vars"][name] = key
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = rare_ray("run", "--config", str(tmp_path / "config.yaml"))
    assert result.returncode == 2
    assert f"ray.runtime_env.env_vars holds {name}" in result.stderr
    assert "Traceback" not in result.stderr and key not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()
