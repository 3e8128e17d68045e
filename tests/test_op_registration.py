"""The native op is a proper torch custom op: opcheck, torch.compile without graph breaks, build checks."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICES, make_case

import dense_rlhf
from dense_rlhf import _native

needs_native = pytest.mark.skipif(not _native.is_built(), reason="native op not built")


def test_native_cpu_op_is_built_where_required():
    """CI sets DENSE_RLHF_REQUIRE_NATIVE=1 so that a broken build cannot hide behind the reference."""
    if os.environ.get("DENSE_RLHF_REQUIRE_NATIVE") != "1":
        pytest.skip("DENSE_RLHF_REQUIRE_NATIVE is not set")
    assert _native.is_built(), _native.IMPORT_ERROR
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dense_rlhf::dense_rewards", "CPU")


@needs_native
def test_importing_the_package_registers_the_op():
    """``import dense_rlhf`` alone makes ``torch.ops.dense_rlhf.dense_rewards`` callable (the README's promise)."""
    import subprocess
    import sys

    code = "import torch, dense_rlhf; print(callable(torch.ops.dense_rlhf.dense_rewards))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_cuda_kernel_is_registered_where_required():
    """The CUDA build environment of CI sets DENSE_RLHF_REQUIRE_CUDA_KERNEL=1 (no GPU needed to check it)."""
    if os.environ.get("DENSE_RLHF_REQUIRE_CUDA_KERNEL") != "1":
        pytest.skip("DENSE_RLHF_REQUIRE_CUDA_KERNEL is not set")
    assert _native.is_built(), _native.IMPORT_ERROR
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dense_rlhf::dense_rewards", "CUDA")
    assert _native.has_kernel("cuda")


def op_args(device, layout="maps", with_reward_index=False, dtype=torch.float32):
    attn, score, mask, index = make_case(
        3, 2, 9, layout=layout, prompt=2, device=device, dtype=dtype, with_reward_index=with_reward_index
    )
    if attn.dim() == 3:
        attn = attn.unsqueeze(2).expand(3, 2, 9, 9)
    return attn, score, mask, 0.8, index


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "layout,with_reward_index,dtype",
    [
        ("maps", False, torch.float32),
        ("maps", True, torch.bfloat16),
        ("rows", False, torch.float16),
    ],
)
def test_opcheck(device, layout, with_reward_index, dtype):
    args = op_args(device, layout, with_reward_index, dtype)
    torch.library.opcheck(torch.ops.dense_rlhf.dense_rewards.default, args)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def rewards(attn, score, mask):
        return dense_rlhf.dense_rewards(attn, score, mask, beta=0.5, validate=False) * 2.0

    compiled = torch.compile(rewards, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    attn, score, mask, _, _ = op_args(device)
    torch.testing.assert_close(compiled(attn, score, mask), rewards(attn, score, mask))


@pytest.mark.skipif(not (torch.cuda.is_available() and _native.has_kernel("cuda")), reason="needs a GPU")
def test_cuda_graph_capture():
    attn, score, mask, _, _ = op_args("cuda")
    expected = dense_rlhf.dense_rewards(attn, score, mask)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dense_rlhf.dense_rewards(attn, score, mask, validate=False)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = dense_rlhf.dense_rewards(attn, score, mask, validate=False)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected)
