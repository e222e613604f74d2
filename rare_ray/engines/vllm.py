"""The in-cluster vLLM backend: engine replicas that live as long as the run.

``VLLMPool.start(engine)`` starts ``engine.replicas`` Ray actors (``EngineReplica``), each with
one vLLM ``AsyncLLMEngine``, and returns at once: the engines load while the driver goes on.
Every stage of the run that uses the same engine config gets the same pool
(``rare_ray.engines.Engines``), so Doc2Query, its re-asks and ReasonDistill all run on engines
started once. A stage's workers open a ``VLLMClient`` on the pool: it renders rows next to the
tokenizer it already holds (chat template, prompt token ids) and sends each batch to a replica,
which runs its requests concurrently in the engine's continuous batching. ``close()`` shuts
the engines down before their actors go, so that a successful run ends without vLLM's
shutdown tracebacks.

Why engine actors of our own (the design choice of issue 12; the design notes' default is
``ray.data.llm`` "unless a measured blocker says otherwise", and this is that blocker, measured
by ``rare-ray bench pipeline`` in ``BENCHMARKS.md``). ``ray.data.llm`` ties an engine
to one Dataset execution: its engine actors are a Ray Data actor pool, started when the
Dataset starts and torn down when it ends. The job ran three executions on engines (Doc2Query,
the pass of its re-asks, ReasonDistill), so it started three engines per run, each of them
minutes of every GPU on a cluster, and the re-ask pass started one for a handful of rows. The
candidates were:

- a ``ray.serve.llm`` deployment, driven through the OpenAI-compatible engine: one engine for
  the run and an HTTP hop per request; it needs ``ray[serve]`` and ``ray[llm]``, whose pinned
  vLLM is the CUDA build (it cannot be installed on the CPU machines the tests run on, so it
  could not be measured here);
- one streaming Ray Data pipeline for the three stages: BM25 would hide behind generation,
  but each LLM stage would still be its own ``ray.data.llm`` processor with its own engines
  (two per model), and a re-ask cannot flow back upstream in a Dataset;
- engine actors owned by the run (this module): one engine start per replica per run,
  re-asks sent to the same engine from inside the batch that needed them, the engines kept
  warm across stages, and everything else (checkpoints, resume, Ray Data's streaming over the
  stage's rows) unchanged. ``rare-ray bench pipeline`` measures it against the processor
  (``BENCHMARKS.md``).

Restarts. A replica is a Ray actor with ``max_restarts`` = ``engine.max_restarts``: an engine
whose process dies (``EngineDeadError``) exits its actor, and so does a lost node; Ray starts a
new one (on any node with room) and the batches it held wait for it and run there (their task
retries are not capped: while an actor is only "unavailable", as the replica of a node not yet
declared dead is, capped retries are spent in seconds). A replica that keeps dying is dead for
good after its restarts, and its batches fail the stage instead of looping. One request that
fails leaves its error in its row and never fails the batch.

No node left. A replica whose node is lost while no other node can take it is never declared
dead: Ray keeps its restart pending (on an autoscaling cluster a new node may come), and the
stage waits. So the driver watches its replicas: every few seconds it reads their states from
Ray's control store, and once one that had been up has not been up for
``engine.unavailable_timeout_s``, the replicas are given up on and the driver's main thread
is interrupted (``SIGUSR1``, whose handler the pool installs there) with ``EnginesLost``: the
stage stops with how many shards it committed, and a rerun resumes from them. A signal,
because the main thread is waiting inside Ray Data's iterator, which no other thread can end;
a signal ends the wait.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rare_ray.config import VLLMEngineConfig
from rare_ray.engines.contract import Generation, Messages, Render, TokenBudget, load_tokenizer
from rare_ray.vocabulary import EnginesLost

logger = logging.getLogger("rare_ray")

# The engines' actor class, by name: the benches read its starts from Ray's task events.
REPLICA_CLASS = "EngineReplica"
# How often the driver reads its replicas' states (the watchdog of "No node left").
WATCH_INTERVAL_S = 5.0
# Ray starts its worker processes at niceness 15 (``worker_niceness``), below the driver, the
# raylet and the GCS, and every engine would inherit it: its scheduler, the structured-output
# grammar and (on a CPU) its compute then yield to any Ray Data bookkeeping in the driver,
# and rank equal with BM25's searchers and every other task on the node. The engines are the
# run's critical path, so their processes start at the driver's priority instead, the way
# Ray's own job supervisor starts a job's driver; everything else keeps Ray's 15 and takes
# what the engines leave. Measured by ``rare-ray bench pipeline`` (BENCHMARKS.md).
ENGINE_ENV_VARS = {"RAY_worker_niceness": "0"}
# On a CPU, vLLM's platform puts the model in a third process (its multiprocessing executor)
# next to the engine core, which waits on every step by spinning on a shared-memory queue
# (``sched_yield`` for up to a second after each read). In a Ray actor, where vLLM must spawn
# rather than fork, that process also imports torch and vLLM once more. With one worker
# (tensor_parallel_size 1) the engine core runs the model itself instead: one spawn and one
# import less at start, and no core spent spinning beside the model's threads. The engine core
# is still spawned with the OpenMP library vLLM preloads for its processes (``LD_PRELOAD``), so
# the model's threads are set up as in the worker they replace. Measured by ``rare-ray bench
# pipeline`` on 2 cores: the engine's processes used about one core instead of 1.7, at the
# same generation speed (BENCHMARKS.md).
CPU_ENGINE_ENV_VARS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def engine_runtime_env(engine: VLLMEngineConfig) -> dict[str, Any]:
    """The replicas' runtime env (Ray merges it with the job's, ``env_vars`` key by key)."""
    env_vars = dict(ENGINE_ENV_VARS)
    if engine.device == "cpu" and engine.workers_per_replica == 1:
        env_vars.update(CPU_ENGINE_ENV_VARS)
    return {"env_vars": env_vars}


def engine_kwargs(engine: VLLMEngineConfig) -> dict[str, Any]:
    """vLLM's ``AsyncEngineArgs`` for one replica (the model aside)."""
    parallel = engine.workers_per_replica
    return {
        "max_model_len": engine.max_model_len,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        # One GPU: vLLM's single-process executor; more: its Ray executor, whose workers land
        # in the replica's placement group (the actor captures it for its child tasks).
        "distributed_executor_backend": "uni" if parallel == 1 else "ray",
        # No free-form whitespace inside JSON answers: a weak model can loop on it forever.
        "structured_outputs_config": {
            "backend": engine.structured_output_backend,
            "disable_any_whitespace": True,
        },
        "enable_log_requests": False,
        # vLLM's periodic stats lines; the manifest and the benches record what we need.
        "disable_log_stats": True,
        **engine.engine_kwargs,
    }


def sampling_params(params: dict[str, Any], final_only: bool = False) -> Any:
    """vLLM ``SamplingParams`` from an operator's sampling dict (``json_schema_sampling``'s
    ``structured_outputs`` included). ``final_only``: the engine hands back the finished
    answer alone, not the answer so far after every step."""
    import vllm
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    params = dict(params)
    constraint = params.pop("structured_outputs", None)
    if final_only:
        params["output_kind"] = RequestOutputKind.FINAL_ONLY
    return vllm.SamplingParams(
        **params, structured_outputs=StructuredOutputsParams(**constraint) if constraint else None
    )


def _vllm_processes() -> list[str]:
    """The titles vLLM gave the processes it started under this one (``VLLM::EngineCore``,
    ``VLLM::Worker``...)."""
    import psutil  # a dependency of vLLM's

    titles = []
    for child in psutil.Process().children(recursive=True):
        try:
            title = " ".join(child.cmdline()).strip()
        except psutil.Error:  # gone already: not part of the engine
            continue
        if title.startswith("VLLM::"):
            titles.append(title.split()[0])
    return sorted(titles)


class EngineReplica:
    """One vLLM engine in a Ray actor (async: its requests share the engine's batches).

    Besides generating it keeps the numbers the benches report: when it was ready, when its
    first token came, and how long it had requests running.
    """

    def __init__(self, model: str, kwargs: dict[str, Any]):
        started = time.time()  # importing vLLM is part of an engine's start
        import vllm

        imported = time.time()
        self.engine = vllm.AsyncLLMEngine.from_engine_args(
            vllm.AsyncEngineArgs(model=model, **kwargs)
        )
        self.stats: dict[str, Any] = {
            "start_s": time.time() - started,
            "import_s": imported - started,  # of start_s, this process importing vLLM
            "ready_at": time.time(),
            "first_token_at": None,
            "last_token_at": None,
            "busy_s": 0.0,
            "requests": 0,
            "niceness": os.nice(0),  # its processes' CPU priority (ENGINE_ENV_VARS)
            "processes": _vllm_processes(),  # where the model runs (CPU_ENGINE_ENV_VARS)
        }
        self._running = 0
        self._busy_since = 0.0
        self._watching = False  # a request streams its tokens to see the first one

    async def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sequence[dict[str, Any]]
    ) -> list[tuple[str, int, str | None]]:
        """``(text, generated tokens, error)`` per prompt (token ids), in order."""
        return list(
            await asyncio.gather(*(self._one(p, s) for p, s in zip(prompts, sampling, strict=True)))
        )

    async def _one(
        self, prompt: Sequence[int], sampling: dict[str, Any]
    ) -> tuple[str, int, str | None]:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        # Only the finished answer comes back, not the answer so far after every step: with
        # hundreds of requests running, waking each one's generator per step costs this
        # process more than the engine's own scheduling. The replica's first request alone
        # streams, so that its first token, the engine's first, is seen.
        watch_first = self.stats["first_token_at"] is None and not self._watching
        self._watching = self._watching or watch_first
        self._enter()
        try:
            final = None
            async for out in self.engine.generate(
                request_id=uuid.uuid4().hex,
                prompt=TokensPrompt(prompt_token_ids=list(prompt)),
                sampling_params=sampling_params(sampling, final_only=not watch_first),
            ):
                now = time.time()
                self.stats["first_token_at"] = self.stats["first_token_at"] or now
                self.stats["last_token_at"] = now
                final = out
            if final is None or not final.outputs:
                return "", 0, "the engine finished the request without an output"
            completion = final.outputs[0]
            return completion.text, len(completion.token_ids), None
        except EngineDeadError as e:
            # The engine's process is gone, this actor is not: exit it, so that Ray starts a
            # new replica and retries the batch there (a retry on this one would fail again).
            logger.error("vLLM engine died (%s); exiting the replica so Ray restarts it", e)
            os._exit(1)
        except Exception as e:  # this request's error, not the batch's
            return "", 0, f"{type(e).__name__}: {e}"
        finally:
            self._leave()

    def _enter(self) -> None:
        if self._running == 0:
            self._busy_since = time.time()
        self._running += 1
        self.stats["requests"] += 1

    def _leave(self) -> None:
        self._running -= 1
        if self._running == 0:
            self.stats["busy_s"] += time.time() - self._busy_since

    def report(self) -> dict[str, Any]:
        return dict(self.stats)

    def shutdown(self) -> None:
        """Stops the engine's processes while the actor still runs (then it is killed)."""
        self.engine.shutdown()


@dataclass
class VLLMPool:
    """The run's replicas of one engine config (the engine handle of this backend)."""

    engine: VLLMEngineConfig
    replicas: list[Any]  # actor handles
    groups: list[Any] = field(default_factory=list)  # their placement groups, when they have one
    # Why the replicas were given up on (see the module's "No node left"), once they were.
    lost: str | None = None
    _stop_watch: threading.Event = field(default_factory=threading.Event, repr=False)
    _handler: Any = field(default=None, repr=False)  # the SIGUSR1 handler it replaced

    @classmethod
    def start(cls, engine: VLLMEngineConfig) -> VLLMPool:
        """Starts the replicas without waiting for them: the first batch sent waits instead."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        replicas, groups = [], []
        options: dict[str, Any] = {
            "max_restarts": engine.max_restarts,
            "max_task_retries": -1,  # bounded by max_restarts (see the module's "Restarts")
            # Requests of every batch in flight at once, plus the bench's report calls.
            "max_concurrency": 1000,
            "runtime_env": engine_runtime_env(engine),
        }
        parallel = engine.workers_per_replica
        for _ in range(engine.replicas):
            actor_options = dict(options)
            if engine.device == "cpu":
                actor_options["num_cpus"] = engine.cpus_per_replica
            elif parallel == 1:
                actor_options.update(num_cpus=1, num_gpus=1)
                if engine.accelerator_type:
                    actor_options["accelerator_type"] = engine.accelerator_type
            else:
                bundle: dict[str, float] = {"GPU": 1, "CPU": 1}
                if engine.accelerator_type:
                    bundle[f"accelerator_type:{engine.accelerator_type}"] = 0.001
                group = ray.util.placement_group([dict(bundle)] * parallel, strategy="PACK")
                groups.append(group)
                # The actor itself takes nothing; vLLM's Ray workers take the bundles.
                actor_options.update(
                    num_cpus=0,
                    num_gpus=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_capture_child_tasks=True
                    ),
                )
            actor = ray.remote(EngineReplica).options(**actor_options)
            replicas.append(actor.remote(engine.model, engine_kwargs(engine)))
        pool = cls(engine, replicas, groups)
        interrupt = threading.current_thread() is threading.main_thread()
        if interrupt:
            pool._handler = signal.signal(signal.SIGUSR1, pool._raise_lost)
        threading.Thread(target=pool._watch, args=(interrupt,), daemon=True).start()
        return pool

    def _watch(self, interrupt: bool) -> None:
        """The watchdog (see the module's "No node left"). It reads each replica's state from
        Ray's control store instead of calling it: a call would run on the replica beside its
        batches (and retitle its process mid-batch). The public state API would need the
        dashboard, which local runs and tests go without."""
        import ray
        from ray._private.state import actors

        ids, timeout = [r._actor_id.hex() for r in self.replicas], self.engine.unavailable_timeout_s
        seen_alive: set[int] = set()
        down_since: dict[int, float] = {}
        while not self._stop_watch.wait(WATCH_INTERVAL_S) and ray.is_initialized():
            for i, actor_id in enumerate(ids):
                try:
                    state = actors(actor_id=actor_id).get("State")
                except Exception:  # the control store busy or going away: look again later
                    continue
                if state == "ALIVE":
                    seen_alive.add(i)
                    down_since.pop(i, None)
                    continue
                # Not started yet (not armed), or dead for good (its batches fail the stage).
                if i not in seen_alive or state == "DEAD":
                    continue
                since = down_since.setdefault(i, time.monotonic())
                if time.monotonic() - since > timeout:
                    self._give_up(i, timeout, interrupt)
                    return

    def _give_up(self, replica: int, timeout: float, interrupt: bool) -> None:
        import ray

        self.lost = (
            f"engine replica {replica} of {self.engine.model} has not been up for {timeout:g} s "
            "(engine.unavailable_timeout_s): its node is gone and no node left can take it"
        )
        logger.error("rare-ray: %s; stopping the run", self.lost)
        if interrupt and not self._stop_watch.is_set():
            # A real signal: one only flagged (``_thread.interrupt_main``) waits for the main
            # thread to run Python, and it is blocked on a lock in Ray Data's iterator.
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
        else:  # no thread to interrupt: the batches waiting for the replicas fail instead
            for r in self.replicas:
                ray.kill(r, no_restart=True)

    def _raise_lost(self, signum: int, frame: Any) -> None:
        if self.lost is not None:  # else not ours: ignored
            raise EnginesLost(self.lost)

    def client(self) -> VLLMClient:
        return VLLMClient(self.engine, self.replicas)

    def reports(self, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Each replica's numbers (``EngineReplica.stats``; a restarted one's since its
        restart; for one that died for good, why)."""
        import ray

        reports = []
        for replica in self.replicas:
            try:
                reports.append(ray.get(replica.report.remote(), timeout=timeout_s))
            except ray.exceptions.RayError as e:
                reports.append({"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
        return reports

    def close(self, timeout_s: float = 120) -> None:
        """Engines first, then their actors and placement groups."""
        import ray

        self._stop_watch.set()
        if self._handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._handler)
            self._handler = None

        for replica in self.replicas:
            try:
                if self.lost is None:  # a lost one's call would wait for its restart
                    ray.get(replica.shutdown.remote(), timeout=timeout_s)
            except ray.exceptions.RayActorError:
                pass  # it died (and stopped its engine) on its own
            except Exception as e:  # a replica that cannot shut down cleanly is killed anyway
                logger.warning("vLLM engine shutdown: %s: %s", type(e).__name__, e)
            ray.kill(replica)
        for group in self.groups:
            ray.util.remove_placement_group(group)
        self.replicas, self.groups = [], []

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the replicas, never the placement groups they do not manage, nor the
        # driver's watchdog.
        return {"engine": self.engine, "replicas": self.replicas, "groups": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


@dataclass
class Rendered:
    """A batch's requests: per row its messages, its prompt as token ids (chat template
    applied), its sampling parameters, and how many documents were cut to their budgets."""

    messages: list[Messages] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    sampling: list[dict[str, Any]] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """The token ids the engine gets for ``messages``: the chat template's text, tokenized as
    vLLM's own chat API does it (the template already holds the special tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_prompts(rows: Sequence[dict[str, Any]], model: str, render: Render) -> Rendered:
    """Every row of ``rows`` rendered for ``model``."""
    tokenizer = load_tokenizer(model)
    out = Rendered()
    for row in rows:
        fit = TokenBudget(model)
        messages, params = render(row, fit)
        out.messages.append(messages)
        out.prompts.append(prompt_ids(tokenizer, messages))
        out.sampling.append(params)
        out.truncated.append(fit.truncated)
    return out


class VLLMClient:
    """Renders rows into prompt token ids and sends them to the pool's replicas (``Client``).

    The chat template and the tokenizer run here, next to the renderer that already holds the
    tokenizer for the documents' token budgets; the prompt is tokenized as vLLM's own chat API
    does it, without adding special tokens twice. Batches go to the replicas in turn, from a
    random first one, so that every worker spreads its batches over all of them.
    """

    def __init__(self, engine: VLLMEngineConfig, replicas: Sequence[Any]):
        if not replicas:
            raise RuntimeError("the vLLM engine pool is closed (no replica left)")
        self.engine = engine
        load_tokenizer(engine.model)  # once per worker; a bad path fails here
        self._next = itertools.cycle(random.sample(list(replicas), len(replicas)))
        # Batches render in threads; a Hugging Face tokenizer must not be used by two at once.
        self._render_lock = threading.Lock()

    def _render(self, rows: Sequence[dict[str, Any]], render: Render) -> Rendered:
        with self._render_lock:
            return render_prompts(rows, self.engine.model, render)

    async def generate(self, rows: Sequence[dict[str, Any]], render: Render) -> list[Generation]:
        if not rows:
            return []
        batch = await asyncio.to_thread(self._render, rows, render)
        answers = await next(self._next).generate.remote(batch.prompts, batch.sampling)
        return [
            Generation(text, tokens, error, cut, messages, len(prompt))
            for (text, tokens, error), cut, messages, prompt in zip(
                answers, batch.truncated, batch.messages, batch.prompts, strict=True
            )
        ]
