"""AnswerVerify: does the teacher's final answer agree with the document's reference answer?

RARE trains only on reasoning that reached the right answer. Most corpora come without gold
answers, so Doc2Query writes a short reference answer from the document itself, and this
stage asks the engine (the run's engine: no other one starts) to compare the two, with the
verdict constrained to a fixed set by a JSON schema: ``agrees``, ``disagrees`` or
``unclear``, and a one-sentence reason written before it.

The stage never rejects a row: a verdict is a label to filter on (``rare-ray export`` keeps
``answer_verified`` rows by default), not a reason to lose the reasoning. A row whose
reasoning was cut off at ``max_tokens`` has no final answer to compare; it gets the verdict
``unfinished`` without an ask. A row whose verdict cannot be read is asked again, up to
``max_attempts`` asks, and after that (or after an engine error) keeps the verdict
``unreadable`` and ``answer_verified`` null, with what went wrong as its reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from rare_ray.config import VerifyConfig
from rare_ray.engines.contract import Fit, Generation, Messages, json_schema_sampling
from rare_ray.operators.base import LLMOperator
from rare_ray.rows import ANSWER_VERIFIED, ID
from rare_ray.seeding import row_seed
from rare_ray.vocabulary import ColumnKind

# What the verifier may answer; ``answer_verified`` is true for the first only.
VERDICTS = ("agrees", "disagrees", "unclear")
# What the stage records without the verifier's word.
UNFINISHED, UNREADABLE = "unfinished", "unreadable"

SYSTEM_PROMPT = (
    "You grade answers. You compare a candidate's final answer with a reference answer to the "
    "same question and judge whether they reach the same conclusion; wording, length and the "
    "quality of the reasoning do not matter."
)

USER_PROMPT = """Question:
{question}

Reference answer:
{reference}

Candidate's final answer:
{candidate}

Does the candidate's final answer reach the same conclusion as the reference answer? Reply with a JSON object: "reason" says why in one sentence, then "verdict" is "agrees" (the same conclusion), "disagrees" (a different or contradicting conclusion) or "unclear" (no conclusion, or one that cannot be compared with the reference)."""


def verdict_schema(max_reason_chars: int) -> dict[str, Any]:
    # The reason comes first: a verdict written after its reason is the better judged one.
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "minLength": 1, "maxLength": max_reason_chars},
            "verdict": {"type": "string", "enum": list(VERDICTS)},
        },
        "required": ["reason", "verdict"],
        "additionalProperties": False,
    }


def parse_verdict(text: str) -> tuple[str, str] | str:
    """``(verdict, reason)`` from the verifier's answer, or why it cannot be read."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as e:
        return f"verdict is not valid JSON ({e.msg})"
    if not isinstance(answer, dict) or answer.get("verdict") not in VERDICTS:
        return "verdict is not one of " + ", ".join(VERDICTS)
    reason = answer.get("reason")
    return answer["verdict"], reason.strip() if isinstance(reason, str) else ""


class AnswerVerify(LLMOperator[VerifyConfig]):
    """Labels every row with whether the teacher's answer agrees with the reference."""

    name = "verify"
    config_class = VerifyConfig
    counters = ("agrees", "disagrees", "unclear", UNFINISHED, UNREADABLE, "reasked")
    verdict_column, verified_column, reason_column = (
        "answer_verdict",
        ANSWER_VERIFIED,
        "answer_verdict_reason",
    )

    @property
    def input_columns(self) -> Mapping[str, ColumnKind]:
        cfg = self.config
        # <reasoning>_answer and <reasoning>_finished are read when there (ReasonDistill
        # writes them); a corpus of responses from elsewhere may come without them.
        return {
            cfg.input_question_key: "text",
            cfg.input_reference_key: "text",
            cfg.input_reasoning_key: "text",
        }

    @property
    def text_key(self) -> str:
        return self.config.input_question_key

    @property
    def own_fields(self) -> Sequence[pa.Field]:
        return [
            pa.field(self.verdict_column, pa.string()),
            pa.field(self.verified_column, pa.bool_()),
            pa.field(self.reason_column, pa.string()),
        ]

    @property
    def asks(self) -> int:
        return self.config.max_attempts

    def candidate(self, row: dict[str, Any]) -> str:
        """The teacher's final answer: after its ``<think>`` block, else its response's end."""
        key, limit = self.config.input_reasoning_key, self.config.max_answer_chars
        answer = row.get(f"{key}_answer")
        text: str = answer if answer else row[key]
        return text if len(text) <= limit else "..." + text[-limit:]

    def decided(self, row: dict[str, Any]) -> dict[str, Any] | None:
        if row.get(f"{self.config.input_reasoning_key}_finished") is False:
            return self._outputs(UNFINISHED, "the reasoning was cut off at max_tokens")
        return None

    def render(
        self, row: dict[str, Any], fit: Fit, attempt: int = 1
    ) -> tuple[Messages, dict[str, Any]]:
        cfg = self.config
        user = USER_PROMPT.format(
            question=row[cfg.input_question_key],
            reference=row[cfg.input_reference_key],
            candidate=self.candidate(row),
        )
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        sampling = self.engine.sampling(
            cfg.sampling, row_seed(self.seed, row[ID], self.name, attempt)
        )
        return messages, json_schema_sampling(verdict_schema(cfg.max_reason_chars), sampling)

    def read(
        self, row: dict[str, Any], answer: Generation, attempt: int
    ) -> tuple[dict[str, Any], str | None]:
        if answer.error:
            return self._outputs(UNREADABLE, f"engine error: {answer.error}", attempt), None
        if answer.tokens >= self.config.sampling.max_tokens:
            result: tuple[str, str] | str = (
                f"verdict cut off at max_tokens ({self.config.sampling.max_tokens})"
            )
        else:
            result = parse_verdict(answer.text)
        if isinstance(result, tuple):
            return self._outputs(*result, attempt), None
        # Asked again while asks are left (a reason makes the base class ask again); the
        # last unreadable answer is kept as such, never a reject.
        outputs = self._outputs(UNREADABLE, result, attempt)
        return outputs, (result if attempt < self.asks else None)

    def _outputs(self, verdict: str, reason: str, attempt: int = 0) -> dict[str, Any]:
        verified = None if verdict == UNREADABLE else verdict == "agrees"
        return {
            self.verdict_column: verdict,
            self.verified_column: verified,
            self.reason_column: reason,
            **{self.counter(c): int(c == verdict) for c in self.counters},
            self.counter("reasked"): int(attempt > 1),
        }
