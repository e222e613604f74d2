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
