"""Generation against an OpenAI-compatible chat-completions API.

``OpenAIEndpoint`` is the engine handle (``rare_ray.engines.contract``): nothing to start, as
the server runs on its own, and every stage of a run shares it. Each of a stage's
``engine.workers`` actors opens an ``OpenAIClient`` on it, which keeps up to
``engine.concurrency`` requests in flight (asyncio + aiohttp, which ``ray[default]`` installs)
and answers each row with a ``Generation``, as the vLLM backend does.

Why not ``ray.data.llm``'s ``HttpRequestProcessorConfig`` (Ray 2.60): its stage raises once a
request has used up its retries, failing the whole job instead of marking the row (it has no
``should_continue_on_error``), and hands 4xx error bodies back as if they were answers. It
retries only 408/429/502/503/504 (not 500), with no jitter, no cap and no regard for
Retry-After, awaits the requests of a batch one after another, has no request timeout, and
would need the API key in its ``headers`` config field.

Requests. The operators' sampling dicts are vLLM-shaped; ``request_body`` translates them:
``temperature``, ``top_p`` and ``seed`` (only with ``engine.seed_requests``) go as they are,
``max_tokens`` under ``engine.max_tokens_param``, and a JSON-schema constraint (Doc2Query's
``structured_outputs``) as ``response_format={"type": "json_schema", ...}`` when
``engine.structured_outputs`` is on, else not at all (the answer is parsed and checked anyway).

Tokens. ``_generated_tokens`` is the response's ``usage.completion_tokens`` (0 without usage).
A choice that stopped with ``finish_reason == "length"`` counts at least the request's
``max_tokens``, so the operators' "cut off at max_tokens" test (``tokens >= max_tokens``)
treats it as cut off even when a server reports no or odd usage.

Truncation. With ``engine.tokenizer`` documents are cut to their token budgets with that
tokenizer, as on the vLLM path. Without one the served model's tokenizer is unknown, so a
budget of N tokens keeps ``N * engine.chars_per_token`` characters (3 by default: English BPE
averages about 4 characters a token, so this errs towards cutting too much, not too little).

Retries. HTTP 408, 429 and 5xx, timeouts and connection errors are retried up to
``engine.max_retries`` times (so ``max_retries + 1`` attempts) after a wait of
``backoff_base_s * 2**(retry-1)``, capped at ``backoff_max_s`` and jittered to 50-100 %; a
``Retry-After`` (or ``retry-after-ms``) header replaces that wait, up to ``backoff_max_s``.
Other 4xx, malformed responses and refusals are not retried. A request that still fails
leaves its error in ``_inference_error``; it never fails the job.

The key. It is read from the environment variable ``engine.api_key_env`` on the worker, or,
where the worker's environment lacks it, handed over from the driver's environment wrapped in
``pydantic.SecretStr`` (whose ``repr`` shows ``'**********'``). It only ever goes into the ``Authorization``
header; error texts are scrubbed of it before they reach a row.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from rare_ray.config import OpenAIEngineConfig
from rare_ray.engines.contract import (
    CharBudget,
    Generation,
    Messages,
    Render,
    TokenBudget,
    load_tokenizer,
)
from rare_ray.vocabulary import REDACTED

logger = logging.getLogger("rare_ray")

# The key the operators' sampling dicts use for a JSON-schema constraint (json_schema_sampling).
STRUCTURED_OUTPUTS = "structured_outputs"
# Longest piece of an error response body kept in _inference_error.
MAX_ERROR_CHARS = 500


def retryable(status: int) -> bool:
    """Statuses worth another try: request timeout, rate limit, server errors."""
    return status in (408, 429) or 500 <= status <= 599


def request_body(
    engine: OpenAIEngineConfig, messages: Messages, sampling: Mapping[str, Any]
) -> dict[str, Any]:
    """The chat-completions request for one rendered row."""
    body: dict[str, Any] = {**engine.extra_body, "model": engine.model, "messages": messages}
    for key, value in sampling.items():
        if key == STRUCTURED_OUTPUTS:
            if engine.structured_outputs:
                body["response_format"] = _response_format(value, engine.strict_schema)
        elif key == "max_tokens":
            body[engine.max_tokens_param] = value
        else:
            body[key] = value
    return body


def _response_format(constraint: Mapping[str, Any], strict: bool) -> dict[str, Any]:
    if set(constraint) != {"json"}:
        raise ValueError(
            f"only JSON-schema constraints can be sent as response_format, got {sorted(constraint)}"
        )
    schema = constraint["json"]
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": json.loads(schema) if isinstance(schema, str) else schema,
            "strict": strict,
        },
    }


class _Refused(ValueError):
    pass


def read_response(payload: Any, max_tokens: int | None) -> tuple[str, int, int]:
    """``(text, completion tokens, prompt tokens)`` of a chat-completions response (tokens 0
    where its ``usage`` does not say); ValueError if malformed.

    A choice cut off by the token limit (``finish_reason == "length"``) counts at least
    ``max_tokens``, so that the operators see it as cut off whatever the usage says.
    """
    try:
        choice = payload["choices"][0]
        message = choice.get("message") or {}
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"no choices in the response ({type(e).__name__}: {e})") from e
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None:
        if message.get("refusal"):
            raise _Refused(f"refused: {message['refusal']}")
        content = ""
    if not isinstance(content, str):
        raise ValueError(f"message content is a {type(content).__name__}, not text")
    usage = payload.get("usage") or {}
    tokens, prompt_tokens = _count(usage, "completion_tokens"), _count(usage, "prompt_tokens")
    if choice.get("finish_reason") == "length" and max_tokens:
        tokens = max(tokens, max_tokens)
    return content, tokens, prompt_tokens


def _count(usage: Any, key: str) -> int:
    try:
        return int(usage.get(key) or 0)
    except (AttributeError, TypeError, ValueError):
        return 0


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a ``retry-after-ms`` or ``Retry-After`` header (seconds or a date) asks for."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff(engine: OpenAIEngineConfig, retry: int) -> float:
    """Wait before retry number ``retry`` (1, 2, ...): exponential, capped, jittered."""
    delay: float = min(engine.backoff_max_s, engine.backoff_base_s * 2 ** (retry - 1))
    return delay * random.uniform(0.5, 1.0)


def _error_text(status: int, raw: bytes) -> str:
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    message: Any = None
    if isinstance(payload, dict):
        error = payload.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or payload.get("message") or payload.get("detail")
    if not message:
        message = raw.decode("utf-8", errors="replace")
    text = " ".join(str(message).split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "..."
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


@dataclass(frozen=True)
class OpenAIEndpoint:
    """The engine handle: the server's settings, and the driver's key for workers that lack it."""

    engine: OpenAIEngineConfig
    driver_key: SecretStr | None = None

    @classmethod
    def start(cls, engine: OpenAIEngineConfig) -> OpenAIEndpoint:
        key = os.environ.get(engine.api_key_env) if engine.api_key_env else None
        return cls(engine, SecretStr(key) if key else None)

    def client(self) -> OpenAIClient:
        return OpenAIClient(self.engine, self.driver_key)

    def reports(self) -> list[dict[str, Any]]:
        return []  # the server's engines are not ours to watch

    def close(self) -> None:
        return None  # nor to stop


class OpenAIClient:
    """Renders rows and sends them to the server, from one worker (``Client``)."""

    def __init__(self, engine: OpenAIEngineConfig, driver_key: SecretStr | None = None):
        self.engine = engine
        self.url = f"{engine.base_url}/chat/completions"
        self._key = self._resolve_key(driver_key)
        self._headers = {"Content-Type": "application/json"}
        if self._key is not None:
            self._headers["Authorization"] = f"Bearer {self._key.get_secret_value()}"
        if engine.tokenizer:
            load_tokenizer(engine.tokenizer)  # loaded once per worker; a bad path fails here
        self._slots: asyncio.Semaphore | None = None
        # Batches render in threads; a Hugging Face tokenizer must not be used by two at once
        # ("Already borrowed").
        self._render_lock = threading.Lock()

    def _resolve_key(self, driver_key: SecretStr | None) -> SecretStr | None:
        name = self.engine.api_key_env
        if name is None:
            return None
        value = os.environ.get(name)
        if value:
            return SecretStr(value)
        if driver_key is not None and driver_key.get_secret_value():
            return driver_key
        raise RuntimeError(
            f"engine.api_key_env names {name!r}, which is set neither on the driver nor on "
            "this worker; set it, or set engine.api_key_env: null for a server without a key"
        )

    def _scrub(self, text: str) -> str:
        if self._key is not None and self._key.get_secret_value():
            text = text.replace(self._key.get_secret_value(), REDACTED)
        return text

    def _budget(self) -> TokenBudget | CharBudget:
        if self.engine.tokenizer:
            return TokenBudget(self.engine.tokenizer)
        return CharBudget(self.engine.chars_per_token)

    def _render(
        self, rows: Sequence[dict[str, Any]], render: Render
    ) -> tuple[list[dict[str, Any]], list[int]]:
        bodies, truncated = [], []
        with self._render_lock:
            for row in rows:
                fit = self._budget()
                messages, sampling = render(row, fit)
                bodies.append(request_body(self.engine, messages, sampling))
                truncated.append(fit.truncated)
        return bodies, truncated

    async def generate(self, rows: Sequence[dict[str, Any]], render: Render) -> list[Generation]:
        import aiohttp

        # Tokenizing is CPU work: off the event loop that other batches' requests share.
        bodies, truncated = await asyncio.to_thread(self._render, rows, render)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.engine.concurrency)
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.engine.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.engine.concurrency),
        ) as session:
            results = await asyncio.gather(*(self._request(session, b) for b in bodies))
        for result, cut, body in zip(results, truncated, bodies, strict=True):
            result.truncated, result.messages = cut, body["messages"]
        return list(results)

    async def _request(self, session: Any, body: dict[str, Any]) -> Generation:
        assert self._slots is not None
        async with self._slots:
            try:
                result = await self._post(session, body)
            except Exception as e:  # whatever it is, it is this row's error, not the job's
                result = Generation(error=f"{type(e).__name__}: {e}")
        if result.error is not None:
            result.error = self._scrub(result.error)
        return result

    async def _post(self, session: Any, body: dict[str, Any]) -> Generation:
        import aiohttp

        engine = self.engine
        attempts = engine.max_retries + 1
        max_tokens = body.get(engine.max_tokens_param)
        last_error = ""
        for attempt in range(1, attempts + 1):
            wait: float | None = None
            try:
                async with session.post(self.url, json=body, headers=self._headers) as resp:
                    raw = await resp.read()
                    if 200 <= resp.status < 300:
                        try:
                            text, tokens, prompt = read_response(json.loads(raw), max_tokens)
                        except _Refused as e:
                            return Generation(error=str(e))
                        except ValueError as e:
                            return Generation(error=f"malformed response: {e}")
                        return Generation(text, tokens, prompt_tokens=prompt)
                    last_error = _error_text(resp.status, raw)
                    if not retryable(resp.status):
                        return Generation(error=last_error)
                    wait = retry_after(resp.headers)
            except aiohttp.InvalidURL as e:
                return Generation(error=f"invalid URL: {e}")
            except (aiohttp.ClientError, TimeoutError) as e:
                last_error = f"{type(e).__name__}: {e}".rstrip(": ")
            if attempt < attempts:
                delay = (
                    backoff(engine, attempt) if wait is None else min(wait, engine.backoff_max_s)
                )
                logger.debug("request failed (%s), retry %d in %.1f s", last_error, attempt, delay)
                await asyncio.sleep(delay)
        return Generation(error=f"{last_error} (gave up after {attempts} attempts)")
