import pytest
from pydantic import ValidationError

from rare_ray.config import BM25Config, RunConfig
from tests.conftest import LOCAL_CONFIG


def test_local_config_loads_with_reference_defaults():
    config = RunConfig.from_yaml(LOCAL_CONFIG)
    assert config.doc2query.input_key == "text"
    assert config.doc2query.output_question_key == "question"
    assert config.doc2query.output_scenario_key == "scenario"
    assert config.doc2query.max_attempts == 3
    assert config.bm25.num_neg == 3
    assert config.bm25.output_negatives_key == "hard_negatives"
    assert config.distill.output_key == "reasoning"
    assert config.distill.input_hardneg_key == "hard_negatives"


def test_overrides_replace_config_values():
    config = RunConfig.from_yaml(LOCAL_CONFIG, output="/tmp/x", input=None)
    assert config.output == "/tmp/x"
    assert config.input.endswith("corpus.jsonl")


def test_unknown_keys_are_refused():
    with pytest.raises(ValidationError, match="num_negs"):
        BM25Config.model_validate({"num_negs": 3})


def test_depth_must_leave_room_for_negatives():
    with pytest.raises(ValidationError, match="depth"):
        BM25Config(depth=3, num_neg=3)


def test_prompts_must_fit_the_context():
    data = RunConfig.from_yaml(LOCAL_CONFIG).model_dump()
    data["engine"]["max_model_len"] = 2048
    with pytest.raises(ValidationError, match="max_model_len"):
        RunConfig.model_validate(data)
