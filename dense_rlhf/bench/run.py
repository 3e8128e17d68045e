"""Microbenchmarks of ``dense_rewards`` against every alternative a user has, side by side in one process.

Methods, all on identical inputs and all with ``validate=False`` (the compiled reference needs it to stay in
the graph, the official loop validates nothing, and validation costs every backend the same sync):

* ``native``: the fused op (``backend="native"``);
* ``reference``: the project's vectorised PyTorch reference, eager (``backend="reference"``);
* ``compiled``: the same call under ``torch.compile`` (PyTorch defaults, one compiled function per layout
  and dtype; after the first shape change Dynamo recompiles with dynamic shapes, which is what an RLHF loop
  with varying lengths gets; ``--compile-dynamic false`` compiles each shape statically instead);
* ``official``: the public ABC code path, written from its description: head mean over the full maps
  (``attentions[-1].mean(1)``), then a per-sample Python loop that moves the map to NumPy, slices the
  completion block, takes its last row and normalises it. It needs full maps; for the [B, H, L] layout it is
  *adapted*: the same loop over the head mean of the given rows (the public code cannot take rows at all).

Inputs are real allocations (no stride-0 ``expand`` of a small tensor, which would keep rows cache-resident
and flatter the native op); a case whose tensors do not fit the memory budget is skipped and listed.
Each sequence is a prompt of L/8 tokens then its completion; odd rows are right-padded by L/8 tokens. Scores
are at the last completion token (the default reward position), as in the public code.

Timing: the methods of a case run interleaved in ``--rounds`` rounds, so that load drifts hit them alike;
median over all repetitions after a warm-up call, with their first and third quartiles and the share of the
timed threads' time spent waiting for a CPU (Linux): a target that the spread of the repeats leaves undecided, or
whose threads waited for a CPU, is reported "inconclusive", naming the noise, on the console and in the report
(:func:`dense_rlhf.bench.cases.verdict` states the rule). CPU: ``torch.utils.benchmark.Timer``; CUDA: CUDA events
around each call with the L2 cache flushed before it. "Bytes that must move" are the attention values at the
reward position for the completion tokens of every head, plus the mask, the score and the outputs (rewards
and row status); GB/s is those bytes over the method's time, the same numerator for every method.

Usage: ``dense-rlhf bench [--quick | --tiny | --targets-only] [--device cpu|cuda] [--out DIR]``.
Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` (default name ``dense_rewards``) into ``DIR/<device>/``:
``./dense-rlhf-results/bench/<device>/`` by default; ``make bench`` passes ``--out benchmarks/results``, the
repository's committed results. ``<device>`` is ``cpu`` or the GPU's name (e.g. ``nvidia-h100-80gb-hbm3``).
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from dense_rlhf import _native
from dense_rlhf.bench.baselines import (
    ALTERNATIVES,
    DEFAULT_TOLERANCE,
    METHODS,
    TOLERANCE,
    CompiledReference,
    agreement,
    native_method,
    official_method,
    reference_method,
)
from dense_rlhf.bench.cases import (
    CPU_WAIT_LIMIT,
    Case,
    bytes_to_move,
    check_targets,
    extra_bytes_estimate,
    full_grid,
    make_inputs,
    quick_grid,
    target_cases,
    tiny_grid,
)
from dense_rlhf.bench.report import _us, device_slug, machine_info, target_line, write_outputs
from dense_rlhf.bench.timers import CpuTimer, CudaTimer, copy_bandwidth_gbs, sync, thread_waits, waited_s
from dense_rlhf.cli import default_out


def run_case(case: Case, device: str, args, timer, compiled: CompiledReference | None) -> dict:
    record = {"label": case.label, "case": asdict(case), "skipped": None, "methods": {}, "speedup": {}}
    threads = torch.get_num_threads()
    if case.threads:
        torch.set_num_threads(case.threads)
    try:
        return _run_case(case, device, args, timer, compiled, record)
    finally:
        torch.set_num_threads(threads)


def _run_case(case: Case, device: str, args, timer, compiled: CompiledReference | None, record: dict) -> dict:
    need = case.attn_bytes + extra_bytes_estimate(case)
    if need > args.max_input_bytes:
        record["skipped"] = (
            f"needs ~{need / 2**30:.1f} GiB (attention + largest temporary) > budget "
            f"{args.max_input_bytes / 2**30:.1f} GiB"
        )
        return record
    inputs = make_inputs(case, device, args.seed)
    moved = bytes_to_move(case, inputs)
    record["bytes_to_move"] = moved
    expected = reference_method(inputs)
    sync(device)

    methods: dict[str, Callable[[], torch.Tensor]] = {}
    for name in args.methods:
        if name == "compiled":
            fn = compiled.for_case(case)
        else:
            fn = {"native": native_method, "reference": reference_method, "official": official_method}[name]
        methods[name] = functools.partial(fn, inputs)

    results, warm = {}, {}
    for name, fn in methods.items():  # warm-up (compiles), agreement, memory
        start = time.perf_counter()
        out = fn()
        sync(device)
        warm[name] = time.perf_counter() - start
        if name == "compiled":  # the first call compiled; time a second one for the budget estimate
            start = time.perf_counter()
            out = fn()
            sync(device)
            warm[name] = time.perf_counter() - start
        error = agreement(out, expected, inputs.score)
        tolerance = TOLERANCE.get((name, case.dtype), DEFAULT_TOLERANCE[case.dtype])
        results[name] = {"max_error": error, "tolerance": tolerance, "agrees": error <= tolerance, "times_s": []}
        if warm[name] > args.max_call_s:
            results[name]["skipped"] = f"one call took {warm[name]:.1f} s > {args.max_call_s} s"
        del out
        results[name]["peak_extra_bytes"] = timer.peak_extra_bytes(fn)

    timed = [name for name in methods if "skipped" not in results[name]]
    threads = torch.get_num_threads()  # the case's (run_case set them)
    for name in timed:
        results[name].update(wall_s=0.0, cpu_wait_s=0.0)
    for _ in range(args.rounds):
        for name in timed:
            before, start = thread_waits(), time.perf_counter()
            results[name]["times_s"] += timer.times(methods[name], args.time_budget / args.rounds, warm[name])
            results[name]["wall_s"] += time.perf_counter() - start
            waited = waited_s(before, thread_waits())
            results[name]["cpu_wait_s"] = (
                None if waited is None or results[name]["cpu_wait_s"] is None else results[name]["cpu_wait_s"] + waited
            )

    for name in timed:
        result = results[name]
        times = result.pop("times_s")
        result["median_s"] = statistics.median(times)
        result["q1_s"], result["q3_s"] = quartiles(times)
        result["reps"] = len(times)
        # the share of the timed threads' time spent waiting for a CPU (None where the kernel does not say)
        wait, wall = result.pop("cpu_wait_s"), result.pop("wall_s")
        result["cpu_wait_frac"] = None if wait is None or wall <= 0 else max(0.0, wait / (wall * threads))
        result["gbps"] = moved / result["median_s"] / 1e9
        if args.copy_gbps:
            result["pct_copy_bandwidth"] = 100.0 * result["gbps"] / args.copy_gbps
    for result in results.values():
        result.pop("times_s", None)
    native = results.get("native", {}).get("median_s")
    for name in ALTERNATIVES:
        other = results.get(name, {}).get("median_s")
        if native and other:
            record["speedup"][name] = other / native
    record["methods"] = results
    del inputs, expected, methods
    if device == "cuda":
        torch.cuda.empty_cache()
    return record


# ------------------------------------------------------------------------------------------------- driver
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dense-rlhf bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when a GPU and the native CUDA op are present, else cpu",
    )
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="small grid (under 60 s on 2 CPU cores)")
    grid.add_argument("--tiny", action="store_true", help="a few tiny shapes, for tests")
    grid.add_argument(
        "--targets-only",
        action="store_true",
        help="only the cases that carry a speed target (on CPU: full maps B=64 H=16 L=512 with 2 "
        "threads and with 1), with a met / missed / inconclusive verdict for each",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results go to OUT/<device>/ (default ./{default_out('bench')}; the repository's "
        "committed results: benchmarks/results)",
    )
    parser.add_argument("--name", default="dense_rewards", help="output base name")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of timed calls per method and case (default 1.0 CPU, 0.3 GPU; quick 0.3)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per case")
    parser.add_argument(
        "--max-wall-s",
        type=float,
        default=None,
        help="start no new case after this many seconds (the rest are listed as skipped)",
    )
    parser.add_argument("--max-call-s", type=float, default=20.0, help="skip a method whose one call takes longer")
    parser.add_argument(
        "--max-gib",
        type=float,
        default=None,
        help="memory budget per case (default: 6 GiB on CPU, 45%% of free GPU memory)",
    )
    parser.add_argument(
        "--compile-dynamic",
        choices=("auto", "true", "false", "static-targets"),
        default="auto",
        help="torch.compile's dynamic= (auto: PyTorch's default); see CompiledReference",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a note for the report (repeatable)")
    return parser.parse_args(argv)


def quartiles(times: list[float]) -> tuple[float, float]:
    """First and third quartile of the repeats (the one value twice when there is one)."""
    if len(times) < 2:
        return times[0], times[0]
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, q3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    device = args.device or ("cuda" if torch.cuda.is_available() and _native.has_kernel("cuda") else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("dense-rlhf bench: --device cuda but no GPU is available", file=sys.stderr)
        return 2
    if "native" in args.methods and not _native.has_kernel(device):
        print(
            f"dense-rlhf bench: the native op for {device} is not built: {_native.build_hint(device)}", file=sys.stderr
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.time_budget is None:
        args.time_budget = 0.3 if (device == "cuda" or args.quick or args.tiny) else 1.0
    if args.tiny:
        args.time_budget = min(args.time_budget, 0.05)
    if args.max_gib is not None:
        args.max_input_bytes = int(args.max_gib * 2**30)
    elif device == "cuda":
        args.max_input_bytes = int(0.45 * torch.cuda.mem_get_info()[0])
    else:
        args.max_input_bytes = 6 * 2**30
    grid = (tiny_grid if args.tiny else quick_grid if args.quick else target_cases if args.targets_only else full_grid)(
        device
    )
    compiled = CompiledReference(args.compile_dynamic) if "compiled" in args.methods else None
    timer = CudaTimer() if device == "cuda" else CpuTimer()
    args.copy_gbps = copy_bandwidth_gbs(device)

    meta = machine_info(device)
    meta["copy_gbps"] = args.copy_gbps
    notes = [
        "All methods run with validate=False: the compiled reference needs it, the official loop validates "
        "nothing, and validation costs every backend the same device-to-host sync.",
        f"torch.compile --compile-dynamic {args.compile_dynamic} (auto: PyTorch's default, one compiled "
        "function per (layout, dtype), static for its first shape, dynamic after a change; see "
        "CompiledReference); compile time is excluded (warm-up).",
        "official on [B,H,L] rows is adapted (head mean of the given rows, same per-sample NumPy loop): the "
        "public code cannot take rows, it needs output_attentions=True full maps.",
        "Inputs are real allocations, never stride-0 expansions. Each row: prompt L/8 tokens, completion to "
        "the end, odd rows right-padded by L/8.",
    ]
    notes += args.note
    if device == "cpu":
        notes.append(
            "CPU: torch.utils.benchmark blocked_autorange, repetitions back to back, so working sets "
            "under the last-level cache stay cache-resident for every method alike; 2 shared cores "
            "are noisy: compare ratios within a row rather than absolute times across rows."
        )
    else:
        notes.append(
            "GPU: CUDA events around each call, L2 flushed (256 MiB memset) before each; peak extra "
            "memory is torch.cuda.max_memory_allocated minus the allocation before the call."
        )
    report = {
        "command": shlex.join(["dense-rlhf", "bench"] + list(sys.argv[1:] if argv is None else argv)),
        "meta": meta,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cases": [],
        "targets": [],
        "notes": notes,
    }
    out_dir = (args.out or Path(default_out("bench"))) / device_slug(device)

    started = time.perf_counter()
    for case in grid:
        if args.max_wall_s is not None and time.perf_counter() - started > args.max_wall_s:
            record = {
                "label": case.label,
                "case": asdict(case),
                "methods": {},
                "speedup": {},
                "skipped": f"out of time (--max-wall-s {args.max_wall_s:g})",
            }
        else:
            record = run_case(case, device, args, timer, compiled)
        report["cases"].append(record)
        print(_progress(record), flush=True)
        _finish(report, started)
        write_outputs(report, out_dir, args.name, with_plot=False)  # so that an interrupted run leaves results
    skipped = [c["label"] for c in report["cases"] if c["skipped"]]
    if skipped:
        notes.append(f"{len(skipped)} case(s) skipped; listed in the table with the reason.")
    paths = write_outputs(report, out_dir, args.name, not args.no_plot)
    for target in report["targets"]:
        print(target_line(target, markdown=False))
    print("wrote " + ", ".join(str(p) for p in paths))
    disagree = [
        c["label"] + ":" + name
        for c in report["cases"]
        for name, r in c["methods"].items()
        if not r.get("agrees", True)
    ]
    if disagree:
        print("methods disagree with the reference: " + "; ".join(disagree), file=sys.stderr)
        return 1
    return 0


def _finish(report: dict, started: float) -> None:
    report["meta"]["load_average_end"] = list(os.getloadavg())
    report["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
    report["targets"] = check_targets(report["cases"])


def _progress(record: dict) -> str:
    if record["skipped"]:
        return f"{record['label']}: skipped ({record['skipped']})"
    parts = [
        f"{name} {_us(r.get('median_s'))} µs" if "median_s" in r else f"{name} skipped ({r.get('skipped')})"
        for name, r in record["methods"].items()
    ]
    waits = [r["cpu_wait_frac"] for r in record["methods"].values() if r.get("cpu_wait_frac") is not None]
    busy = (
        f" (busy machine: the threads waited for a CPU up to {100 * max(waits):.0f}% of the time)"
        if waits and max(waits) > CPU_WAIT_LIMIT
        else ""
    )
    return f"{record['label']}: " + ", ".join(parts) + busy


if __name__ == "__main__":
    sys.exit(main())
