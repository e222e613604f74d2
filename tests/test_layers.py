"""Imports point one way: shared vocabulary at the bottom, the pipeline at the top.

Each module's imports of our own package are read from its source (``ast``), so a sideways
import fails here whether or not it is ever executed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rare_ray"

# Module (or package prefix) -> what of ours it may import. Anything not listed may import
# anything below the pipeline's layer.
ALLOWED: dict[str, set[str]] = {
    "rare_ray.vocabulary": set(),
    "rare_ray.rows": set(),
    "rare_ray.seeding": set(),
    "rare_ray.config": {"rare_ray.vocabulary"},
    "rare_ray.io": {"rare_ray.vocabulary", "rare_ray.rows", "rare_ray.io"},
    "rare_ray.engines.contract": set(),
    "rare_ray.engines": {
        "rare_ray.vocabulary",
        "rare_ray.rows",
        "rare_ray.config",
        "rare_ray.engines",
    },
    "rare_ray.preflight": {"rare_ray.vocabulary", "rare_ray.config"},
    # Reads a finished run's files: no stage, engine or pipeline (and so no Ray).
    "rare_ray.export": {"rare_ray.vocabulary", "rare_ray.rows", "rare_ray.io"},
    "rare_ray.operators": {
        "rare_ray.vocabulary",
        "rare_ray.rows",
        "rare_ray.seeding",
        "rare_ray.config",
        "rare_ray.engines",
        "rare_ray.preflight",
        "rare_ray.operators",
    },
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _our_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n == "rare_ray" or n.startswith("rare_ray.")}
    return found


def _rule(module: str) -> set[str] | None:
    """The most specific rule for ``module`` (a module rule beats its package's)."""
    matches = [k for k in ALLOWED if module == k or module.startswith(k + ".")]
    return ALLOWED[max(matches, key=len)] if matches else None


def _allowed(target: str, allowed: set[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_imports_point_down_the_layers(path):
    module = _module_name(path)
    allowed = _rule(module)
    if allowed is None:
        return  # the top: pipeline, runner, cli, bench, testing
    wrong = sorted(t for t in _our_imports(path) if not _allowed(t, allowed))
    assert not wrong, f"{module} imports {wrong}; it may import only {sorted(allowed)}"


def test_importing_the_package_or_the_export_imports_neither_ray_nor_vllm():
    code = (
        "import sys, rare_ray, rare_ray.export; rare_ray.RunConfig; "
        "print(sorted(m for m in ('ray', 'vllm', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
