import json
import re

import pytest

from rare_ray.config import SamplingConfig, VLLMEngineConfig
from rare_ray.engines.contract import Generation
from rare_ray.operators.doc2query import Doc2Query, answer_schema, parse_answer
from rare_ray.vocabulary import SettingsError
from tests.scripted_server import engine_for


def test_valid_answer_is_parsed_and_stripped():
    text = json.dumps({"question": " Why? ", "scenario": "A case."})
    assert parse_answer(text, tokens=10, max_tokens=100) == ("Why?", "A case.")


def test_unusable_answers_say_why():
    assert "cut off" in parse_answer('{"question": "x', tokens=100, max_tokens=100)
    assert "not valid JSON" in parse_answer("{oops", tokens=5, max_tokens=100)
    assert "not a JSON object" in parse_answer("[1]", tokens=5, max_tokens=100)
    assert "'scenario'" in parse_answer('{"question": "q"}', tokens=5, max_tokens=100)
    assert "'question'" in parse_answer('{"question": " ", "scenario": "s"}', 5, 100)


def test_schema_bounds_both_fields():
    schema = answer_schema(50)
    assert schema["required"] == ["question", "scenario"]
    assert schema["properties"]["question"]["maxLength"] == 50


def test_the_reference_answer_is_a_third_field_in_its_own_column():
    engine = engine_for("http://127.0.0.1:1/v1")
    op = Doc2Query(engine, max_field_chars=60)
    messages, sampling = op.render({"id": "d", "text": "A doc."}, lambda text, _: text)
    schema = json.loads(sampling["structured_outputs"]["json"])
    assert schema["required"] == ["question", "scenario", "answer"]
    assert '"answer"' in messages[-1]["content"]
    answer = Generation(json.dumps({"question": "Q?", "scenario": "S.", "answer": "A."}), 9)
    outputs, reason = op.read({"id": "d"}, answer, 1)
    assert reason is None and outputs["reference_answer"] == "A." and outputs["question"] == "Q?"
    without = Doc2Query(engine, output_answer_key=None)
    assert "reference_answer" not in [f.name for f in without.output_fields]
    _, sampling = without.render({"id": "d", "text": "A doc."}, lambda text, _: text)
    assert json.loads(sampling["structured_outputs"]["json"])["required"] == [
        "question",
        "scenario",
    ]


def test_a_budget_too_small_for_the_schema_is_refused_naming_both_settings(test_model):
    engine = VLLMEngineConfig(model=str(test_model), device="cpu")
    small = Doc2Query(engine, max_field_chars=400, sampling=SamplingConfig(max_tokens=128))
    with pytest.raises(SettingsError, match=r"max_tokens \(128\).*max_field_chars \(400\)"):
        small.check()
    # The limit it suggests is one that passes; the shipped local settings pass.
    message = ""
    try:
        small.check()
    except SettingsError as e:
        message = str(e)
    suggested = int(re.search(r"at most (\d+)", message).group(1))
    Doc2Query(engine, max_field_chars=suggested, sampling=SamplingConfig(max_tokens=128)).check()
    Doc2Query(engine, max_field_chars=400, sampling=SamplingConfig(max_tokens=768)).check()


def test_without_a_tokenizer_the_budget_uses_chars_per_token():
    engine = engine_for("http://127.0.0.1:1/v1", chars_per_token=4.0)
    # Three fields (question, scenario, reference answer) of 200 characters at 4 a token.
    ok = Doc2Query(engine, max_field_chars=200, sampling=SamplingConfig(max_tokens=174))
    ok.check_budget()
    with pytest.raises(SettingsError, match=r"3 fields.*engine\.chars_per_token"):
        Doc2Query(
            engine, max_field_chars=200, sampling=SamplingConfig(max_tokens=173)
        ).check_budget()
    # Without a reference answer, two fields.
    Doc2Query(
        engine, max_field_chars=200, output_answer_key=None, sampling=SamplingConfig(max_tokens=124)
    ).check_budget()
