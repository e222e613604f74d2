"""Doc2Query's re-asks, against a scripted chat-completions server and a scripted client.

The server and the client are the test doubles here: they stand in for a model that writes
invalid JSON, which the real test model (held to a JSON schema) cannot be made to do on
purpose. With the server, everything else (Ray Data, the HTTP engine, the operator) is real.
"""

import asyncio
import json
from collections import Counter

import pyarrow as pa
import ray

from rare_ray.config import SamplingConfig, VLLMEngineConfig
from rare_ray.engines.contract import Generation
from rare_ray.operators import Doc2Query
from tests.helpers import ScriptedClient
from tests.scripted_server import ScriptedServer, answer, engine_for

GOOD = json.dumps(
    {"question": "Why does it matter?", "scenario": "A clinic decides.", "answer": "It does."}
)


def test_invalid_answers_are_asked_again_then_rejected(ray_local, api_key):
    asked: Counter[str] = Counter()

    def model(body):
        document = next(d for d in ("always-bad", "bad-once", "fine") if d in str(body))
        asked[document] += 1
        if document == "always-bad" or (document == "bad-once" and asked[document] == 1):
            return answer("{not json")
        return answer(GOOD)

    rows = [{"id": d, "text": f"A document: {d}."} for d in ("always-bad", "bad-once", "fine")]
    with ScriptedServer(model) as server:
        op = Doc2Query(engine_for(server.base_url, workers=1), max_attempts=3)
        out = {r["id"]: r for r in op.run(ray.data.from_items(rows)).take_all()}

    assert len(out) == 3  # every row back, once
    assert asked == {"always-bad": 3, "bad-once": 2, "fine": 1}
    assert out["fine"]["doc2query_attempts"] == 1 and out["fine"]["reject_reason"] is None
    assert out["bad-once"]["doc2query_attempts"] == 2
    assert out["bad-once"]["question"] == "Why does it matter?"
    assert out["bad-once"]["_doc2query_reasked"] == 1
    rejected = out["always-bad"]
    assert rejected["doc2query_attempts"] == 3
    assert rejected["reject_reason"].startswith("answer is not valid JSON")
    assert rejected["question"] is None and rejected["scenario"] is None  # never empty strings


def test_reasks_go_to_the_same_client_inside_the_batch_with_a_new_seed():
    """The asking logic alone: one batch, one client, re-asks in it (a scripted client)."""
    engine = VLLMEngineConfig(model="unused", device="cpu", seed_requests=True)
    tries: Counter[str] = Counter()

    def reply(row, _messages, _sampling):
        tries[row["id"]] += 1
        if row["id"] == "engine-error":
            return Generation(error="HTTP 401: bad key")
        if row["id"] == "bad-twice" and tries[row["id"]] <= 2:
            return Generation("{not json", tokens=3)
        return Generation(GOOD, tokens=10)

    op = Doc2Query(engine, max_attempts=3, sampling=SamplingConfig(max_tokens=300))
    client = ScriptedClient(reply)
    batch = pa.Table.from_pylist(
        [{"id": i, "text": f"doc {i}"} for i in ("fine", "bad-twice", "engine-error")]
    )
    out = {r["id"]: r for r in asyncio.run(op.answer(batch, client)).to_pylist()}

    assert tries == {"fine": 1, "bad-twice": 3, "engine-error": 1}  # errors are not re-asked
    assert out["bad-twice"]["doc2query_attempts"] == 3 and out["bad-twice"]["reject_reason"] is None
    assert out["engine-error"]["reject_reason"] == "engine error: HTTP 401: bad key"
    seeds = [s["seed"] for row_id, _, s in client.asked if row_id == "bad-twice"]
    assert len(set(seeds)) == 3
    # Every ask's tokens count, the re-asks' too.
    assert out["bad-twice"]["_doc2query_generated_tokens"] == 3 + 3 + 10
    assert out["fine"]["_doc2query_generated_tokens"] == 10
