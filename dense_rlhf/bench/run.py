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
median over all repetitions after a warm-up call. CPU: ``torch.utils.benchmark.Timer``; CUDA: CUDA events
around each call with the L2 cache flushed before it. "Bytes that must move" are the attention values at the
reward position for the completion tokens of every head, plus the mask, the score and the outputs (rewards
and row status); GB/s is those bytes over the method's time, the same numerator for every method.

Usage: ``dense-rlhf bench [--quick | --tiny | --targets-only] [--device cpu|cuda] [--out DIR]``.
Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` (default name ``dense_rewards``) into
``benchmarks/results/<device>/``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dense_rlhf import _native
from dense_rlhf.ops import dense_rewards

BETA = 0.8
METHODS = ("native", "reference", "compiled", "official")
ALTERNATIVES = METHODS[1:]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"maps": "[B,H,L,L]", "rows": "[B,H,L]"}

# Largest |method - reference| / max(1, |score|) accepted per method and dtype. The official loop averages
# heads in the input dtype, so in bf16 its head mean is rounded to 8 bits before the normalisation.
TOLERANCE = {("official", "bf16"): 2e-2}
DEFAULT_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-4}


# ----------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Case:
    layout: str  # "maps" ([B, H, L, L]) or "rows" ([B, H, L])
    dtype: str  # "fp32" or "bf16"
    batch: int
    heads: int
    length: int
    target: str = ""  # the target this case checks, if any
    threads: int = 0  # CPU threads for this case; 0: the run's setting

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def attn_bytes(self) -> int:
        rows = self.length if self.layout == "maps" else 1
        return self.batch * self.heads * rows * self.length * self.element_bytes

    @property
    def label(self) -> str:
        threads = f" threads={self.threads}" if self.threads else ""
        return f"{LAYOUTS[self.layout]} {self.dtype} B={self.batch} H={self.heads} L={self.length}{threads}"


def dtypes_for(device: str) -> list[str]:
    return list(DTYPES) if device == "cuda" else ["fp32"]


def full_grid(device: str) -> list[Case]:
    """Targets first. On CPU then layout by layout; on GPU shapes from small to large batch with every layout
    and dtype of a shape together, so that a run cut short by --max-wall-s loses the largest batches only."""
    shapes = list(itertools.product((1, 8, 64, 256), (12, 32), (128, 512, 2048, 8192)))
    if device == "cpu":
        cases = [Case(layout, "fp32", *shape) for layout in LAYOUTS for shape in shapes]
    else:
        cases = [Case(layout, dtype, *shape) for shape in shapes for layout in LAYOUTS for dtype in dtypes_for(device)]
    return target_cases(device) + cases


def quick_grid(device: str) -> list[Case]:
    cases = [Case(layout, dtype, 8, 12, length)
             for layout in LAYOUTS for dtype in dtypes_for(device) for length in (128, 512)]
    return target_cases(device) + cases


def tiny_grid(device: str) -> list[Case]:
    return [Case(layout, dtype, 3, 2, 24) for layout in LAYOUTS for dtype in dtypes_for(device)]


def target_cases(device: str) -> list[Case]:
    if device == "cpu":  # the target names 2 cores: measured with both threads and with one
        goal = "cpu: native >= 5x reference and >= 500x official"
        return [Case("maps", "fp32", 64, 16, 512, target=goal, threads=threads) for threads in (2, 1)]
    return [
        Case("maps", "bf16", 64, 32, 2048, target="gpu: native >= 8x reference and >= 2x compiled"),
        # [256, 64, 8192, 8192] maps would be 2 TB: the bandwidth target can only be the [B, H, L] layout.
        Case("rows", "bf16", 256, 64, 8192, target="gpu: native >= 80% of copy bandwidth"),
        Case("rows", "fp32", 256, 64, 8192, target="gpu: native >= 80% of copy bandwidth"),
    ]


def check_targets(cases: list[dict]) -> list[dict]:
    """Evaluates the issue's targets on the measured cases that carry one."""
    checks = []
    for case in cases:
        goal = case["case"]["target"]
        if not goal or case["skipped"]:
            continue
        speedup, native = case["speedup"], case["methods"].get("native", {})
        if goal.startswith("cpu"):
            wanted = {"reference": 5.0, "official": 500.0}
        elif "bandwidth" in goal:
            pct = native.get("pct_copy_bandwidth")
            checks.append({"case": case["label"], "goal": goal, "measured": {"pct_copy_bandwidth": pct},
                           "met": pct is not None and pct >= 80.0})
            continue
        else:
            wanted = {"reference": 8.0, "compiled": 2.0}
        measured = {f"x_{name}": speedup.get(name) for name in wanted}
        met = all(speedup.get(name) is not None and speedup[name] >= goal_x for name, goal_x in wanted.items())
        checks.append({"case": case["label"], "goal": goal, "measured": measured, "met": met})
    return checks


# --------------------------------------------------------------------------------------------- the inputs
@dataclass
class Inputs:
    attn: torch.Tensor
    score: torch.Tensor
    mask: torch.Tensor
    spans: list[tuple[int, int]]  # (first completion token, completion length) per row
    completion_tokens: int


def spans_for(batch: int, length: int) -> list[tuple[int, int]]:
    prompt = max(1, length // 8)
    pad = length // 8
    return [(prompt, length - prompt - (pad if b % 2 else 0)) for b in range(batch)]


def make_inputs(case: Case, device: str, seed: int) -> Inputs:
    """Positive random attention (every value a real, distinct allocation), scores and completion masks."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (case.batch, case.heads) + ((case.length,) if case.layout == "maps" else ()) + (case.length,)
    attn = torch.empty(shape, dtype=DTYPES[case.dtype], device=device)
    attn.uniform_(0.0, 1.0, generator=generator)
    score = (torch.randn(case.batch, generator=generator, device=device) * 4).float()
    spans = spans_for(case.batch, case.length)
    mask = torch.zeros(case.batch, case.length, dtype=torch.bool)
    for b, (first, count) in enumerate(spans):
        mask[b, first:first + count] = True
    return Inputs(attn, score, mask.to(device), spans, sum(count for _, count in spans))


def bytes_to_move(case: Case, inputs: Inputs) -> int:
    """Attention read (reward-position values of completion tokens, every head) + mask + score + outputs."""
    rows = case.heads * inputs.completion_tokens * case.element_bytes
    mask = case.batch * case.length  # bool
    score = case.batch * 4
    outputs = case.batch * case.length * 4 + case.batch * 4  # float32 rewards, int32 status
    return rows + mask + score + outputs


def extra_bytes_estimate(case: Case) -> int:
    """Largest temporary any method allocates: the official loop's head-mean maps, or the reference's rows."""
    official = case.batch * case.length * case.length * case.element_bytes + case.length * case.length * 4
    reference = 6 * case.batch * case.heads * case.length * 4
    return max(official if case.layout == "maps" else 0, reference)


# -------------------------------------------------------------------------------------------- the methods
def native_method(inputs: Inputs) -> torch.Tensor:
    return dense_rewards(inputs.attn, inputs.score, inputs.mask, beta=BETA, backend="native", validate=False)


def _reference_call(attn: torch.Tensor, score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return dense_rewards(attn, score, mask, beta=BETA, backend="reference", validate=False)


def reference_method(inputs: Inputs) -> torch.Tensor:
    return _reference_call(inputs.attn, inputs.score, inputs.mask)


class CompiledReference:
    """``torch.compile`` of the reference call.

    mode "auto" / "true": one compiled function per (layout, dtype) with dynamic=None (PyTorch's default:
    static first, dynamic after a shape change) / dynamic=True. "false": one static compile per case.
    "static-targets": the target cases compiled statically each (compile's best case), the rest of the grid
    sharing one dynamic=True function per (layout, dtype) (fewer compiles where time is short).
    """

    def __init__(self, mode: str):
        self.mode = mode
        self._compiled: dict[tuple, Callable] = {}
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def for_case(self, case: Case) -> Callable[[Inputs], torch.Tensor]:
        static = self.mode == "false" or (self.mode == "static-targets" and case.target)
        dynamic = False if static else {"auto": None}.get(self.mode, True)
        key = (case.layout, case.dtype) + ((case,) if static else ())
        if key not in self._compiled:
            self._compiled[key] = torch.compile(_reference_call, dynamic=dynamic)
        compiled = self._compiled[key]
        return lambda inputs: compiled(inputs.attn, inputs.score, inputs.mask)


def official_method(inputs: Inputs) -> torch.Tensor:
    """The public ABC code path: head mean of the full maps, then a per-sample loop through NumPy."""
    attention = inputs.attn.mean(1)  # attentions[-1].mean(1): [B, L, L] maps (the rows layout: [B, L])
    scores = inputs.score.cpu().numpy()
    batch, length = inputs.mask.shape
    rewards = []
    for i, (first, count) in enumerate(inputs.spans):
        this = attention[i].float().cpu().numpy()  # the whole map of sample i to NumPy
        if this.ndim == 2:
            row = this[first:first + count, first:first + count][-1]  # completion block, last row
        else:  # adapted to [B, H, L] rows: the row at the reward position is all there is
            row = this[first:first + count]
        alpha = row / row.sum()
        reward = BETA * scores[i] * alpha
        reward[-1] += (1.0 - BETA) * scores[i]
        rewards.append(reward)
    out = torch.zeros(batch, length, dtype=torch.float32)  # the op's [B, L] layout, for comparison
    for i, (first, count) in enumerate(inputs.spans):
        out[i, first:first + count] = torch.from_numpy(rewards[i])
    return out.to(inputs.attn.device)


# ------------------------------------------------------------------------------------------------- timing
class CpuTimer:
    """torch.utils.benchmark.Timer; per-call times of each block (median over rounds taken by the caller)."""

    def times(self, fn: Callable[[], object], budget_s: float, warm_s: float) -> list[float]:
        from torch.utils import benchmark

        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        if warm_s * 3 < budget_s:
            return list(timer.blocked_autorange(min_run_time=budget_s).times)
        return [timer.timeit(1).times[0]]  # slow call: one timed call per round

    def peak_extra_bytes(self, fn: Callable[[], object]) -> int | None:
        return None  # not measured on CPU


class CudaTimer:
    """CUDA events around each call, the L2 cache flushed (a 256 MiB memset) before each."""

    def __init__(self):
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def times(self, fn: Callable[[], object], budget_s: float, warm_s: float) -> list[float]:
        reps = int(min(200, max(1, budget_s / max(warm_s, 1e-6))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]

    def peak_extra_bytes(self, fn: Callable[[], object]) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return peak


def copy_bandwidth_gbs(device: str) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes per second) of a large buffer, median of 20."""
    if device != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info()
    size = int(min(2 * 2**30, free // 8))
    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
    for start, end in events:
        start.record()
        dst.copy_(src)
        end.record()
    torch.cuda.synchronize()
    seconds = statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * size / seconds / 1e9


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- one case
def agreement(out: torch.Tensor, expected: torch.Tensor, score: torch.Tensor) -> float:
    scale = score.abs().clamp(min=1.0)[:, None]
    return float(((out.float().cpu() - expected.cpu()) / scale.cpu()).abs().max())


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
        methods[name] = (lambda fn=fn: fn(inputs))

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
    for _ in range(args.rounds):
        for name in timed:
            results[name]["times_s"] += timer.times(methods[name], args.time_budget / args.rounds, warm[name])

    for name in timed:
        result = results[name]
        times = result.pop("times_s")
        result["median_s"] = statistics.median(times)
        result["reps"] = len(times)
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


# ------------------------------------------------------------------------------------------------ reports
def device_slug(device: str) -> str:
    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def machine_info(device: str) -> dict:
    info = {
        "device": device,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "native_built": _native.has_kernel(device),
    }
    if device == "cpu":
        info["device_name"] = _cpu_name()
    else:
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, cuda=torch.version.cuda, sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), driver=_nvidia_driver())
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _us(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e6:,.0f}" if seconds * 1e6 >= 10 else f"{seconds * 1e6:.1f}"


def _x(value: float | None) -> str:
    return "—" if value is None else (f"{value:,.0f}x" if value >= 100 else f"{value:.1f}x")


def markdown(report: dict) -> str:
    meta = report["meta"]
    gpu = meta["device"] == "cuda"
    lines = [
        f"# dense_rewards microbenchmark: {meta['device_name']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {meta['date_utc']}; torch {meta['torch']}"
        + (f", CUDA {meta.get('cuda')}, driver {meta.get('driver')}" if gpu else "")
        + f"; {meta['torch_threads']} torch threads on {meta['cpu_count']} CPUs; load average at start "
        f"{meta['load_average_start'][0]:.1f}, at end {meta['load_average_end'][0]:.1f}.",
    ]
    if gpu:
        lines.append(f"Device copy bandwidth measured in this run: {meta['copy_gbps']:.0f} GB/s (read + write).")
    lines += [
        "",
        "Median time per call in µs (all methods `validate=False`, identical inputs, interleaved rounds); "
        "speedup = method time / native time; GB/s = bytes that must move / native time.",
        "",
    ]
    head = "| layout | dtype | B | H | L |" + ("" if gpu else " threads |") + " native | reference | compiled | official | x ref | x compiled | x official | native GB/s |"
    rule = "|---|---|--:|--:|--:|" + ("" if gpu else "--:|") + "--:|--:|--:|--:|--:|--:|--:|--:|"
    if gpu:
        head += " % copy BW | peak extra MiB (native / ref / compiled / official) |"
        rule += "--:|---|"
    lines += [head, rule]
    for case in report["cases"]:
        c = case["case"]
        start = f"| {LAYOUTS[c['layout']]} | {c['dtype']} | {c['batch']} | {c['heads']} | {c['length']} |"
        if not gpu:
            start += f" {c['threads'] or meta['torch_threads']} |"
        if case["skipped"]:
            lines.append(start + f" skipped: {case['skipped']} |")
            continue
        m = case["methods"]
        cells = [_us(m.get(name, {}).get("median_s")) for name in METHODS]
        cells += [_x(case["speedup"].get(name)) for name in ALTERNATIVES]
        gbps = m.get("native", {}).get("gbps")
        cells.append("—" if gbps is None else f"{gbps:.1f}")
        if gpu:
            pct = m.get("native", {}).get("pct_copy_bandwidth")
            cells.append("—" if pct is None else f"{pct:.0f}%")
            cells.append(" / ".join(
                "—" if m.get(name, {}).get("peak_extra_bytes") is None else f"{m[name]['peak_extra_bytes'] / 2**20:.1f}"
                for name in METHODS
            ))
        lines.append(start + " " + " | ".join(cells) + " |" + (" *target*" if c["target"] else ""))
    lines += ["", "Targets:", ""]
    lines += [f"- {t['case']}: {t['goal']}: measured {_fmt_measured(t['measured'])}: "
              f"**{'met' if t['met'] else 'missed'}**" for t in report["targets"]] or ["- none in this grid"]
    agree = all(r.get("agrees", True) for case in report["cases"] for r in case["methods"].values())
    lines += ["", f"Every method agrees with the reference on every benchmarked input: **{'yes' if agree else 'NO'}**."]
    lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def _fmt_measured(measured: dict) -> str:
    parts = []
    for key, value in measured.items():
        if value is None:
            parts.append(f"{key} n/a")
        elif key.startswith("pct"):
            parts.append(f"{value:.0f}% of copy bandwidth")
        else:
            parts.append(f"{key.removeprefix('x_')} {_x(value)}")
    return ", ".join(parts)


def plot(report: dict, path: Path) -> None:
    """Time against L per method, log axes: one panel per (layout, dtype, H), one line per (method, B)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [c for c in report["cases"] if not c["skipped"] and not c["case"]["target"]]
    panels = sorted({(c["case"]["layout"], c["case"]["dtype"], c["case"]["heads"]) for c in measured})
    if not panels:
        return
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.6 * rows + 1.2), squeeze=False)
    colours = dict(zip(METHODS, ("tab:red", "tab:blue", "tab:green", "tab:gray")))
    batches = sorted({c["case"]["batch"] for c in measured})
    styles = dict(zip(batches, ("-", "--", "-.", ":", (0, (1, 3)))))
    for ax, (layout, dtype, heads) in zip(axes.flat, panels):
        for method, batch in itertools.product(METHODS, batches):
            points = sorted(
                (c["case"]["length"], c["methods"][method]["median_s"] * 1e6)
                for c in measured
                if (c["case"]["layout"], c["case"]["dtype"], c["case"]["heads"], c["case"]["batch"])
                == (layout, dtype, heads, batch) and "median_s" in c["methods"].get(method, {})
            )
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=colours[method], linestyle=styles[batch], marker="o", markersize=3,
                        label=f"{method} B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{LAYOUTS[layout]} {dtype} H={heads}", fontsize=9)
        ax.set_xlabel("L")
        ax.set_ylabel("median µs per call")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(f"dense_rewards on {report['meta']['device_name']}", fontsize=10)
    legend_inches = 0.2 * math.ceil(len(labels) / 4) + 0.2
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out_dir: Path, name: str, with_plot: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report))
    if with_plot:
        try:
            plot(report, out_dir / f"{name}.png")
            paths.append(out_dir / f"{name}.png")
        except ImportError as error:  # matplotlib is optional (the "demo" extra)
            print(f"no plot: {error}", file=sys.stderr)
    return paths


# ------------------------------------------------------------------------------------------------- driver
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dense-rlhf bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when a GPU and the native CUDA op are present, else cpu")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="small grid (under 60 s on 2 CPU cores)")
    grid.add_argument("--tiny", action="store_true", help="a few tiny shapes, for tests")
    grid.add_argument("--targets-only", action="store_true", help="only the issue's target cases")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>")
    parser.add_argument("--name", default="dense_rewards", help="output base name")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of timed calls per method and case (default 1.0 CPU, 0.3 GPU; quick 0.3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per case")
    parser.add_argument("--max-wall-s", type=float, default=None,
                        help="start no new case after this many seconds (the rest are listed as skipped)")
    parser.add_argument("--max-call-s", type=float, default=20.0, help="skip a method whose one call takes longer")
    parser.add_argument("--max-gib", type=float, default=None,
                        help="memory budget per case (default: 6 GiB on CPU, 45%% of free GPU memory)")
    parser.add_argument("--compile-dynamic", choices=("auto", "true", "false", "static-targets"), default="auto",
                        help="torch.compile's dynamic= (auto: PyTorch's default); see CompiledReference")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a note for the report (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    device = args.device or ("cuda" if torch.cuda.is_available() and _native.has_kernel("cuda") else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("dense-rlhf bench: --device cuda but no GPU is available", file=sys.stderr)
        return 2
    if "native" in args.methods and not _native.has_kernel(device):
        print(f"dense-rlhf bench: the native op for {device} is not built: {_native.build_hint(device)}",
              file=sys.stderr)
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
    grid = (tiny_grid if args.tiny else quick_grid if args.quick else
            target_cases if args.targets_only else full_grid)(device)
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
        notes.append("CPU: torch.utils.benchmark blocked_autorange, repetitions back to back, so working sets "
                     "under the last-level cache stay cache-resident for every method alike; 2 shared cores "
                     "are noisy: compare ratios within a row rather than absolute times across rows.")
    else:
        notes.append("GPU: CUDA events around each call, L2 flushed (256 MiB memset) before each; peak extra "
                     "memory is torch.cuda.max_memory_allocated minus the allocation before the call.")
    report = {"command": shlex.join(["dense-rlhf", "bench"] + list(sys.argv[1:] if argv is None else argv)),
              "meta": meta, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "cases": [], "targets": [], "notes": notes}
    out_dir = args.out or Path("benchmarks") / "results" / device_slug(device)

    started = time.perf_counter()
    for case in grid:
        if args.max_wall_s is not None and time.perf_counter() - started > args.max_wall_s:
            record = {"label": case.label, "case": asdict(case), "methods": {}, "speedup": {},
                      "skipped": f"out of time (--max-wall-s {args.max_wall_s:g})"}
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
    print("wrote " + ", ".join(str(p) for p in paths))
    disagree = [c["label"] + ":" + name for c in report["cases"] for name, r in c["methods"].items()
                if not r.get("agrees", True)]
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
    parts = [f"{name} {_us(r.get('median_s'))} µs" if "median_s" in r else f"{name} skipped ({r.get('skipped')})"
             for name, r in record["methods"].items()]
    return f"{record['label']}: " + ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
