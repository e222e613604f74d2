"""Checks that run before any engine starts, so a run that cannot succeed costs nothing."""

from __future__ import annotations

from pathlib import Path

from rare_ray.config import EngineConfig, VLLMEngineConfig
from rare_ray.vocabulary import ClusterError, InputError


def check_model(model: str) -> None:
    """A model given as a local path must exist and be readable now, not when engines start."""
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists()
    if not looks_local:
        return  # a hub id: resolved by the engine on the node (weights may be cached there)
    hint = "for the local test model run `rare-ray build-test-model`"
    config = path / "config.json"
    try:
        config.read_bytes()
    except OSError as e:
        if not path.exists():
            problem = "does not exist"
        elif path.is_dir() and not config.exists():
            problem = "has no config.json (not a Hugging Face model directory)"
        else:
            problem = f"is not readable ({e.strerror or e})"
        raise InputError(f"model {model!r} {problem}; {hint}") from e


def check_gpus(engine: EngineConfig, cluster_resources: dict[str, float]) -> None:
    """The cluster has the GPUs (of the right type) that the engine's replicas need."""
    if not isinstance(engine, VLLMEngineConfig) or engine.device != "gpu":
        return  # an HTTP engine's GPUs are someone else's
    if not engine.check_resources:
        return
    per_replica = engine.workers_per_replica
    needed = engine.replicas * per_replica
    have = cluster_resources.get("GPU", 0)
    if have < needed:
        raise ClusterError(
            f"the config asks for {needed} GPUs ({engine.replicas} replicas x {per_replica}), "
            f"the cluster has {have:g}; start GPU nodes or lower engine.replicas "
            "(on an autoscaling cluster set engine.check_resources: false)"
        )
    if engine.accelerator_type:
        label = f"accelerator_type:{engine.accelerator_type}"
        if label not in cluster_resources:
            types = sorted(k.split(":", 1)[1] for k in cluster_resources if ":" in k)
            raise ClusterError(
                f"no node has accelerator type {engine.accelerator_type!r} "
                f"(the cluster has: {', '.join(types) or 'none'})"
            )
