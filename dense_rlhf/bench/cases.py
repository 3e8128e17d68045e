"""The benchmark grid: cases (layout, dtype, shape), the speed targets and their verdicts, and the inputs of a case.

The targets (the project's speed goals, checked on the cases that carry one): on CPU, the native op at least 5x
the eager reference and 500x the official loop on full maps B=64 H=16 L=512, with 2 threads and with 1; on GPU,
at least 8x the reference and 2x the compiled reference on bf16 maps B=64 H=32 L=2048, and at least 85% of the
copy bandwidth on [B, H, L] rows B=256 H=64 L=8192. Noisy timings make a verdict "inconclusive" (:func:`verdict`).

Inputs are real allocations (no stride-0 ``expand`` of a small tensor, which would keep rows cache-resident
and flatter the native op). Each sequence is a prompt of L/8 tokens then its completion; odd rows are
right-padded by L/8 tokens. "Bytes that must move" are the attention values at the reward position for the
completion tokens of every head, plus the mask, the score and the outputs (rewards and row status).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {"maps": "[B,H,L,L]", "rows": "[B,H,L]"}
BANDWIDTH_TARGET_PCT = 85.0  # of the copy bandwidth measured in the same run, at B=256 H=64 L=8192
CPU_WAIT_LIMIT = 0.1  # share of the timed threads' time spent waiting for a CPU beyond which timings are unreliable


@dataclass(frozen=True)
class Case:
    layout: str  # "maps" ([B, H, L, L]) or "rows" ([B, H, L])
    dtype: str  # "fp32" or "bf16"
    batch: int
    heads: int
    length: int
    target: str = ""  # the speed target this case checks, if any
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
    cases = [
        Case(layout, dtype, 8, 12, length)
        for layout in LAYOUTS
        for dtype in dtypes_for(device)
        for length in (128, 512)
    ]
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
        Case("rows", "bf16", 256, 64, 8192, target=f"gpu: native >= {BANDWIDTH_TARGET_PCT:g}% of copy bandwidth"),
        Case("rows", "fp32", 256, 64, 8192, target=f"gpu: native >= {BANDWIDTH_TARGET_PCT:g}% of copy bandwidth"),
    ]


def check_targets(cases: list[dict]) -> list[dict]:
    """Evaluates the speed targets on the measured cases that carry one, with the noise rule of :func:`verdict`.

    Each check: the case, the goal, ``measured`` (the ratios or the bandwidth from medians), ``ranges`` (the same
    from the interquartile bounds), ``verdict`` ("met", "missed" or "inconclusive"), ``met`` (verdict == "met")
    and ``spread`` (per timed method: first quartile, median and third quartile in seconds, and the repeats).
    """
    checks = []
    for case in cases:
        goal = case["case"]["target"]
        if not goal or case["skipped"]:
            continue
        methods, native = case["methods"], case["methods"].get("native", {})
        if "bandwidth" in goal:
            pct = native.get("pct_copy_bandwidth")
            q1, q3 = _bounds(native)
            scale = pct * native["median_s"] if pct is not None else None  # the percentage is inverse to the time
            ranges = {"pct_copy_bandwidth": None if scale is None else (scale / q3, scale / q1)}
            measured = {"pct_copy_bandwidth": pct}
            wanted = {"pct_copy_bandwidth": BANDWIDTH_TARGET_PCT}
            timed = ["native"]
        else:
            cpu = goal.startswith("cpu")
            wanted = {"reference": 5.0, "official": 500.0} if cpu else {"reference": 8.0, "compiled": 2.0}
            measured = {f"x_{name}": case["speedup"].get(name) for name in wanted}
            ranges = {f"x_{name}": _ratio_bounds(methods.get(name, {}), native) for name in wanted}
            wanted = {f"x_{name}": goal_x for name, goal_x in wanted.items()}
            timed = ["native"] + [key.removeprefix("x_") for key in wanted]
        spread = {
            name: {
                "q1_s": _bounds(methods[name])[0],
                "median_s": methods[name]["median_s"],
                "q3_s": _bounds(methods[name])[1],
                "reps": methods[name].get("reps", 1),
                "cpu_wait_frac": methods[name].get("cpu_wait_frac"),
            }
            for name in timed
            if methods.get(name, {}).get("median_s") is not None
        }
        waits = [s["cpu_wait_frac"] for s in spread.values() if s["cpu_wait_frac"] is not None]
        result = verdict(measured, ranges, wanted, max(waits) if waits else None)
        checks.append(
            {
                "case": case["label"],
                "goal": goal,
                "measured": measured,
                "ranges": {k: list(v) if v else None for k, v in ranges.items()},
                "verdict": result,
                "met": result == "met",
                "spread": spread,
            }
        )
    return checks


def verdict(measured: dict, ranges: dict, wanted: dict, cpu_wait: float | None = None) -> str:
    """The noise rule: when the timings cannot decide a target, it is **inconclusive**, not missed.

    1. The spread. A ratio of medians says little when the repeated timings behind it are spread wide, so each
       figure is also computed from the quartiles of the repeats: the ratio's pessimistic bound is the other
       method's first quartile over native's third, its optimistic bound the other's third quartile over
       native's first (for bandwidth: bytes over native's third and first quartile). A goal is **met** when the
       pessimistic bound reaches it, **missed** when even the optimistic bound falls short of it, and
       inconclusive when the bounds lie on both sides of it: the gap the target needs is within the noise. With
       one repeat (slow calls) the bounds equal the median.
    2. The scheduler. On a machine whose cores other processes hold, every call can wait for a time slice (a
       40 µs call of two threads on two busy cores took 8-12 ms, every repeat alike, so the spread stays small
       and a ratio of such times measures the scheduler). ``cpu_wait`` is the largest share, over the timed
       methods, of their threads' time spent runnable but waiting for a CPU (Linux schedstat); above
       ``CPU_WAIT_LIMIT`` (10%) the target is inconclusive whatever the ratios. None (not measured) skips this.

    A target with several goals is missed if one is missed, else inconclusive if one is, else met; a figure
    that was not measured misses.
    """
    if cpu_wait is not None and cpu_wait > CPU_WAIT_LIMIT:
        return "inconclusive"
    results = []
    for key, goal in wanted.items():
        if measured.get(key) is None or ranges.get(key) is None:
            results.append("missed")
            continue
        low, high = ranges[key]
        results.append("met" if low >= goal else "missed" if high < goal else "inconclusive")
    for result in ("missed", "inconclusive"):
        if result in results:
            return result
    return "met"


def _bounds(result: dict) -> tuple[float, float]:
    """(first quartile, third quartile) of a method's repeats; the median twice when they were not recorded."""
    median = result.get("median_s")
    return result.get("q1_s", median), result.get("q3_s", median)


def _ratio_bounds(other: dict, native: dict) -> tuple[float, float] | None:
    if other.get("median_s") is None or native.get("median_s") is None:
        return None
    (other_q1, other_q3), (native_q1, native_q3) = _bounds(other), _bounds(native)
    return other_q1 / native_q3, other_q3 / native_q1


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
        mask[b, first : first + count] = True
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
