"""The CUDA kernel's own source (csrc/cuda/dense_rewards_kernel.cu), built by the host compiler through the
emulation in csrc/cuda_emu and run on the CPU, against the PyTorch reference; and the emulation itself: real
barriers, warp exchanges, grid indices, bit-exact 16-bit float conversions.

Marked ``cuda``, which ``make test-cpu`` leaves out; ``make test-cuda-emu`` runs the file twice: plainly, then
with DENSE_RLHF_CUDA_EMU_SANITIZE=1, which builds with AddressSanitizer and UndefinedBehaviorSanitizer, with
their runtime preloaded (the Makefile says how), so that a read out of bounds fails.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from cuda_emu import ROOT, Case, EmulatedKernel, EmulatedLaunchError, build, check_case, grid_cases, make_inputs

from dense_rlhf.reference import dense_rewards_reference

pytestmark = pytest.mark.cuda
SANITIZE = os.environ.get("DENSE_RLHF_CUDA_EMU_SANITIZE") == "1"
# The C++ tree to build from: this one, or a copy with a planted bug (tests/cuda_emu_planted_bugs.py).
CSRC = pathlib.Path(os.environ.get("DENSE_RLHF_CUDA_EMU_CSRC", ROOT / "csrc"))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    if SANITIZE and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        pytest.fail(
            "DENSE_RLHF_CUDA_EMU_SANITIZE=1 needs the AddressSanitizer runtime in LD_PRELOAD "
            "(make test-cuda-emu sets it)"
        )
    return build(tmp_path_factory.mktemp("cuda_emu"), csrc=CSRC, sanitize=SANITIZE)


@pytest.fixture(scope="module")
def kernel(library) -> EmulatedKernel:
    return EmulatedKernel(library)


# ---- The kernel against the reference ----


@pytest.mark.parametrize("case", grid_cases(), ids=lambda case: case.id)
def test_kernel_matches_reference(kernel, case):
    check_case(kernel, case)


def test_overflow_next_to_an_attention_sink(kernel):
    """All but e^-95 of the mass on a prompt token: the completion's total is a float32 subnormal, and
    beta * score / total overflows. The rewards must stay finite, the masked tokens exactly 0."""
    logits = torch.zeros(1, 1, 16)
    logits[..., 0] = 95.0
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[:, 8:] = True
    attn, score = logits.softmax(-1), torch.tensor([0.5])
    for num_sms in (1, 1000):
        out, status = kernel.dense_rewards(attn, score, mask, beta=0.8, num_sms=num_sms)
        expected, _ = dense_rewards_reference(attn[:, :, None, :].expand(1, 1, 16, 16), score, mask, 0.8)
        assert status.tolist() == [0]
        assert out.isfinite().all(), out
        assert (out[~mask] == 0).all()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.sum(), score.sum())


@pytest.mark.parametrize(
    "case",
    [Case("maps", torch.float32, 300, 1000, True, seed=7), Case("rows", torch.bfloat16, 777, 2, False, seed=8)],
    ids=lambda case: case.id,
)
def test_results_do_not_depend_on_block_or_thread_order(kernel, case):
    """Chunk partials are added in a fixed order, so the result is the same bits for any schedule."""
    inputs = make_inputs(case)
    runs = [
        kernel.dense_rewards(
            inputs.attn,
            inputs.score,
            inputs.mask,
            reward_index=inputs.reward_index,
            layout=case.layout,
            num_sms=case.num_sms,
            seed=seed,
        )[0]
        for seed in range(4)
    ]
    for other in runs[1:]:
        assert torch.equal(other.view(torch.int32), runs[0].view(torch.int32))


@pytest.mark.skipif(
    SANITIZE,
    reason="one OS thread per CUDA thread: slow under the sanitizers, and plain runs have shown the kernel the same",
)
@pytest.mark.parametrize(
    "case",
    [Case("maps", torch.float16, 300, 1000, True, seed=3), Case("row", torch.float32, 37, 1, False, seed=4)],
    ids=lambda case: case.id,
)
def test_kernel_on_os_threads(kernel, case):
    """The other block backend: each CUDA thread an OS thread, __syncthreads a std::barrier."""
    check_case(kernel, case, backend="threads")


# ---- The emulation ----


def test_half_and_bfloat16_to_float_are_bit_exact(kernel):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)  # all 65536 patterns
    for name, dtype in (("half_to_float", torch.float16), ("bfloat16_to_float", torch.bfloat16)):
        expected = bits.view(dtype).float().view(torch.int32)
        assert torch.equal(kernel.convert(name, bits).view(torch.int32), expected), name


def test_float_to_half_and_bfloat16_round_to_nearest_even(kernel):
    """Every 16-bit value, every midpoint between neighbours (ties go to even), one float ulp either side of
    each midpoint, and a million random float bit patterns, against torch's conversions."""
    g = torch.Generator().manual_seed(0)
    for name, dtype in (("float_to_half", torch.float16), ("float_to_bfloat16", torch.bfloat16)):
        values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).float()
        ordered = values[values.isfinite()].unique()
        middle = (ordered[:-1].double() + ordered[1:].double()) / 2
        middle = middle.float()
        up = torch.nextafter(middle, torch.tensor(float("inf")))
        down = torch.nextafter(middle, torch.tensor(float("-inf")))
        random = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
        floats = torch.cat(
            [
                values,
                middle,
                up,
                down,
                random.view(torch.float32),
                torch.tensor([float("inf"), float("-inf"), 65520.0, 65519.996, 2.0**-25, 2.0**-24 * 1.5]),
            ]
        )
        converted = kernel.convert(name, floats)
        expected = floats.to(dtype).view(torch.int16)
        nan = floats.isnan()
        assert torch.equal(converted[~nan], expected[~nan]), name
        assert converted[nan].view(dtype).isnan().all(), name


def test_barriers_are_real(kernel):
    """Each thread sums what every thread wrote to shared memory, then overwrites its own entry. With the
    barrier in between every thread gets the sum; without it, under any schedule, most do not."""
    expected = torch.full((256,), 128 * 129 / 2)
    for seed in range(3):
        torch.testing.assert_close(kernel.selftest("block_sum", 256, seed=seed), expected)
        wrong = kernel.selftest("block_sum_missing_barrier", 256, seed=seed) != expected
        assert wrong.sum() > 200


def test_divergent_barrier_fails_instead_of_hanging(kernel):
    with pytest.raises(
        EmulatedLaunchError,
        match=r"deadlock in block \(0, 0, 0\): 64 of 128 threads exited, "
        r"64 wait at __syncthreads\(\)",
    ):
        kernel.selftest("divergent_barrier", 128)


@pytest.mark.parametrize("threads,delta,width", [(32, 1, 32), (64, 16, 32), (64, 3, 8), (40, 2, 8), (96, 0, 32)])
def test_shfl_down(kernel, threads, delta, width):
    """Lane i gets lane i + delta's value within its segment of `width` lanes, else its own; a block may end
    in a partial warp, whose mask then names only its lanes."""
    out = kernel.selftest(f"shfl_down:{delta}:{width}", threads, seed=threads)
    lane = torch.arange(threads)
    warp_end = torch.minimum((lane // 32 + 1) * 32, torch.tensor(threads))
    segment_end = torch.minimum((lane // width + 1) * width, warp_end)
    expected = torch.where(lane + delta < segment_end, lane + delta, lane).float()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("voter", [-1, 0, 77, 199])
def test_syncthreads_or(kernel, voter):
    """Thread `voter` votes 1 in the first vote, thread voter + 1 in the second: every thread sees both."""
    out = kernel.selftest(f"syncthreads_or:{voter}", 200, seed=voter + 1)
    expected = 10 * (0 <= voter < 200) + (0 <= voter + 1 < 200)
    torch.testing.assert_close(out, torch.full((200,), float(expected)))


def test_undefined_shuffles_fail_the_launch(kernel):
    with pytest.raises(EmulatedLaunchError, match="mask 0x0000ffff, but the warp's lanes are 0xffffffff"):
        kernel.selftest("half_warp_mask", 32)
    with pytest.raises(EmulatedLaunchError, match="source lane not in mask"):  # lane 38 + 2 does not exist
        kernel.selftest("shfl_down:2:32", 40)


def test_grid_and_block_indices(kernel):
    """A 3 x 2 x 2 grid of 4 x 3 x 2 blocks: each thread sees its own indices and the dimensions, once."""
    out = kernel.selftest("indices", 12 * 24)
    block, thread = torch.arange(12)[:, None], torch.arange(24)[None, :]
    torch.testing.assert_close(out, (block * 10000 + thread).flatten().float())


def test_invalid_launch_configuration_is_an_error(kernel):
    with pytest.raises(EmulatedLaunchError, match="invalid configuration argument: invalid launch configuration"):
        kernel.selftest("too_many_threads", 2048)


@pytest.mark.skipif(not SANITIZE, reason="the sanitizer build only")
def test_out_of_bounds_read_fails_under_sanitizers(library):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from cuda_emu import EmulatedKernel
        EmulatedKernel({str(library)!r}).selftest("read_past_end", 4)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in result.stderr and "READ of size 4" in result.stderr, (
        result.stderr[-3000:]
    )


def test_every_planted_bug_applies_to_the_kernel_source():
    """tests/cuda_emu_planted_bugs.py plants each bug by replacing a text that must occur once in the source."""
    from cuda_emu_planted_bugs import KERNEL, PLANTED_BUGS, plant

    source = (ROOT / "csrc" / KERNEL).read_text()
    for bug in PLANTED_BUGS:
        assert plant(source, bug) != source
