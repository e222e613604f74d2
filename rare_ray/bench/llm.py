"""Benchmark: the LLM stages through Ray Data and the run's engine replicas against bare vLLM.

For each LLM stage (Doc2Query, ReasonDistill), in one run, on the same rows, the same prompts
and the same engine settings:

- **bare vLLM**: the requests the stage would send (rendered by the operator's own ``render``
  with the same token budgets), through ``vllm.LLM.chat`` in one process of its own, with the
  engine arguments that ``rare_ray.engines.vllm.engine_kwargs`` gives the stage's replicas, and the
  scheduler limits (``max_num_seqs``, ``max_num_batched_tokens``) that the stage's async engine
  resolves from them: ``vllm.LLM`` would otherwise pick other defaults (on a CPU, twice the
  sequences and batched tokens). Timed from the call to the last output; the engine's
  construction is timed apart (engine start).
- **the stage**: ``rare_ray.engines.generate`` over the same rows as a Ray Dataset, every
  output row consumed by the driver. Its engine starts inside a Ray actor after the Dataset
  starts executing, so the stage's time is split at the moment that actor became ready (the end
  of its ``__init__``, read from Ray's own task events, ``ray.timeline()``): engine start is
  dataset start to that moment; generation is that moment to the last output row in the driver.
  Rendering, chat templating and tokenizing of the first blocks overlap the engine start, as
  they do in a real run; everything after it (Ray Data's hand-offs, the stage's own columns,
  the driver fetching rows) counts against the stage.

The two never run at once: bare vLLM runs first, in a subprocess, before this process uses Ray.
With random weights and sampling the two sides write different texts of different lengths, so
they are compared on output tokens per second, not on time. ``ratio`` is the stage's output
tokens/s over bare vLLM's.

Rows: the first N sample abstracts (repeated with new ids past 1,000). Doc2Query renders them
as they are. ReasonDistill needs a question, a scenario and hard negatives: row i gets the
human-written PubMedQA question of its abstract, a fixed scenario, and three other abstracts
drawn by ``random.Random(i)`` as negatives, so every run sends the same prompts.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import pyarrow as pa

from rare_ray.bench.common import engine_starts, read_jsonl
from rare_ray.config import RunConfig, VLLMEngineConfig
from rare_ray.engines.contract import GENERATED_TOKENS, INFERENCE_ERROR, Render, TokenBudget
from rare_ray.io.readers import SAMPLE_CORPUS, SAMPLE_QUESTIONS
from rare_ray.pipeline import init_ray
from rare_ray.rows import ID

WORKLOADS = ("doc2query", "distill")

SCENARIO = (
    "A clinical research group is preparing a grant proposal and must decide whether the "
    "published evidence justifies a new trial, or whether the question has already been settled."
)


def doc_rows(n: int) -> list[dict[str, Any]]:
    """The first ``n`` sample abstracts; past 1,000 they repeat under new ids."""
    corpus = read_jsonl(SAMPLE_CORPUS)
    return [
        {
            ID: corpus[i % len(corpus)]["id"]
            + (f"-r{i // len(corpus)}" if i >= len(corpus) else ""),
            "text": corpus[i % len(corpus)]["text"],
        }
        for i in range(n)
    ]


def distill_rows(n: int, num_neg: int = 3) -> list[dict[str, Any]]:
    """Doc rows with a question (the abstract's human one), a scenario and ``num_neg`` negatives."""
    corpus = read_jsonl(SAMPLE_CORPUS)
    questions = {q["id"]: q["question"] for q in read_jsonl(SAMPLE_QUESTIONS)}
    rows = []
    for i, row in enumerate(doc_rows(n)):
        own = i % len(corpus)
        others = random.Random(i).sample([j for j in range(len(corpus)) if j != own], num_neg)
        rows.append(
            {
                **row,
                "question": questions[corpus[own]["id"]],
                "scenario": SCENARIO,
                "hard_negatives": [corpus[j]["text"] for j in others],
            }
        )
    return rows


def workload(name: str, config: RunConfig, n: int) -> tuple[list[dict[str, Any]], Render]:
    """The rows of one stage and the operator's own render function for them."""
    from rare_ray.operators import Doc2Query, ReasonDistill

    if name == "doc2query":
        op = Doc2Query(config.engine, config.doc2query, seed=config.seed)
        return doc_rows(n), functools.partial(op.render, attempt=1)
    if name == "distill":
        distill = ReasonDistill(config.engine, config.distill, seed=config.seed)
        return distill_rows(n, config.bm25.num_neg), distill.render
    raise ValueError(f"unknown workload {name!r}; one of {WORKLOADS}")


def requests(rows: list[dict[str, Any]], render: Render, model: str) -> list[dict[str, Any]]:
    """What the stage sends per row: messages and sampling parameters (as ``render_batch``)."""
    out = []
    for row in rows:
        messages, sampling = render(row, TokenBudget(model))
        out.append({"messages": messages, "sampling": sampling})
    return out


def bare_engine_kwargs(engine: VLLMEngineConfig) -> dict[str, Any]:
    """The engine arguments the stage's vLLM replicas get (``engine_kwargs``), for ``vllm.LLM``
    (which has no request logging to turn off)."""
    from rare_ray.engines.vllm import engine_kwargs

    kwargs = engine_kwargs(engine)
    kwargs.pop("enable_log_requests", None)
    return kwargs


@dataclass
class Side:
    """One side of a comparison: rows in, output tokens, and where the time went."""

    rows: int
    output_tokens: int
    engine_start_s: float  # construction (bare) or dataset start to engine actor ready (stage)
    generate_s: float  # first request to last output (see the module docstring for the stage)
    total_s: float  # engine start and generation, as a user waits for it
    errors: int = 0
    prompt_tokens: int | None = None
    first_row_s: float | None = None  # stage: dataset start to the first output row
    scheduler: dict[str, int] | None = None  # bare: the scheduler limits both engines ran with

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.generate_s if self.generate_s > 0 else math.nan


@dataclass
class Comparison:
    stage: str
    bare: Side
    ray: Side
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """The stage's output tokens/s per engine replica over bare vLLM's (one engine)."""
        replicas = int(self.settings.get("replicas", 1))
        return self.ray.tokens_per_s / replicas / self.bare.tokens_per_s

    def markdown(self) -> str:
        b, r = self.bare, self.ray
        return (
            f"| {self.stage} | {b.rows} | {b.output_tokens:,} | {b.tokens_per_s:,.0f} | "
            f"{b.engine_start_s:.1f} | {r.output_tokens:,} | {r.tokens_per_s:,.0f} | "
            f"{r.engine_start_s:.1f} | {r.first_row_s or math.nan:.1f} | {r.total_s:.1f} | "
            f"**{self.ratio:.2f}** |"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "ratio": self.ratio,
            "bare": {**asdict(self.bare), "tokens_per_s": self.bare.tokens_per_s},
            "ray": {**asdict(self.ray), "tokens_per_s": self.ray.tokens_per_s},
            "settings": self.settings,
        }


HEADER = (
    "| stage | rows | bare: output tokens | bare: tok/s | bare: engine start (s) "
    "| Ray: output tokens | Ray: tok/s | Ray: engine start (s) | Ray: first row (s) "
    "| Ray: stage total (s) | ratio |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


# --- bare vLLM, in a process of its own ---------------------------------------------------


def run_bare(
    model: str, engine_kwargs: dict[str, Any], reqs: list[dict[str, Any]], env: dict[str, str]
) -> Side:
    """Runs ``reqs`` through ``vllm.LLM`` in a subprocess (``env`` added to its environment)."""
    with tempfile.TemporaryDirectory(prefix="rare-ray-bench-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(
            json.dumps({"model": model, "engine_kwargs": engine_kwargs, "requests": reqs})
        )
        subprocess.run(
            [sys.executable, "-m", "rare_ray.bench.llm", str(spec), str(result)],
            env={**os.environ, **env},
            check=True,
        )
        return Side(**json.loads(result.read_text()))


def _bare_main(spec_path: str, result_path: str) -> None:
    import vllm
    from vllm.sampling_params import StructuredOutputsParams

    spec = json.loads(Path(spec_path).read_text())
    messages, params = [], []
    for req in spec["requests"]:
        sampling = dict(req["sampling"])
        structured = sampling.pop("structured_outputs", None)
        params.append(
            vllm.SamplingParams(
                **sampling,
                structured_outputs=StructuredOutputsParams(**structured) if structured else None,
            )
        )
        messages.append(req["messages"])

    kwargs = dict(spec["engine_kwargs"])
    # vllm.LLM and the async engine that ray.data.llm runs resolve different scheduler defaults
    # (on a CPU: 256 sequences and 4,096 batched tokens against 128 and 2,048; on GPUs the
    # batched tokens differ). Bare vLLM gets the async engine's, so both run the same engine.
    resolved = vllm.AsyncEngineArgs(
        model=spec["model"], runner="generate", **kwargs
    ).create_engine_config()
    kwargs.setdefault("max_num_seqs", resolved.scheduler_config.max_num_seqs)
    kwargs.setdefault("max_num_batched_tokens", resolved.scheduler_config.max_num_batched_tokens)

    start = time.perf_counter()
    llm = vllm.LLM(model=spec["model"], **kwargs)
    ready = time.perf_counter()
    outputs = llm.chat(messages, params, use_tqdm=False)
    done = time.perf_counter()
    side = Side(
        rows=len(outputs),
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        prompt_tokens=sum(len(o.prompt_token_ids or []) for o in outputs),
        engine_start_s=ready - start,
        generate_s=done - ready,
        total_s=done - start,
        scheduler={k: kwargs[k] for k in ("max_num_seqs", "max_num_batched_tokens")},
    )
    Path(result_path).write_text(json.dumps(asdict(side)))


# --- the stage, through Ray Data --------------------------------------------------------------


def engine_ready_after(since: float) -> float | None:
    """Wall-clock time (``time.time()``) at which the newest vLLM engine actor started after
    ``since`` finished its ``__init__``, from Ray's task events; None if Ray has none."""
    ends = [start + seconds for start, seconds in engine_starts(since)]
    return max(ends) if ends else None


def run_stage(rows: list[dict[str, Any]], engine: VLLMEngineConfig, render: Render) -> Side:
    """``generate`` over ``rows``; every output row is fetched by this process."""
    import ray

    from rare_ray.engines import generate
    from rare_ray.engines.vllm import VLLMPool

    ds = ray.data.from_items(rows)
    wall_start, start = time.time(), time.perf_counter()
    first = None
    n = tokens = errors = 0
    pool = VLLMPool.start(engine)
    try:
        batches = generate(ds, engine, render, pool).iter_batches(
            batch_format="pyarrow", batch_size=None
        )
        for batch in cast(Iterator[pa.Table], batches):
            if batch.num_rows and first is None:
                first = time.perf_counter()
            n += batch.num_rows
            tokens += sum(t or 0 for t in batch[GENERATED_TOKENS].to_pylist())
            errors += sum(e is not None for e in batch[INFERENCE_ERROR].to_pylist())
        done = time.perf_counter()
        wall_done = time.time()
    finally:
        pool.close()

    # Task events reach the timeline within about a second; wait for the actor's.
    ready = None
    for _ in range(20):
        ready = engine_ready_after(wall_start)
        if ready is not None:
            break
        time.sleep(0.5)
    if ready is None:
        names = sorted({str(e.get("cat")) for e in ray.timeline()})
        raise RuntimeError(f"no vLLM engine actor start in ray.timeline(): {names}")
    return Side(
        rows=n,
        output_tokens=tokens,
        engine_start_s=ready - wall_start,
        generate_s=wall_done - ready,
        total_s=done - start,
        errors=errors,
        first_row_s=(first - start) if first is not None else None,
    )


def stage_prompt_tokens(rows: list[dict[str, Any]], model: str, render: Render) -> int:
    """Prompt tokens the stage sends for ``rows``, from its own render step (outside timing)."""
    from rare_ray.engines.vllm import render_prompts

    prompts = render_prompts(rows, model, render).prompts
    return sum(len(p) for p in prompts)


def compare(name: str, config: RunConfig, n: int) -> Comparison:
    """Bare vLLM, then the stage, on the same ``n`` rows of workload ``name``.

    Ray is shut down in this process while bare vLLM runs, and started afterwards.
    """
    import ray

    engine = config.engine
    if not isinstance(engine, VLLMEngineConfig):
        raise ValueError("the LLM bench needs engine.kind: vllm")
    rows, render = workload(name, config, n)
    reqs = requests(rows, render, engine.model)
    if ray.is_initialized():
        ray.shutdown()
    env = {str(k): str(v) for k, v in config.ray.runtime_env.get("env_vars", {}).items()}
    bare = run_bare(engine.model, bare_engine_kwargs(engine), reqs, env)
    init_ray(config.ray, log_to_driver=False, attempts=3)
    try:
        stage = run_stage(rows, engine, render)
    finally:
        ray.shutdown()
    if stage.rows != bare.rows:
        raise RuntimeError(f"{name}: {bare.rows} rows through bare vLLM, {stage.rows} through Ray")
    stage.prompt_tokens = stage_prompt_tokens(rows, engine.model, render)
    settings: dict[str, Any] = engine.model_dump(
        include={"batch_size", "max_concurrent_batches", "replicas", "cpus_per_replica"}
    )
    sampling = config.doc2query.sampling if name == "doc2query" else config.distill.sampling
    settings["sampling"] = sampling.model_dump()
    return Comparison(name, bare, stage, settings)


def main(
    config: RunConfig,
    docs: int,
    stages: list[str],
    json_out: str | None = None,
    repeats: int = 1,
) -> list[Comparison]:
    """The comparisons, printed as a Markdown table (and written to ``json_out``).

    With ``repeats`` > 1 the stages take turns (bare, Ray, bare, Ray, ...) and the median
    ratio per stage is printed last: on a shared machine, load comes and goes between runs.
    """
    results = []
    print(HEADER, flush=True)
    for _ in range(repeats):
        for name in stages:
            result = compare(name, config, docs)
            results.append(result)
            print(result.markdown(), flush=True)
    if repeats > 1:
        for name in stages:
            ratios = sorted(r.ratio for r in results if r.stage == name)
            print(f"{name}: median ratio {statistics.median(ratios):.2f} over {len(ratios)} "
                  f"pairs ({', '.join(f'{r:.2f}' for r in ratios)})", flush=True)  # fmt: skip
    if json_out:
        Path(json_out).write_text(json.dumps([r.to_json() for r in results], indent=2))
    return results


if __name__ == "__main__":
    _bare_main(sys.argv[1], sys.argv[2])
