"""The in-cluster vLLM backend, through ``ray.data.llm``.

``generate(ds, engine, render)`` renders each row (``render_batch``: chat template and prompt
tokens, next to the renderer's tokenizer), runs the prompts through a ``ray.data.llm`` vLLM
processor built from ``processor_config(engine)``, and gives back the columns of
``rare_ray.engines.contract``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray.data

from rare_ray.config import VLLMEngineConfig
from rare_ray.engines.contract import (
    TRUNCATED,
    Render,
    TokenBudget,
    load_tokenizer,
    with_results,
)

if TYPE_CHECKING:
    from ray.data.llm import Processor

PROMPT_TOKENS = "tokenized_prompt"  # what ray.data.llm's engine stage takes as the prompt
ENGINE_STAGE = "vLLMEngineStage"  # the engine stage's name in the processor's stages


def render_batch(batch: pa.Table, model: str, render: Render) -> pa.Table:
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
    inputs = pa.table({f.name: batch[f.name].cast(f.type) for f in keep})
    errors = batch["__inference_error__"].to_pylist()
    return with_results(
        inputs,
        truncated=batch[TRUNCATED],
        text=batch["generated_text"],
        tokens=batch["num_generated_tokens"],
        errors=[e or None for e in errors],
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
        # render_batch applies the chat template and tokenizes; vLLM detokenizes its output
        # itself. Three more actor stages would only repeat that work on the engine's CPUs.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        **extra,
    )


def _build_processor(engine: VLLMEngineConfig) -> Processor:
    """The ``ray.data.llm`` processor, its engine actors' restarts and retries bounded.

    ``ray.data.llm`` leaves engine actors to Ray Data's defaults: restarted forever, their
    batches retried forever, so an engine that dies on every request loops. Neither the
    processor config nor the engine stage's config has a field for them in Ray 2.60, so they go
    in through Ray's own stage hook, ``override_stage_config_fn(name, stage)`` of
    ``ProcessorBuilder.build`` (ray/llm/_internal/batch/processor/base.py), called on every
    stage as the processor is built. The public ``ray.data.llm.build_processor``
    (ray/data/llm.py) is that same call without the hook in its signature.
    """
    from ray.llm._internal.batch.processor import ProcessorBuilder

    bounded: list[str] = []

    def bound_restarts(name: str, stage: Any) -> None:
        if name == ENGINE_STAGE:
            stage.map_batches_kwargs.update(
                max_restarts=engine.max_restarts, max_task_retries=engine.max_restarts
            )
            bounded.append(name)

    processor = ProcessorBuilder.build(
        processor_config(engine), override_stage_config_fn=bound_restarts
    )
    if not bounded:  # a renamed stage must not quietly bring back endless restarts
        raise RuntimeError(f"ray.data.llm built no {ENGINE_STAGE} to bound the restarts of")
    return processor


def generate(ds: ray.data.Dataset, engine: VLLMEngineConfig, render: Render) -> ray.data.Dataset:
    """Run one request per row of ``ds``; every input row comes back, with its generation."""
    keep = ds.schema().base_schema
    processor = _build_processor(engine)
    # Blocks of one engine batch each: Ray Data then keeps max_concurrent_batches of them in
    # flight per engine. One big block would reach the engine a batch at a time.
    prompts = ds.repartition(target_num_rows_per_block=engine.batch_size).map_batches(
        functools.partial(render_batch, model=engine.model, render=render),
        batch_format="pyarrow",
        batch_size=engine.batch_size,
    )
    return processor(prompts).map_batches(
        functools.partial(_project, keep=keep), batch_format="pyarrow"
    )
