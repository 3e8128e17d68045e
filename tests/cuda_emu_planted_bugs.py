"""Plants small bugs, one at a time, in a copy of the CUDA kernel's source and shows that ``make test-cuda-emu``
fails on each: its plain build, and on its own the build with the sanitizers.

    .venv/bin/python tests/cuda_emu_planted_bugs.py                 # all bugs, writes the report
    .venv/bin/python tests/cuda_emu_planted_bugs.py --only "halved warp reduction" --out -

The report (default tests/cuda_emu_planted_bugs.md) gives, for each bug, the first failing test of each build
and its message. Each run stops at its first failure (pytest -x), so a bug costs seconds unless it survives.
``test_cuda_emu.py`` checks that every bug below still applies to the kernel's current source.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL = pathlib.Path("cuda") / "dense_rewards_kernel.cu"  # under csrc


@dataclasses.dataclass(frozen=True)
class PlantedBug:
    name: str
    what: str  # the mistake, in words
    old: str  # text of the kernel source that occurs exactly once
    new: str


PLANTED_BUGS = (
    PlantedBug(
        "last-token bound off by one",
        "accumulate stops before the last completion token",
        "t >= info.first && t <= info.last && mask",
        "t >= info.first && t < info.last && mask",
    ),
    PlantedBug(
        "wrong chunk start",
        "accumulate starts chunk c at c * kThreads instead of c * chunk",
        "const int64_t begin = c * layout.chunk;\n  const int64_t end = begin + layout.chunk < p.length ? "
        "begin + layout.chunk : p.length;\n  const bool read",
        "const int64_t begin = c * kThreads;\n  const int64_t end = begin + layout.chunk < p.length ? "
        "begin + layout.chunk : p.length;\n  const bool read",
    ),
    PlantedBug(
        "halved warp reduction",
        "the warp shuffle starts at offset 8: lanes 16-31 never reach lane 0",
        "for (int offset = 16;",
        "for (int offset = 8;",
    ),
    PlantedBug(
        "dropped head stride", "heads read as if adjacent in memory", "column[h * p.attn_stride[1]]", "column[h]"
    ),
    PlantedBug(
        "wrong sparse share",
        "beta * score instead of (1 - beta) * score added at the last token",
        "if (usable) value += (1.0f - p.beta) * score;",
        "if (usable) value += p.beta * score;",
    ),
    PlantedBug(
        "missing barrier in the block sum",
        "warp sums read before every warp has written its own",
        "if (lane == 0) shared[warp] = value;\n  __syncthreads();\n",
        "if (lane == 0) shared[warp] = value;\n",
    ),
    PlantedBug(
        "missing barrier in the row-bounds reduction",
        "the tree reduction reads entries still being written",
        "if (l > shared_last[threadIdx.x]) shared_last[threadIdx.x] = l;\n    }\n    __syncthreads();\n",
        "if (l > shared_last[threadIdx.x]) shared_last[threadIdx.x] = l;\n    }\n",
    ),
    PlantedBug(
        "dropped mask stride",
        "row bounds read the mask as if contiguous",
        "if (mask[t * p.mask_stride[1]]) {",
        "if (mask[t]) {",
    ),
    PlantedBug(
        "dropped score stride",
        "finalize reads the score as if contiguous",
        "const float score = p.score[b * p.score_stride];",
        "const float score = p.score[b];",
    ),
    PlantedBug(
        "contiguous batch stride",
        "attn's batch offset computed as if attn were contiguous",
        "static_cast<const T*>(p.attn) + b * p.attn_stride[0]",
        "static_cast<const T*>(p.attn) + b * p.heads * p.rows * p.length",
    ),
    PlantedBug(
        "first chunk's partial only",
        "finalize reads only chunk 0's partial sum and negative flag",
        "for (int64_t i = 0; i < layout.chunks; ++i) {\n    total +=",
        "for (int64_t i = 0; i < 1; ++i) {\n    total +=",
    ),
    PlantedBug(
        "non-finite attention undetected",
        "NaN or Inf in the values used is not status 4",
        "const bool finite = is_finite(total);",
        "const bool finite = true;",
    ),
    PlantedBug(
        "no fallback for a bad reward index",
        "a row with a bad reward index gets zeros, not its score",
        "fallback = !usable && state != kStatusEmptyMask && state != kStatusBadScore;",
        "fallback = !usable && state != kStatusEmptyMask && state != kStatusBadScore && "
        "state != kStatusBadRewardIndex;",
    ),
    PlantedBug(
        "negative attention undetected",
        "no chunk ever reports a negative head sum (status 5)",
        "    any_negative |= acc < 0.0f;\n",
        "",
    ),
    PlantedBug(
        "zero counted as negative",
        "a head sum of 0 taken for negative attention",
        "any_negative |= acc < 0.0f;",
        "any_negative |= acc <= 0.0f;",
    ),
    PlantedBug(
        "negative before non-finite",
        "status 5 checked before status 4",
        "if (state == kStatusOk && !finite) {\n    state = kStatusBadAttention;\n  } else if (state == "
        "kStatusOk && any_negative) {\n    state = kStatusNegativeAttention;\n  }",
        "if (state == kStatusOk && any_negative) {\n    state = kStatusNegativeAttention;\n  } else if (state "
        "== kStatusOk && !finite) {\n    state = kStatusBadAttention;\n  }",
    ),
    PlantedBug(
        "precomputed scale",
        "beta * score / total computed once (the overflow next to an attention sink)",
        "beta_score * (out[t] / total) + 0.0f",
        "out[t] * (beta_score / total) + 0.0f",
    ),
    PlantedBug(
        "negative zero on masked tokens",
        "masked tokens of a row with a negative score get -0.0",
        "beta_score * (out[t] / total) + 0.0f",
        "beta_score * (out[t] / total)",
    ),
    PlantedBug(
        "reward index upper bound unchecked",
        "an index >= R is read instead of reported (out of bounds)",
        "if (info.reward < 0 || info.reward >= p.rows)",
        "if (info.reward < 0)",
    ),
    PlantedBug(
        "unclamped chunk end",
        "accumulate's last chunk runs past the row (out of bounds)",
        "const int64_t end = begin + layout.chunk < p.length ? begin + layout.chunk : p.length;\n  const bool read",
        "const int64_t end = begin + layout.chunk;\n  const bool read",
    ),
    PlantedBug(
        "row scan one past the end",
        "row bounds read one mask element past the row (out of bounds)",
        "for (int64_t t = threadIdx.x; t < p.length; t += kThreads) {\n    if (mask",
        "for (int64_t t = threadIdx.x; t <= p.length; t += kThreads) {\n    if (mask",
    ),
)


def plant(source: str, bug: PlantedBug) -> str:
    count = source.count(bug.old)
    if count != 1:
        raise ValueError(f"planted bug {bug.name!r}: its text occurs {count} times in the kernel source, not once")
    return source.replace(bug.old, bug.new)


def run_make(csrc: pathlib.Path, build: str) -> tuple[str, str, float]:
    """`make test-cuda-emu` on the tree `csrc` with one build; (verdict, first failure, seconds)."""
    env = dict(
        os.environ, DENSE_RLHF_CUDA_EMU_CSRC=str(csrc), PYTEST_ADDOPTS="-x -vv"
    )  # with the Makefile's -q: one line per test
    start = time.perf_counter()
    result = subprocess.run(
        ["make", "-s", "test-cuda-emu", f"CUDA_EMU_BUILDS={build}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return "passed", "", seconds
    return "FAILED", first_failure(output), seconds


def first_failure(output: str) -> str:
    """The test that failed first and why, in one line, from pytest's (or a sanitizer's) output."""
    running = re.findall(r"^(tests/test_cuda_emu\.py::\S+)", output, flags=re.M)
    test = running[-1].split("::", 1)[1] if running else "?"
    access = re.search(r"^((?:READ|WRITE) of size \d+)", output, flags=re.M)
    for pattern in (
        r"SUMMARY: (AddressSanitizer: \S+ )\S*?([^/\s]+:\d+ in \S+)",
        r"SUMMARY: (AddressSanitizer: \S+)",
        r"(runtime error: .*)",
        r"(Fatal glibc error: .*)",
        r"^E\s+(\S.*)$",
        r"(Fatal Python error: .*)",
    ):
        found = re.search(pattern, output, flags=re.M)
        if found:
            what = "".join(found.groups()).strip()[:160]  # a sanitizer's file without its (scratch) folder
            if what.startswith("AddressSanitizer") and access:
                what += f" ({access.group(1)})"
            return f"`{test}`: {what}"
    return f"`{test}`: {output.strip().splitlines()[-1][:160] if output.strip() else 'no output'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="run only the bug with this name (repeatable)")
    parser.add_argument(
        "--out", default=str(ROOT / "tests" / "cuda_emu_planted_bugs.md"), help="report file, - for stdout"
    )
    args = parser.parse_args()
    bugs = [bug for bug in PLANTED_BUGS if not args.only or bug.name in args.only]
    source = (ROOT / "csrc" / KERNEL).read_text()
    blob = subprocess.run(["git", "hash-object", str(ROOT / "csrc" / KERNEL)], capture_output=True, text=True).stdout
    lines = [
        "# Planted bugs in the CUDA kernel, and the `make test-cuda-emu` runs that catch them",
        "",
        f"Written by `.venv/bin/python tests/cuda_emu_planted_bugs.py`: each bug planted alone in a copy of "
        f"`csrc/{KERNEL}` (git blob `{blob.strip()[:12]}`), then `make test-cuda-emu` run on the copy once per "
        "build (plain, then sanitized: AddressSanitizer + UndefinedBehaviorSanitizer), each stopping at its first "
        "failing test. Seconds include building the emulated kernel.",
        "",
        "| planted bug | the mistake | plain build | sanitized build |",
        "|---|---|---|---|",
    ]
    caught_all = True
    with tempfile.TemporaryDirectory() as scratch:
        for bug in bugs:
            csrc = pathlib.Path(scratch) / re.sub(r"\W+", "-", bug.name) / "csrc"
            shutil.copytree(ROOT / "csrc", csrc)
            (csrc / KERNEL).write_text(plant(source, bug))
            cells = []
            caught = False
            for build in ("plain", "sanitized"):
                verdict, failure, seconds = run_make(csrc, build)
                caught |= verdict == "FAILED"
                cells.append(
                    f"**{verdict}** in {seconds:.0f} s: {failure}".replace("|", "\\|")
                    if failure
                    else f"{verdict} in {seconds:.0f} s"
                )
                print(f"{bug.name} [{build}]: {verdict} {failure}", file=sys.stderr, flush=True)
            caught_all &= caught
            lines.append(f"| {bug.name} | {bug.what} | {cells[0]} | {cells[1]} |")
    lines += ["", "Every planted bug is caught." if caught_all else "Some planted bug survived both builds.", ""]
    report = "\n".join(lines)
    if args.out == "-":
        print(report)
    else:
        pathlib.Path(args.out).write_text(report)
    return 0 if caught_all else 1


if __name__ == "__main__":
    sys.exit(main())
