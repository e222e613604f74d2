"""Engines the operators run on: LLMs (vLLM or an OpenAI-compatible API) and Lucene BM25.

``generate`` runs an operator's requests on the LLM engine its config names (``engine.kind``);
``contract`` holds what both LLM backends share. The backends are imported only when called,
so ``rare_ray.engines.lucene`` and the rest load without the vLLM stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rare_ray.config import OpenAIEngineConfig, VLLMEngineConfig

if TYPE_CHECKING:
    import ray.data

    from rare_ray.config import EngineConfig
    from rare_ray.engines.contract import Render


def generate(ds: ray.data.Dataset, engine: EngineConfig, render: Render) -> ray.data.Dataset:
    """Run one request per row of ``ds`` on ``engine``; every input row comes back, with its
    generation (the columns of ``rare_ray.engines.contract.RESULT_FIELDS``)."""
    if isinstance(engine, OpenAIEngineConfig):
        from rare_ray.engines import openai_http

        return openai_http.generate(ds, engine, render)
    if isinstance(engine, VLLMEngineConfig):
        from rare_ray.engines import vllm

        return vllm.generate(ds, engine, render)
    raise TypeError(f"no LLM engine for {type(engine).__name__} (kind {engine.kind!r})")
