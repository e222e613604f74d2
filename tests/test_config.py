from typing import Any, get_args

import pytest
from pydantic import BaseModel, Field, ValidationError

from rare_ray.config import (
    MUST_MATCH,
    BM25Config,
    OpenAIEngineConfig,
    RunConfig,
    SamplingConfig,
    VLLMEngineConfig,
    output_settings,
    resume_of,
)
from tests.helpers import LOCAL_CONFIG, stage_settings


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


def models_under(annotation: Any, found: list[type[BaseModel]]) -> list[type[BaseModel]]:
    """Every pydantic model reachable from ``annotation``: through fields, unions, Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation not in found:
            found.append(annotation)
            for field in annotation.model_fields.values():
                models_under(field.annotation, found)
    else:
        for arg in get_args(annotation):
            models_under(arg, found)
    return found


def unclassified(root: type[BaseModel]) -> list[str]:
    return [
        f"{model.__name__}.{name}"
        for model in models_under(root, [])
        for name, field in model.model_fields.items()
        if resume_of(field) is None
    ]


def test_every_config_field_says_whether_a_resumed_run_may_change_it():
    models = models_under(RunConfig, [])
    assert {VLLMEngineConfig, OpenAIEngineConfig, SamplingConfig, BM25Config} <= set(models)
    missing = unclassified(RunConfig)
    assert not missing, (
        f"annotate {', '.join(missing)} with MUST_MATCH (it decides what a stage writes) or "
        "MAY_CHANGE (only how fast or where it runs), e.g. Annotated[int, MAY_CHANGE]"
    )


def test_an_unclassified_field_is_named_and_refused():
    class Stray(BaseModel):
        knob: int = Field(1, description="New, and not classified.")

    assert unclassified(Stray) == ["Stray.knob"]
    with pytest.raises(TypeError, match=r"Stray\.knob"):
        output_settings(Stray())


def test_stage_settings_keep_must_match_fields_and_drop_may_change_ones():
    config = RunConfig.from_yaml(LOCAL_CONFIG)
    doc2query, bm25 = stage_settings(config, "doc2query"), stage_settings(config, "bm25")
    assert doc2query["doc2query"]["sampling"]["max_tokens"] == config.doc2query.sampling.max_tokens
    assert bm25["bm25"]["k1"] == config.bm25.k1
    for runtime in ("replicas", "batch_size", "device", "max_restarts"):
        assert runtime not in doc2query["engine"]
    for runtime in ("searchers_per_node", "batch_size", "local_dir", "debug_logs"):
        assert runtime not in bm25["bm25"]
    # engine_kwargs must match, but for the keys that only tune vLLM's speed.
    assert doc2query["engine"]["engine_kwargs"] == {"dtype": "float32"}
    assert config.engine.engine_kwargs["enforce_eager"] is True
    must_match = {n for n, f in BM25Config.model_fields.items() if resume_of(f) == MUST_MATCH}
    assert set(bm25["bm25"]) == must_match
