"""The job as users start it: `ray job submit` against a real Ray head on this machine.

The head gets its own temp dir and ports, and is stopped by the test through its own process
ids (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest
import yaml

from tests.helpers import LOCAL_CONFIG, REPO

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    # A short path: Ray's unix sockets live under it.
    temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    dashboard = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Every port its own: another Ray on this machine (the test session's) holds the defaults,
    # and a job agent that cannot bind its port never registers ("No available agent").
    ports = {
        flag: str(_free_port())
        for flag in ("--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--metrics-export-port", "--runtime-env-agent-port",
                     "--ray-client-server-port", "--node-manager-port", "--object-manager-port")
    }  # fmt: skip
    start = [
        str(BIN / "ray"), "start", "--head", "--temp-dir", temp_dir, "--num-cpus", "8",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--include-dashboard", "true", "--disable-usage-stats",
        *(part for flag, port in ports.items() for part in (flag, port)),
    ]  # fmt: skip
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        processes = _own_processes(temp_dir)
        for p in processes:
            p.terminate()
        _, alive = psutil.wait_procs(processes, timeout=20)
        for p in alive:
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_local_job(ray_head, tmp_path, test_model):
    address, env = ray_head
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["input"] = str(REPO / config["input"])
    config["engine"]["model"] = str(test_model)
    config["bm25"]["local_dir"] = str(tmp_path / "indexes")
    config["distill"]["sampling"]["max_tokens"] = 64
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--",
        "rare-ray", "run", "--config", str(tmp_path / "job.yaml"), "--limit", "20",
        "--output", str(out),
    ]  # fmt: skip
    for _ in range(12):  # the head's job agent registers a few seconds after `ray start`
        result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in result.stdout + result.stderr:
            break
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    data = pads.dataset(out / "data", format="parquet", partitioning="hive").to_table()
    assert data.num_rows + pads.dataset(out / "rejects", partitioning="hive").count_rows() == 20
    assert {"question", "hard_negatives", "reasoning", "split"} <= set(data.column_names)
