"""A scripted chat-completions server, and an HTTP engine config that points at one.

``ScriptedServer`` is a test double for an OpenAI-compatible API (stdlib http.server on
127.0.0.1, in a thread): it answers from a script or a function of the request and records
every request it got, headers included. It stands in for hosted APIs, which cannot be reached
from a test, and for server behaviour a real server cannot be made to show on demand (429s,
500s, malformed bodies, an error that echoes the key).

``engine_for(base_url)`` is the HTTP engine's config for such a server, reading its key from
``KEY_ENV``; tests/conftest.py's ``api_key`` fixture sets that variable to ``KEY``.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rare_ray.config import OpenAIEngineConfig

Reply = tuple[int, dict[str, str], Any]

KEY_ENV = "RARE_RAY_TEST_API_KEY"
# A fresh key per session: it must reach the server and nothing else.
KEY = "sk-test-" + secrets.token_hex(16)


def engine_for(base_url: str, **overrides: Any) -> OpenAIEngineConfig:
    settings: dict[str, Any] = {
        "kind": "openai",
        "base_url": base_url,
        "model": "test",
        "api_key_env": KEY_ENV,
        "max_retries": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 30,
        **overrides,
    }
    return OpenAIEngineConfig.model_validate(settings)


def answer(text: str = "fine", tokens: int | None = 3, finish: str = "stop") -> Reply:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
    }
    if tokens is not None:
        body["usage"] = {"prompt_tokens": 9, "completion_tokens": tokens}
    return 200, {}, body


def failure(status: int, message: str = "oops", **headers: str) -> Reply:
    return status, headers, {"error": {"message": message, "type": "error", "code": status}}


class ScriptedServer:
    """A chat-completions endpoint answering from a script (the last reply repeats), or from
    a function of the request; it records every request it got."""

    def __init__(self, replies: list[Reply] | Callable[[dict[str, Any]], Reply]):
        self.replies = replies
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"headers": dict(self.headers), "body": body})
                    status, headers, payload = server.reply(body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def reply(self, body: dict[str, Any]) -> Reply:
        if callable(self.replies):
            return self.replies(body)
        return self.replies[min(len(self.requests), len(self.replies)) - 1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
