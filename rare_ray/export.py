"""SFT export: a finished run's rows as the training examples trainers take as they are.

``rare-ray export OUT`` reads the published ``data/`` (the files the manifest lists) and
writes, per format, one Parquet file per data file under ``export/<format>/split=<split>/``
(``part-<export>-<group>.parquet``, the export's id a hash of the publication and options);
each format becomes a config of the dataset card, so ``load_dataset(OUT, "messages")`` loads
it with its ``train`` and ``validation`` splits. Formats:

- ``messages``: chat ``messages`` (the teacher's system and user messages, then the
  reasoning as the assistant's), TRL's conversational format, which LLaMA-Factory reads too;
- ``prompt_completion``: the same split into ``prompt`` (the teacher's messages) and
  ``completion`` (the assistant's message), TRL's prompt-completion format, for a loss on the
  completion only;
- ``rare``: RARE's own layout, ``id``, ``system``, ``instruction`` (the user message) and
  ``output`` (the reasoning).

The prompt is the one the teacher got, stored by ReasonDistill (``reasoning_prompt``), never
rendered again here: the documents keep their order, numbering and cuts. Options: only rows
whose reasoning ended before ``max_tokens`` (``reasoning_finished``, the default), only rows
whose answer the verify stage found to agree with the reference (``answer_verified``, the
default when the run verified), a maximum
length of prompt plus reasoning in tokens (the engine's own counts; a row whose counts are
unknown is left out), and ``<think>`` blocks kept or stripped (stripped: the answer after the
block; a response without one is kept whole). Every row of ``data/`` is either exported or
counted under the filter that left it out.

The export follows the publication protocol (``rare_ray.io.publication``): files first, then
the record ``export/_export.json`` and the card that lists them, then files of any earlier
export are deleted. A new run's publication deletes the export of the one before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rare_ray.io.card import EXPORT_RECORD, EXPORTS
from rare_ray.io.checkpoints import fingerprint, read_json, write_json, write_parquet_whole
from rare_ray.io.publication import MANIFEST, write_card
from rare_ray.io.writers import OutputDir
from rare_ray.rows import ANSWER_VERIFIED, ID, MESSAGES_TYPE
from rare_ray.vocabulary import InputError, OutputError, storage_problem

Format = Literal["messages", "prompt_completion", "rare"]
FORMATS: dict[str, str] = {
    "messages": "chat `messages` (system, user, assistant)",
    "prompt_completion": "`prompt` / `completion` (conversational)",
    "rare": "RARE's `instruction` / `output`",
}
SCHEMAS: dict[str, pa.Schema] = {
    "messages": pa.schema([(ID, pa.string()), ("messages", MESSAGES_TYPE)]),
    "prompt_completion": pa.schema(
        [(ID, pa.string()), ("prompt", MESSAGES_TYPE), ("completion", MESSAGES_TYPE)]
    ),
    "rare": pa.schema(
        [
            (ID, pa.string()),
            ("system", pa.string()),
            ("instruction", pa.string()),
            ("output", pa.string()),
        ]
    ),
}


@dataclass(frozen=True)
class ExportOptions:
    formats: tuple[str, ...] = tuple(FORMATS)
    finished_only: bool = True
    # Only rows whose answer the verify stage found right; None: when the run verified.
    verified_only: bool | None = None
    max_tokens: int | None = None
    think: Literal["keep", "strip"] = "keep"


@dataclass(frozen=True)
class Columns:
    """The data/ columns an export reads, named from the run's ``distill.output_key``, and
    whether it reads the verify stage's label."""

    reasoning: str
    verified: bool = False

    @property
    def prompt(self) -> str:
        return f"{self.reasoning}_prompt"

    @property
    def needed(self) -> list[str]:
        r = self.reasoning
        return [ID, self.prompt, r, f"{r}_answer", f"{r}_finished", f"{r}_prompt_tokens",
                f"{r}_tokens", *([ANSWER_VERIFIED] if self.verified else [])]  # fmt: skip


def export(output: str, options: ExportOptions | None = None) -> dict[str, Any]:
    """Exports the finished run in ``output``; returns the export's record."""
    options = options or ExportOptions()
    unknown = set(options.formats) - set(FORMATS)
    if unknown:
        raise InputError(f"unknown export format(s) {sorted(unknown)}; choose from {list(FORMATS)}")
    out = OutputDir(output)
    manifest = read_json(out.fs, out.path(MANIFEST))
    if not manifest or "publication" not in manifest:
        raise InputError(
            f"{output} is not a finished rare-ray run (no {MANIFEST} with a publication): "
            "run `rare-ray run` into it first"
        )
    config = manifest.get("config") or {}
    reasoning = (config.get("distill") or {}).get("output_key", "reasoning")
    data_files = sorted(f for f in manifest["publication"]["files"] if f.startswith("data/"))
    verified = bool(data_files) and all(
        ANSWER_VERIFIED in _schema(out, name).names for name in data_files
    )
    if options.verified_only and not verified:
        raise InputError(
            f"{output} has no {ANSWER_VERIFIED} column (its run had verify.enabled off, or "
            "came from a rare-ray without the verify stage): export without --verified-only"
        )
    options = replace(options, verified_only=verified and options.verified_only is not False)
    columns = Columns(reasoning, verified=bool(options.verified_only))
    for name in data_files:
        _check_columns(out, name, columns)
    out.check_writable()

    pub_id = manifest["publication"]["id"]
    chosen_options = {**asdict(options), "formats": list(options.formats)}
    record: dict[str, Any] = {
        "id": fingerprint({"publication": pub_id, "options": chosen_options}),
        "publication": pub_id,
        "options": chosen_options,
        "data_rows": 0,
        "rows": 0,
        "filtered": {},
        "formats": {
            f: {"directory": f"{EXPORTS}/{f}", "description": FORMATS[f], "rows": {}, "files": []}
            for f in options.formats
        },
    }
    try:
        for name in data_files:
            split = name.split("/")[1].removeprefix("split=")
            table = pq.read_table(out.path(name), columns=columns.needed, filesystem=out.fs)
            record["data_rows"] += table.num_rows
            chosen, filtered = select(table, columns, options)
            for reason, n in filtered.items():
                record["filtered"][reason] = record["filtered"].get(reason, 0) + n
            record["rows"] += chosen.num_rows
            if not chosen.num_rows:  # no empty files: `datasets` fails on them
                continue
            examples = examples_of(chosen, columns, options.think)
            for fmt in options.formats:
                group = name.rsplit("/", 1)[1].removeprefix(f"part-{pub_id}-")
                path = f"{EXPORTS}/{fmt}/split={split}/part-{record['id']}-{group}"
                write_parquet_whole(examples[fmt], out.path(path), out.fs)
                entry = record["formats"][fmt]
                entry["files"].append(path)
                entry["rows"][split] = entry["rows"].get(split, 0) + chosen.num_rows
        # Every row may be filtered out (no format file written): the record still goes in.
        out.fs.create_dir(out.path(EXPORTS), recursive=True)
        write_json(out.fs, out.path(EXPORT_RECORD), record)
        write_card(out.fs, out.root, manifest)
        _delete_others(out, record)
    except OSError as e:
        problem = storage_problem(e, out.fs)
        raise OutputError(f"cannot write the export into {output}: {problem}") from e
    return record


def _schema(out: OutputDir, name: str) -> pa.Schema:
    try:
        return pq.read_schema(out.path(name), filesystem=out.fs)
    except OSError as e:
        raise InputError(f"cannot read {out.path(name)}: {storage_problem(e, out.fs)}") from e


def _check_columns(out: OutputDir, name: str, columns: Columns) -> None:
    schema = _schema(out, name)
    missing = [c for c in columns.needed if c not in schema.names]
    if missing:
        raise InputError(
            f"{out.path(name)} has no column {missing[0]!r}: it was written by a rare-ray "
            "that did not store the teacher's prompt; run the distill stage again "
            "(`rare-ray run --fresh`, or into a new output directory) to export it"
        )


def select(
    table: pa.Table, columns: Columns, options: ExportOptions
) -> tuple[pa.Table, dict[str, int]]:
    """The rows to export, and how many each filter left out (the first that applies)."""
    filtered: dict[str, int] = {}
    keep = pa.array([True] * table.num_rows)
    if options.finished_only:
        finished = pc.fill_null(table[f"{columns.reasoning}_finished"], False)
        filtered["unfinished"] = int(pc.sum(pc.invert(finished)).as_py() or 0)
        keep = pc.and_(keep, finished)
    if options.verified_only:
        verified = pc.fill_null(table[ANSWER_VERIFIED], False)
        filtered["not verified"] = int(pc.sum(pc.and_(keep, pc.invert(verified))).as_py() or 0)
        keep = pc.and_(keep, verified)
    if options.max_tokens is not None:
        prompt = table[f"{columns.reasoning}_prompt_tokens"]
        generated = table[f"{columns.reasoning}_tokens"]
        known = pc.and_(pc.greater(pc.fill_null(prompt, 0), 0), pc.is_valid(generated))
        fits = pc.less_equal(pc.add(prompt, generated), options.max_tokens)
        unknown = pc.and_(keep, pc.invert(known))
        filtered["length unknown"] = int(pc.sum(unknown).as_py() or 0)
        keep = pc.and_(keep, known)
        too_long = pc.and_(keep, pc.invert(pc.fill_null(fits, False)))
        filtered[f"over {options.max_tokens} tokens"] = int(pc.sum(too_long).as_py() or 0)
        keep = pc.and_(keep, pc.fill_null(fits, False))
    return table.filter(keep), {k: v for k, v in filtered.items() if v}


def completion_of(raw: str, answer: str | None, think: str) -> str:
    """The assistant's text: the raw response, or with ``think="strip"`` the answer after
    its ``<think>`` block (a response without one stays whole)."""
    return answer if think == "strip" and answer is not None else raw


def examples_of(table: pa.Table, columns: Columns, think: str) -> dict[str, pa.Table]:
    """``table``'s rows in every format."""
    ids = table[ID].to_pylist()
    prompts: list[list[dict[str, str]]] = table[columns.prompt].to_pylist()
    raw = table[columns.reasoning].to_pylist()
    answers = table[f"{columns.reasoning}_answer"].to_pylist()
    completions = [
        [{"role": "assistant", "content": completion_of(r, a, think)}]
        for r, a in zip(raw, answers, strict=True)
    ]
    system = [_content(p, "system") for p in prompts]
    user = [_content(p, "user") for p in prompts]
    values: dict[str, Mapping[str, Sequence[Any]]] = {
        "messages": {
            ID: ids,
            "messages": [p + c for p, c in zip(prompts, completions, strict=True)],
        },
        "prompt_completion": {ID: ids, "prompt": prompts, "completion": completions},
        "rare": {
            ID: ids,
            "system": system,
            "instruction": user,
            "output": [c[0]["content"] for c in completions],
        },
    }
    return {fmt: pa.table(dict(v), schema=SCHEMAS[fmt]) for fmt, v in values.items()}


def _content(messages: Sequence[Mapping[str, str]], role: str) -> str:
    return "\n\n".join(m["content"] for m in messages if m["role"] == role)


def _delete_others(out: OutputDir, record: Mapping[str, Any]) -> None:
    keep = {f for fmt in record["formats"].values() for f in fmt["files"]} | {EXPORT_RECORD}
    selector = pafs.FileSelector(out.path(EXPORTS), recursive=True, allow_not_found=True)
    for info in out.fs.get_file_info(selector):
        relative = info.path[len(out.root.rstrip("/")) + 1 :]
        if info.type == pafs.FileType.File and relative not in keep:
            out.fs.delete_file(info.path)
