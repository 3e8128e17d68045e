"""Timers: ``torch.utils.benchmark`` on CPU; CUDA events with the L2 cache flushed before each call on GPU;
the device's copy bandwidth, the yardstick of the bandwidth target; and how long this process's threads waited
for a CPU while they were timed, the mark of a busy machine."""

from __future__ import annotations

import glob
import statistics
from collections.abc import Callable

import torch


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


def thread_waits() -> dict[str, int] | None:
    """Nanoseconds each thread of this process has spent runnable but waiting for a CPU (Linux's schedstat, one
    entry per thread); None where the kernel does not report it."""
    waits = {}
    for path in glob.glob("/proc/self/task/*/schedstat"):
        try:
            with open(path) as f:
                waits[path] = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return waits or None


def waited_s(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """Seconds this process's threads waited for a CPU between two :func:`thread_waits` snapshots (threads
    started in between count from zero)."""
    if before is None or after is None:
        return None
    return sum(wait - before.get(path, 0) for path, wait in after.items()) / 1e9
