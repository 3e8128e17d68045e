"""Builds dense_rlhf._C: the C++ CPU op always, plus the CUDA kernel when torch has CUDA and nvcc is found.

Environment variables:
    DENSE_RLHF_CUDA      "1" forces the CUDA build (fails if it cannot), "0" disables it; unset: automatic.
    DENSE_RLHF_NATIVE    "0" builds no extension at all (the reference backend runs the op); for an environment that
                         needs only the Python side, such as a vLLM server's, which loads the ABC plugin.
    TORCH_CUDA_ARCH_LIST GPU architectures to compile for, e.g. "8.0;9.0" (needed where no GPU can be queried).
    MAX_JOBS             parallel compile jobs (ninja).
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "dense-rlhf: building needs PyTorch importable in the build environment, and it must be the torch you run.\n"
        "Install torch first (CPU: pip install torch==2.13.0; GPU: the CUDA build for your platform), then\n"
        "    pip install --no-build-isolation .\n"
        "(--no-build-isolation lets the build see that torch instead of a fresh, unrelated one.)"
    )


def want_cuda() -> bool:
    flag = os.environ.get("DENSE_RLHF_CUDA", "").strip()
    found = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not found:
            sys.exit(
                "dense-rlhf: DENSE_RLHF_CUDA=1 but "
                + ("this torch has no CUDA" if torch.version.cuda is None else "nvcc/CUDA_HOME was not found")
            )
        return True
    return found


def extension():
    sources = ["csrc/dense_rewards.cpp", "csrc/cpu/dense_rewards_cpu.cpp"]
    # The C++ standard is the one torch's headers need (cpp_extension sets it). -fopenmp: at::parallel_for
    # is inline OpenMP code in torch's builds, a serial loop without it; it links the libgomp torch loaded.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "dense_rlhf._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    return cpp_extension.CUDAExtension(
        "dense_rlhf._C",
        sources,
        define_macros=[("DENSE_RLHF_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )


# Metadata, dependencies, extras and the console script are in pyproject.toml; only the extension needs code.
setup(
    ext_modules=[] if os.environ.get("DENSE_RLHF_NATIVE", "").strip() == "0" else [extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
