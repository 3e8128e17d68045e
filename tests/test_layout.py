"""The package's shape: the library imports light, the public API is where users find it, one version."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import dense_rlhf
from dense_rlhf import cli

ROOT = Path(__file__).resolve().parents[1]


def test_import_dense_rlhf_leaves_the_study_and_heavy_libraries_alone():
    code = (
        "import sys, dense_rlhf; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('trl', 'transformers', 'matplotlib', 'datasets', 'rich') or m.startswith(('dense_rlhf.study', "
        "'dense_rlhf.bench', 'dense_rlhf.rl', 'dense_rlhf.integrations')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_public_api_at_the_top():
    for name in (
        "dense_rewards",
        "prefix_rewards",
        "sparse_rewards",
        "uniform_rewards",
        "capture_reward_attention",
        "capture_prefix_scores",
        "score_and_densify",
        "score_and_densify_text",
    ):
        assert callable(getattr(dense_rlhf, name)), name
        assert name in dense_rlhf.__all__


def test_every_cli_subcommand_resolves_to_a_module_with_main():
    assert set(cli._COMMANDS) >= {"demo", "experiment", "bench"}
    for module, _ in cli._COMMANDS.values():
        assert callable(importlib.import_module(module).main), module


def test_one_version_string():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "dense_rlhf._version.__version__" in pyproject
    assert "version=" not in (ROOT / "setup.py").read_text()
    written = [p for p in (ROOT / "dense_rlhf").rglob("*.py") if re.search(r"^__version__ = ", p.read_text(), re.M)]
    assert written == [ROOT / "dense_rlhf" / "_version.py"]
    assert importlib.metadata.version("dense-rlhf") == dense_rlhf.__version__


def test_modules_keep_to_one_concern():
    """A module that outgrows about 450 lines (ruff's formatting included) is doing more than one job: split it."""
    sizes = {
        path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
        for path in (ROOT / "dense_rlhf").rglob("*.py")
    }
    assert sizes and all(size <= 480 for size in sizes.values()), {p: n for p, n in sizes.items() if n > 480}


def _package_imports(path: Path) -> set[str]:
    """The dense_rlhf modules that a module imports anywhere in its source (deferred imports included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dense_rlhf"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dense_rlhf"))
    return found


def test_the_package_has_no_import_circle():
    """Each module reads top-down: no chain of imports (deferred ones included) leads back to where it started."""
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "dense_rlhf").rglob("*.py")
    }
    graph = {m: sorted(x for x in _package_imports(p) if x in modules and x != m) for m, p in modules.items()}
    # a package's __init__ that only re-exports its modules is not a step of a circle through them
    graph = {m: [x for x in deps if not m.startswith(x + ".")] for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for x in graph[m]:
            if state.get(x) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(x) :] + [x]))
            if x not in state:
                visit(x, path + [x])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
