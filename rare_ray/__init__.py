"""rare-ray: retrieval-augmented reasoning (RARE) training data at cluster scale, on Ray.

    from rare_ray import RunConfig, run
    run(RunConfig.from_yaml("configs/local.yaml"))

or one operator at a time on a Ray Dataset: ``Doc2Query``, ``BM25HardNeg``, ``ReasonDistill``.
"""

from rare_ray.config import (
    BM25Config,
    Doc2QueryConfig,
    OpenAIEngineConfig,
    ReasonDistillConfig,
    RunConfig,
    SamplingConfig,
    VLLMEngineConfig,
)
from rare_ray.operators import BM25HardNeg, Doc2Query, ReasonDistill
from rare_ray.pipeline import run

__all__ = [
    "BM25Config",
    "BM25HardNeg",
    "Doc2Query",
    "Doc2QueryConfig",
    "OpenAIEngineConfig",
    "ReasonDistill",
    "ReasonDistillConfig",
    "RunConfig",
    "SamplingConfig",
    "VLLMEngineConfig",
    "run",
]
