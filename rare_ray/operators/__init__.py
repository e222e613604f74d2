"""The RARE stages, each an ``Operator`` (see ``base``): alone on a Ray Dataset or in the
pipeline, which builds them from a ``RunConfig`` with ``build_operators``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rare_ray.config import RunConfig
from rare_ray.operators.base import LLMOperator, Operator, Resources, StageContext
from rare_ray.operators.bm25_hardneg import BM25HardNeg
from rare_ray.operators.doc2query import Doc2Query
from rare_ray.operators.reason_distill import ReasonDistill
from rare_ray.vocabulary import ALL_STAGES, StageName

# How each named stage is built from the run's config, in pipeline order.
STAGES: dict[StageName, Callable[[RunConfig], Operator]] = {
    "doc2query": lambda c: Doc2Query(c.engine, c.doc2query, seed=c.seed),
    "bm25": lambda c: BM25HardNeg(c.bm25),
    "distill": lambda c: ReasonDistill(c.engine, c.distill, seed=c.seed),
}


def build_operators(config: RunConfig, stages: Sequence[StageName]) -> list[Operator]:
    """The operators of ``stages``, in pipeline order whatever the order given."""
    return [STAGES[name](config) for name in ALL_STAGES if name in stages]


__all__ = [
    "STAGES",
    "BM25HardNeg",
    "Doc2Query",
    "LLMOperator",
    "Operator",
    "ReasonDistill",
    "Resources",
    "StageContext",
    "build_operators",
]
