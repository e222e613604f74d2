"""Batch generation: in-cluster vLLM through ``ray.data.llm``, or an OpenAI-compatible API.

An operator describes each request with a function ``render(row, fit) -> (messages, sampling)``,
where ``fit(text, max_tokens)`` truncates a document to a token budget with the model's own
tokenizer. ``generate`` runs it on the engine the config names (``engine.kind``): for ``vllm``
this module turns it into a ``ray.data.llm`` processor; for ``openai``,
``rare_ray.engines.openai_http`` sends it to the server. Either way every input row comes back
with its own columns plus ``_generated_text``, ``_generated_tokens`` (a response cut off at
``max_tokens`` counts at least ``max_tokens``), ``_inference_error`` (null, or why the request
failed) and ``_truncated`` (documents cut to fit).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import pyarrow as pa
import ray.data

from rare_ray.config import EngineConfig, OpenAIEngineConfig, VLLMEngineConfig

Messages = list[dict[str, str]]
Fit = Callable[[str, int], str]
Render = Callable[[dict[str, Any], Fit], tuple[Messages, dict[str, Any]]]

GENERATED_TEXT = "_generated_text"
GENERATED_TOKENS = "_generated_tokens"
INFERENCE_ERROR = "_inference_error"
TRUNCATED = "_truncated"
PROMPT_TOKENS = "tokenized_prompt"  # what ray.data.llm's engine stage takes as the prompt


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
        return self.tokenizer.decode(ids[:max_tokens])


def _render_batch(batch: pa.Table, model: str, render: Render) -> pa.Table:
    """Each row's request, ready for the engine: the prompt as token ids, sampling parameters.

    The chat template and the tokenizer run here, next to the renderer that already holds the
    tokenizer, instead of in two more actor stages of ``ray.data.llm`` (and the prompt is
    tokenized as vLLM's own chat API does it, without adding special tokens twice).
    """
    tokenizer = load_tokenizer(model)
    prompts, sampling, truncated = [], [], []
    for row in batch.to_pylist():
        fit = TokenBudget(model)
        messages, params = render(row, fit)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
        sampling.append(params)
        truncated.append(fit.truncated)
    return (
        batch.append_column(PROMPT_TOKENS, pa.array(prompts, pa.list_(pa.int32())))
        .append_column("sampling_params", pa.array(sampling))
        .append_column(TRUNCATED, pa.array(truncated, pa.int32()))
    )


def _project(batch: pa.Table, keep: pa.Schema) -> pa.Table:
    """The input columns and the generation's results; drops the processor's own columns.

    The processor passes rows through Python dicts, which widens types (int32 to int64,
    float32 to double): the input columns get their own types back.
    """
    errors = batch["__inference_error__"].to_pylist()
    return pa.table(
        {
            **{f.name: batch[f.name].cast(f.type) for f in keep},
            TRUNCATED: batch[TRUNCATED],
            GENERATED_TEXT: batch["generated_text"].cast(pa.string()),
            GENERATED_TOKENS: batch["num_generated_tokens"].cast(pa.int32()),
            INFERENCE_ERROR: pa.array([e or None for e in errors], pa.string()),
        }
    )


def processor_config(engine: VLLMEngineConfig) -> Any:
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs: dict[str, Any] = {
        "max_model_len": engine.max_model_len,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        # No free-form whitespace inside JSON answers: a weak model can loop on it forever.
        "structured_outputs_config": {
            "backend": engine.structured_output_backend,
            "disable_any_whitespace": True,
        },
        **engine.engine_kwargs,
    }
    extra: dict[str, Any] = {}
    if engine.device == "cpu":
        # Without a placement group of its own, the engine asks Ray for a GPU.
        extra["placement_group_config"] = {"bundles": [{"CPU": engine.cpus_per_replica}]}
    elif engine.accelerator_type:
        extra["accelerator_type"] = engine.accelerator_type
    return vLLMEngineProcessorConfig(
        model_source=engine.model,
        engine_kwargs=engine_kwargs,
        batch_size=engine.batch_size,
        concurrency=engine.replicas,
        max_concurrent_batches=engine.max_concurrent_batches,
        # A failed request becomes a row with an error (a reject), not a failed job.
        should_continue_on_error=True,
        # Engine metrics need ray[serve]; the manifest records what we need.
        log_engine_metrics=False,
        # _render_batch applies the chat template and tokenizes; vLLM detokenizes its output
        # itself. Three more actor stages would only repeat that work on the engine's CPUs.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        **extra,
    )


def generate(ds: ray.data.Dataset, engine: EngineConfig, render: Render) -> ray.data.Dataset:
    """Run one request per row of ``ds``; every input row comes back, with its generation."""
    if isinstance(engine, OpenAIEngineConfig):
        from rare_ray.engines import openai_http

        return openai_http.generate(ds, engine, render)

    from ray.data.llm import build_processor

    keep = ds.schema().base_schema
    processor = build_processor(processor_config(engine))
    # ray.data.llm leaves engine actors to Ray Data's defaults: restarted forever, their
    # batches retried forever, so an engine that dies on every request loops. Bound both.
    engine_stage = processor.get_stage_by_name("vLLMEngineStage")
    engine_stage.map_batches_kwargs.update(
        max_restarts=engine.max_restarts, max_task_retries=engine.max_restarts
    )
    # Blocks of one engine batch each: Ray Data then keeps max_concurrent_batches of them in
    # flight per engine. One big block would reach the engine a batch at a time.
    prompts = ds.repartition(target_num_rows_per_block=engine.batch_size).map_batches(
        functools.partial(_render_batch, model=engine.model, render=render),
        batch_format="pyarrow",
        batch_size=engine.batch_size,
    )
    return processor(prompts).map_batches(
        functools.partial(_project, keep=keep), batch_format="pyarrow"
    )


def json_schema_sampling(schema: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
    """Sampling parameters that constrain the answer to ``schema`` (vLLM structured outputs).

    The OpenAI engine sends the same schema as ``response_format`` (``engine.structured_outputs``).
    """
    return {**sampling, "structured_outputs": {"json": json.dumps(schema)}}
