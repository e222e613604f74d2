"""The RARE stages, each an ``Operator`` (see ``base``): alone on a Ray Dataset or in the
pipeline, which builds them from a ``RunConfig`` with ``build_operators``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rare_ray.config import RunConfig
from rare_ray.operators.answer_verify import AnswerVerify
from rare_ray.operators.base import LLMOperator, Operator, Resources, StageContext
from rare_ray.operators.bm25_hardneg import BM25HardNeg
from rare_ray.operators.doc2query import Doc2Query
from rare_ray.operators.reason_distill import ReasonDistill
from rare_ray.vocabulary import ALL_STAGES, StageName

# How each named stage is built from the run's config, in pipeline order (None: the config
# turns it off).
STAGES: dict[StageName, Callable[[RunConfig], Operator | None]] = {
    "doc2query": lambda c: Doc2Query(c.engine, c.doc2query, seed=c.seed),
    "bm25": lambda c: BM25HardNeg(c.bm25),
    "distill": lambda c: ReasonDistill(c.engine, c.distill, seed=c.seed),
    "verify": lambda c: AnswerVerify(c.engine, c.verify, seed=c.seed) if c.verify.enabled else None,
}


def build_operators(config: RunConfig, stages: Sequence[StageName]) -> list[Operator]:
    """The operators of ``stages`` that the config turns on, in pipeline order whatever the
    order given."""
    built = (STAGES[name](config) for name in ALL_STAGES if name in stages)
    return [op for op in built if op is not None]


__all__ = [
    "STAGES",
    "AnswerVerify",
    "BM25HardNeg",
    "Doc2Query",
    "LLMOperator",
    "Operator",
    "ReasonDistill",
    "Resources",
    "StageContext",
    "build_operators",
]
