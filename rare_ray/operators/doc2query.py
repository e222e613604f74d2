"""Doc2Query: one self-contained, reasoning-heavy question and a scenario per document, and
a short reference answer from the document (``output_answer_key``; the verify stage checks
the teacher's answer against it).

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

{answer_item}
Reply with a JSON object with the keys {keys} and nothing else."""

ANSWER_ITEM = (
    '- "answer": the answer to the question in one or two sentences, as the document '
    "supports it; it will be used to check answers written by others.\n"
)
QUESTION_FIELDS = ("question", "scenario")
ANSWER_FIELDS = (*QUESTION_FIELDS, "answer")


def answer_schema(max_chars: int, fields: Sequence[str] = QUESTION_FIELDS) -> dict[str, Any]:
    field = {"type": "string", "minLength": 1, "maxLength": max_chars}
    return {
        "type": "object",
        "properties": {name: field for name in fields},
        "required": list(fields),
        "additionalProperties": False,
    }


def user_prompt(document: str, fields: Sequence[str]) -> str:
    keys = " and ".join(f'"{name}"' for name in fields)
    answer_item = ANSWER_ITEM if "answer" in fields else ""
    return USER_PROMPT.format(document=document, answer_item=answer_item, keys=keys)


# Tokens of an answer besides its fields' text: braces, keys, quotes, the end of the text.
ANSWER_OVERHEAD_TOKENS = 24


def answer_tokens(max_field_chars: int, chars_per_token: float, fields: int = 2) -> int:
    """Tokens an answer needs when every field is as long as the schema lets it be."""
    return math.ceil(fields * max_field_chars / chars_per_token) + ANSWER_OVERHEAD_TOKENS


def parse_answer(
    text: str, tokens: int, max_tokens: int, fields: Sequence[str] = QUESTION_FIELDS
) -> tuple[str, ...] | str:
    """The ``fields``' values from a model answer, or the reason it cannot be used."""
    if tokens >= max_tokens:
        return f"answer cut off at max_tokens ({max_tokens})"
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as e:
        return f"answer is not valid JSON ({e.msg})"
    if not isinstance(answer, dict):
        return "answer is not a JSON object"
    values = []
    for key in fields:
        value = answer.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"answer has no usable {key!r}"
        values.append(value.strip())
    return tuple(values)


class Doc2Query(LLMOperator[Doc2QueryConfig]):
    """Writes a question, a scenario and (unless ``output_answer_key`` is None) a reference
    answer for every document."""

    name = "doc2query"
    config_class = Doc2QueryConfig
    counters = ("truncated", "reasked")
    attempts_column = f"{name}_attempts"

    @property
    def fields(self) -> tuple[str, ...]:
        """The keys of the JSON answer."""
        return ANSWER_FIELDS if self.config.output_answer_key else QUESTION_FIELDS

    @property
    def columns(self) -> dict[str, str]:
        """The column each key of the answer goes to."""
        cfg = self.config
        names = [cfg.output_question_key, cfg.output_scenario_key, cfg.output_answer_key]
        return {key: str(column) for key, column in zip(self.fields, names, strict=False)}

    @property
    def input_columns(self) -> Mapping[str, ColumnKind]:
        return {self.config.input_key: "text"}

    @property
    def text_key(self) -> str:
        return self.config.input_key

    @property
    def own_fields(self) -> Sequence[pa.Field]:
        return [
            *(pa.field(column, pa.string()) for column in self.columns.values()),
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
        n = len(self.fields)
        need = answer_tokens(cfg.max_field_chars, ratio, n)
        if cfg.sampling.max_tokens < need:
            raise SettingsError(
                f"doc2query.sampling.max_tokens ({cfg.sampling.max_tokens}) is too small for "
                f"doc2query.max_field_chars ({cfg.max_field_chars}): {n} fields of that length "
                f"take about {need} tokens at {measured}, so most answers would be cut off. "
                f"Raise max_tokens to at least {need} or lower max_field_chars to at most "
                f"{self.max_field_chars_for(cfg.sampling.max_tokens, ratio, n)}."
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
    def max_field_chars_for(max_tokens: int, ratio: float, fields: int = 2) -> int:
        return max(0, math.floor((max_tokens - ANSWER_OVERHEAD_TOKENS) * ratio / fields))

    def render(
        self, row: dict[str, Any], fit: Fit, attempt: int = 1
    ) -> tuple[Messages, dict[str, Any]]:
        cfg = self.config
        document = fit(row[cfg.input_key], cfg.max_doc_tokens)
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_prompt(document, self.fields)},
        ]
        # A fresh seed per attempt: asking again with the same seed gives the same answer.
        sampling = self.engine.sampling(
            cfg.sampling, row_seed(self.seed, row[ID], self.name, attempt)
        )
        schema = answer_schema(cfg.max_field_chars, self.fields)
        return messages, json_schema_sampling(schema, sampling)

    def read(
        self, row: dict[str, Any], answer: Generation, attempt: int
    ) -> tuple[dict[str, Any], str | None]:
        cfg = self.config
        result = (
            f"engine error: {answer.error}"
            if answer.error
            else parse_answer(answer.text, answer.tokens, cfg.sampling.max_tokens, self.fields)
        )
        values = [None] * len(self.fields) if isinstance(result, str) else result
        outputs = {
            **dict(zip(self.columns.values(), values, strict=True)),
            self.attempts_column: attempt,
            self.counter("truncated"): answer.truncated,
            self.counter("reasked"): int(attempt > 1),
        }
        return outputs, result if isinstance(result, str) else None
