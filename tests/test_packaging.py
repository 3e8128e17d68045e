"""Packaging, tried as a new user would: the sdist and wheel build from a clean copy of the tree, the sdist
installs into a fresh virtual environment and works from outside the tree, and the editable install works
with the pip that ``python -m venv`` ships.

Slow (a fresh venv, three compiles of the CPU op): marked ``packaging``, which ``make test-cpu`` leaves out and
``make test-packaging`` (part of ``make test``) selects.
"""

from __future__ import annotations

import ensurepip
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.packaging, pytest.mark.slow]

# Run from outside the source tree, in the fresh environment: the native op is built, registered, and agrees
# with the PyTorch reference.
CHECK = r"""
import sys, torch, dense_rlhf
from dense_rlhf import _native
assert _native.has_kernel("cpu"), _native.IMPORT_ERROR
g = torch.Generator().manual_seed(0)
attn = torch.rand(4, 3, 16, 16, generator=g)
score = torch.randn(4, generator=g)
mask = torch.zeros(4, 16, dtype=torch.bool)
mask[:, 5:13] = True
native = dense_rlhf.dense_rewards(attn, score, mask, beta=0.8, backend="native")
reference = dense_rlhf.dense_rewards(attn, score, mask, beta=0.8, backend="reference")
assert torch.allclose(native, reference, atol=1e-6), (native - reference).abs().max()
assert torch.allclose(native.sum(1), score, atol=1e-5)
print(dense_rlhf.__version__, dense_rlhf.__file__)
"""


def run(*args, cwd=None, env=None, timeout=900) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result.stdout


def clean_env() -> dict:
    """The environment without this venv's traces, so that the fresh venv's python resolves its own packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.pop("DENSE_RLHF_CUDA", None)
    return env


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def source(work) -> Path:
    """A clean copy of the tree: the files git tracks (or would), no build products."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    dest = work / "src"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def dist(work, source) -> Path:
    """``python -m build --no-isolation``: the sdist, then the wheel built from the sdist."""
    out = work / "dist"
    run(
        sys.executable,
        "-m",
        "build",
        "--no-isolation",
        "--outdir",
        out,
        source,
        env={**os.environ, "DENSE_RLHF_CUDA": "0"},
    )
    return out


@pytest.fixture(scope="module")
def fresh_venv(work) -> Path:
    """``python3 -m venv`` with the pip it ships (never upgraded), then the same torch as this environment."""
    venv = work / "venv"
    run(getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv)
    pip_version = run(venv / "bin" / "python", "-m", "pip", "--version").split()[1]
    assert pip_version == ensurepip.version(), (pip_version, ensurepip.version())
    run(
        venv / "bin" / "python",
        "-m",
        "pip",
        "install",
        "-q",
        f"torch=={torch.__version__.split('+')[0]}",
        env=clean_env(),
    )
    return venv


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_sdist_carries_every_source_header_and_cuda_file(dist, source):
    sdist = _one(dist, "dense_rlhf-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {str(p.relative_to(source)) for p in (source / "csrc").rglob("*") if p.is_file()}
    assert any(n.endswith(".cu") for n in needed) and any(n.endswith(".h") for n in needed)
    assert needed <= names, sorted(needed - names)
    assert {
        "README.md",
        "LICENSE",
        "pyproject.toml",
        "setup.py",
        "dense_rlhf/_version.py",
        "dense_rlhf/py.typed",
    } <= names
    assert not any(n.endswith((".so", ".o")) for n in names)


def test_wheel_holds_the_built_op_the_subpackages_and_the_console_script(dist):
    wheel = _one(dist, "dense_rlhf-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert any(n.startswith("dense_rlhf/_C") and n.endswith(".so") for n in names)
    for module in (
        "ops",
        "capture/__init__",
        "align/scoring",
        "integrations/verl_config",
        "integrations/vllm_plugin/__init__",
        "integrations/vllm_plugin/models",
        "rl/ppo",
        "study/demo",
        "bench/run",
    ):
        assert f"dense_rlhf/{module}.py" in names
    assert "dense_rlhf/py.typed" in names  # PEP 561: type checkers read the package's hints
    assert "dense-rlhf = dense_rlhf.cli:main" in entry_points
    # vLLM loads the ABC plugin from this group in every process it starts
    assert "[vllm.general_plugins]\ndense_rlhf_abc = dense_rlhf.integrations.vllm_plugin:register" in entry_points


def test_metadata_passes_twine_check(dist):
    out = run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()))
    assert out.count("PASSED") == 2, out


def test_sdist_installs_into_a_fresh_venv_and_works_outside_the_tree(dist, fresh_venv, work):
    sdist = _one(dist, "dense_rlhf-*.tar.gz")
    python = fresh_venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-build-isolation", sdist, env=clean_env())
    outside = work / "elsewhere"
    outside.mkdir()
    out = run(python, "-c", CHECK, cwd=outside, env=clean_env())
    assert str(fresh_venv) in out and "0." in out, out
    assert run(fresh_venv / "bin" / "dense-rlhf", "--help", cwd=outside, env=clean_env()).startswith(
        "usage: dense-rlhf"
    )
    run(python, "-m", "pip", "uninstall", "-y", "dense-rlhf", env=clean_env())


def test_editable_install_with_the_pip_venv_ships(fresh_venv, source, work):
    python = fresh_venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-build-isolation", "-e", source, cwd=source, env=clean_env())
    outside = work / "elsewhere-editable"
    outside.mkdir()
    out = run(python, "-c", CHECK, cwd=outside, env=clean_env())
    assert str(source / "dense_rlhf" / "__init__.py") in out, out
