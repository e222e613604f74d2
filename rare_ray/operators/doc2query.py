"""Doc2Query: one self-contained, reasoning-heavy question and a scenario per document.

The answer is constrained to a JSON schema (vLLM structured outputs), then parsed strictly.
A row whose answer is still unusable (cut off at ``max_tokens``, not JSON, an empty field) is
asked again at once, on the same engine and with a new seed, up to ``max_attempts`` asks in
all; after that, or after an engine error, it is rejected with the last reason, never passed
on with empty strings.

The schema lets each field hold ``max_field_chars`` characters, and an answer that fills them
must fit in ``sampling.max_tokens``: ``check`` measures the tokenizer's characters per token
and refuses, before any engine starts, a budget that the schema's own limits would overrun.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from rare_ray.config import Doc2QueryConfig, OpenAIEngineConfig
from rare_ray.engines.contract import (
    Fit,
    Generation,
    Messages,
    chars_per_token,
    json_schema_sampling,
    load_tokenizer,
)
from rare_ray.operators.base import LLMOperator
from rare_ray.rows import ID
from rare_ray.seeding import row_seed
from rare_ray.vocabulary import ColumnKind, SettingsError

SYSTEM_PROMPT = (
    "You write exam questions for training reasoning models. Each question is grounded in the "
    "knowledge of a source document, but it must stand on its own: a reader who has never "
    "seen the document has to understand it."
)

USER_PROMPT = """Source document:
<document>
{document}
</document>

Using the knowledge in this document, write:
- "scenario": a short, concrete situation (a case, an experiment, a decision to make) in which that knowledge matters. Describe it fully; do not refer to "the document", "the study" or "the text".
- "question": one question about the scenario that cannot be answered by looking up a single fact. Answering it should take several steps of reasoning that combine facts and ideas from the document with the details of the scenario.

Reply with a JSON object with the keys "question" and "scenario" and nothing else."""


def answer_schema(max_chars: int) -> dict[str, Any]:
    field = {"type": "string", "minLength": 1, "maxLength": max_chars}
    return {
        "type": "object",
        "properties": {"question": field, "scenario": field},
        "required": ["question", "scenario"],
        "additionalProperties": False,
    }


# Tokens of an answer besides its fields' text: braces, keys, quotes, the end of the text.
ANSWER_OVERHEAD_TOKENS = 24


def answer_tokens(max_field_chars: int, chars_per_token: float) -> int:
    """Tokens an answer needs when both fields are as long as the schema lets them be."""
    return math.ceil(2 * max_field_chars / chars_per_token) + ANSWER_OVERHEAD_TOKENS


def parse_answer(text: str, tokens: int, max_tokens: int) -> tuple[str, str] | str:
    """``(question, scenario)`` from a model answer, or the reason it cannot be used."""
    if tokens >= max_tokens:
        return f"answer cut off at max_tokens ({max_tokens})"
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as e:
        return f"answer is not valid JSON ({e.msg})"
    if not isinstance(answer, dict):
        return "answer is not a JSON object"
    fields = []
    for key in ("question", "scenario"):
        value = answer.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"answer has no usable {key!r}"
        fields.append(value.strip())
    return fields[0], fields[1]


class Doc2Query(LLMOperator[Doc2QueryConfig]):
    """Writes a question and a scenario for every document."""

    name = "doc2query"
    config_class = Doc2QueryConfig
    counters = ("truncated", "reasked")
    attempts_column = f"{name}_attempts"

    @property
    def input_columns(self) -> Mapping[str, ColumnKind]:
        return {self.config.input_key: "text"}

    @property
    def text_key(self) -> str:
        return self.config.input_key

    @property
    def own_fields(self) -> Sequence[pa.Field]:
        return [
            pa.field(self.config.output_question_key, pa.string()),
            pa.field(self.config.output_scenario_key, pa.string()),
            pa.field(self.attempts_column, pa.int32()),
        ]

    @property
    def asks(self) -> int:
        return self.config.max_attempts

    @property
    def pass_column(self) -> str:
        return self.attempts_column

    def check(self) -> None:
        super().check()
        self.check_budget()

    def check_budget(self) -> None:
        """Refuses a ``max_tokens`` that answers as long as the schema allows would overrun."""
        cfg = self.config
        ratio, measured = self.chars_per_token()
        need = answer_tokens(cfg.max_field_chars, ratio)
        if cfg.sampling.max_tokens < need:
            raise SettingsError(
                f"doc2query.sampling.max_tokens ({cfg.sampling.max_tokens}) is too small for "
                f"doc2query.max_field_chars ({cfg.max_field_chars}): two fields of that length "
                f"take about {need} tokens at {measured}, so most answers would be cut off. "
                f"Raise max_tokens to at least {need} or lower max_field_chars to at most "
                f"{self.max_field_chars_for(cfg.sampling.max_tokens, ratio)}."
            )

    def chars_per_token(self) -> tuple[float, str]:
        """The engine's characters per token, and where the figure comes from."""
        if isinstance(self.engine, OpenAIEngineConfig) and not self.engine.tokenizer:
            ratio = self.engine.chars_per_token
            return ratio, f"engine.chars_per_token ({ratio:g})"
        model = self.engine.tokenizer if isinstance(self.engine, OpenAIEngineConfig) else None
        tokenizer = load_tokenizer(model or self.engine.model)
        # Prose like the answers', in the prompt's own words.
        ratio = chars_per_token(tokenizer, SYSTEM_PROMPT + USER_PROMPT)
        return ratio, f"{ratio:.2f} characters per token for this model's tokenizer"

    @staticmethod
    def max_field_chars_for(max_tokens: int, ratio: float) -> int:
        return max(0, math.floor((max_tokens - ANSWER_OVERHEAD_TOKENS) * ratio / 2))

    def render(
        self, row: dict[str, Any], fit: Fit, attempt: int = 1
    ) -> tuple[Messages, dict[str, Any]]:
        cfg = self.config
        document = fit(row[cfg.input_key], cfg.max_doc_tokens)
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT.format(document=document)},
        ]
        # A fresh seed per attempt: asking again with the same seed gives the same answer.
        sampling = self.engine.sampling(
            cfg.sampling, row_seed(self.seed, row[ID], self.name, attempt)
        )
        return messages, json_schema_sampling(answer_schema(cfg.max_field_chars), sampling)

    def read(
        self, row: dict[str, Any], answer: Generation, attempt: int
    ) -> tuple[dict[str, Any], str | None]:
        cfg = self.config
        result = (
            f"engine error: {answer.error}"
            if answer.error
            else parse_answer(answer.text, answer.tokens, cfg.sampling.max_tokens)
        )
        question, scenario = (None, None) if isinstance(result, str) else result
        outputs = {
            cfg.output_question_key: question,
            cfg.output_scenario_key: scenario,
            self.attempts_column: attempt,
            self.counter("truncated"): answer.truncated,
            self.counter("reasked"): int(attempt > 1),
        }
        return outputs, result if isinstance(result, str) else None
