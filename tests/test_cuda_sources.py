"""Every CUDA source compiles with nvcc alone, so CUDA code that does not compile fails CI without a GPU."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_cuda_sources_exist():
    assert CUDA_SOURCES, "csrc/cuda/*.cu not found"


@pytest.mark.cuda
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_nvcc_compiles(source, arch, tmp_path):
    result = subprocess.run(
        [NVCC, "-c", "-O3", f"-arch={arch}", str(source), "-o", str(tmp_path / "kernel.o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
