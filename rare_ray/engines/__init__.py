"""Engines the operators run on: LLMs (vLLM or an OpenAI-compatible API) and Lucene BM25.

An LLM engine is started once per run and engine config (``Engines``), shared by every stage
that names that config, and closed when the run ends: ``start`` picks the backend by
``engine.kind``; ``contract`` holds what the backends share. ``map_with_engine`` runs a stage's
batches through async workers that each open a client on the engine, and ``generate`` is the
simplest such stage: one request per row. The backends are imported only when called, so
``rare_ray.engines.lucene`` and the rest load without the vLLM stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rare_ray.config import OpenAIEngineConfig, VLLMEngineConfig

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from rare_ray.config import EngineConfig
    from rare_ray.engines.contract import Client, EngineHandle, Render


def start(engine: EngineConfig) -> EngineHandle:
    """Starts ``engine`` (without waiting for it to be ready) and returns its handle."""
    if isinstance(engine, OpenAIEngineConfig):
        from rare_ray.engines.openai_http import OpenAIEndpoint

        return OpenAIEndpoint.start(engine)
    if isinstance(engine, VLLMEngineConfig):
        from rare_ray.engines.vllm import VLLMPool

        return VLLMPool.start(engine)
    raise TypeError(f"no LLM engine for {type(engine).__name__} (kind {engine.kind!r})")


class Engines:
    """The run's LLM engines: one per distinct engine config, started on first use and kept
    until ``close``, so that every stage and every re-ask of a run uses the same ones."""

    def __init__(self) -> None:
        self._open: dict[str, EngineHandle] = {}

    def get(self, engine: EngineConfig) -> EngineHandle:
        key = engine.model_dump_json()
        if key not in self._open:
            self._open[key] = start(engine)
        return self._open[key]

    def reports(self) -> list[dict[str, Any]]:
        """Every engine's report (``EngineHandle.reports``)."""
        return [r for handle in self._open.values() for r in handle.reports()]

    def close(self) -> None:
        """Stops every engine, in the order they were started."""
        while self._open:
            _, handle = self._open.popitem()
            handle.close()


class EngineWorker:
    """A Ray Data UDF (an async actor) that answers batches with ``answer(batch, client)``
    on a client it opens once on the engine handle."""

    def __init__(self, handle: EngineHandle, answer: Callable[[pa.Table, Client], Any]):
        self.client = handle.client()
        self.answer = answer

    async def __call__(self, batch: pa.Table) -> pa.Table:
        result: pa.Table = await self.answer(batch, self.client)
        return result


def map_with_engine(
    ds: ray.data.Dataset,
    engine: EngineConfig,
    handle: EngineHandle,
    answer: Callable[[pa.Table, Client], Any],
) -> ray.data.Dataset:
    """``answer(batch, client)`` (async) over ``ds`` in batches of ``engine.batch_size``, in
    worker actors that keep several batches in flight against the engine."""
    import ray.data

    if isinstance(engine, OpenAIEngineConfig):
        workers, cpus, in_flight = engine.workers, engine.cpus_per_worker, 4
    else:
        # One worker per replica renders for it (chat template, tokenizer) and keeps
        # max_concurrent_batches in flight, so the engine always has the next batch queued.
        workers, cpus, in_flight = engine.replicas, 0.5, engine.max_concurrent_batches
    # Blocks of one batch each: Ray Data then spreads them over the workers and keeps
    # ``in_flight`` of them running per worker. One big block would go to one worker.
    return ds.repartition(target_num_rows_per_block=engine.batch_size).map_batches(
        EngineWorker,
        fn_constructor_kwargs={"handle": handle, "answer": answer},
        batch_format="pyarrow",
        batch_size=engine.batch_size,
        compute=ray.data.ActorPoolStrategy(
            size=workers,
            max_tasks_in_flight_per_actor=in_flight,
            max_concurrent_calls_per_actor=in_flight,
        ),
        num_cpus=cpus,
    )


def generate(
    ds: ray.data.Dataset,
    engine: EngineConfig,
    render: Render,
    handle: EngineHandle | None = None,
) -> ray.data.Dataset:
    """One request per row of ``ds``; every input row comes back with its own columns and the
    generation's (``rare_ray.engines.contract.RESULT_FIELDS``). Without ``handle`` the engine
    is started for this Dataset and stops when nothing refers to it any more."""
    return map_with_engine(ds, engine, handle or start(engine), _Ask(render))


class _Ask:
    """``answer`` for ``generate``: one ask per row, the results as columns."""

    def __init__(self, render: Render):
        self.render = render

    async def __call__(self, batch: pa.Table, client: Client) -> pa.Table:
        from rare_ray.engines.contract import with_results

        answers = await client.generate(batch.to_pylist(), self.render)
        return with_results(
            batch,
            truncated=[a.truncated for a in answers],
            text=[a.text for a in answers],
            tokens=[a.tokens for a in answers],
            errors=[a.error for a in answers],
        )
