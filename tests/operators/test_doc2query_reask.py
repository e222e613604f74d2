"""Doc2Query's re-asks, against a scripted chat-completions server.

The server is the test double here: it stands in for a model that writes invalid JSON, which
the real test model (held to a JSON schema) cannot be made to do on purpose. Everything else
(Ray Data, the HTTP engine, the operator) is real.
"""

import json
from collections import Counter

import ray

from rare_ray.operators import Doc2Query
from tests.scripted_server import ScriptedServer, answer, engine_for

GOOD = json.dumps({"question": "Why does it matter?", "scenario": "A clinic decides."})


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
