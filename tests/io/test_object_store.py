"""Input and output on a real S3-compatible server (SeaweedFS, rare_ray/testing/object_store.py).

Endpoint and keys come from the environment only, as pyarrow and boto users keep them; a
wrong endpoint, a missing bucket or refused keys stop ``rare-ray run`` before any engine or
Ray starts, with one line that says what and where, and no key in it.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rare_ray.io.readers import check_input, list_input_files
from rare_ray.testing.object_store import S3Server, environment_with, free_ports
from rare_ray.vocabulary import REDACTED, _s3_with_retries, filesystem, storage_problem, store_of
from tests.helpers import LOCAL_CONFIG, rare_ray, sample_rows

TEXT = {"text": "text"}


def _round_trip(server: S3Server, prefix: str) -> None:
    """Parquet and JSONL written through ``filesystem()``, checked as input and read back
    through it, and through a filesystem given the server's keys explicitly (so they did
    reach that server)."""
    table = pa.table({"id": ["a", "b"], "text": ["first document", "second document"]})
    fs, path = filesystem(server.uri(prefix, "parquet", "rows.parquet"))
    assert store_of(fs) == f"S3 endpoint {server.endpoint}"
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    check_input(server.uri(prefix, "parquet"), TEXT, "id")

    fs, path = filesystem(server.uri(prefix, "json", "corpus.jsonl"))
    with fs.open_output_stream(path) as f:
        f.write("".join(json.dumps(r) + "\n" for r in table.to_pylist()).encode())
    check_input(server.uri(prefix, "json"), TEXT, "id")
    assert list_input_files(server.uri(prefix, "json"))[1] == [path]

    direct = server.filesystem()
    key = f"{server.bucket}/{prefix}"
    assert pq.read_table(f"{key}/parquet/rows.parquet", filesystem=direct).equals(table)
    with direct.open_input_stream(f"{key}/json/corpus.jsonl") as f:
        assert [json.loads(line) for line in f.read().splitlines()] == table.to_pylist()


def test_parquet_and_jsonl_round_trip_with_endpoint_and_keys_from_the_environment(
    s3_env, s3_prefix
):
    _round_trip(s3_env, s3_prefix)


def test_the_filesystem_pickles_as_ray_ships_it_to_workers(s3_env, s3_prefix):
    fs, path = filesystem(s3_env.uri(s3_prefix, "x.txt"))
    with fs.open_output_stream(path) as f:
        f.write(b"x")
    shipped = pickle.loads(pickle.dumps(fs))  # the endpoint travels; the keys do not
    assert s3_env.secret_key.encode() not in pickle.dumps(fs)
    assert shipped.get_file_info(path).size == 1


def test_service_specific_endpoint_alone_works_and_wins(s3_env, s3_prefix, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    _round_trip(s3_env, s3_prefix)
    # As in boto3, AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL.
    (closed,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    fs, path = filesystem(s3_env.uri(s3_prefix, "parquet", "rows.parquet"))
    assert pq.read_table(path, filesystem=fs).num_rows == 2


def test_an_s3_filesystem_without_endpoint_takes_the_environments(s3_env, monkeypatch):
    """What ``filesystem()`` does where a pyarrow's ``from_uri`` ignores the variables."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    fs = _s3_with_retries(pafs.S3FileSystem(region="us-east-1"))
    assert store_of(fs) == f"S3 endpoint {s3_env.endpoint}"
    assert fs.get_file_info(s3_env.bucket).type == pafs.FileType.Directory


def test_a_refused_connection_fails_in_seconds(s3_env, monkeypatch):
    """pyarrow's standard retries (backoff of at most 1 s, then 2 s), not ``from_uri``'s
    AWS SDK default, which took 6 s a call here."""
    (closed,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    fs, path = filesystem(s3_env.uri("anything"))
    start = time.perf_counter()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        fs.get_file_info(path)
    assert time.perf_counter() - start < 5


def test_storage_problem_says_where_in_one_line_and_never_shows_a_key(s3_env, monkeypatch):
    """What the output check's message is built from (a missing bucket, refused keys)."""
    fs, path = filesystem(f"s3://no-such-bucket-{secrets.token_hex(4)}/out")
    with pytest.raises(OSError) as missing:
        fs.create_dir(path, recursive=True)
    said = storage_problem(missing.value, fs)
    assert "not found" in said and "create it, or name another" in said
    assert said.endswith(f"(S3 endpoint {s3_env.endpoint})")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secrets.token_urlsafe(24))
    fs, path = filesystem(s3_env.uri("out"))
    with pytest.raises(OSError) as refused:
        fs.get_file_info(path)
    said = storage_problem(refused.value, fs)
    assert "ACCESS_DENIED" in said and "AWS_SECRET_ACCESS_KEY right" in said
    assert "\n" not in said

    leaky = OSError(f"signed with {s3_env.access_key}:\n{os.environ['AWS_SECRET_ACCESS_KEY']}")
    assert storage_problem(leaky, fs).startswith(f"signed with {REDACTED}: {REDACTED} (S3 ")


# The refusals, through the real command ------------------------------------------------------


def _refused(server: S3Server, case: str) -> tuple[dict[str, str], str, str]:
    """The environment and bucket of a refusal, and the endpoint the message must name."""
    env, bucket = server.env(), server.bucket
    if case == "closed endpoint":
        (port,) = free_ports(1)  # nothing listens there
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    elif case == "missing bucket":
        bucket = f"no-such-bucket-{secrets.token_hex(4)}"
    else:  # keys refused
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-" + secrets.token_urlsafe(24)
    return env, bucket, env["AWS_ENDPOINT_URL"]


def _run_refused(server: S3Server, env: dict[str, str], *args: str) -> str:
    """``rare-ray run`` that must stop at once; its one line of stderr."""
    start = time.perf_counter()
    result = rare_ray("run", "--config", str(LOCAL_CONFIG), *args, env=environment_with(env))
    elapsed = time.perf_counter() - start
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert "Traceback" not in said
    for key in {server.secret_key, server.access_key, env["AWS_SECRET_ACCESS_KEY"]}:
        assert key not in said
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rare-ray: "), result.stderr
    assert elapsed < 30, f"{elapsed:.1f} s"  # no Ray, no engine; pyarrow's retries kept short
    return lines[0]


CASES = ["closed endpoint", "missing bucket", "wrong secret"]


@pytest.mark.parametrize("case", CASES)
def test_output_on_s3_refused_stops_the_run_with_one_line(s3_server, s3_prefix, case):
    env, bucket, _ = _refused(s3_server, case)
    output = f"s3://{bucket}/{s3_prefix}/out"
    line = _run_refused(
        s3_server, env, "--input", f"s3://{bucket}/{s3_prefix}/corpus.jsonl", "--output", output
    )
    assert f"output directory {output!r} is not writable" in line


@pytest.mark.parametrize("case", CASES)
def test_input_on_s3_refused_stops_the_run_with_one_line(s3_server, s3_prefix, tmp_path, case):
    env, bucket, endpoint = _refused(s3_server, case)
    corpus = f"s3://{bucket}/{s3_prefix}/corpus.jsonl"
    if case != "missing bucket":  # a corpus that is there, for keys that would read it
        fs = s3_server.filesystem()
        with fs.open_output_stream(f"{s3_server.bucket}/{s3_prefix}/corpus.jsonl") as f:
            f.write("".join(json.dumps(r) + "\n" for r in sample_rows(3)).encode())
    line = _run_refused(s3_server, env, "--input", corpus, "--output", str(tmp_path / "out"))
    assert f"input {corpus!r}" in line and f"S3 endpoint {endpoint}" in line
    expected = "does not exist" if case == "missing bucket" else "cannot be read"
    assert expected in line


def test_missing_input_object_on_s3_does_not_exist(s3_server, s3_prefix):
    corpus = s3_server.uri(s3_prefix, "corpus.jsonl")
    line = _run_refused(
        s3_server, s3_server.env(), "--input", corpus, "--output", s3_server.uri(s3_prefix, "out")
    )
    assert line == (
        f"rare-ray: input {corpus!r} does not exist (in S3 endpoint {s3_server.endpoint})"
    )
