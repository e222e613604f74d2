"""rare-ray: retrieval-augmented reasoning (RARE) training data at cluster scale, on Ray.

    from rare_ray import RunConfig, run
    run(RunConfig.from_yaml("configs/local.yaml"))

or one operator at a time on a Ray Dataset: ``Doc2Query``, ``BM25HardNeg``, ``ReasonDistill``,
``AnswerVerify``.

Importing the package imports neither Ray nor vLLM: the configs come at once, the operators
and ``run`` on first use (so ``rare-ray --help`` and config checks stay fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rare_ray.config import (
    BM25Config,
    Doc2QueryConfig,
    OpenAIEngineConfig,
    ReasonDistillConfig,
    RunConfig,
    SamplingConfig,
    VerifyConfig,
    VLLMEngineConfig,
)

if TYPE_CHECKING:
    from rare_ray.operators import AnswerVerify, BM25HardNeg, Doc2Query, Operator, ReasonDistill
    from rare_ray.pipeline import run

# Names that need Ray, and the module that has each.
_LAZY = {
    "AnswerVerify": "rare_ray.operators",
    "BM25HardNeg": "rare_ray.operators",
    "Doc2Query": "rare_ray.operators",
    "Operator": "rare_ray.operators",
    "ReasonDistill": "rare_ray.operators",
    "run": "rare_ray.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rare_ray' has no attribute {name!r}")


__all__ = [
    "AnswerVerify",
    "BM25Config",
    "BM25HardNeg",
    "Doc2Query",
    "Doc2QueryConfig",
    "OpenAIEngineConfig",
    "Operator",
    "ReasonDistill",
    "ReasonDistillConfig",
    "RunConfig",
    "SamplingConfig",
    "VLLMEngineConfig",
    "VerifyConfig",
    "run",
]
