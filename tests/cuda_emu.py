"""The CUDA kernel's own source, run on the CPU: build it through the emulation in ``csrc/cuda_emu`` and call it.

``build`` compiles ``csrc/cuda/dense_rewards_kernel.cu`` (and the emulation's self-test kernels) with the host
C++ compiler into a shared library, optionally with AddressSanitizer and UndefinedBehaviorSanitizer (a Python
that loads that one needs the sanitizer runtime preloaded: ``make test-cuda-emu`` shows how); no nvcc, no GPU.
``EmulatedKernel`` calls it through ctypes on the CPU tensors that ``dense_rlhf.dense_rewards``' wrapper produces.
``grid_cases`` is the case grid that ``tests/test_cuda_emu.py`` runs against the PyTorch reference and
``tests/cuda_emu_planted_bugs.py`` runs against kernels with planted bugs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import pathlib
import shutil
import subprocess

import torch

from dense_rlhf import ops
from dense_rlhf.reference import (
    STATUS_BAD_ATTENTION,
    STATUS_BAD_REWARD_INDEX,
    STATUS_BAD_SCORE,
    STATUS_EMPTY_MASK,
    STATUS_NEGATIVE_ATTENTION,
    STATUS_OK,
    dense_rewards_reference,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU_SOURCES = ("cuda_emu.cpp", "dense_rewards_emu.cpp", "selftest_kernels.cpp")
FLAGS = ["-std=c++20", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare"]
SANITIZE_FLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
BACKENDS = {"fibers": 0, "threads": 1}  # cuda_emu::Backend


def compiler() -> str:
    return os.environ.get("CXX") or shutil.which("c++") or "g++"


def build(out_dir: pathlib.Path, *, csrc: pathlib.Path = ROOT / "csrc", sanitize: bool = False) -> pathlib.Path:
    """Compile the emulated kernels from `csrc` (the tree's own, or a copy) into out_dir; return the library."""
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / ("libdense_rlhf_emu_sanitized.so" if sanitize else "libdense_rlhf_emu.so")
    emu = csrc / "cuda_emu"
    command = [
        compiler(),
        *FLAGS,
        *(SANITIZE_FLAGS if sanitize else ["-O2"]),
        f"-I{emu / 'include'}",
        *(str(emu / name) for name in EMU_SOURCES),
        "-o",
        str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the emulated kernels failed:\n{' '.join(command)}\n{result.stderr}")
    return library


class EmulatedLaunchError(RuntimeError):
    """The emulated launch failed: a deadlock, a bad warp mask, an invalid configuration."""


def _pointer(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr() if tensor is not None else None)


def _int64s(values) -> ctypes.Array:
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values)


class EmulatedKernel:
    """The CUDA kernel of dense_rewards in a library that ``build`` made."""

    def __init__(self, library: pathlib.Path):
        self.lib = ctypes.CDLL(str(library))
        self.lib.dense_rlhf_emu_dense_rewards.restype = ctypes.c_int
        self.lib.dense_rlhf_emu_dense_rewards.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int32,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_float,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int32,
            ctypes.c_int32,
            ctypes.c_uint64,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        self.lib.dense_rlhf_emu_attn_dtype.restype = ctypes.c_int
        self.lib.dense_rlhf_emu_attn_dtype.argtypes = [ctypes.c_char_p]
        self.lib.dense_rlhf_emu_selftest.restype = ctypes.c_int
        self.lib.dense_rlhf_emu_selftest.argtypes = [
            ctypes.c_char_p,
            ctypes.c_int32,
            ctypes.c_uint64,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        for name in ("half_to_float", "bfloat16_to_float", "float_to_half", "float_to_bfloat16"):
            getattr(self.lib, f"dense_rlhf_emu_{name}").argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def dense_rewards(
        self,
        attn,
        score,
        mask,
        *,
        beta: float = 0.8,
        reward_index=None,
        layout: str = "auto",
        num_sms: int,
        seed: int = 0,
        backend: str = "fibers",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, status) of the emulated CUDA kernel on inputs as ``dense_rlhf.dense_rewards`` takes them.

        `num_sms` is the device's multiprocessor count, which sets the kernel's chunks per row; `seed` the
        order of blocks and threads. out and status start as NaN and -1, so an element the kernel never writes
        shows.
        """
        attn4, score1, mask_b, index = ops._normalise(attn, score, mask, reward_index, layout, "reference")
        beta = ops.check_beta(beta)
        batch, _, _, length = attn4.shape
        out = torch.full((batch, length), float("nan"))
        status = torch.full((batch,), -1, dtype=torch.int32)
        code = self.lib.dense_rlhf_emu_attn_dtype(str(attn4.dtype).removeprefix("torch.").encode())
        error = ctypes.create_string_buffer(1024)
        result = self.lib.dense_rlhf_emu_dense_rewards(
            _pointer(attn4),
            code,
            _int64s(attn4.shape),
            _int64s(attn4.stride()),
            _pointer(score1),
            score1.stride(0),
            _pointer(mask_b),
            _int64s(mask_b.stride()),
            _pointer(index),
            index.stride(0) if index is not None else 0,
            beta,
            _pointer(out),
            _pointer(status),
            num_sms,
            BACKENDS[backend],
            seed,
            error,
            len(error),
        )
        if result != 0:
            raise EmulatedLaunchError(error.value.decode())
        return out, status

    def selftest(self, name: str, size: int, *, seed: int = 0, backend: str = "fibers") -> torch.Tensor:
        out = torch.full((size,), float("nan"))
        error = ctypes.create_string_buffer(1024)
        result = self.lib.dense_rlhf_emu_selftest(
            name.encode(), BACKENDS[backend], seed, _pointer(out), size, error, len(error)
        )
        if result != 0:
            raise EmulatedLaunchError(error.value.decode())
        return out

    def convert(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """The emulation's half/bfloat16 conversion `name` ("half_to_float", ...) over a 1-d tensor."""
        values = values.contiguous()
        out_dtype = torch.float32 if name.endswith("to_float") else torch.int16
        out = torch.empty(values.shape, dtype=out_dtype)
        getattr(self.lib, f"dense_rlhf_emu_{name}")(_pointer(values), _pointer(out), values.numel())
        return out


# ---- The case grid ----

# What each row of a grid case is made to be: its expected status, and how.
ROW_KINDS = ("ok", "gaps", "empty", "bad_score", "bad_index", "bad_attention", "negative", "zero_attention", "sink")


@dataclasses.dataclass(frozen=True)
class Case:
    layout: str  # "maps" [B, H, L, L], "rows" [B, H, L], "row" [B, L]
    dtype: torch.dtype
    length: int
    num_sms: int
    with_index: bool
    memory: str = "contiguous"  # how attn, score, mask and reward_index are laid out in memory
    beta: float = 0.8
    seed: int = 0

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        index = "index" if self.with_index else "last"
        return f"{self.layout}-{dtype}-L{self.length}-sm{self.num_sms}-{index}-{self.memory}-b{self.beta}-s{self.seed}"


LAYOUTS = ("maps", "rows", "row")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# 1 and 37: one short chunk; 256: one block's worth exactly; 300, 777: several chunks, neither a multiple of 256.
LENGTHS = (1, 37, 256, 300, 777)
# With 10 rows: 1 SM gives one chunk per row; 3 SMs, two where the length allows; 1000 SMs, as many as it allows.
NUM_SMS = (1, 3, 1000)
MEMORY = ("transposed", "head_slice", "padded_rows", "expanded_heads", "strided_mask_score_index")


def grid_cases() -> list[Case]:
    """Every layout x dtype x length x SM count, reward_index on and off in turn; then each strided or expanded
    memory layout on two lengths; then the beta extremes. Each case's rows cover every row kind."""
    cases = []
    for i, (layout, dtype, length, num_sms) in enumerate(itertools.product(LAYOUTS, DTYPES, LENGTHS, NUM_SMS)):
        cases.append(Case(layout, dtype, length, num_sms, with_index=i % 2 == 0, seed=i))
    for i, (memory, length, num_sms) in enumerate(itertools.product(MEMORY, (37, 777), (1, 1000))):
        layout = "rows" if memory == "expanded_heads" else "maps"
        cases.append(
            Case(
                layout,
                torch.float16 if i % 2 else torch.float32,
                length,
                num_sms,
                with_index=True,
                memory=memory,
                seed=1000 + i,
            )
        )
    for beta in (0.0, 1.0):
        cases.append(Case("maps", torch.bfloat16, 300, 1000, with_index=True, beta=beta, seed=2000))
    return cases


@dataclasses.dataclass
class Inputs:
    attn: torch.Tensor
    score: torch.Tensor
    mask: torch.Tensor
    reward_index: torch.Tensor | None
    kinds: tuple[str, ...]  # each row's kind, from ROW_KINDS


def make_inputs(case: Case) -> Inputs:
    """Inputs for `case`: 10 rows, each of a kind in ROW_KINDS (two of "ok"), in a
    shuffled order; attn in the case's layout, dtype and memory layout, reward_index None unless with_index.

    Only the attention row at each reward position holds values; every other row of full maps is NaN, and so
    is every position of the read row that the mask leaves out (or -1 in the gaps of a "gaps" row): values the
    kernel must never use.
    """
    g = torch.Generator().manual_seed(case.seed)
    kinds = list(ROW_KINDS) + ["ok"]
    batch, length, heads = len(kinds), case.length, 3
    kinds = [kinds[i] for i in torch.randperm(batch, generator=g).tolist()]

    rows = (torch.randn(batch, heads, length, generator=g) * 3).softmax(-1)  # the rows at the reward positions
    mask = torch.zeros(batch, length, dtype=torch.bool)
    score = torch.randn(batch, generator=g) * 4
    index = torch.randint(0, length, (batch,), generator=g)
    for b, kind in enumerate(kinds):
        read = rows[b]
        if kind == "empty":
            score[b] = float("nan")  # status 1 wins over 2
            continue
        first = int(torch.randint(1 if kind == "sink" and length > 1 else 0, length, (1,), generator=g))
        last = int(torch.randint(first, length, (1,), generator=g))
        if kind == "bad_index" and not case.with_index:
            last = length - 1  # without reward_index no index is bad: the row ends on the last position instead
        mask[b, first : last + 1] = True
        if kind == "gaps" and last > first:
            mask[b, first:last] &= torch.rand(last - first, generator=g) > 0.4
        if not case.with_index:
            index[b] = last
        elif kind == "bad_index":
            index[b] = -1 if b % 2 else length
        if kind in ("ok", "gaps"):
            read[:, ~mask[b]] = float("nan")
            read[:, first : last + 1][:, ~mask[b, first : last + 1]] = -1.0
            # Negative per head but not summed over heads, and -0.0: neither is negative attention.
            position = int(torch.randint(first, last + 1, (1,), generator=g))
            read[:, position] = torch.tensor([-0.25, 0.25, -0.0]) if kind == "ok" else -0.0
        elif kind == "bad_score":
            score[b] = float("inf") if b % 2 else float("nan")
            read[0, last] = float("nan")  # status 2 wins over 4
        elif kind == "bad_attention":
            position = int(torch.randint(first, last + 1, (1,), generator=g))
            head = int(torch.randint(0, heads, (1,), generator=g))
            read[head, position] = (float("nan"), float("inf"), float("-inf"))[b % 3]
            if position != first:
                read[:, first] = -0.5  # negative too: status 4 wins over 5
        elif kind == "negative":  # a completion token's head sum < 0 (logits passed for probabilities)
            read[:, int(torch.randint(first, last + 1, (1,), generator=g))] = -1e-3
        elif kind == "zero_attention":
            read[:, first : last + 1] = 0.0  # sums to 0 over the completion: the sparse reward, status 0
        elif kind == "sink":
            # Nearly all mass on position 0, a tiny but positive mass on the completion (float32 subnormals).
            read[:, first : last + 1] = torch.rand(heads, last - first + 1, generator=g) * 1e-40 + 1e-41
            read[:, 0] = 1.0

    if case.layout == "maps":
        attn = torch.full((batch, heads, length, length), float("nan"))
        valid = (index >= 0) & (index < length)
        attn[valid.nonzero().flatten(), :, index[valid]] = rows[valid]
    else:
        attn = rows if case.layout == "rows" else rows.mean(1)
    attn = _lay_out(attn.to(case.dtype), case.memory)
    score, mask, index = _lay_out_others(score, mask, index, case.memory)
    return Inputs(attn, score, mask, index if case.with_index else None, tuple(kinds))


def _lay_out(attn: torch.Tensor, memory: str) -> torch.Tensor:
    assert memory in ("contiguous", "transposed") or attn.dim() >= 3, memory
    if memory == "transposed":
        return attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    if memory == "head_slice":
        return torch.stack([attn, torch.full_like(attn, float("nan"))], dim=2).flatten(1, 2)[
            :, ::2
        ]  # NaN heads between
    if memory == "padded_rows":
        return torch.nn.functional.pad(attn, (0, 5), value=float("nan"))[..., : attn.shape[-1]]
    if memory == "expanded_heads":  # one head's values seen as four heads, as a stride-0 expand
        return attn[:, :1].expand(attn.shape[0], 4, *attn.shape[2:])
    return attn


def _lay_out_others(score, mask, index, memory):
    if memory != "strided_mask_score_index":
        return score, mask, index
    return (
        torch.stack([score, score + 1], 1)[:, 0],
        torch.stack([mask, ~mask], 2)[..., 0],
        torch.stack([index, index + 1], 1)[:, 0],
    )


def check_case(kernel: EmulatedKernel, case: Case, *, backend: str = "fibers") -> None:
    """Runs `case` through the emulated kernel and checks it against the PyTorch reference."""
    inputs = make_inputs(case)
    out, status = kernel.dense_rewards(
        inputs.attn,
        inputs.score,
        inputs.mask,
        beta=case.beta,
        reward_index=inputs.reward_index,
        layout=case.layout,
        num_sms=case.num_sms,
        seed=case.seed,
        backend=backend,
    )
    attn4, score1, mask_b, index1 = ops._normalise(
        inputs.attn, inputs.score, inputs.mask, inputs.reward_index, case.layout, "reference"
    )
    expected, expected_status = dense_rewards_reference(attn4, score1, mask_b, case.beta, index1)
    assert status.tolist() == expected_status.tolist(), (
        f"status {status.tolist()} != {expected_status.tolist()} for rows {inputs.kinds}"
    )
    assert not out.isnan().any(), f"NaN (or never written) at {out.isnan().nonzero().tolist()[:5]}"
    assert (out[~mask_b] == 0).all() and not out[~mask_b].signbit().any(), "reward outside the mask is not +0.0"
    scale = score1.abs().nan_to_num(1.0, 1.0, 1.0).clamp(min=1.0)[:, None]  # rewards are fractions of the score
    torch.testing.assert_close(out / scale, expected / scale, rtol=1e-6, atol=1e-6)
    last = torch.where(mask_b, torch.arange(mask_b.shape[1]), -1).amax(1)
    sparse = (
        (status == STATUS_BAD_REWARD_INDEX) | (status == STATUS_BAD_ATTENTION) | (status == STATUS_NEGATIVE_ATTENTION)
    )
    conserved = (status == STATUS_OK) | sparse
    torch.testing.assert_close(out[conserved].sum(1), score1[conserved], rtol=1e-5, atol=1e-5)
    for b in sparse.nonzero().flatten():
        assert out[b, last[b]] == score1[b] and out[b].count_nonzero() <= 1, "the sparse fallback is not exact"
    zero_rows = (status == STATUS_EMPTY_MASK) | (status == STATUS_BAD_SCORE)
    assert (out[zero_rows] == 0).all(), "a row with an empty mask or a bad score is not all zeros"
