"""ReasonDistill: a teacher model reasons over the positive mixed with its hard negatives.

The positive and the negatives are shuffled by a generator seeded from the run's seed and the
row's id, so the order is the same on every run and on every machine, and shown as numbered
documents. ``document_order`` records the shuffle (0 is the positive, k the k-th negative) and
``positive_document`` the number the positive got; ``cites_positive`` says whether the
reasoning cites that number (``[2]``, or "document 2"), a free signal that it used the
positive. The raw response is kept; when the model
separates its thinking with ``<think>`` tags, the two parts also get their own columns.

The request is kept as the engine got it (``<output_key>_prompt``: the chat messages, the
documents cut to their budgets, in their order), with its prompt and generated token counts:
a training example is that prompt and this response, never a re-rendering that could drift
(``rare_ray.export``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from rare_ray.config import ReasonDistillConfig
from rare_ray.engines.contract import Fit, Generation, Messages
from rare_ray.operators.base import LLMOperator
from rare_ray.rows import ID, MESSAGES_TYPE
from rare_ray.seeding import row_rng, row_seed
from rare_ray.vocabulary import ColumnKind

SYSTEM_PROMPT = (
    "You are an expert who answers questions by reasoning carefully over retrieved documents. "
    "Some documents are relevant and some only look relevant. Show your reasoning step by "
    "step before you answer."
)

USER_PROMPT = """Scenario:
{scenario}

Question:
{question}

Retrieved documents:
{documents}

Work through the question step by step:
1. For each document, decide whether it bears on the question and say why, citing it by its number, e.g. [2].
2. Take the relevant facts and combine them with the details of the scenario, one step at a time.
3. End with a clear, direct answer to the question."""

_THINK = re.compile(r"^\s*<think>(?P<think>.*?)</think>(?P<answer>.*)$", re.DOTALL)


def document_order(seed: int, row_id: str, n_documents: int) -> list[int]:
    """The order in which the documents are shown: 0 is the positive, k the k-th negative."""
    order = list(range(n_documents))
    row_rng(seed, row_id, "shuffle").shuffle(order)
    return order


def cites(text: str, number: int) -> bool:
    """Whether ``text`` cites document ``number`` the way the prompt asks (``[2]``), or by
    name ("Document 2", "doc. 2")."""
    return re.search(rf"\[{number}\]|\bdoc(?:ument)?\.?\s*#?{number}\b", text, re.I) is not None


def split_thinking(text: str) -> tuple[str | None, str | None]:
    """``(thinking, answer)`` when the response opens with a ``<think>`` block, else Nones."""
    match = _THINK.match(text)
    if not match:
        return None, None
    return match["think"].strip(), match["answer"].strip()


class ReasonDistill(LLMOperator[ReasonDistillConfig]):
    """Has a teacher model write a reasoning chain over the positive and its negatives."""

    name = "distill"
    config_class = ReasonDistillConfig
    counters = ("truncated", "unfinished", "cited_positive")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        out = self.config.output_key
        self.think_column, self.answer_column = f"{out}_think", f"{out}_answer"
        self.finished_column = f"{out}_finished"
        self.prompt_column = f"{out}_prompt"
        self.prompt_tokens_column = f"{out}_prompt_tokens"
        self.tokens_column = f"{out}_tokens"

    @property
    def input_columns(self) -> Mapping[str, ColumnKind]:
        cfg = self.config
        return {
            cfg.input_text_key: "text",
            cfg.input_question_key: "text",
            cfg.input_scenario_key: "text",
            cfg.input_hardneg_key: "text_list",
        }

    @property
    def text_key(self) -> str:
        return self.config.input_text_key

    @property
    def own_fields(self) -> Sequence[pa.Field]:
        return [
            pa.field("document_order", pa.list_(pa.int32())),
            pa.field("positive_document", pa.int32()),
            pa.field("cites_positive", pa.bool_()),
            pa.field(self.config.output_key, pa.string()),
            pa.field(self.think_column, pa.string()),
            pa.field(self.answer_column, pa.string()),
            pa.field(self.finished_column, pa.bool_()),
            pa.field(self.prompt_column, MESSAGES_TYPE),
            pa.field(self.prompt_tokens_column, pa.int32()),
            pa.field(self.tokens_column, pa.int32()),
        ]

    def documents(self, row: dict[str, Any]) -> list[str]:
        """Positive first, then the negatives: the indices ``document_order`` refers to."""
        return [row[self.config.input_text_key], *(row[self.config.input_hardneg_key] or [])]

    def render(
        self, row: dict[str, Any], fit: Fit, attempt: int = 1
    ) -> tuple[Messages, dict[str, Any]]:
        cfg = self.config
        docs = self.documents(row)
        shown = [
            fit(docs[i], cfg.max_doc_tokens) for i in document_order(self.seed, row[ID], len(docs))
        ]
        listing = "\n\n".join(f"[{n}] {text}" for n, text in enumerate(shown, start=1))
        user = USER_PROMPT.format(
            scenario=row[cfg.input_scenario_key],
            question=row[cfg.input_question_key],
            documents=listing,
        )
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        return messages, self.engine.sampling(cfg.sampling, row_seed(self.seed, row[ID], self.name))

    def read(
        self, row: dict[str, Any], answer: Generation, attempt: int
    ) -> tuple[dict[str, Any], str | None]:
        text = answer.text
        if answer.error:
            reason: str | None = f"engine error: {answer.error}"
        elif not text.strip():
            reason = "empty generation"
        else:
            reason = None
        order = document_order(self.seed, row[ID], len(self.documents(row)))
        think, final = split_thinking(text) if reason is None else (None, None)
        finished = reason is None and answer.tokens < self.config.sampling.max_tokens
        positive = order.index(0) + 1
        cited = None if reason is not None else cites(text, positive)
        outputs = {
            "document_order": order,
            "positive_document": positive,
            "cites_positive": cited,
            self.config.output_key: text if reason is None else None,
            self.think_column: think,
            self.answer_column: final,
            self.finished_column: finished if reason is None else None,
            self.prompt_column: answer.messages,
            self.prompt_tokens_column: answer.prompt_tokens,
            self.tokens_column: answer.tokens,
            self.counter("unfinished"): int(reason is None and not finished),
            self.counter("truncated"): answer.truncated,
            self.counter("cited_positive"): int(bool(cited)),
        }
        return outputs, reason
