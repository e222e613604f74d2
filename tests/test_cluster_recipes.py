"""The cluster recipes: configs/*.yaml, cluster/*.yaml and the commands in cluster/README.md.

Nothing here starts Ray or reaches the network: the recipes are parsed and cross-checked, so a
config that does not validate, a job command naming a missing config, or a config asking for
more GPUs than its cluster has fails here rather than an hour into a cluster run.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rare_ray.cli import STAGE_COMMANDS, build_parser
from rare_ray.config import RunConfig
from rare_ray.engines.vllm import engine_runtime_env
from rare_ray.vocabulary import looks_secret
from tests.helpers import REPO

CONFIGS = REPO / "configs"
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster-aws.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
GUIDE = CLUSTER / "README.md"
GPU_8X = CONFIGS / "gpu-8x.yaml"
GPU_MULTINODE = CONFIGS / "gpu-multinode.yaml"

RECIPE_YAMLS = sorted([*CONFIGS.glob("*.y*ml"), *CLUSTER.glob("*.y*ml")])
CONFIG_YAMLS = sorted(CONFIGS.glob("*.y*ml"))

# GPUs per instance and Ray's accelerator_type label for the instance types the recipes name.
INSTANCE_GPUS = {
    "p5.48xlarge": ("H100", 8),
    "p5e.48xlarge": ("H200", 8),
    "p4d.24xlarge": ("A100", 8),
    "g6e.48xlarge": ("L40S", 8),
}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def gpus_needed(config: RunConfig) -> int:
    e = config.engine
    return e.replicas * e.tensor_parallel_size * e.pipeline_parallel_size


def cpus(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("176", "500m") in CPUs."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


# Job commands --------------------------------------------------------------------------------


@dataclass
class JobCommand:
    source: str
    argv: list[str]  # the job's own command: what runs on the cluster
    runtime_env: dict[str, Any] | None  # the job-level runtime env, when the command gives one


def logical_lines(text: str, comments_only: bool = False) -> list[str]:
    """Shell lines with backslash continuations joined (in comments only, for YAML files)."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if comments_only:
            if not line.startswith("#"):
                continue
            line = line.lstrip("#").strip()
        lines.append(line)
    joined, pending = [], ""
    for line in lines:
        if line.endswith("\\"):
            pending += line[:-1] + " "
        else:
            joined.append(pending + line)
            pending = ""
    if pending:
        joined.append(pending)
    return joined


def shell_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", markdown, re.DOTALL))


# A line that runs a job: `[VAR=value ...] ray job submit ...` or `rare-ray ...`.
COMMAND = re.compile(r"^(?:\w+=\S*\s+)*ray job submit\s|^rare-ray\s")


def job_commands(text: str, source: str, comments_only: bool = False) -> Iterator[JobCommand]:
    """`ray job submit ... -- CMD` lines, and lines that run `rare-ray` directly."""
    for line in logical_lines(text, comments_only):
        if not COMMAND.match(line):
            continue  # prose (in comments, say) need not be valid shell
        tokens = shlex.split(line, comments=True)
        starts = [
            i for i in range(len(tokens) - 2) if tokens[i : i + 3] == ["ray", "job", "submit"]
        ]
        if starts:
            rest = tokens[starts[0] + 3 :]
            if "--" not in rest:
                yield JobCommand(source, [], None)  # no entrypoint: reported by the check
                continue
            options, argv = rest[: rest.index("--")], rest[rest.index("--") + 1 :]
            runtime_env: dict[str, Any] = {}
            if "--runtime-env-json" in options:
                runtime_env = json.loads(options[options.index("--runtime-env-json") + 1])
            if "--working-dir" in options:
                runtime_env["working_dir"] = options[options.index("--working-dir") + 1]
            yield JobCommand(source, argv, runtime_env)
        elif tokens[:1] == ["rare-ray"]:
            yield JobCommand(source, tokens, None)


def rayjob_command() -> JobCommand:
    spec = load(RAYJOB)["spec"]
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
    return JobCommand(str(RAYJOB), shlex.split(spec["entrypoint"]), runtime_env)


def all_job_commands() -> list[JobCommand]:
    found = [rayjob_command()]
    for path in [*CONFIG_YAMLS, LAUNCHER, RAYJOB]:
        found += job_commands(path.read_text(encoding="utf-8"), str(path), comments_only=True)
    found += job_commands(shell_blocks(GUIDE.read_text(encoding="utf-8")), str(GUIDE))
    return found


def runtime_env_conflicts(job: dict[str, Any], driver: dict[str, Any]) -> set[str]:
    """What Ray refuses to merge between a job's runtime env and ray.init's (the config's)."""
    fields = (set(job) & set(driver)) - {"env_vars"}
    env_vars = set(job.get("env_vars") or {}) & set(driver.get("env_vars") or {})
    return fields | {f"env_vars.{name}" for name in env_vars}


def check_job_command(command: JobCommand) -> list[str]:
    """Problems with one job command; empty when it would start as written."""
    where = f"{command.source}: {shlex.join(command.argv) or '(no command)'}"
    scripts = pyproject()["project"]["scripts"]
    if command.argv[:1] != ["rare-ray"] or "rare-ray" not in scripts:
        return [f"{where}: does not run the rare-ray console script"]
    try:
        args = build_parser().parse_args(command.argv[1:])
    except SystemExit:
        return [f"{where}: rare-ray refuses these arguments"]
    if args.command not in STAGE_COMMANDS:
        return [f"{where}: {args.command} is not a job"]
    path = REPO / args.config
    if not path.is_file():
        return [f"{where}: no config file {args.config} in the repo"]
    try:
        config = RunConfig.from_yaml(path, input=args.input, output=args.output, limit=args.limit)
    except Exception as e:
        return [f"{where}: config does not validate: {e}"]
    problems = []
    if command.runtime_env is not None:
        conflicts = runtime_env_conflicts(command.runtime_env, config.ray.runtime_env)
        if conflicts:
            problems.append(f"{where}: job and config both set {sorted(conflicts)}")
    return problems


# (a) everything parses ------------------------------------------------------------------------


def test_recipes_are_all_there():
    names = {p.relative_to(REPO).as_posix() for p in RECIPE_YAMLS}
    assert {
        "configs/local.yaml",
        "configs/gpu-8x.yaml",
        "configs/gpu-multinode.yaml",
        "cluster/ray-cluster-aws.yaml",
        "cluster/rayjob.yaml",
    } <= names
    assert GUIDE.is_file()


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_yaml_parses(path: Path):
    assert isinstance(load(path), dict)


# (b) every config validates -------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIG_YAMLS, ids=lambda p: p.name)
def test_every_config_validates(path: Path):
    RunConfig.from_yaml(path)


@pytest.mark.parametrize("path", [GPU_8X, GPU_MULTINODE], ids=lambda p: p.name)
def test_gpu_configs_are_set_for_a_cluster(path: Path):
    config = RunConfig.from_yaml(path)
    engine = config.engine
    assert engine.device == "gpu"
    assert engine.seed_requests is True
    assert engine.accelerator_type
    # A Hugging Face id, not a local path the driver would look for.
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", engine.model), engine.model
    assert not engine.model.startswith((".", "/", "~"))
    assert not {"enforce_eager", "dtype"} & set(engine.engine_kwargs), "CPU-only settings"
    # Enough requests in flight to fill the engine's running batch (vLLM warns otherwise).
    max_num_seqs = engine.engine_kwargs.get("max_num_seqs", 1024)
    assert engine.batch_size * engine.max_concurrent_batches >= max_num_seqs
    # GPU engines keep vLLM's own process layout; only CPU engines run the model in the core.
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_runtime_env(engine)["env_vars"]
    assert config.ray.address == "auto"
    assert config.input.startswith("s3://") and config.output.startswith("s3://")
    # Only env_vars: a pip or working_dir here would clash with the job's own runtime env.
    assert set(config.ray.runtime_env) <= {"env_vars"}
    secret = re.compile(r"(^|_)(TOKEN|SECRET|KEY|PASSWORD)$")
    assert not any(secret.search(k.upper()) for k in config.ray.runtime_env.get("env_vars", {}))


# (c) job commands name the console script and configs that exist ------------------------------


def test_rare_ray_console_script_is_declared():
    target = pyproject()["project"]["scripts"]["rare-ray"]
    module, _, function = target.partition(":")
    assert (module, function) == ("rare_ray.cli", "main")
    from rare_ray import cli

    assert callable(cli.main)


def test_rayjob_entrypoint_runs_the_multinode_config():
    command = rayjob_command()
    assert command.argv[:4] == ["rare-ray", "run", "--config", "configs/gpu-multinode.yaml"]
    assert check_job_command(command) == []
    runtime_env = command.runtime_env or {}
    assert runtime_env.get("working_dir"), "the relative --config path needs the repo"
    # Without rare-ray in the image, the pip entry is what puts the console script there.
    assert any(p.replace(" ", "").startswith("rare-ray[gpu]@") for p in runtime_env["pip"])


def test_launcher_and_guide_submit_rare_ray_jobs():
    commands = all_job_commands()
    by_source = {c.source for c in commands}
    assert str(LAUNCHER) in by_source
    assert str(GUIDE) in by_source
    submitted = [c for c in commands if c.runtime_env is not None]
    assert any(c.source == str(GUIDE) and "pip" in (c.runtime_env or {}) for c in submitted)
    assert {
        "configs/gpu-8x.yaml",
        "configs/gpu-multinode.yaml",
    } <= {c.argv[c.argv.index("--config") + 1] for c in commands if "--config" in c.argv}


def test_every_job_command_would_start():
    problems = [p for command in all_job_commands() for p in check_job_command(command)]
    assert problems == []


def test_the_checks_catch_broken_commands():
    bad = [
        "ray job submit --working-dir . -- python -m rare_ray.cli run --config configs/local.yaml",
        "ray job submit --working-dir . -- rare-ray run --config configs/missing.yaml",
        "ray job submit --working-dir . -- rare-ray run --input x.jsonl",
        "ray job submit --working-dir . rare-ray run --config configs/gpu-8x.yaml",
        'ray job submit --runtime-env-json \'{"env_vars": {"TOKENIZERS_PARALLELISM": "1"}}\' '
        "-- rare-ray run --config configs/gpu-8x.yaml",
    ]
    for text in bad:
        (command,) = job_commands(text, "test")
        assert check_job_command(command), text
    (good,) = job_commands(
        "# ray job submit -- \\\n#   rare-ray bm25 --config configs/local.yaml", "t", True
    )
    assert check_job_command(good) == []


def test_launcher_installs_this_repo_with_the_gpu_extra():
    launcher = load(LAUNCHER)
    remote = {local: remote for remote, local in launcher["file_mounts"].items()}["."]
    setup = " && ".join(launcher["setup_commands"])
    assert f"cd {remote}" in setup
    assert re.search(r"pip install\b[^&]*\"\.\[gpu\]\"", setup), setup


# (d) GPU configs ask for the GPUs their recipe provides ---------------------------------------


def launcher_gpu_worker() -> dict[str, Any]:
    launcher = load(LAUNCHER)
    workers = [
        t
        for name, t in launcher["available_node_types"].items()
        if name != launcher["head_node_type"] and t.get("resources", {}).get("GPU")
    ]
    assert len(workers) == 1
    return workers[0]


def rayjob_gpu_group() -> dict[str, Any]:
    groups = load(RAYJOB)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in groups
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    ]
    assert len(gpu_groups) == 1
    return gpu_groups[0]


def test_gpu_8x_fills_one_launcher_node():
    config = RunConfig.from_yaml(GPU_8X)
    worker = launcher_gpu_worker()
    gpus, node_cpus = worker["resources"]["GPU"], worker["resources"]["CPU"]
    accelerator, instance_gpus = INSTANCE_GPUS[worker["node_config"]["InstanceType"]]
    assert gpus == instance_gpus
    assert gpus_needed(config) == gpus == 8
    per_replica = config.engine.tensor_parallel_size * config.engine.pipeline_parallel_size
    assert gpus % per_replica == 0
    assert config.engine.accelerator_type == accelerator
    assert worker["min_workers"] >= 1
    # The engines stay up through BM25 (one CPU per GPU in their placement groups).
    bm25_cpus = config.bm25.searchers_per_node * config.bm25.cpus_per_searcher
    assert bm25_cpus + gpus <= node_cpus
    # The launcher can also grow to gpu-multinode's size.
    multinode = RunConfig.from_yaml(GPU_MULTINODE)
    assert gpus_needed(multinode) <= worker["max_workers"] * gpus
    assert load(LAUNCHER)["max_workers"] >= worker["max_workers"]


def test_gpu_multinode_fits_the_rayjob_worker_group():
    config = RunConfig.from_yaml(GPU_MULTINODE)
    group = rayjob_gpu_group()
    pod = group["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    gpus_per_pod = int(resources["limits"]["nvidia.com/gpu"])
    assert int(resources["requests"]["nvidia.com/gpu"]) == gpus_per_pod
    pods = group["replicas"]
    # Every engine replica runs at once, so the group must never shrink below what they need.
    min_pods = group.get("minReplicas", pods)

    engine = config.engine
    per_replica = engine.tensor_parallel_size * engine.pipeline_parallel_size
    assert gpus_per_pod % per_replica == 0, "a replica would straddle two nodes"
    assert gpus_needed(config) <= min_pods * gpus_per_pod
    assert engine.replicas <= min_pods * (gpus_per_pod // per_replica)
    assert pods > 1, "a multi-node recipe"

    accelerator, instance_gpus = INSTANCE_GPUS[
        pod["nodeSelector"]["node.kubernetes.io/instance-type"]
    ]
    assert engine.accelerator_type == accelerator
    assert gpus_per_pod <= instance_gpus

    pod_cpus = cpus(resources["limits"]["cpu"])
    # The engines stay up through BM25 (one CPU per GPU in their placement groups).
    bm25_cpus = config.bm25.searchers_per_node * config.bm25.cpus_per_searcher
    assert bm25_cpus + gpus_per_pod <= pod_cpus

    # Tensor parallelism talks through /dev/shm: it must be a memory-backed volume.
    shm = [m["name"] for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert shm and volumes[shm[0]]["emptyDir"]["medium"] == "Memory"


def test_images_run_the_pinned_ray():
    deps = pyproject()["project"]
    (ray_pin,) = [d for d in deps["dependencies"] if d.startswith("ray[")]
    version = ray_pin.split("==")[1]
    assert f"ray[llm]=={version}" in deps["optional-dependencies"]["gpu"]

    launcher = load(LAUNCHER)
    assert launcher["docker"]["image"].startswith(f"rayproject/ray-llm:{version}-py311")

    cluster = load(RAYJOB)["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == version
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert images and all(i.startswith(f"rayproject/ray-llm:{version}-py311") for i in images)


def test_rayjob_is_a_kuberay_v1_rayjob():
    manifest = load(RAYJOB)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    # rayStartParams are strings in the CRD.
    for group in [head, *spec["rayClusterSpec"]["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


# (e) the job API stays closed: no published dashboard, token authentication on ----------------

# Where Ray looks for its token when RAY_AUTH_MODE=token and no RAY_AUTH_TOKEN(_PATH) is set:
# ~/.ray/auth_token, for the image's user `ray`.
NODE_TOKEN_PATH = "/home/ray/.ray/auth_token"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def ray_starts(commands: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """Each `[VAR=value ...] ray start ...` in shell lines: its variables and its arguments."""
    found = []
    for line in commands:
        for part in re.split(r";|&&", line):
            tokens = shlex.split(part)
            env = {}
            while tokens and re.fullmatch(r"\w+=.*", tokens[0]):
                name, _, value = tokens.pop(0).partition("=")
                env[name] = value
            if tokens[:2] == ["ray", "start"]:
                found.append((env, tokens[2:]))
    return found


def option(args: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value`; None when the option is absent."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def launcher_exposure(launcher: dict[str, Any]) -> list[str]:
    """How a launcher config opens the cluster to more than its own nodes; empty when not."""
    problems = []
    heads = ray_starts(launcher.get("head_start_ray_commands") or [])
    workers = ray_starts(launcher.get("worker_start_ray_commands") or [])
    if not heads or not workers:
        problems.append("no `ray start` for the head or the workers")
    for env, args in heads + workers:
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"ray start {shlex.join(args)}: without RAY_AUTH_MODE=token")
    for _, args in heads:
        host = option(args, "--dashboard-host")  # Ray's default is localhost
        if host is not None and host not in LOOPBACK:
            problems.append(f"the dashboard and job API listen on {host}, not the loopback")
    token = (launcher.get("file_mounts") or {}).get(NODE_TOKEN_PATH)
    if token is None:
        problems.append(f"no file mount gives the nodes the token at {NODE_TOKEN_PATH}")
    elif not token.startswith(("~", "/")) or Path(token).expanduser().is_relative_to(REPO):
        problems.append(f"the token comes from {token}: inside the repo")
    return problems


def rayjob_exposure(manifest: dict[str, Any]) -> list[str]:
    """How a RayJob opens its cluster to more than its own pods; empty when not."""
    cluster = manifest["spec"]["rayClusterSpec"]
    problems = []
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        problems.append("authOptions.mode is not token")
    head = cluster["headGroupSpec"]
    service = head.get("serviceType", "ClusterIP")
    if service != "ClusterIP":
        problems.append(f"the head's Service is {service}: reachable from outside the cluster")
    if head.get("enableIngress"):
        problems.append("the head has an Ingress")
    groups = [head, *cluster["workerGroupSpecs"]]
    for container in (c for g in groups for c in g["template"]["spec"]["containers"]):
        for var in container.get("env") or []:
            if var["name"] == "RAY_AUTH_MODE" and var.get("value") != "token":
                problems.append(f"{container['name']}: RAY_AUTH_MODE={var.get('value')}")
            if looks_secret(var["name"]) and "value" in var:
                problems.append(f"{container['name']}: {var['name']} written in the manifest")
    runtime_env = yaml.safe_load(manifest["spec"].get("runtimeEnvYAML") or "") or {}
    problems += [
        f"runtime env carries {name}" for name in runtime_env.get("env_vars") or {}
        if looks_secret(name)
    ]  # fmt: skip
    return problems


def test_the_recipes_keep_the_job_api_closed():
    assert launcher_exposure(load(LAUNCHER)) == []
    assert rayjob_exposure(load(RAYJOB)) == []
    text = "\n".join(p.read_text(encoding="utf-8") for p in (LAUNCHER, RAYJOB))
    assert "RAY_AUTH_MODE=disabled" not in text


def test_the_exposure_checks_catch_an_open_cluster():
    launcher = load(LAUNCHER)
    launcher["head_start_ray_commands"] = [
        "ray stop",
        "ray start --head --port=6379 --dashboard-host=0.0.0.0",
    ]
    launcher["file_mounts"][NODE_TOKEN_PATH] = "./auth_token"
    problems = launcher_exposure(launcher)
    assert any("without RAY_AUTH_MODE=token" in p for p in problems)
    assert any("listen on 0.0.0.0" in p for p in problems)
    assert any("inside the repo" in p for p in problems)
    del launcher["file_mounts"][NODE_TOKEN_PATH]
    assert any("no file mount" in p for p in launcher_exposure(launcher))

    manifest = load(RAYJOB)
    cluster = manifest["spec"]["rayClusterSpec"]
    del cluster["authOptions"]
    cluster["headGroupSpec"]["serviceType"] = "LoadBalancer"
    cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "HF_TOKEN", "value": "hf_written_here"}
    )
    manifest["spec"]["runtimeEnvYAML"] += "  OPENAI_API_KEY: sk-in-the-runtime-env\n"
    problems = rayjob_exposure(manifest)
    assert any("authOptions" in p for p in problems)
    assert any("LoadBalancer" in p for p in problems)
    assert any("HF_TOKEN written" in p for p in problems)
    assert any("OPENAI_API_KEY" in p for p in problems)


def test_the_guide_submits_with_the_token_and_passes_no_secret_in_a_runtime_env():
    blocks = shell_blocks(GUIDE.read_text(encoding="utf-8"))
    exports = [line for line in logical_lines(blocks) if line.startswith("export ")]
    assert any("RAY_AUTH_MODE=token" in line for line in exports)
    assert "ray get-auth-token --generate" in blocks
    for command in all_job_commands():
        env_vars = (command.runtime_env or {}).get("env_vars") or {}
        assert not [n for n in env_vars if looks_secret(n)], command
