"""Doc2Query: one self-contained, reasoning-heavy question and a scenario per document.

The answer is constrained to a JSON schema (vLLM structured outputs), then parsed strictly.
Rows whose answer is still unusable (cut off at ``max_tokens``, empty fields, engine errors)
are asked again together, in a pass of their own, up to ``max_attempts`` asks in all; after
that they are rejected with the last reason, never passed on with empty strings.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import ray.data

from rare_ray.config import Doc2QueryConfig
from rare_ray.engines import generate
from rare_ray.engines.contract import (
    GENERATED_TEXT,
    GENERATED_TOKENS,
    INFERENCE_ERROR,
    TRUNCATED,
    Fit,
    Messages,
    json_schema_sampling,
)
from rare_ray.operators.base import LLMOperator, StageContext
from rare_ray.rows import ID, REJECT_REASON
from rare_ray.seeding import row_seed
from rare_ray.vocabulary import ColumnKind

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
    def passes(self) -> int:
        return self.config.max_attempts

    @property
    def pass_column(self) -> str:
        return self.attempts_column

    def render(
        self, row: dict[str, Any], fit: Fit, attempt: int
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

    def parse(self, batch: pa.Table, attempt: int) -> pa.Table:
        cfg = self.config
        questions: list[str | None] = []
        scenarios: list[str | None] = []
        reasons: list[str | None] = []
        for text, tokens, error in zip(
            batch[GENERATED_TEXT].to_pylist(),
            batch[GENERATED_TOKENS].to_pylist(),
            batch[INFERENCE_ERROR].to_pylist(),
            strict=True,
        ):
            result = (
                f"engine error: {error}"
                if error
                else parse_answer(text or "", tokens or 0, cfg.sampling.max_tokens)
            )
            if isinstance(result, str):
                questions.append(None)
                scenarios.append(None)
                reasons.append(result)
            else:
                questions.append(result[0])
                scenarios.append(result[1])
                reasons.append(None)
        n = batch.num_rows
        return self.with_outputs(
            batch,
            {
                cfg.output_question_key: questions,
                cfg.output_scenario_key: scenarios,
                self.attempts_column: [attempt] * n,
                self.counter("truncated"): batch[TRUNCATED].to_pylist(),
                self.counter("reasked"): [int(attempt > 1)] * n,
            },
            reasons,
        )

    def run_pass(
        self, ds: ray.data.Dataset, attempt: int, context: StageContext
    ) -> ray.data.Dataset:
        """One ask per row of ``ds`` (for ``attempt`` > 1, the rows whose answer failed)."""
        ours = {f.name for f in self.output_fields}
        columns = [
            c
            for c in ds.columns()
            if c != REJECT_REASON and c not in ours and not c.startswith("_")
        ]
        return generate(
            ds.select_columns(columns), self.engine, functools.partial(self.render, attempt=attempt)
        ).map_batches(functools.partial(self.parse, attempt=attempt), batch_format="pyarrow")
