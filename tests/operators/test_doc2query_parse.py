import json
import re

import pytest

from rare_ray.config import SamplingConfig, VLLMEngineConfig
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
    ok = Doc2Query(engine, max_field_chars=200, sampling=SamplingConfig(max_tokens=124))
    ok.check_budget()
    with pytest.raises(SettingsError, match=r"engine\.chars_per_token"):
        Doc2Query(
            engine, max_field_chars=200, sampling=SamplingConfig(max_tokens=123)
        ).check_budget()
