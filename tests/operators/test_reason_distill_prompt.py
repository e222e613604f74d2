"""The shuffle, the prompt and the reading of answers of ReasonDistill (no engine: a scripted
client answers)."""

import asyncio

import pyarrow as pa

from rare_ray.config import VLLMEngineConfig
from rare_ray.engines.contract import Generation
from rare_ray.operators.reason_distill import (
    ReasonDistill,
    cites,
    document_order,
    split_thinking,
)
from tests.helpers import ScriptedClient

ENGINE = VLLMEngineConfig(model="unused", seed_requests=False)
ROW = {
    "id": "doc-1",
    "text": "POSITIVE",
    "question": "Why?",
    "scenario": "A case.",
    "hard_negatives": ["NEG-A", "NEG-B", "NEG-C"],
}


def test_order_is_reproducible_per_seed_and_row_and_a_permutation():
    assert document_order(0, "doc-1", 4) == document_order(0, "doc-1", 4)
    assert sorted(document_order(0, "doc-1", 4)) == [0, 1, 2, 3]
    orders = {tuple(document_order(s, r, 4)) for s in range(5) for r in ("x", "y", "z")}
    assert len(orders) > 1


def test_prompt_shows_the_documents_in_the_recorded_order():
    op = ReasonDistill(ENGINE, seed=3)
    messages, sampling = op.render(ROW, lambda text, _: text)
    user = messages[-1]["content"]
    order = document_order(3, "doc-1", 4)
    docs = op.documents(ROW)
    for number, index in enumerate(order, start=1):
        assert f"[{number}] {docs[index]}" in user
    assert "Why?" in user and "A case." in user
    assert "seed" not in sampling


def test_split_thinking():
    assert split_thinking("<think> steps </think> answer") == ("steps", "answer")
    assert split_thinking("no tags here") == (None, None)


def test_answers_record_the_positive_number_and_empty_generations_are_rejected_once():
    op = ReasonDistill(ENGINE, seed=0)
    texts = {"doc-1": "<think>a</think>b", "doc-2": "  "}
    client = ScriptedClient(lambda row, _m, _s: Generation(texts[row["id"]], tokens=5))
    batch = pa.Table.from_pylist([ROW, {**ROW, "id": "doc-2"}])
    rows = asyncio.run(op.answer(batch, client)).to_pylist()
    assert rows[0]["positive_document"] == document_order(0, "doc-1", 4).index(0) + 1
    assert rows[0]["reasoning_think"] == "a" and rows[0]["reasoning_answer"] == "b"
    assert rows[0]["reject_reason"] is None and rows[0]["reasoning_finished"] is True
    assert rows[1]["reject_reason"] == "empty generation"
    assert [row_id for row_id, _, _ in client.asked] == ["doc-1", "doc-2"]  # asked once each
    assert not any(k.startswith("_generated") for k in rows[0])


def test_the_request_is_kept_with_its_tokens_and_the_stage_counts_them():
    op = ReasonDistill(ENGINE, seed=0)
    client = ScriptedClient(lambda row, _m, _s: Generation("so", tokens=7, prompt_tokens=40))
    rows = asyncio.run(op.answer(pa.Table.from_pylist([ROW]), client)).to_pylist()
    (_, asked, _) = client.asked[0]
    assert rows[0]["reasoning_prompt"] == asked
    assert rows[0]["reasoning_prompt_tokens"] == 40 and rows[0]["reasoning_tokens"] == 7
    assert rows[0]["_distill_prompt_tokens"] == 40 and rows[0]["_distill_generated_tokens"] == 7


def test_cites_positive_reads_the_positives_own_number_only():
    assert cites("see [2], not [12]", 2) and cites("Document 2 says so", 2)
    assert cites("doc. 3 and doc #4", 4)
    assert not cites("see [12] and document 23", 2) and not cites("2 of them", 2)
    op = ReasonDistill(ENGINE, seed=0)
    positive = document_order(0, "doc-1", 4).index(0) + 1
    other = 1 if positive != 1 else 2
    texts = {"doc-1": f"[{positive}] holds.", "doc-2": f"[{other}] holds."}
    client = ScriptedClient(lambda row, _m, _s: Generation(texts[row["id"]], tokens=5))
    # doc-2 shuffles differently: its positive's number is computed on its own.
    second = document_order(0, "doc-2", 4).index(0) + 1
    rows = asyncio.run(
        op.answer(pa.Table.from_pylist([ROW, {**ROW, "id": "doc-2"}]), client)
    ).to_pylist()
    assert rows[0]["cites_positive"] is True and rows[0]["_distill_cited_positive"] == 1
    assert rows[1]["cites_positive"] is (other == second)
