"""The benchmark's report: machine facts, the markdown table with the targets, the plot, and the files."""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import platform
import re
import sys
from pathlib import Path

import numpy as np
import torch

from dense_rlhf import _native
from dense_rlhf.bench.baselines import ALTERNATIVES, METHODS
from dense_rlhf.bench.cases import CPU_WAIT_LIMIT, LAYOUTS


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
        info.update(
            device_name=props.name,
            cuda=torch.version.cuda,
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            driver=_nvidia_driver(),
        )
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
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _us(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e6:,.0f}" if seconds * 1e6 >= 10 else f"{seconds * 1e6:.1f}"


def _x(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.1f}x" if value >= 1 else f"{value:.2f}x"


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
    head = (
        "| layout | dtype | B | H | L |"
        + ("" if gpu else " threads |")
        + " native | reference | compiled | official | x ref | x compiled | x official | native GB/s |"
    )
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
            cells.append(
                " / ".join(
                    "—"
                    if m.get(name, {}).get("peak_extra_bytes") is None
                    else f"{m[name]['peak_extra_bytes'] / 2**20:.1f}"
                    for name in METHODS
                )
            )
        lines.append(start + " " + " | ".join(cells) + " |" + (" *target*" if c["target"] else ""))
    lines += ["", "Targets:", ""]
    lines += [f"- {target_line(t)}" for t in report["targets"]] or ["- none in this grid"]
    if report["targets"]:
        lines += [
            "",
            "A target is met when its ratio computed from the interquartile bounds of the repeats (the "
            "other method's first quartile over native's third) reaches the goal, missed when even the "
            "opposite bounds fall short, inconclusive when they lie on both sides of it or when the timed "
            f"threads waited for a CPU more than {100 * CPU_WAIT_LIMIT:.0f}% of their time "
            "(`dense_rlhf.bench.cases.verdict`).",
        ]
    agree = all(r.get("agrees", True) for case in report["cases"] for r in case["methods"].values())
    lines += ["", f"Every method agrees with the reference on every benchmarked input: **{'yes' if agree else 'NO'}**."]
    lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def target_line(target: dict, markdown: bool = True) -> str:
    """One target's verdict in a line: the case, the goal, the measured figures with their interquartile bounds,
    and, when the verdict is inconclusive, the spread of each method's repeats that made it so."""
    verdict = target.get("verdict", "met" if target["met"] else "missed")
    shown = f"**{verdict}**" if markdown else verdict.upper()
    line = (
        f"{target['case']}: {target['goal']}: measured {_fmt_measured(target['measured'], target.get('ranges'))}: "
        f"{shown}"
    )
    if verdict == "inconclusive":
        spread = target.get("spread", {})
        waits = {name: s["cpu_wait_frac"] for name, s in spread.items() if s.get("cpu_wait_frac") is not None}
        if waits and max(waits.values()) > CPU_WAIT_LIMIT:
            waited = ", ".join(f"{name} {100 * w:.0f}%" for name, w in waits.items())
            line += (
                f": the machine was busy, the timed threads waited for a CPU for part of their time ({waited}; "
                f"over {100 * CPU_WAIT_LIMIT:.0f}% the times are the scheduler's)"
            )
        else:
            ranges = "; ".join(
                f"{name} {_us(s['q1_s'])}-{_us(s['q3_s'])} µs, median {_us(s['median_s'])}, {s['reps']} repeats"
                for name, s in spread.items()
            )
            line += (
                ": too noisy to decide, the bounds from the interquartile ranges of the repeats lie on both "
                f"sides of the goal ({ranges})"
            )
        line += "; rerun on a quieter machine"
    return line


def _fmt_measured(measured: dict, ranges: dict | None = None) -> str:
    parts = []
    for key, value in measured.items():
        if value is None:
            parts.append(f"{key} n/a")
        elif key.startswith("pct"):
            parts.append(f"{value:.0f}% of copy bandwidth")
        else:
            parts.append(f"{key.removeprefix('x_')} {_x(value)}")
        bounds = (ranges or {}).get(key)
        if value is not None and bounds:
            low, high = bounds
            parts[-1] += f" [{low:.0f}-{high:.0f}%]" if key.startswith("pct") else f" [{_x(low)}-{_x(high)}]"
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
                == (layout, dtype, heads, batch)
                and "median_s" in c["methods"].get(method, {})
            )
            if points:
                xs, ys = zip(*points)
                ax.plot(
                    xs,
                    ys,
                    color=colours[method],
                    linestyle=styles[batch],
                    marker="o",
                    markersize=3,
                    label=f"{method} B={batch}",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{LAYOUTS[layout]} {dtype} H={heads}", fontsize=9)
        ax.set_xlabel("L")
        ax.set_ylabel("median µs per call")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
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
