"""The words every layer shares, with no imports from the rest of the package.

Stage names, the kinds of column an operator may ask for, the errors each layer raises, the
policy that decides which settings are secrets, and how a path or URI becomes a pyarrow
filesystem. ``config``, ``io``, ``engines`` and ``operators`` all build on this module and
on ``rows`` (the row conventions); neither of the two imports anything else of ours.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, cast

import pyarrow as pa
import pyarrow.fs as pafs

StageName = Literal["doc2query", "bm25", "distill", "verify"]
ALL_STAGES: tuple[StageName, ...] = ("doc2query", "bm25", "distill", "verify")
# The pass before every stage: the input read, checked and cut into shards.
INGEST = "ingest"

ColumnKind = Literal["text", "text_list", "carried"]
"""What a column read by a stage must hold: ``text``, a non-empty string; ``text_list``, a list
of strings; ``carried``, any value or none (kept as text: a string as it is, another JSON value
as JSON), for columns that only travel with the row, like a document's source id."""


class InputError(ValueError):
    """The input (corpus, model path) cannot be used; raised before any engine starts."""


class SettingsError(ValueError):
    """Settings that cannot work together (a budget too small for a schema); raised before any
    engine starts."""


class OutputError(RuntimeError):
    """The output location cannot be used."""


class ResumeError(RuntimeError):
    """The output directory holds a run that this one cannot continue."""


class ClusterError(RuntimeError):
    """The cluster lacks what the config asks for."""


class StageError(RuntimeError):
    """A stage stopped; the shards it committed stay, and a rerun resumes after them."""


class EnginesLost(StageError):
    """The run's engine replicas are gone, and no node left can take them back."""


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
    """The pyarrow filesystem of a URI (``s3://...``) or a local path, and the path in it.

    For ``s3://`` the endpoint and credentials come from where pyarrow and boto users keep
    them: the URI's query (``?endpoint_override=...``), else ``AWS_ENDPOINT_URL_S3``, else
    ``AWS_ENDPOINT_URL``; keys from the AWS default chain (``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role). No key is ever taken from or put
    into a file or the config of ours.
    """
    if "://" in uri:
        try:
            fs, path = cast("tuple[pafs.FileSystem, str]", pafs.FileSystem.from_uri(uri))
        except (pa.ArrowInvalid, ValueError) as e:
            raise InputError(f"{uri!r} is not a path or URI pyarrow can open: {e}") from e
        if isinstance(fs, pafs.S3FileSystem):
            fs = _s3_with_retries(fs)
        return fs, path
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


# pyarrow (26) reads AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL (the first wins, as in boto3)
# in `FileSystem.from_uri` only; `S3FileSystem(...)` itself ignores both. These are read here
# too, for a pyarrow whose from_uri predates them, and only when the URI names no endpoint.
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _s3_with_retries(fs: pafs.S3FileSystem) -> pafs.S3FileSystem:
    """``from_uri``'s S3 filesystem, rebuilt with pyarrow's standard retries (3 attempts)
    and, where it has no endpoint, the environment's.

    ``from_uri`` leaves the retries to the AWS SDK's default, which spent 6 s on each call to
    an endpoint that refuses connections (12 s for the output check). The standard strategy
    answers in about 1 s, and it is what every Ray worker gets anyway: a pickled
    S3FileSystem keeps its options but not its retry strategy. The options are those
    ``from_uri`` resolved (its pickled form); credentials it left unset stay unset, so the
    AWS default chain (the environment) still supplies them.
    """
    options = _s3_options(fs)
    if options is None:
        return fs  # a pyarrow whose pickled form is not the options: keep its filesystem
    if not options.get("endpoint_override"):
        for name in _ENDPOINT_VARIABLES:
            if os.environ.get(name):
                options["endpoint_override"] = os.environ[name]
                break
    options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    return pafs.S3FileSystem(**options)


def _s3_options(fs: pafs.S3FileSystem) -> dict[str, Any] | None:
    """The options an S3 filesystem was made with: its pickled form, ``S3FileSystem``'s
    keyword arguments (pyarrow exposes no other way to read them)."""
    _, args = fs.__reduce__()
    return dict(args[0]) if args and isinstance(args[0], dict) else None


def store_of(fs: pafs.FileSystem) -> str:
    """Where a filesystem keeps its files, for error messages: ``S3 endpoint http://...``."""
    if isinstance(fs, pafs.S3FileSystem):
        endpoint = (_s3_options(fs) or {}).get("endpoint_override")
        return f"S3 endpoint {endpoint}" if endpoint else f"AWS S3 (region {fs.region or '?'})"
    return str(fs.type_name)


# Credentials an error text could carry: scrubbed from every message we print.
_CREDENTIAL_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")


def storage_problem(error: OSError, fs: pafs.FileSystem) -> str:
    """An I/O error of ``fs`` as one line that says where: pyarrow's text, whitespace folded,
    any credential of the environment cut out, and the store (an S3 endpoint) named."""
    text = " ".join(str(error).split()) or type(error).__name__
    for name in _CREDENTIAL_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, REDACTED)
    # pyarrow's advice names its own option, which no rare-ray setting reaches.
    text = text.replace(
        "To create buckets, enable the allow_bucket_creation option.",
        "rare-ray creates no bucket: create it, or name another.",
    )
    if "ACCESS_DENIED" in text or "INVALID_ACCESS_KEY" in text or "SIGNATURE" in text:
        text += " (are AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY right, and allowed here?)"
    if isinstance(fs, pafs.S3FileSystem):
        text = f"{text} ({store_of(fs)})"
    return text
