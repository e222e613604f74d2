"""What the benches share: reading the sample files and reading engine starts from Ray's own
task events (Ray itself starts through ``rare_ray.pipeline.init_ray``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rare_ray.engines.vllm import REPLICA_CLASS


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def engine_starts(since: float) -> list[tuple[float, float]]:
    """(start, seconds) of every vLLM engine actor ``__init__`` begun after ``since``
    (``time.time()``), from Ray's task events (``ray.timeline()``), earliest first."""
    import ray

    starts = []
    for event in ray.timeline():
        what = f"{event.get('cat', '')} {event.get('name', '')}"
        if REPLICA_CLASS in what and "__init__" in what and "ts" in event:
            start = float(event["ts"]) / 1e6
            if start >= since:
                starts.append((start, float(event.get("dur", 0)) / 1e6))
    return sorted(starts)
