"""The study's statistics of score curves (used by every study command).

Definitions:
- curve: the seed-mean ground-truth score per training step, smoothed by a trailing 5-step moving average.
- threshold: 80% of the way from the SFT policy's score (mean over seeds of step 0) to the best method's
  final score; steps-to-threshold is the first step whose smoothed seed-mean reaches it (per seed too).
- final score: per seed, the mean over the last ``final_window`` steps; mean and std over seeds.
- late-training spread: the std over seeds of the score at each step, averaged over the last quarter of
  the steps.
"""

from __future__ import annotations

import math


def moving_average(xs: list[float], window: int = 5) -> list[float]:
    """The trailing moving average: point i is the mean of xs[i - window + 1 .. i] (fewer at the start)."""
    out = []
    for i in range(len(xs)):
        chunk = xs[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def first_reach(curve: list[float], threshold: float) -> int | None:
    """The first index whose value is at least ``threshold`` (None: never)."""
    for i, v in enumerate(curve):
        if v >= threshold:
            return i
    return None


def summarise(results: list[dict], final_window: int = 10, key: str = "gt_score") -> dict:
    """Per-method statistics of the ground-truth score curves (see the module docstring)."""
    by_method: dict[str, list[list[float]]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r["curves"][key])
    steps = min(len(c) for cs in by_method.values() for c in cs)
    stats = {}
    for m, curves in by_method.items():
        curves = [c[:steps] for c in curves]
        mean_curve = [_mean([c[i] for c in curves]) for i in range(steps)]
        std_curve = [_std([c[i] for c in curves]) for i in range(steps)]
        finals = [_mean(c[-final_window:]) for c in curves]
        late = max(1, steps // 4)
        stats[m] = {
            "seeds": len(curves),
            "mean_curve": mean_curve,
            "std_curve": std_curve,
            "start": mean_curve[0],
            "final_mean": _mean(finals),
            "final_std": _std(finals),
            "late_spread": _mean(std_curve[-late:]),
            "final_kl": _mean(
                [_mean(r["curves"]["kl"][steps - final_window : steps]) for r in results if r["method"] == m]
            ),
        }
    start = _mean([s["start"] for s in stats.values()])
    best = max(s["final_mean"] for s in stats.values())
    threshold = start + 0.8 * (best - start)
    for m, s in stats.items():
        s.update(
            threshold_stats(s["mean_curve"], [r["curves"][key][:steps] for r in results if r["method"] == m], threshold)
        )
    return {"steps": steps, "sft_score": start, "best_final": best, "threshold": threshold, "methods": stats}


def threshold_stats(mean_curve: list[float], seed_curves: list[list[float]], threshold: float) -> dict:
    """When the 5-step moving average of the seed-mean curve, and of each seed's curve, first reaches the
    threshold (None: never); how many seeds reach it, and their median step ('never' counting as the largest)."""
    per_seed = [first_reach(moving_average(c), threshold) for c in seed_curves]
    return {
        "steps_to_threshold": first_reach(moving_average(mean_curve), threshold),
        "per_seed_steps_to_threshold": per_seed,
        "seeds_reaching": sum(x is not None for x in per_seed),
        "median_seed_steps": _median_with_never(per_seed),
    }


def steps_to(summary: dict, runs: list[dict], threshold: float) -> dict:
    """Per method: steps for the 5-step moving average of the seed-mean curve, and of each seed's curve (in
    seed order), to reach the threshold (None: never)."""
    out = {}
    for m, s in summary["methods"].items():
        mine = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        reached = threshold_stats(
            s["mean_curve"], [r["curves"]["gt_score"][: summary["steps"]] for r in mine], threshold
        )
        out[m] = {"steps": reached["steps_to_threshold"], "per_seed": reached["per_seed_steps_to_threshold"]}
    return out


def ratios(steps: dict, methods, n_steps: int) -> dict:
    """Each dense method's steps-to-threshold ratio against sparse: seed-mean curves, and paired per seed."""
    sparse = steps["sparse"]
    out = {}
    for m in methods:
        if m == "sparse" or m not in steps:
            continue
        a, b = steps[m]["steps"], sparse["steps"]
        mean_ratio = a / b if a is not None and b else None
        if a is None:
            text = "never"
        elif b is None:
            text = f"< {a / n_steps:.2f} (sparse never)"
        elif b == 0:
            text = "n/a (sparse at step 0)"
        else:
            text = f"{mean_ratio:.2f}"
        per_seed, censored = [], []
        for x, y in zip(steps[m]["per_seed"], sparse["per_seed"]):
            x_, y_ = n_steps if x is None else x, n_steps if y is None else y
            per_seed.append(x_ / max(y_, 1))
            censored.append(x is None or y is None)
        out[m] = {
            "mean_curve_ratio": mean_ratio,
            "text": text,
            "steps": a,
            "sparse_steps": b,
            "per_seed": per_seed,
            "per_seed_censored": censored,
            "per_seed_median": _median(per_seed),
        }
    return out


def sparse_level(summary: dict, fraction: float = 0.8) -> float:
    """A threshold on sparse's own scale: ``fraction`` of the way from the SFT score to sparse's final score (sparse
    reaches it by construction, so ratios against sparse are always defined)."""
    start = summary["sft_score"]
    return start + fraction * (summary["methods"]["sparse"]["final_mean"] - start)


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if n == 0 else (xs[(n - 1) // 2] + xs[n // 2]) / 2


def _median_with_never(values: list[int | None]) -> float | None:
    """Median where 'never' counts as larger than any step (None if the median itself is 'never')."""
    keyed = sorted(values, key=lambda v: math.inf if v is None else v)
    n = len(keyed)
    mid = keyed[(n - 1) // 2], keyed[n // 2]
    if mid[0] is None or mid[1] is None:
        return None
    return (mid[0] + mid[1]) / 2
