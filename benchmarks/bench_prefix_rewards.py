"""Does ``prefix_rewards`` need a native kernel? Its PyTorch implementation timed beside the native ABC op.

``prefix_rewards`` is a handful of elementwise passes and one running maximum over [B, L]. This times, on the
same random [B, L] inputs (a prompt of L/8 tokens, odd rows right-padded by L/8, completion in between):

* ``prefix eager``: ``prefix_rewards(..., validate=False)``;
* ``prefix eager, validate``: the default, with its one host sync and the value checks;
* ``prefix compiled``: the same call under ``torch.compile`` (inductor, static shapes);
* ``dense_rewards native, [B, L] row``: the fused C++ op on one attention row per sequence, the closest
  natively implemented function (same input and output sizes);
* ``clone``: copying the [B, L] float32 scores once, the floor of any kernel that reads them.

Methods run interleaved in rounds (load drifts hit them alike); median of all repetitions after a warm-up,
``torch.utils.benchmark.Timer``. Writes ``prefix_rewards.{json,md}`` into ``--out``.

Usage: ``python benchmarks/bench_prefix_rewards.py [--threads N] [--rounds 5] [--out benchmarks/results/cpu]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

import dense_rlhf
from dense_rlhf import _native

CASES = [(8, 2048), (64, 512), (64, 2048), (256, 4096)]


def inputs(batch: int, length: int):
    g = torch.Generator().manual_seed(batch * 100_003 + length)
    scores = torch.randn(batch, length, generator=g)
    row = torch.rand(batch, length, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, length // 8 :] = True
    mask[1::2, length - length // 8 :] = False
    last = torch.where(mask, torch.arange(length), -1).amax(1)
    return scores, row, mask, scores[torch.arange(batch), last].contiguous()


def methods(scores, row, mask, score):
    compiled = torch.compile(lambda s, m: dense_rlhf.prefix_rewards(s, m, beta=0.8, validate=False), dynamic=False)
    found = {
        "prefix eager": lambda: dense_rlhf.prefix_rewards(scores, mask, beta=0.8, validate=False),
        "prefix eager, validate": lambda: dense_rlhf.prefix_rewards(scores, mask, beta=0.8),
        "prefix compiled": lambda: compiled(scores, mask),
        "clone": lambda: scores.clone(),
    }
    if _native.has_kernel("cpu"):
        found["dense_rewards native, [B, L] row"] = lambda: dense_rlhf.dense_rewards(
            row, score, mask, beta=0.8, backend="native", validate=False
        )
    return found


def measure(rounds: int, budget_s: float) -> list[dict]:
    from torch.utils import benchmark

    rows = []
    for batch, length in CASES:
        fns = methods(*inputs(batch, length))
        expected = fns["prefix eager"]()
        torch.testing.assert_close(fns["prefix compiled"](), expected)  # also the compile warm-up
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                times[name] += list(timer.blocked_autorange(min_run_time=budget_s).times)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        for name, median in medians.items():
            rows.append(
                {
                    "B": batch,
                    "L": length,
                    "method": name,
                    "median_s": median,
                    "reps": len(times[name]),
                    "vs_prefix_eager": median / medians["prefix eager"],
                }
            )
        print(f"B={batch} L={length}: " + ", ".join(f"{n} {m * 1e6:.0f} us" for n, m in medians.items()), flush=True)
    return rows


def _ratio(rows, batch, length, slow="prefix eager", fast="dense_rewards native, [B, L] row"):
    times = {r["method"]: r["median_s"] for r in rows if r["B"] == batch and r["L"] == length}
    return times[slow] / times[fast] if fast in times else float("nan")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# prefix_rewards: PyTorch implementation beside the native ABC op (CPU)",
        "",
        f"Command: `{meta['command']}`. {meta['machine']}; torch {meta['torch']}, torch threads: {meta['threads']}. "
        "Median time per call; methods interleaved in rounds; inputs [B, L] float32 scores, bool mask.",
        "",
        "| B | L | method | median (us) | vs prefix eager |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['L']} | {r['method']} | {r['median_s'] * 1e6:.0f} | {r['vs_prefix_eager']:.2f} |"
        )
    lines += [
        "",
        "prefix_rewards (eager) over the native ABC op on the same [B, L]: "
        + ", ".join(f"{case} {ratio:.1f}x" for case, ratio in meta["medians_vs_native"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.2, help="seconds per method per round")
    p.add_argument("--out", default="benchmarks/results/cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.rounds, args.budget)
    meta = {
        "command": "python benchmarks/bench_prefix_rewards.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": args.threads,
    }
    meta["command"] = meta["command"].rstrip()
    meta["medians_vs_native"] = {f"B={b} L={n}": round(_ratio(rows, b, n), 1) for b, n in CASES}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_rewards.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "prefix_rewards.md").write_text(markdown(rows, meta))
    print(f"wrote {out / 'prefix_rewards.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
