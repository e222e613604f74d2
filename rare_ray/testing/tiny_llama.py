"""Build the local test model: a tiny Llama with random weights and a BPE tokenizer.

Nothing is downloaded. The tokenizer is trained on the sample corpus that ships with the
package, the weights come from a seeded generator, so the same command always writes the
same files. The model's text is noise; it exists to drive the real vLLM engine, its chat
template and its structured-output path on a CPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rare_ray.io.readers import SAMPLE_CORPUS

# ChatML: the template most instruction-tuned open models use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# vLLM's CPU attention kernels support head sizes 32, 64, 80, ... only: 4 heads x 32 = 128.
MODEL_SHAPE: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 8192,
}


def _training_text(corpus: Path) -> Iterator[str]:
    with corpus.open(encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["text"]
    # Make sure the characters our prompts and JSON answers use are in the vocabulary.
    yield '{"question": "", "scenario": ""} <think> </think> Document [1] [2] [3] [4]'


def build_tiny_llama(output: str | Path, seed: int = 0, corpus: Path = SAMPLE_CORPUS) -> Path:
    """Write a random-weight Llama and its tokenizer to ``output`` and return the path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_SHAPE["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(output)

    torch.manual_seed(seed)
    token_id = {name: bpe.token_to_id(name) for name in SPECIAL_TOKENS}
    config = LlamaConfig(
        **MODEL_SHAPE,
        bos_token_id=token_id["<|im_start|>"],
        eos_token_id=token_id["<|im_end|>"],
        pad_token_id=token_id["<|endoftext|>"],
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(output, safe_serialization=True)
    return output


def fingerprint(model_dir: str | Path) -> str:
    """A hash of the model's weights and tokenizer files, to check builds are reproducible."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.suffix in {".safetensors", ".json"} and path.name != "config.json":
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
