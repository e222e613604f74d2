"""The words every layer shares, with no imports from the rest of the package.

Stage names, the kinds of column an operator may ask for, the errors each layer raises, the
policy that decides which settings are secrets, and how a path or URI becomes a pyarrow
filesystem. ``config``, ``io``, ``engines`` and ``operators`` all build on this module and
on ``rows`` (the row conventions); neither of the two imports anything else of ours.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, cast

import pyarrow as pa
import pyarrow.fs as pafs

StageName = Literal["doc2query", "bm25", "distill"]
ALL_STAGES: tuple[StageName, ...] = ("doc2query", "bm25", "distill")
# The pass before every stage: the input read, checked and cut into shards.
INGEST = "ingest"

# What a column must hold: a non-empty string, or a list of strings.
ColumnKind = Literal["text", "text_list"]


class InputError(ValueError):
    """The input (corpus, model path) cannot be used; raised before any engine starts."""


class OutputError(RuntimeError):
    """The output location cannot be used."""


class ResumeError(RuntimeError):
    """The output directory holds a run that this one cannot continue."""


class ClusterError(RuntimeError):
    """The cluster lacks what the config asks for."""


class StageError(RuntimeError):
    """A stage stopped; the shards it committed stay, and a rerun resumes after them."""


class ReconciliationError(RuntimeError):
    """Rows were lost or duplicated between stages: never expected, always fatal."""


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


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a URI (``s3://...``) or a local path, and the path in it."""
    if "://" in uri:
        try:
            return cast("tuple[pafs.FileSystem, str]", pafs.FileSystem.from_uri(uri))
        except (pa.ArrowInvalid, ValueError) as e:
            raise InputError(f"{uri!r} is not a path or URI pyarrow can open: {e}") from e
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
