"""A zero-cost engine: an OpenAI-compatible chat-completions server that answers at once.

A test double, named as one wherever it is used. It stands in for the LLM so that
``rare-ray bench overhead`` measures what the job itself costs around its engines (reading,
shuffling, checkpoints, commits, publishing, the driver) at corpus sizes no real engine could
answer on one machine. Its answers have the shapes the stages parse, and nothing more:

- a request whose ``response_format`` schema asks for a ``verdict`` (AnswerVerify) gets
  ``{"reason": ..., "verdict": "agrees"}``;
- any other request with a ``response_format`` (Doc2Query) gets every property of the schema
  filled with words drawn from the prompt (seeded by the prompt, so the same document always
  gets the same question, and different documents get different ones: BM25 searches real,
  varied queries);
- a request without one (ReasonDistill) gets a ``<think>`` block and a final answer.

Every answer reports 12 generated tokens, far below any ``max_tokens``, so no row is cut off.
With ``--latency S`` each answer waits S seconds first (requests still overlap): a stage then
lasts long enough for a test to stop the job in the middle of it.

Run it in a process of its own, so that its CPU time is not the driver's:
``python -m rare_ray.testing.instant_server`` prints ``http://127.0.0.1:PORT/v1`` on its first
line and serves until it is stopped; ``GET /stats`` answers the requests served so far and the
process's CPU seconds. ``running_instant_server()`` does all that for a ``with`` block.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Words of the prompt a Doc2Query field takes, and the tokens every answer reports.
FIELD_WORDS = 8
GENERATED_TOKENS = 12


def reply_text(body: dict[str, Any]) -> str:
    """The answer's text for a chat-completions request ``body``."""
    prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema")
    if schema is None:
        return "<think>Document 1 holds the facts the question needs.</think> Document 1."
    properties = list(schema.get("properties", {}))
    if "verdict" in properties:
        return json.dumps({"reason": "Both reach the same conclusion.", "verdict": "agrees"})
    words = [w for w in prompt.split() if w.isalpha()] or ["word"]
    rng = random.Random(zlib.crc32(prompt.encode()))
    fields = {name: " ".join(rng.choices(words, k=FIELD_WORDS)) for name in properties}
    return json.dumps(fields)


def completion(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-instant",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "instant"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply_text(body)},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": GENERATED_TOKENS},
    }


async def serve(host: str, port: int, latency_s: float = 0.0) -> None:
    from aiohttp import web  # ray[default] installs it

    served = {"requests": 0}

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        served["requests"] += 1
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        return web.json_response(completion(body))

    async def stats(_request: web.Request) -> web.Response:
        cpu = time.process_time()
        return web.json_response({**served, "cpu_seconds": round(cpu, 3)})

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"http://{host}:{bound}/v1", flush=True)
    await asyncio.Event().wait()


@dataclass(frozen=True)
class InstantServer:
    base_url: str
    pid: int  # the server's process: a test can stop it (SIGSTOP) to hold every answer

    def stats(self) -> dict[str, Any]:
        """Requests served so far and the server process's CPU seconds."""
        root = self.base_url.removesuffix("/v1")
        with urllib.request.urlopen(f"{root}/stats", timeout=10) as response:
            return dict(json.loads(response.read()))


@contextmanager
def running_instant_server(
    host: str = "127.0.0.1", latency_s: float = 0.0
) -> Iterator[InstantServer]:
    """The server in a process of its own, for a ``with`` block."""
    command = [sys.executable, "-m", "rare_ray.testing.instant_server", "--host", host]
    proc = subprocess.Popen(
        [*command, "--latency", str(latency_s)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("http://"):
            raise RuntimeError(f"the instant server did not start (exit code {proc.poll()})")
        yield InstantServer(line, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.latency))


if __name__ == "__main__":
    main()
