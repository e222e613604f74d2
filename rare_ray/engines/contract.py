"""What every LLM backend shares: the request an operator renders and what it gets back.

An operator describes each request with a function ``render(row, fit) -> (messages, sampling)``
(``Render``), where ``fit(text, max_tokens)`` (``Fit``) cuts a document to a token budget and
counts the cuts (``TokenBudget`` does it with the model's own tokenizer, ``CharBudget`` by
characters where the tokenizer is unknown). ``sampling`` is vLLM-shaped;
``json_schema_sampling`` adds a JSON-schema constraint to it.

A backend is an ``EngineHandle``: started once on the driver (``rare_ray.engines.Engines``
starts one per engine config and keeps it for the whole run), picklable, so that a stage's
workers each open a ``Client`` on it. ``Client.generate(rows, render)`` renders the rows and
answers each with a ``Generation``: its text, its tokens (a response cut off at
``max_tokens`` counts at least ``max_tokens``), its error (None, or why the request failed;
never an exception for one row), how many documents its render cut to fit, and the rendered
request with its prompt tokens.

``rare_ray.engines.generate`` runs one request per row of a Dataset on a client and gives back
every input row with its own columns, types untouched, followed by ``RESULT_FIELDS``
(``with_results`` builds that table).

No import of the backends here, nor of Ray; transformers is imported only to load a tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, cast

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


@dataclass
class Generation:
    """One request's answer: ``error`` is None or why it failed (then ``text`` is empty).

    ``messages`` is the request exactly as rendered (documents cut to their budgets), so that
    an operator can keep the prompt its answer came from; ``prompt_tokens`` is what the
    engine counted of it (0 where a server does not say).
    """

    text: str = ""
    tokens: int = 0
    error: str | None = None
    truncated: int = 0  # documents its render cut to their token budget
    messages: Messages | None = None
    prompt_tokens: int = 0


class Client(Protocol):
    """An open connection to an engine, inside one worker."""

    async def generate(self, rows: Sequence[dict[str, Any]], render: Render) -> list[Generation]:
        """Renders every row and answers it; one ``Generation`` per row, in order."""
        ...


class EngineHandle(Protocol):
    """A started engine, as the driver holds it and hands it (pickled) to a stage's workers."""

    def client(self) -> Client:
        """Opens a client in the calling process (a worker)."""
        ...

    def reports(self) -> list[dict[str, Any]]:
        """What each of its engines did so far (``time.time()`` stamps; empty when the engine
        is not ours, like a server's): ``start_s``, ``ready_at``, ``first_token_at``,
        ``last_token_at``, ``busy_s`` (seconds it had requests running), ``requests``."""
        ...

    def close(self) -> None:
        """Stops the engine (on the driver, once no stage needs it)."""
        ...


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


class CharBudget:
    """Cuts documents to ``chars_per_token`` characters per token of budget; counts the cuts."""

    def __init__(self, chars_per_token: float):
        self.chars_per_token = chars_per_token
        self.truncated = 0

    def __call__(self, text: str, max_tokens: int) -> str:
        limit = int(max_tokens * self.chars_per_token)
        if len(text) <= limit:
            return text
        self.truncated += 1
        cut = text[:limit]
        # End on a word boundary when there is one near the end.
        space = cut.rfind(" ", int(limit * 0.9))
        return cut[:space] if space > 0 else cut


def chars_per_token(tokenizer: Any, sample: str) -> float:
    """How many characters of ``sample`` one token of ``tokenizer`` covers, on average."""
    return len(sample) / max(1, len(tokenizer.encode(sample, add_special_tokens=False)))


def json_schema_sampling(schema: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
    """Sampling parameters that constrain the answer to ``schema`` (vLLM structured outputs).

    The OpenAI engine sends the same schema as ``response_format`` (``engine.structured_outputs``).
    """
    return {**sampling, "structured_outputs": {"json": json.dumps(schema)}}
