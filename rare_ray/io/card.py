"""The dataset card: ``README.md`` at the output root, written from the manifest.

Its YAML header is what the Hugging Face Hub and ``datasets.load_dataset(DIR)`` read: one
``configs`` entry per table (``default`` is ``data/`` with its ``train`` and ``validation``
splits; each SFT export adds its own, ``rare_ray.export``), the licence and a size category.
The body says how the rows were made (model, prompts' settings, sampling, BM25 settings and
index), what came of them (counts per stage, rejects by reason, tokens), and how to load them.

Everything in it comes from the manifest, whose config is already redacted: no key or token
can reach the card. Each split's glob names its publication (``part-<publication>-*.parquet``,
an export's ``part-<export>-*``): it matches exactly the manifest's files even while an older
publication's are still being deleted, and it changes with every publication, which is what
tells ``datasets`` that its cache of the directory is stale (``datasets`` 5 keys the cache of
a local directory on the card's globs, not on the files they match, so a glob that stayed the
same would load the rows of an earlier run). A split with no rows is left out (a glob that
matches nothing fails ``load_dataset``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from rare_ray.vocabulary import ALL_STAGES, INGEST

CARD = "README.md"
# SFT exports (``rare_ray.export``) live under here, with a record of what was exported from
# which publication; the card lists them while that publication is the published one.
EXPORTS = "export"
EXPORT_RECORD = f"{EXPORTS}/_export.json"
SPLITS = ("train", "validation")
# The Hub's size categories, by row count.
_SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
          (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]  # fmt: skip


def size_category(rows: int) -> str:
    return next((name for limit, name in _SIZES if rows < limit), "100M<n<1B")


def data_config(
    name: str, directory: str, rows: Mapping[str, int], publication: str, default: bool = False
) -> dict[str, Any]:
    """A ``configs`` entry: ``directory/split=<split>/part-<publication>-*.parquet`` for each
    split with rows (only those have files)."""
    files = [
        {"split": split, "path": f"{directory}/split={split}/part-{publication}-*.parquet"}
        for split in SPLITS
        if rows.get(split)
    ]
    return {"config_name": name, **({"default": True} if default else {}), "data_files": files}


def header(manifest: Mapping[str, Any], exports: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card's YAML header."""
    config = manifest.get("config") or {}
    rows = manifest["publication"]["data"]
    configs = [data_config("default", "data", rows, manifest["publication"]["id"], default=True)]
    exports = exports or {}
    for name, export in exports.get("formats", {}).items():
        configs.append(data_config(name, export["directory"], export["rows"], exports["id"]))
    return {
        "license": (config.get("output_layout") or {}).get("license", "unknown"),
        "pretty_name": f"RARE reasoning data ({manifest['engine']['model']})",
        "size_categories": [size_category(sum(rows.values()))],
        "task_categories": ["question-answering", "text-generation"],
        "tags": ["rare-ray", "retrieval-augmented-reasoning", "synthetic", "hard-negatives"],
        # A config without files fails load_dataset: a table with no rows has none.
        "configs": [c for c in configs if c["data_files"]],
    }


def render_card(manifest: Mapping[str, Any], exports: Mapping[str, Any] | None = None) -> str:
    """The whole card: header and body."""
    head = yaml.safe_dump(header(manifest, exports), sort_keys=False, allow_unicode=True)
    return f"---\n{head}---\n\n{_body(manifest, exports)}"


def _body(manifest: Mapping[str, Any], exports: Mapping[str, Any] | None) -> str:
    config = manifest.get("config") or {}
    pub, counts = manifest["publication"], manifest["counts"]
    engine = manifest["engine"]
    lines = [
        f"# RARE reasoning data ({engine['model']})",
        "",
        "Training data for retrieval-augmented reasoning, made by rare-ray "
        f"{manifest.get('rare_ray_version') or ''} from "
        f"`{manifest['input']}`: for each document a question, a scenario and a reference answer "
        "(Doc2Query), BM25 hard negatives mined from the whole corpus (BM25HardNeg), a "
        "teacher's step-by-step reasoning over the document shuffled among its negatives "
        "(ReasonDistill), and whether its answer agrees with the reference (verify).",
        "",
        "## Load it",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'ds = load_dataset("path/to/this/directory")  # or the Hub repository it was uploaded to',
        *(
            f'sft = load_dataset("path/to/this/directory", "{name}")'
            for name in (exports or {}).get("formats", {})
        ),
        "```",
        "",
        "| split | rows |",
        "|---|---:|",
        *(f"| {split} | {pub['data'].get(split, 0):,} |" for split in SPLITS),
        "",
    ]
    if exports:
        lines += _export_section(exports)
    lines += [
        "## How it was made",
        "",
        f"- Engine: {engine.get('kind')} serving `{engine['model']}` ({engine.get('device')}); "
        f"seed {config.get('seed')}.",
        *_settings(config, manifest),
        f"- Started {manifest.get('started_at')}, finished {manifest.get('finished_at')}; "
        f"publication `{pub['id']}`.",
        "",
        "## Counts",
        "",
        "| stage | in | kept | rejected | prompt tokens | generated tokens | seconds "
        "| generated tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *_count_rows(counts["stages"], manifest.get("timings_seconds") or {}),
        "",
        f"{counts['input_rows']:,} input rows: {counts['output_rows']:,} in `data/`, "
        f"{counts['rejected_rows']:,} in `rejects/`.",
        "",
        *_signals(counts["stages"]),
        *_cost(manifest.get("estimated_cost")),
    ]
    reasons = pub.get("reasons") or {}
    if reasons:
        lines += ["## Rejects by reason", "", "| stage | reason | rows |", "|---|---|---:|"]
        for stage, by_reason in reasons.items():
            for reason, rows in sorted(by_reason.items(), key=lambda kv: -kv[1])[:20]:
                lines.append(f"| {stage} | {_cell(reason)} | {rows:,} |")
        lines.append("")
    lines += [
        "## Columns of `data/`",
        "",
        "`id`, `text` (the positive document), `question`, `scenario`, `hard_negatives` (with "
        "their ids and BM25 scores), `positive_rank` and `positive_score` (the positive's own "
        "BM25 rank and score for the question), `document_order` and `positive_document` (how "
        "the documents were shuffled and numbered for the teacher), `reasoning` (the raw "
        "response; `reasoning_think` and `reasoning_answer` when it used `<think>` tags), "
        "`reasoning_finished` (it ended before `max_tokens`), `reasoning_prompt` (the chat "
        "messages the teacher got, exactly as rendered) and its token counts, `cites_positive` "
        "(the reasoning cites the positive's number); with the verify stage, "
        "`reference_answer` (written by Doc2Query from the document), `answer_verdict`, "
        "`answer_verified` and `answer_verdict_reason`.",
        "",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items() if v),
        "",
    ]
    return "\n".join(lines)


def _settings(config: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[str]:
    out = []
    d2q, bm25, distill = (config.get(k) or {} for k in ("doc2query", "bm25", "distill"))
    if d2q:
        out.append(
            f"- Doc2Query: up to {d2q.get('max_attempts')} asks, documents cut to "
            f"{d2q.get('max_doc_tokens')} tokens, fields up to {d2q.get('max_field_chars')} "
            f"characters; sampling `{json.dumps(d2q.get('sampling'))}`."
        )
    if bm25:
        index = manifest.get("index") or {}

        def setting(key: str) -> str:  # an unset filter reads "off", not Python's None
            value = bm25.get(key)
            return "off" if value is None else f"`{value}`"

        out.append(
            f"- BM25HardNeg: {bm25.get('num_neg')} negatives from the top {bm25.get('depth')} "
            f"(k1 {bm25.get('k1')}, b {bm25.get('b')}, preset {setting('preset')}, query "
            f"{setting('query')}, start rank {bm25.get('start_rank')}, group key "
            f"{setting('group_key')}, near-duplicate {setting('near_duplicate')}, relative "
            f"margin {setting('relative_margin')}, max score {setting('max_score')}); index "
            f"`{index.get('fingerprint')}` of {index.get('num_docs')} documents."
        )
    if distill:
        out.append(
            f"- ReasonDistill: documents cut to {distill.get('max_doc_tokens')} tokens; sampling "
            f"`{json.dumps(distill.get('sampling'))}`."
        )
    verify = config.get("verify") or {}
    if verify.get("enabled") and "verify" in (manifest.get("stages_run") or []):
        out.append(
            f"- Verify: the teacher's final answer (up to {verify.get('max_answer_chars')} "
            f"characters) against the reference answer, up to {verify.get('max_attempts')} "
            f"asks; sampling `{json.dumps(verify.get('sampling'))}`."
        )
    return out


def _count_rows(stages: Mapping[str, Mapping[str, int]], seconds: Mapping[str, float]) -> list[str]:
    rows = []
    # In pipeline order (the manifest's JSON sorts its keys); a stage of another name last.
    order = {name: n for n, name in enumerate((INGEST, *ALL_STAGES))}
    for stage, c in sorted(stages.items(), key=lambda kv: order.get(kv[0], len(order))):
        tokens = [c.get("prompt_tokens"), c.get("generated_tokens")]
        cells = [f"{t:,}" if t is not None else "" for t in tokens]
        took = seconds.get(stage, 0.0)
        rate = f"{tokens[1] / took:,.1f}" if tokens[1] is not None and took > 0 else ""
        rows.append(
            f"| {stage} | {c['in']:,} | {c['out']:,} | {c['rejected']:,} | {cells[0]} | "
            f"{cells[1]} | {took:.1f} | {rate} |"
        )
    return rows


def _signals(stages: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The per-row labels worth filtering on, counted."""
    lines = []
    distill, verify = stages.get("distill") or {}, stages.get("verify") or {}
    if "cited_positive" in distill:
        lines.append(
            f"- `cites_positive`: the reasoning cites the positive document in "
            f"{distill['cited_positive']:,} of {distill['out']:,} rows."
        )
    if verify:
        verdicts = ", ".join(
            f"{verify.get(v, 0):,} {v}"
            for v in ("agrees", "disagrees", "unclear", "unfinished", "unreadable")
        )
        lines.append(
            f"- `answer_verified` (the teacher's answer agrees with the reference answer "
            f"written from the document): {verdicts}."
        )
    return [*lines, ""] if lines else []


def _cost(cost: Mapping[str, Any] | None) -> list[str]:
    if not cost:
        return []
    prices = cost["price_per_million_tokens"]
    per_stage = ", ".join(f"{stage} {value:,.4f}" for stage, value in cost["stages"].items())
    return [
        f"Estimated cost at {prices['prompt']:g} per million prompt and {prices['generated']:g} "
        f"per million generated tokens: {cost['total']:,.4f} ({per_stage}).",
        "",
    ]


def _export_section(exports: Mapping[str, Any]) -> list[str]:
    filtered = exports.get("filtered") or {}
    lines = [
        "## SFT exports",
        "",
        f"Made by `rare-ray export` with `{json.dumps(exports.get('options'))}`: "
        f"{exports['rows']:,} of {exports['data_rows']:,} rows of `data/` exported"
        + (
            "; left out: " + ", ".join(f"{n:,} {reason}" for reason, n in filtered.items())
            if filtered
            else ""
        )
        + ".",
        "",
        "| config | format | train | validation |",
        "|---|---|---:|---:|",
    ]
    for name, export in exports["formats"].items():
        rows = export["rows"]
        lines.append(
            f"| `{name}` | {export['description']} | {rows.get('train', 0):,} | "
            f"{rows.get('validation', 0):,} |"
        )
    return [*lines, ""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]
