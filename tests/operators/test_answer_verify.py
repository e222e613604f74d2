"""The verify stage's logic, with a scripted client (a test double for the engine, which the
test model, held to the verdict's JSON schema, cannot be made to break on purpose). The stage
on the real vLLM engine is in tests/engines/test_openai_http.py and the whole run in
tests/test_pipeline.py."""

import asyncio
import json

import pyarrow as pa

from rare_ray.config import SamplingConfig, VerifyConfig, VLLMEngineConfig
from rare_ray.engines.contract import Generation
from rare_ray.operators.answer_verify import (
    VERDICTS,
    AnswerVerify,
    parse_verdict,
    verdict_schema,
)
from tests.helpers import ScriptedClient

ENGINE = VLLMEngineConfig(model="unused", seed_requests=False)


def _row(row_id: str, **extra) -> dict:
    return {
        "id": row_id,
        "question": "Which drug works?",
        "reference_answer": "Drug A, because the trial shows it.",
        "reasoning": "Document [2] says drug A. So: drug A.",
        "reasoning_answer": None,
        "reasoning_finished": True,
        **extra,
    }


def _verdict(verdict: str) -> str:
    return json.dumps({"reason": "Both name drug A.", "verdict": verdict})


def test_parse_verdict_takes_only_the_fixed_set():
    assert parse_verdict(_verdict("agrees")) == ("agrees", "Both name drug A.")
    assert "not one of" in parse_verdict(_verdict("maybe"))
    assert "not valid JSON" in parse_verdict('{"reason": "x"')
    schema = verdict_schema(100)
    assert schema["properties"]["verdict"]["enum"] == list(VERDICTS)
    assert list(schema["properties"]) == ["reason", "verdict"]  # the reason is written first


def test_every_row_comes_back_labelled_and_none_is_rejected():
    op = AnswerVerify(ENGINE, VerifyConfig(max_attempts=2, sampling=SamplingConfig(max_tokens=50)))
    tries: dict[str, int] = {}

    def reply(row, _messages, _sampling):
        row_id = row["id"]
        tries[row_id] = tries.get(row_id, 0) + 1
        if row_id == "dead":
            return Generation(error="HTTP 500: engine died")
        if row_id == "garbled" or (row_id == "bad-once" and tries[row_id] == 1):
            return Generation("{oops", tokens=3, prompt_tokens=30)
        verdict = {"agree": "agrees", "differ": "disagrees", "bad-once": "unclear"}[row_id]
        return Generation(_verdict(verdict), tokens=9, prompt_tokens=30)

    ids = ["agree", "differ", "garbled", "bad-once", "dead"]
    rows = [_row(i) for i in ids] + [_row("cut", reasoning_finished=False)]
    client = ScriptedClient(reply)
    out = {
        r["id"]: r for r in asyncio.run(op.answer(pa.Table.from_pylist(rows), client)).to_pylist()
    }

    assert all(r["reject_reason"] is None for r in out.values())  # a label, never a reject
    verdicts = {i: (r["answer_verdict"], r["answer_verified"]) for i, r in out.items()}
    assert verdicts == {
        "agree": ("agrees", True), "differ": ("disagrees", False),
        "garbled": ("unreadable", None), "bad-once": ("unclear", False),
        "dead": ("unreadable", None), "cut": ("unfinished", False),
    }  # fmt: skip
    # Unreadable verdicts are asked again once; engine errors are not; a cut-off reasoning
    # is never asked (and spends no tokens).
    assert tries == {"agree": 1, "differ": 1, "garbled": 2, "bad-once": 2, "dead": 1}
    assert out["cut"]["_verify_prompt_tokens"] == 0 and out["cut"]["_verify_unfinished"] == 1
    assert out["garbled"]["_verify_prompt_tokens"] == 60 and out["garbled"]["_verify_reasked"] == 1
    assert out["dead"]["answer_verdict_reason"] == "engine error: HTTP 500: engine died"
    # Each row counts under exactly one verdict.
    for row in out.values():
        assert sum(row[f"_verify_{v}"] for v in (*VERDICTS, "unfinished", "unreadable")) == 1


def test_the_verifier_sees_the_answer_after_think_or_the_end_of_the_response():
    op = AnswerVerify(ENGINE, VerifyConfig(max_answer_chars=20))
    thought = _row("t", reasoning="<think>long</think>Drug A.", reasoning_answer="Drug A.")
    assert op.candidate(thought) == "Drug A."
    long = _row("l", reasoning="x" * 100 + " so drug A")
    assert op.candidate(long) == "..." + ("x" * 100 + " so drug A")[-20:]
    messages, sampling = op.render(thought, lambda text, _: text)
    user = messages[-1]["content"]
    assert "Which drug works?" in user and "Drug A, because" in user and "Drug A." in user
    assert "long" not in user  # the thinking is not what is graded
    assert json.loads(sampling["structured_outputs"]["json"]) == verdict_schema(240)
