import json

from rare_ray.operators.doc2query import answer_schema, parse_answer


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
