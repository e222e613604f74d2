from rare_ray.io.card import render_card
from rare_ray.io.manifest import estimated_cost
from rare_ray.vocabulary import REDACTED, redact


def test_secrets_are_redacted_and_nothing_else():
    config = {
        "engine": {"api_key": "sk-1", "api_key_env": "OPENAI_API_KEY", "tokenizer": "m"},
        "headers": [{"hf_token": "hf-2", "password": "p"}],
        "distill": {"sampling": {"max_tokens": 64}},
    }
    out = redact(config)
    assert out["engine"] == {"api_key": REDACTED, "api_key_env": "OPENAI_API_KEY", "tokenizer": "m"}
    assert out["headers"] == [{"hf_token": REDACTED, "password": REDACTED}]
    assert out["distill"]["sampling"]["max_tokens"] == 64


def test_the_cost_estimate_covers_the_llm_stages_and_the_card_shows_it():
    stages = {
        "ingest": {"in": 3, "out": 3, "rejected": 0},
        "doc2query": {"in": 3, "out": 3, "rejected": 0, "prompt_tokens": 1_000_000,
                      "generated_tokens": 200_000},
        "verify": {"in": 3, "out": 3, "rejected": 0, "prompt_tokens": 0, "generated_tokens": 0},
    }  # fmt: skip
    assert estimated_cost(None, stages) is None  # no prices, no estimate
    cost = estimated_cost({"prompt": 0.5, "generated": 2.0}, stages)
    assert cost == {
        "price_per_million_tokens": {"prompt": 0.5, "generated": 2.0},
        "stages": {"doc2query": 0.9, "verify": 0.0},
        "total": 0.9,
    }
    manifest = {
        "input": "c.jsonl", "engine": {"kind": "openai", "model": "m"}, "config": {},
        "counts": {"input_rows": 3, "output_rows": 3, "rejected_rows": 0, "stages": stages},
        "publication": {"id": "p", "files": [], "data": {"train": 3}, "rejects": {}},
        "estimated_cost": cost,
    }  # fmt: skip
    assert (
        "Estimated cost at 0.5 per million prompt and 2 per million generated tokens: 0.9000"
        in (render_card(manifest))
    )
