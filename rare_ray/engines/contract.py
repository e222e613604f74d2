"""What every LLM backend shares: the request an operator renders and the columns it gets back.

An operator describes each request with a function ``render(row, fit) -> (messages, sampling)``
(``Render``), where ``fit(text, max_tokens)`` (``Fit``) cuts a document to a token budget and
counts the cuts (``TokenBudget`` does it with the model's own tokenizer). ``sampling`` is
vLLM-shaped; ``json_schema_sampling`` adds a JSON-schema constraint to it.

Whichever backend runs it (``rare_ray.engines.generate`` picks one by ``engine.kind``), every
input row comes back with its own columns, types untouched, followed by ``RESULT_FIELDS``:
``_truncated`` (documents cut to fit), ``_generated_text``, ``_generated_tokens`` (a response
cut off at ``max_tokens`` counts at least ``max_tokens``) and ``_inference_error`` (null, or why
the request failed). ``with_results`` builds that table for both backends.

No import of the backends here, nor of Ray; transformers is imported only to load a tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, cast

import pyarrow as pa

Messages = list[dict[str, str]]
Fit = Callable[[str, int], str]
Render = Callable[[dict[str, Any], Fit], tuple[Messages, dict[str, Any]]]

GENERATED_TEXT = "_generated_text"
GENERATED_TOKENS = "_generated_tokens"
INFERENCE_ERROR = "_inference_error"
TRUNCATED = "_truncated"

# The one result schema: these columns, in this order, after the input's own.
RESULT_FIELDS: list[pa.Field] = [
    pa.field(TRUNCATED, pa.int32()),
    pa.field(GENERATED_TEXT, pa.string()),
    pa.field(GENERATED_TOKENS, pa.int32()),
    pa.field(INFERENCE_ERROR, pa.string()),
]
RESULT_COLUMNS: tuple[str, ...] = tuple(f.name for f in RESULT_FIELDS)


def with_results(
    inputs: pa.Table,
    truncated: Sequence[int] | pa.Array | pa.ChunkedArray,
    text: Sequence[str] | pa.Array | pa.ChunkedArray,
    tokens: Sequence[int] | pa.Array | pa.ChunkedArray,
    errors: Sequence[str | None] | pa.Array | pa.ChunkedArray,
) -> pa.Table:
    """``inputs``' own columns (any result columns it has are dropped) and then the results.

    Each result column is cast to its type in ``RESULT_FIELDS``.
    """
    base = inputs.drop_columns([c for c in RESULT_COLUMNS if c in inputs.column_names])
    for field, values in zip(RESULT_FIELDS, (truncated, text, tokens, errors), strict=True):
        if isinstance(values, pa.Array | pa.ChunkedArray):
            column = values.cast(field.type)
        else:
            column = pa.array(values, field.type)
        base = base.append_column(field, column)
    return base


@lru_cache(maxsize=4)
def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


class TokenBudget:
    """Truncates documents to a token budget; counts how many it had to cut."""

    def __init__(self, model: str):
        self.tokenizer = load_tokenizer(model)
        self.truncated = 0

    def __call__(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= max_tokens:
            return text
        self.truncated += 1
        return cast(str, self.tokenizer.decode(ids[:max_tokens]))


def json_schema_sampling(schema: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
    """Sampling parameters that constrain the answer to ``schema`` (vLLM structured outputs).

    The OpenAI engine sends the same schema as ``response_format`` (``engine.structured_outputs``).
    """
    return {**sampling, "structured_outputs": {"json": json.dumps(schema)}}
