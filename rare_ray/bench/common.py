"""What the benches share: reading the sample files, starting Ray, and reading engine starts
from Ray's own task events."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rare_ray.config import RayConfig


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def init_ray(config: RayConfig, attempts: int = 3) -> None:
    """Starts (or joins) the Ray of ``config``, without the workers' logs in this process, so a
    bench's table is not broken up by them; a local start that times out is tried again.

    Unlike ``rare_ray.pipeline.init_ray``, which a job uses: that one forwards the workers' logs.
    """
    import ray

    address = config.address or os.environ.get("RAY_ADDRESS") or "local"
    local: dict[str, Any] = (
        {"num_cpus": config.num_cpus, "include_dashboard": False} if address == "local" else {}
    )
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                address=address,
                runtime_env=config.runtime_env or None,
                log_to_driver=False,
                **local,
            )
            return
        except Exception:  # a busy machine can time a local Ray's start-up out
            ray.shutdown()
            if attempt == attempts:
                raise
            time.sleep(5)


def engine_starts(since: float) -> list[tuple[float, float]]:
    """(start, seconds) of every vLLM engine actor ``__init__`` begun after ``since``
    (``time.time()``), from Ray's task events (``ray.timeline()``), earliest first."""
    import ray

    starts = []
    for event in ray.timeline():
        what = f"{event.get('cat', '')} {event.get('name', '')}"
        if "vLLMEngineStageUDF" in what and "__init__" in what and "ts" in event:
            start = float(event["ts"]) / 1e6
            if start >= since:
                starts.append((start, float(event.get("dur", 0)) / 1e6))
    return sorted(starts)
