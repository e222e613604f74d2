"""The three RARE operators; each runs alone on a Ray Dataset or as a pipeline stage."""

from rare_ray.operators.base import LLMOperator, Operator
from rare_ray.operators.bm25_hardneg import BM25HardNeg
from rare_ray.operators.doc2query import Doc2Query
from rare_ray.operators.reason_distill import ReasonDistill

__all__ = ["BM25HardNeg", "Doc2Query", "LLMOperator", "Operator", "ReasonDistill"]
