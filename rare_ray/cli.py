"""The ``rare-ray`` command.

rare-ray run --config configs/local.yaml [--input PATH] [--output DIR]
rare-ray doc2query|bm25|distill --config ... --input PATH --output DIR
rare-ray export DIR [--format messages prompt_completion rare] [--max-tokens N] ...
rare-ray status DIR
rare-ray build-test-model [--output models/tiny-llama] [--if-missing]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rare_ray.config import RayConfig, RunConfig
from rare_ray.vocabulary import (
    ALL_STAGES,
    ClusterError,
    InputError,
    OutputError,
    ResumeError,
    SettingsError,
    StageName,
)

TEST_MODEL_DIR = "models/tiny-llama"

# The stage commands and the stages each runs.
STAGE_COMMANDS: dict[str, tuple[StageName, ...]] = {
    "run": ALL_STAGES,
    "doc2query": ("doc2query",),
    "bm25": ("bm25",),
    "distill": ("distill",),
    "verify": ("verify",),
}
_HELP = {
    "run": "run Doc2Query -> BM25HardNeg -> ReasonDistill -> verify end to end",
    "doc2query": "write a question and a scenario per document (needs: text)",
    "bm25": "mine BM25 hard negatives (needs: question, text)",
    "distill": "write reasoning chains (needs: text, question, scenario, hard_negatives)",
    "verify": "check the teacher's answers (needs: question, reference_answer, reasoning)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rare-ray", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in _HELP.items():
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", required=True, help="YAML run configuration")
        sub.add_argument("--input", help="corpus path (overrides the config)")
        sub.add_argument("--output", help="output directory (overrides the config)")
        sub.add_argument("--limit", type=int, help="use only the first N documents")
        sub.add_argument(
            "--fresh",
            action="store_true",
            help="delete what an earlier run left in the output directory and start over "
            "(by default a rerun resumes, and refuses a changed config or corpus)",
        )
        if name == "bm25":
            sub.add_argument("--corpus", help="index this corpus instead of the input's texts")
    export = commands.add_parser(
        "export", help="SFT training files from a finished run (each a config of its card)"
    )
    export.add_argument("output", help="the run's output directory")
    export.add_argument(
        "--format",
        nargs="+",
        dest="formats",
        choices=["messages", "prompt_completion", "rare"],
        default=["messages", "prompt_completion", "rare"],
    )
    export.add_argument(
        "--include-unfinished",
        action="store_true",
        help="also rows whose reasoning was cut off at max_tokens (left out by default)",
    )
    export.add_argument(
        "--include-unverified",
        action="store_true",
        help="also rows whose answer the verify stage did not find right (left out by default "
        "when the run verified)",
    )
    export.add_argument(
        "--max-tokens", type=int, help="leave out rows whose prompt plus reasoning is longer"
    )
    export.add_argument(
        "--think",
        choices=["keep", "strip"],
        default="keep",
        help="keep a response's <think> block, or train on the answer after it",
    )
    status = commands.add_parser("status", help="what an output directory holds so far")
    status.add_argument("output", help="the run's output directory")
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench", required=True
    )
    bm25 = bench.add_parser("bm25", help="BM25 stage through Ray vs. plain pyserini")
    bm25.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    bm25.add_argument(
        "--searchers-per-node", type=int, default=None, help="default: half of a node's CPUs"
    )
    bm25.add_argument("--repeats", type=int, default=20, help="passes over the 1,000 queries")
    bm25.add_argument("--local-dir", default="/tmp/rare-ray/bench-indexes")
    bm25.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)"
    )
    bm25.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="default and strict settings in turns, this often (each first in half of them)",
    )
    bm25.add_argument(
        "--job",
        nargs="+",
        metavar="FILE",
        help="instead: the whole `rare-ray bm25` command over each file (id, text, question) "
        "against plain pyserini doing the same work, each in its own process",
    )
    bm25.add_argument("--config", default="configs/local.yaml", help="with --job: the run's config")
    bm25.add_argument(
        "--baseline-tree", help="with --job: also run the command with another checkout's code"
    )
    bench.add_parser(
        "negatives", help="how far true and false negatives lie apart (bm25.preset: strict)"
    )
    llm = bench.add_parser("llm", help="LLM stages through Ray Data vs. bare vLLM")
    llm.add_argument("--config", default="configs/local.yaml", help="engine and stage settings")
    llm.add_argument("--docs", type=int, default=256, help="rows per stage")
    llm.add_argument(
        "--stages", nargs="+", choices=["doc2query", "distill"], default=["doc2query", "distill"]
    )
    llm.add_argument("--repeats", type=int, default=1, help="bare/Ray pairs per stage")
    llm.add_argument("--json", help="also write the results to this JSON file")
    scale = bench.add_parser("pipeline", help="the whole job at several corpus sizes")
    scale.add_argument("--config", default="configs/local.yaml")
    scale.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1_000])
    scale.add_argument("--output", default="/tmp/rare-ray/bench-pipeline")
    scale.add_argument("--json", help="also write the results to this JSON file")
    scale.add_argument(
        "--max-tokens",
        type=int,
        help="both stages' max_tokens (and doc2query.max_field_chars lowered to fit them)",
    )
    scale.add_argument(
        "--baseline-tree",
        help="a checkout of another revision: every size also runs with its code, for a "
        "before/after table from one bench run",
    )
    overhead = bench.add_parser(
        "overhead",
        help="the whole job on synthetic corpora with a zero-cost engine: the job's own cost",
    )
    overhead.add_argument(
        "--config", default="configs/local-openai.yaml", help="stage, Ray and output settings"
    )
    overhead.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    overhead.add_argument("--stores", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    overhead.add_argument("--work", default="/tmp/rare-ray/bench-overhead", help="corpora, runs")
    overhead.add_argument(
        "--s3-root",
        help="s3://bucket/prefix of a store the AWS_* variables reach (default: a SeaweedFS "
        "server started on loopback, whose counters give the S3 requests)",
    )
    overhead.add_argument("--json", help="also write the results to this JSON file")
    model = commands.add_parser("build-test-model", help="build the tiny random-weight model")
    model.add_argument("--output", default=TEST_MODEL_DIR)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--if-missing", action="store_true", help="do nothing if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build-test-model":
        return _build_test_model(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "status":
        return _status(args.output)
    if args.command == "export":
        return _export(args)

    from rare_ray.pipeline import run

    try:
        config = RunConfig.from_yaml(
            args.config, input=args.input, output=args.output, limit=args.limit
        )
    except OSError as e:
        print(f"rare-ray: cannot read config {args.config}: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        # Field by field, without the values given: a config may hold a secret by mistake.
        problems = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg']}"
            for err in e.errors(include_url=False, include_input=False)
        ]
        print(f"rare-ray: bad config {args.config}:\n" + "\n".join(problems), file=sys.stderr)
        return 2
    try:
        manifest = run(
            config,
            STAGE_COMMANDS[args.command],
            corpus=getattr(args, "corpus", None),
            fresh=args.fresh,
        )
    except (InputError, SettingsError, OutputError, ClusterError, ResumeError) as e:
        print(f"rare-ray: {e}", file=sys.stderr)
        return 2
    _summary(manifest)
    return 0


def _export(args: argparse.Namespace) -> int:
    from rare_ray.export import ExportOptions, export

    options = ExportOptions(
        formats=tuple(args.formats),
        finished_only=not args.include_unfinished,
        verified_only=False if args.include_unverified else None,
        max_tokens=args.max_tokens,
        think=args.think,
    )
    try:
        record = export(args.output, options)
    except (InputError, OutputError) as e:
        print(f"rare-ray: {e}", file=sys.stderr)
        return 2
    left_out = ", ".join(f"{n} {why}" for why, n in record["filtered"].items()) or "none"
    print(f"exported {record['rows']} of {record['data_rows']} rows (left out: {left_out})")
    if not record["rows"]:  # no files, so no config to load
        print("nothing to load: every row was left out (see the --include-* options)")
        return 0
    for name, fmt in record["formats"].items():
        rows = ", ".join(f"{split} {n}" for split, n in sorted(fmt["rows"].items()))
        print(f"  {name:<18} {args.output}/{fmt['directory']} ({rows})")
    print(f'load one with: datasets.load_dataset("{args.output}", "{options.formats[0]}")')
    return 0


def _status(output: str) -> int:
    from rare_ray.io.writers import OutputDir

    status = OutputDir(output).status()
    if not status["passes"]:
        print(f"{output}: no stage has written anything yet")
        return 1
    print(f"{'stage':<20} {'state':<9} {'shards':>9} {'kept':>8} {'rejected':>9}")
    for name, p in status["passes"].items():
        state = "complete" if p["complete"] else "partial"
        shards = f"{p['committed']}/{p['shards']}"
        print(f"{name:<20} {state:<9} {shards:>9} {p['kept']:>8} {p['rejected']:>9}")
    published = status["published"]
    print(
        f"data/: {published['data']} rows, rejects/: {published['rejects']} rows; "
        f"{'finished (manifest.json written)' if status['finished'] else 'not finished'}"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    import ray

    from rare_ray.bench import bm25
    from rare_ray.pipeline import init_ray

    if args.bench in ("llm", "pipeline"):
        from rare_ray.bench import llm, pipeline

        config = RunConfig.from_yaml(args.config)
        if args.bench == "llm":
            llm.main(config, args.docs, args.stages, args.json, args.repeats)
        else:
            if args.max_tokens:
                config = pipeline.with_max_tokens(config, args.max_tokens)
            pipeline.main(config, args.sizes, args.output, args.json, args.baseline_tree)
        return 0

    if args.bench == "bm25" and args.job:  # both sides in processes of their own
        from rare_ray.bench import bm25_job

        bm25_job.main(args.config, args.job, args.baseline_tree)
        return 0
    if args.bench == "overhead":  # each run in a process of its own
        from rare_ray.bench import overhead

        config = RunConfig.from_yaml(args.config)
        overhead.main(config, args.sizes, args.stores, args.work, args.s3_root, args.json)
        return 0
    if args.bench == "negatives":  # plain pyserini in this process: no Ray
        from rare_ray.bench import negatives

        negatives.main()
        return 0
    init_ray(RayConfig(address="local", num_cpus=args.num_cpus), log_to_driver=False)
    print(f"Ray {ray.__version__}, {ray.cluster_resources().get('CPU', 0):g} CPUs")
    bm25.main(args.sizes, args.searchers_per_node, args.repeats, args.local_dir, args.rounds)
    return 0


def _build_test_model(args: argparse.Namespace) -> int:
    from rare_ray.testing.tiny_llama import build_tiny_llama

    if args.if_missing and (Path(args.output) / "config.json").is_file():
        print(f"test model already at {args.output}")
        return 0
    path = build_tiny_llama(args.output, seed=args.seed)
    print(f"test model written to {path}")
    return 0


def _summary(manifest: dict[str, Any]) -> None:
    counts = manifest["counts"]
    print("\nstage        in      kept  rejected  seconds")
    for stage, c in counts["stages"].items():
        seconds = manifest["timings_seconds"].get(stage, 0.0)
        print(f"{stage:<10} {c['in']:>6} {c['out']:>9} {c['rejected']:>9} {seconds:>8.1f}")
    out = manifest["output"]
    print(
        f"\n{counts['output_rows']} rows in {out}/data, {counts['rejected_rows']} in "
        f"{out}/rejects ({counts['input_rows']} input rows); manifest: {out}/manifest.json"
    )


if __name__ == "__main__":
    sys.exit(main())
