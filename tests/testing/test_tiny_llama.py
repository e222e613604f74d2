import json

from rare_ray.testing.tiny_llama import MODEL_SHAPE, build_tiny_llama, fingerprint


def test_build_is_reproducible_and_fits_vllm_cpu(tmp_path):
    a = build_tiny_llama(tmp_path / "a", seed=0)
    b = build_tiny_llama(tmp_path / "b", seed=0)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(build_tiny_llama(tmp_path / "c", seed=1)) != fingerprint(a)
    config = json.loads((a / "config.json").read_text())
    # vLLM's CPU attention supports head sizes 32, 64, ...: 16 fails at the first forward.
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] >= 32
    assert config["vocab_size"] == MODEL_SHAPE["vocab_size"]


def test_tokenizer_has_a_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path / "m"))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode("Programmed cell death")) == "Programmed cell death"
