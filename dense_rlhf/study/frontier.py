"""``dense-rlhf experiment --study frontier``: each reward method's true score against its KL from the reference
policy, as the KL penalty varies, so that methods are compared at equal KL.

Methods (default sparse, ABC 0.8, prefix differences 0.8 and the oracle in ABC's shape) run at several KL strengths
per PPO setting (``--kl-coefs``; default ``KL_COEFS``): the fixed coefficient in ours; in the paper's, the adaptive
controller's initial coefficient with its target kept at 6 (trl 0.7.4's controller moves the coefficient by at most
about 5% over 150 steps of 16 completions, so the initial coefficient is the lever and the target is not). Each
(method, strength, seed) is one ``runs.run_one``; the setting's own GAE lambda unless ``--lam`` names one.

Per setting (``analyse``):
- each method's frontier: per KL strength, the final true score and the final KL (nats per completion, k1), each
  the mean of the last 10 steps per seed, then mean and std over seeds;
- the KLs that every method spans (from the largest of the methods' smallest seed-mean final KLs to the smallest of
  their largest) and, at ``MATCHED_POINTS`` KLs evenly spaced over it, each method's score interpolated linearly
  along its frontier (points ordered by final KL);
- steps to sparse's level at matched KL: sparse's level at KL k is 80% of the way from the SFT score to sparse's
  interpolated score at k (the oracle and length studies' "sparse's level"); each method's steps for its seed-mean
  curve (5-step moving average) to reach it at each of its strengths, interpolated linearly in final KL between
  the two strengths around k (undefined where either never reaches it), and the ratio to sparse's.

Runs are ordered slowest first through one pool of single-threaded workers. Each finished run is appended to
``<name>.partial.jsonl`` under ``--out``: the same command later resumes from it (runs with the same method, seed,
setup and PPO settings are not run again, nor those already in a finished ``<name>.json``), and the outputs are
rewritten as each setting completes, so that an interrupted study leaves the settings it finished. The file is
removed once every run is in ``<name>.json`` (every curve), beside ``<name>.md`` (tables) and ``<name>.png`` (the
frontiers and the learning curves).
"""

from __future__ import annotations

import json
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

from dense_rlhf.rl.ppo import PPOConfig
from dense_rlhf.study import methods as M
from dense_rlhf.study import runs, stats
from dense_rlhf.study.config import ExperimentOptions
from dense_rlhf.study.models import SetupConfig, load_or_train
from dense_rlhf.study.plots import pyplot, save, score_curves

METHODS = ("sparse", "abc-0.8", "prefix-0.8", "oracle-abs-0.8")
# KL strengths per setting, chosen from the oracle study's final KLs at ours' 0.05 (sparse 10.6, the others 11.8-15.9)
# and the paper's 0.2 (ABC 5.8, the others 7.8-8.2 but one sparse seed at 83) so that the methods' ranges overlap.
KL_COEFS = {"ours": (0.025, 0.05, 0.1), "paper": (0.05, 0.1, 0.2)}
MATCHED_POINTS = 5
FINAL_WINDOW = 10  # steps whose mean is a run's final score and KL (stats.summarise's)


# ------------------------------------------------------------------------------------------------ statistics


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def interpolate(xs: list[float], ys: list[float | None], x: float) -> float | None:
    """The piecewise-linear function through (xs, ys) (xs ascending) at x; None outside [xs[0], xs[-1]] or where a
    y around x is None."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            a, b = ys[i], ys[i + 1]
            if x == xs[i]:
                return a
            if x == xs[i + 1]:
                return b
            if a is None or b is None:
                return None
            return a + (b - a) * (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[0] if x == xs[0] else None


def frontier_points(results: list[dict], methods: list[str], coefs: list[float]) -> dict:
    """Per method, one point per KL strength, ordered by final KL: the seeds' final scores and KLs (mean of the last
    ``FINAL_WINDOW`` steps), their means and stds, the seed-mean score curve and the KL coefficient at the end."""
    out = {}
    for m in methods:
        points = []
        for c in coefs:
            mine = sorted((r for r in results if r["method"] == m and r["kl"] == c), key=lambda r: r["seed"])
            if not mine:
                continue
            scores = [_mean(r["curves"]["gt_score"][-FINAL_WINDOW:]) for r in mine]
            kls = [_mean(r["curves"]["kl"][-FINAL_WINDOW:]) for r in mine]
            n = min(len(r["curves"]["gt_score"]) for r in mine)
            points.append(
                {
                    "kl_strength": c,
                    "seeds": [r["seed"] for r in mine],
                    "final_scores": scores,
                    "final_kls": kls,
                    "score_mean": _mean(scores),
                    "score_std": _std(scores),
                    "kl_mean": _mean(kls),
                    "kl_std": _std(kls),
                    "kl_coef_end": _mean([r["curves"]["kl_coef"][-1] for r in mine]),
                    "mean_curve": [_mean([r["curves"]["gt_score"][i] for r in mine]) for i in range(n)],
                    "std_curve": [_std([r["curves"]["gt_score"][i] for r in mine]) for i in range(n)],
                }
            )
        out[m] = sorted(points, key=lambda p: p["kl_mean"])
    return out


def common_span(points: dict) -> tuple[float, float] | None:
    """The final KLs every method's frontier spans, (low, high); None when they do not overlap."""
    lo = max(p[0]["kl_mean"] for p in points.values())
    hi = min(p[-1]["kl_mean"] for p in points.values())
    return (lo, hi) if lo <= hi else None


def matched(points: dict, sft_score: float, n: int = MATCHED_POINTS) -> list[dict]:
    """At ``n`` KLs evenly spaced over ``common_span``: each method's interpolated score and std over seeds (the
    points' stds interpolated the same way), sparse's level there, and each method's steps to it (interpolated in
    final KL between its strengths around k) with the ratio to sparse's."""
    span = common_span(points)
    if span is None or "sparse" not in points:
        return []
    lo, hi = span
    grid = [lo] if hi == lo else [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    rows = []
    for k in grid:
        row: dict = {"kl": k, "score": {}, "score_std": {}, "steps": {}, "ratio": {}}
        for m, ps in points.items():
            xs = [p["kl_mean"] for p in ps]
            row["score"][m] = interpolate(xs, [p["score_mean"] for p in ps], k)
            row["score_std"][m] = interpolate(xs, [p["score_std"] for p in ps], k)
        level = sft_score + 0.8 * (row["score"]["sparse"] - sft_score)
        row["sparse_level"] = level
        for m, ps in points.items():
            xs = [p["kl_mean"] for p in ps]
            reach = [stats.first_reach(stats.moving_average(p["mean_curve"]), level) for p in ps]
            row["steps"][m] = interpolate(xs, [None if s is None else float(s) for s in reach], k)
        base = row["steps"]["sparse"]
        for m in points:
            s = row["steps"][m]
            row["ratio"][m] = None if s is None or not base else s / base
        rows.append(row)
    return rows


def analyse(results: list[dict], methods: list[str], settings: dict, coefs: dict) -> list[dict]:
    """One section per setting whose runs are all in ``results``: its frontier points, the common KL span, the
    matched-KL rows, the SFT score and the runs."""
    sections = []
    for name, cfg in settings.items():
        mine = sorted(
            (r for r in results if r["setting"] == name),
            key=lambda r: (coefs[name].index(r["kl"]), methods.index(r["method"]), r["seed"]),
        )
        points = frontier_points(mine, methods, coefs[name])
        sft = _mean([r["curves"]["gt_score"][0] for r in mine])
        sections.append(
            {
                "setting": name,
                "ppo": asdict(cfg),
                "kl_strengths": list(coefs[name]),
                "sft_score": sft,
                "points": points,
                "span": common_span(points),
                "matched": matched(points, sft),
                "run_seconds": sum(r["seconds"] for r in mine),
                "runs": mine,
            }
        )
    return sections


# ------------------------------------------------------------------------------------------------ outputs


def _num(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _setting_line(sec: dict) -> str:
    p = sec["ppo"]
    kl = (
        f"adaptive KL controller (target {p['kl_target']:g}, horizon {p['kl_horizon']:g}) from the initial "
        "coefficients below"
        if p["kl_target"] is not None
        else "fixed KL coefficients below"
    )
    return (
        f"{sec['setting']} PPO settings: GAE lambda {p['lam']:g}, batch {p['batch_size']}, minibatch "
        f"{p['minibatch_size']}, {p['ppo_epochs']} epochs, lr {p['lr']:g}, {p['steps']} steps, {kl}"
    )


def _earlier_note(meta: dict) -> str:
    earlier = meta.get("earlier_runs", 0)
    if not earlier:
        return ""
    return (
        f", for the runs it ran; {earlier} runs came from earlier runs of the same study, read from its results "
        "(see `experiments/README.md`)"
    )


def markdown(sections: list[dict], meta: dict) -> str:
    methods = meta["methods"]
    lines = [
        f"# {meta['title']}",
        "",
        f"Command: `{meta['command']}`; wall time {meta['wall_seconds'] / 60:.1f} min ({meta['workers']} workers, one "
        f"torch thread each{_earlier_note(meta)}); the PPO runs' own wall times sum to {meta['run_seconds'] / 60:.1f} "
        f"min, their CPU time to {meta['run_cpu_seconds'] / 60:.1f} min. Every curve is in `{meta['name']}.json`.",
        "",
    ]
    if meta.get("missing"):
        lines += [f"**Incomplete:** {meta['missing']}", ""]
    lines += [
        f"![frontiers]({meta['name']}.png)",
        "",
        "Final score and final KL: per seed the mean of the last 10 steps (true score; KL in nats per completion, "
        "k1), then mean ± std over seeds. Matched KL: the KLs every method's frontier spans; scores interpolated "
        "linearly along each method's points ordered by final KL (± the interpolated std over seeds). Sparse's "
        "level at KL k: 80% of the way from the SFT score to sparse's interpolated score at k; steps: when the "
        "seed-mean curve (5-step moving average) first reaches it, interpolated in final KL between the method's "
        "strengths around k (— where one of them never reaches it within the run).",
    ]
    for sec in sections:
        lines += ["", f"## {_setting_line(sec)}", "", f"SFT score {sec['sft_score']:.2f}.", ""]
        lines += [
            "| method | KL strength | seeds | final KL | final true score | KL coefficient at the end |",
            "|---|---|---|---|---|---|",
        ]
        for m in methods:
            for p in sorted(sec["points"][m], key=lambda p: p["kl_strength"]):
                lines.append(
                    f"| {M.LABELS[m]} | {p['kl_strength']:g} | {len(p['seeds'])} | {p['kl_mean']:.2f} ± "
                    f"{p['kl_std']:.2f} | {p['score_mean']:.2f} ± {p['score_std']:.2f} | {p['kl_coef_end']:.4f} |"
                )
        if sec["span"] is None:
            lines += ["", "The methods' final KLs do not overlap: no matched KL."]
            continue
        lo, hi = sec["span"]
        lines += [
            "",
            f"### At matched KL ({lo:.2f} to {hi:.2f} nats per completion)",
            "",
            "| final KL | " + " | ".join(M.LABELS[m] for m in methods) + " | sparse's level |",
            "|---|" + "---|" * (len(methods) + 1),
        ]
        for row in sec["matched"]:
            lines.append(
                f"| {row['kl']:.2f} | "
                + " | ".join(f"{_num(row['score'][m])} ± {_num(row['score_std'][m])}" for m in methods)
                + f" | {row['sparse_level']:.2f} |"
            )
        lines += [
            "",
            "Steps to sparse's level at matched KL (ratio to sparse's in parentheses):",
            "",
            "| final KL | " + " | ".join(M.LABELS[m] for m in methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for row in sec["matched"]:
            cells = [
                _num(row["steps"][m], 0) + ("" if m == "sparse" else f" ({_num(row['ratio'][m])})") for m in methods
            ]
            lines.append(f"| {row['kl']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(sections: list[dict], methods: list[str], path: Path, title: str) -> None:
    """Per setting: the frontiers (final true score against final KL, one line per method through its strengths,
    ±1 std over seeds on both axes, the matched span shaded) above the seed-mean learning curves at the setting's
    own KL coefficient (or the strength nearest to it)."""
    fig, axes = pyplot().subplots(2, len(sections), figsize=(7 * len(sections), 10), squeeze=False)
    for j, sec in enumerate(sections):
        ax = axes[0][j]
        for k, m in enumerate(methods):
            ps = sec["points"][m]
            ax.errorbar(
                [p["kl_mean"] for p in ps],
                [p["score_mean"] for p in ps],
                xerr=[p["kl_std"] for p in ps],
                yerr=[p["score_std"] for p in ps],
                color=f"C{k}",
                marker="o",
                capsize=3,
                ls="--" if m.startswith("oracle") else "-",
                label=M.LABELS[m],
            )
            for p in ps:
                ax.annotate(f"{p['kl_strength']:g}", (p["kl_mean"], p["score_mean"]), fontsize=6, color=f"C{k}")
        if sec["span"] is not None:
            ax.axvspan(*sec["span"], color="0.9", label="KLs every method spans")
        ax.set_xlabel("final KL (nats per completion)")
        ax.set_ylabel("final true score (±1 std over seeds)")
        ax.set_title("\n".join(textwrap.wrap(_setting_line(sec), 90)), fontsize=8)
        ax.legend(fontsize=7)
        own = sec["ppo"]["kl_coef"]
        strength = min(sec["kl_strengths"], key=lambda c: abs(c - own))
        curves = [
            (M.LABELS[m], p, {"color": f"C{k}", "ls": "--" if m.startswith("oracle") else "-"})
            for k, m in enumerate(methods)
            for p in sec["points"][m]
            if p["kl_strength"] == strength
        ]
        score_curves(
            axes[1][j],
            curves,
            title=f"{sec['setting']}: learning curves at KL strength {strength:g}",
            title_size=8,
            xlabel=f"PPO step ({sec['ppo']['batch_size']} completions each)",
            ylabel="true score (5-step MA, ±1 std over seeds)",
        )
    save(fig, path, title=title, dpi=110)


def write_outputs(sections: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = meta["name"]
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "sections": sections}, indent=1))
    (out / f"{name}.md").write_text(markdown(sections, meta))
    plot(sections, meta["methods"], out / f"{name}.png", meta["title"])


# ------------------------------------------------------------------------------------------------ the command


def _key(run: runs.Run) -> str:
    """What makes two runs the same run: method, seed, setup, PPO settings and tags."""
    return json.dumps([run.method, run.seed, asdict(run.setup), asdict(run.config), list(run.tags)], sort_keys=True)


def _earlier_results(path: Path, jobs: list[runs.Run], setup: SetupConfig, settings: dict[str, PPOConfig]) -> dict:
    """The runs of a finished study of the same name that this one asks for again, by key: those of ``path``
    (``<name>.json``) whose setup and PPO setting equal this command's, matched on method, seed, setting and KL
    strength, so that more seeds or strengths add runs to a finished study instead of repeating it."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data["meta"]["setup"] != asdict(setup):
        return {}
    by_tags = {(j.method, j.seed, dict(j.tags)["setting"], dict(j.tags)["kl"]): _key(j) for j in jobs}
    done = {}
    for section in data["sections"]:
        name = section["setting"]
        if name not in settings or data["meta"]["settings"].get(name) != asdict(settings[name]):
            continue
        for res in section["runs"]:
            key = by_tags.get((res["method"], res["seed"], res["setting"], res["kl"]))
            if key is not None:
                done[key] = res
    return done


def main(args: ExperimentOptions, argv: list[str], setup: SetupConfig, settings: dict[str, PPOConfig]) -> int:
    """Run the study from ``dense-rlhf experiment``'s parsed arguments, its setup and its PPO settings by name."""
    t0 = time.time()
    methods = M.against_sparse(args.methods, METHODS, "frontier")
    given = [float(x) for x in args.kl_coefs.split(",") if x.strip()] if args.kl_coefs else None
    coefs = {name: sorted(given or KL_COEFS.get(name, (settings[name].kl_coef,))) for name in settings}
    if args.lam:
        if "," in args.lam:
            raise SystemExit("--study frontier runs one --lam (default: each setting's own)")
        settings = {name: replace(cfg, lam=float(args.lam)) for name, cfg in settings.items()}
    cache = str(args.cache_dir) if args.cache_dir else None
    seeds = [args.seed * 1000 + i for i in range(args.seeds)]
    out = Path(args.out)
    partial = out / f"{args.name}.partial.jsonl"

    print("[1/2] SFT policy and reward model", flush=True)
    load_or_train(setup, cache)
    order = sorted(settings, key=lambda k: -settings[k].steps * settings[k].batch_size / settings[k].minibatch_size)
    jobs = [
        runs.Run(m, s, setup, replace(settings[name], kl_coef=c), cache, tags=(("setting", name), ("kl", c)))
        for name in order
        for c in sorted(coefs[name])
        for m in methods
        for s in seeds
    ]
    done = _earlier_results(out / f"{args.name}.json", jobs, setup, settings)
    if partial.exists():
        wanted = {_key(j) for j in jobs}
        for line in partial.read_text().splitlines():
            entry = json.loads(line)
            if entry["key"] in wanted:
                done[entry["key"]] = entry["result"]
    todo = [j for j in jobs if _key(j) not in done]
    earlier = len(done)
    plan = ", ".join(f"{name} at KL strengths {'/'.join(f'{c:g}' for c in coefs[name])}" for name in order)
    print(
        f"[2/2] {len(jobs)} PPO runs ({plan}; {len(methods)} methods x {len(seeds)} seeds; {len(done)} done "
        f"earlier, read from {args.name}.json and {partial.name}; {args.workers} workers)",
        flush=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    keys = {id(j): _key(j) for j in todo}
    by_tags = {(j.method, j.seed, dict(j.tags)["setting"], dict(j.tags)["kl"]): keys[id(j)] for j in todo}
    per_setting = {name: sum(dict(j.tags)["setting"] == name for j in jobs) for name in settings}

    def meta() -> dict:
        results = list(done.values())
        complete = [n for n in order if sum(r["setting"] == n for r in results) == per_setting[n]]
        missing = len(jobs) - len(results)
        return {
            "title": f"The reward-KL frontier: {len(methods)} methods x {len(seeds)} seeds per KL strength",
            "command": "dense-rlhf experiment " + " ".join(argv),
            "name": args.name,
            "methods": methods,
            "settings": {k: asdict(v) for k, v in settings.items()},
            "kl_strengths": coefs,
            "seeds": seeds,
            "workers": args.workers,
            "wall_seconds": time.time() - t0,
            "earlier_runs": earlier,
            "run_seconds": sum(r["seconds"] for r in results),
            "run_cpu_seconds": sum(r["cpu_seconds"] for r in results),
            "setup": asdict(setup),
            "complete_settings": complete,
            "missing": (
                f"{missing} of {len(jobs)} runs missing (settings not complete: "
                f"{', '.join(n for n in order if n not in complete)}); rerun the command to finish them"
                if missing
                else None
            ),
        }

    def write() -> None:
        m = meta()
        chosen = {n: settings[n] for n in m["complete_settings"]}
        write_outputs(analyse(list(done.values()), methods, chosen, coefs), m, out)

    base_progress = runs.progress_printer(
        len(todo), t0, lambda r: f"{r['setting']:5s} KL {r['kl']:<6g} {r['method']:14s} seed {r['seed']:5d}"
    )

    def progress(res: dict) -> None:
        key = by_tags[(res["method"], res["seed"], res["setting"], res["kl"])]
        done[key] = res
        with partial.open("a") as f:
            f.write(json.dumps({"key": key, "result": res}) + "\n")
        base_progress(res)
        if sum(r["setting"] == res["setting"] for r in done.values()) == per_setting[res["setting"]]:
            write()

    runs.run_all(todo, args.workers, progress)
    write()
    partial.unlink(missing_ok=True)
    m = meta()
    print()
    print(markdown(analyse(list(done.values()), methods, settings, coefs), m))
    print(f"wrote {out / args.name}.json/.md/.png ({m['wall_seconds']:.0f}s)")
    return 0
