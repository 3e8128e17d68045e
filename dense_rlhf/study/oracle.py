"""``dense-rlhf experiment --study oracle``: how far is ABC from perfect credit, and does the paper's effect appear
under the paper's PPO settings?

On the sentiment task the true per-token credit is known. The oracle methods (``methods.ORACLE_METHODS``) hand it
to PPO the way ABC hands over its credit, each row summing to the reward model's score: ``oracle-0.8``, the signed
true credit in the reward model's units (beta times the reward model's scale times the credit, the rest of the
score on the last token), and ``oracle-abs-0.8``, ABC's shape with a perfect attention row (shares proportional to
|true credit|, every token with the score's sign). They run beside sparse, ABC 0.8, prefix differences 0.8 and
uniform, from the same cached SFT policy and reward model and with the same seeds, for every PPO setting of
``--ppo`` (default ``ours,paper``: ``config.PPO`` and ``config.PAPER_PPO``) and every GAE lambda of
``--lam`` (default: 0.95 and 0.8 in ours, the paper's 0.95 in the paper's, whose runs cost about six times as much
CPU).

Per (setting, lambda), each method's steps to a threshold over sparse's, for two thresholds, both 80% of the way
from the SFT score and so relative to the section's own scale: to sparse's own final score ("sparse's level", the
primary measure: sparse reaches it by construction, so the ratio is always defined and does not depend on which
other methods run; the length study's measure) and to the best method's final score (``stats.summarise``, the
definition of ``dense-rlhf experiment``). Ratios come from the seed-mean curves (5-step moving average) and per
seed, paired with the sparse run of the same seed; a run that never reaches the threshold counts as the number of
PPO steps and is marked as censored. The share of the oracle's speed-up that a method reaches is
``(1 - ratio_method) / (1 - ratio_oracle)`` from the seed-mean ratios at sparse's level (undefined when the oracle
is not faster than sparse). Final score, late spread and final KL are ``stats.summarise``'s.

Every run goes through one pool of single-threaded worker processes. Writes ``<name>.json`` (every curve),
``<name>.md`` (tables) and ``<name>.png`` (seed-mean curves, one panel per setting and lambda) under ``--out``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from dense_rlhf.rl.ppo import PPOConfig
from dense_rlhf.study import methods as M
from dense_rlhf.study import report, runs, stats
from dense_rlhf.study.config import ExperimentOptions
from dense_rlhf.study.diagnostics import credit_report
from dense_rlhf.study.models import SetupConfig, load_or_train
from dense_rlhf.study.plots import pyplot, save, score_curves

METHODS = ("sparse", "abc-0.8", "prefix-0.8", "uniform", "oracle-0.8", "oracle-abs-0.8")
LAMS = {"ours": (0.95, 0.8), "paper": (0.95,)}  # GAE lambdas per setting unless --lam names them
ORACLES = ("oracle-0.8", "oracle-abs-0.8")
COMPARED = ("abc-0.8", "prefix-0.8", "uniform")  # the methods whose share of the oracle's speed-up is reported


# ------------------------------------------------------------------------------------------------ statistics


def shares_of_oracle(ratios: dict, oracle: str, compared=COMPARED) -> dict:
    """(1 - ratio_m) / (1 - ratio_oracle) from the seed-mean ratios; None where a ratio is undefined or the oracle
    is not faster than sparse."""
    r_o = ratios.get(oracle, {}).get("mean_curve_ratio")
    out = {}
    for m in compared:
        r_m = ratios.get(m, {}).get("mean_curve_ratio")
        out[m] = None if r_o is None or r_m is None or r_o >= 1 else (1 - r_m) / (1 - r_o)
    return out


def analyse(results: list[dict], methods: list[str], settings: dict, lams: dict) -> list[dict]:
    """One section per (setting, lambda) (``lams``: the lambdas of each setting): the summary, the ratios against
    sparse for both thresholds, the shares of each oracle's speed-up, the final KL coefficient per method, and the
    runs."""
    sections = []
    for name in settings:
        for lam in lams[name]:
            mine = sorted(
                (r for r in results if r["setting"] == name and r["lam"] == lam),
                key=lambda r: (methods.index(r["method"]), r["seed"]),
            )
            summary = stats.summarise(mine)
            n = summary["steps"]
            level = stats.sparse_level(summary)
            at_level = stats.ratios(stats.steps_to(summary, mine, level), methods, n)
            kl_coef = {
                m: sum(r["curves"]["kl_coef"][n - 1] for r in mine if r["method"] == m) / summary["methods"][m]["seeds"]
                for m in summary["methods"]
            }
            sections.append(
                {
                    "setting": name,
                    "lam": lam,
                    "ppo": asdict(replace(settings[name], lam=lam)),
                    "summary": summary,
                    "sparse_level": {"threshold": level, "ratios": at_level},
                    "best_threshold": {
                        "threshold": summary["threshold"],
                        "ratios": stats.ratios(stats.steps_to(summary, mine, summary["threshold"]), methods, n),
                    },
                    "shares": {o: shares_of_oracle(at_level, o) for o in ORACLES if o in methods},
                    "final_kl_coef": kl_coef,
                    "run_seconds": sum(r["seconds"] for r in mine),
                    "runs": mine,
                }
            )
    return sections


# ------------------------------------------------------------------------------------------------ outputs


def _ratio_cell(r: dict | None) -> str:
    if r is None:
        return ""
    steps = "never" if r["steps"] is None else str(r["steps"])
    return f"{r['text'].split(' (')[0]} ({steps}) {report.seed_ratios(r)}"


def _ratio_table(sections: list[dict], key: str, dense: list[str]) -> list[str]:
    """One row per (setting, lambda): the threshold ``key`` ("sparse_level" or "best_threshold"), sparse's steps
    and each method's ratio cell."""
    lines = [
        "| setting | GAE lambda | threshold | sparse steps | " + " | ".join(M.LABELS[m] for m in dense) + " |",
        "|---|---|---|---|" + "---|" * len(dense),
    ]
    for sec in sections:
        r = sec[key]["ratios"]
        sparse_steps = next(iter(r.values()))["sparse_steps"] if r else None
        lines.append(
            f"| {sec['setting']} | {sec['lam']:g} | {sec[key]['threshold']:.2f} | "
            f"{'never' if sparse_steps is None else sparse_steps} | "
            + " | ".join(_ratio_cell(r.get(m)) for m in dense)
            + " |"
        )
    return lines


def _share(x) -> str:
    return "undefined" if x is None else f"{x:.2f}"


def _setting_title(sec: dict, sep: str = " ") -> str:
    p = sec["ppo"]
    kl = (
        f"adaptive KL from {p['kl_coef']:g} (target {p['kl_target']:g}, horizon {p['kl_horizon']:g})"
        if p["kl_target"] is not None
        else f"fixed KL {p['kl_coef']:g}"
    )
    return (
        f"{sec['setting']} PPO settings, GAE lambda {sec['lam']:g}:{sep}batch {p['batch_size']}, minibatch "
        f"{p['minibatch_size']}, {p['ppo_epochs']} epochs, lr {p['lr']:g}, {kl}, {p['steps']} steps"
    )


def markdown(sections: list[dict], credit: dict, info: dict, meta: dict) -> str:
    methods = meta["methods"]
    dense = [m for m in methods if m != "sparse"]
    lines = [
        f"# {meta['title']}",
        "",
        f"Command: `{meta['command']}`; wall time {meta['wall_seconds'] / 60:.1f} min ({meta['workers']} workers, one "
        f"torch thread each); the PPO runs' own wall times sum to {meta['run_seconds'] / 60:.1f} min"
        + ("" if meta.get("run_cpu_seconds") is None else f", their CPU time to {meta['run_cpu_seconds'] / 60:.1f} min")
        + f". Every curve is in `{meta['name']}.json`.",
        "",
        f"![curves]({meta['name']}.png)",
        "",
        "Each ratio cell: the method's steps to the threshold over sparse's, from the seed-mean curves (5-step moving "
        "average), the method's own steps in parentheses; then [median; range] of the per-seed ratios (seed s against "
        "sparse seed s; * = some run never reached the threshold and counts as the number of steps). Below 1: faster "
        "than sparse.",
        "",
        "## Steps to sparse's level (80% of the way from the SFT score to sparse's own final score)",
        "",
        *_ratio_table(sections, "sparse_level", dense),
    ]
    oracles = [o for o in ORACLES if o in methods]
    compared = [m for m in COMPARED if m in methods]
    if oracles and compared:
        lines += [
            "",
            "## Share of the oracle's speed-up, (1 - ratio) / (1 - ratio of the oracle), at sparse's level",
            "",
            "| setting | GAE lambda | oracle | oracle's ratio | " + " | ".join(M.LABELS[m] for m in compared) + " |",
            "|---|---|---|---|" + "---|" * len(compared),
        ]
        for sec in sections:
            for o in oracles:
                ro = sec["sparse_level"]["ratios"][o]["text"]
                lines.append(
                    f"| {sec['setting']} | {sec['lam']:g} | {M.LABELS[o]} | {ro} | "
                    + " | ".join(_share(sec["shares"][o][m]) for m in compared)
                    + " |"
                )
    lines += [
        "",
        "## Steps to the experiment's threshold (80% of the way to the best method's final score)",
        "",
        *_ratio_table(sections, "best_threshold", dense),
    ]
    lines += [
        "",
        "## Final true score (mean ± std over seeds of the last 10 steps), late spread, final KL",
        "",
        "Late spread: the std over seeds of the score, averaged over the last quarter of the steps. Final KL: "
        "nats per completion (k1), last 10 steps. The KL coefficient is the one of the last step (adaptive "
        "controller) or the fixed one.",
        "",
        "| setting | GAE lambda | method | final ± std | late spread | final KL | KL coefficient at the end |",
        "|---|---|---|---|---|---|---|",
    ]
    for sec in sections:
        for m in methods:
            s = sec["summary"]["methods"][m]
            lines.append(
                f"| {sec['setting']} | {sec['lam']:g} | {M.LABELS[m]} | {s['final_mean']:.2f} ± "
                f"{s['final_std']:.2f} | {s['late_spread']:.2f} | {s['final_kl']:.2f} | "
                f"{sec['final_kl_coef'][m]:.4f} |"
            )
    rm = info["reward_model"]
    lines += [
        "",
        "## Reward model and credit diagnostics",
        "",
        f"Reward model (held-out pairs): accuracy {rm['label_accuracy']:.3f} against the Bradley-Terry labels, "
        f"{rm['true_order_accuracy']:.3f} against the hidden-score order, corr(RM score, hidden score) "
        f"{rm['score_correlation']:.3f}.",
    ]
    calib = {t: d["rm_calibration"] for t, d in credit.items() if "rm_calibration" in d}
    if calib:
        lines += [
            "",
            "The reward model's score against the hidden score (least squares, RM = slope * hidden + "
            "intercept): "
            + "; ".join(
                f"{t}: slope {c['slope']:.3f}, intercept {c['intercept']:+.3f}, r {c['pearson']:.3f}"
                for t, c in calib.items()
            )
            + f". The signed oracle multiplies the true credit by the reward model's scale "
            f"{next(iter(calib.values()))['oracle_scale']:.3f} (``methods.rm_scale``: the same slope on 2048 "
            "grammar texts drawn as the preference data are).",
        ]
    lines += ["", *report.credit_lines(credit)]
    lines += ["", "## Per setting and lambda", ""]
    for sec in sections:
        lines += [f"### {_setting_title(sec)}", "", report.markdown_table(sec["summary"], None, None).strip(), ""]
    return "\n".join(lines) + "\n"


def plot(sections: list[dict], methods: list[str], path: Path, title: str) -> None:
    """Seed-mean score curves (5-step MA, ±1 std band), one panel per (setting, lambda), sparse's level dotted."""
    settings = list(dict.fromkeys(s["setting"] for s in sections))
    lams = list(dict.fromkeys(s["lam"] for s in sections))
    fig, axes = pyplot().subplots(
        len(settings), len(lams), figsize=(6.5 * len(lams), 4.6 * len(settings)), squeeze=False
    )
    bold = {"sparse", "abc-0.8", "prefix-0.8", "oracle-0.8"}
    for sec in sections:
        ax = axes[settings.index(sec["setting"])][lams.index(sec["lam"])]
        curves = [
            (
                M.LABELS[m],
                sec["summary"]["methods"][m],
                {"color": f"C{k}", "ls": "--" if m.startswith("oracle") else "-", "lw": 2 if m in bold else 1.2},
            )
            for k, m in enumerate(methods)
        ]
        score_curves(
            ax,
            curves,
            threshold=sec["sparse_level"]["threshold"],
            threshold_label="sparse's level",
            title=_setting_title(sec, "\n"),
            title_size=8,
            xlabel=f"PPO step ({sec['ppo']['batch_size']} completions each)",
            ylabel="true score (5-step MA, ±1 std over seeds)",
        )
    used = {(settings.index(sec["setting"]), lams.index(sec["lam"])) for sec in sections}
    for i, row in enumerate(axes):
        for j, ax in enumerate(row):
            if (i, j) not in used:
                ax.set_visible(False)
    save(fig, path, title=title, dpi=110)


def write_outputs(sections: list[dict], credit: dict, info: dict, meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = meta["name"]
    (out / f"{name}.json").write_text(
        json.dumps(
            {"meta": meta, "reward_model": info["reward_model"], "credit_diagnostics": credit, "sections": sections},
            indent=1,
        )
    )
    (out / f"{name}.md").write_text(markdown(sections, credit, info, meta))
    plot(sections, meta["methods"], out / f"{name}.png", meta["title"])


# ------------------------------------------------------------------------------------------------ the command


def main(args: ExperimentOptions, argv: list[str], setup: SetupConfig, settings: dict[str, PPOConfig]) -> int:
    """Run the study from ``dense-rlhf experiment``'s parsed arguments, its setup and its PPO settings by name."""
    t0 = time.time()
    methods = M.against_sparse(args.methods, METHODS, "oracle")
    given = [float(x) for x in args.lam.split(",") if x.strip()] if args.lam else None
    lams = {name: given or list(LAMS.get(name, (0.95,))) for name in settings}
    cache = str(args.cache_dir) if args.cache_dir else None
    seeds = [args.seed * 1000 + i for i in range(args.seeds)]

    print("[1/2] SFT policy, reward model and credit diagnostics", flush=True)
    _, _, _, info = load_or_train(setup, cache)
    credit = credit_report(setup, cache, oracle=True)
    # the slowest setting (most Adam updates per step) first, so that the two workers finish together
    order = sorted(
        settings,
        key=lambda k: -settings[k].steps * settings[k].ppo_epochs * settings[k].batch_size / settings[k].minibatch_size,
    )
    jobs = [
        runs.Run(m, s, setup, replace(settings[name], lam=lam), cache, tags=(("setting", name), ("lam", lam)))
        for name in order
        for lam in lams[name]
        for m in methods
        for s in seeds
    ]
    plan = ", ".join(f"{name} at GAE lambda {'/'.join(f'{x:g}' for x in lams[name])}" for name in settings)
    print(
        f"[2/2] {len(jobs)} PPO runs ({plan}; {len(methods)} methods x {len(seeds)} seeds, {args.workers} workers)",
        flush=True,
    )
    progress = runs.progress_printer(
        len(jobs),
        t0,
        lambda res: f"{res['setting']:5s} lambda {res['lam']:g}  {res['method']:14s} seed {res['seed']:5d}",
    )
    results = runs.run_all(jobs, args.workers, progress)
    sections = analyse(results, methods, settings, lams)
    meta = {
        "title": f"Oracle credit and the paper's PPO settings: {len(seeds)} seeds per method",
        "command": "dense-rlhf experiment " + " ".join(argv),
        "name": args.name,
        "methods": methods,
        "settings": {k: asdict(v) for k, v in settings.items()},
        "lams": lams,
        "seeds": seeds,
        "workers": args.workers,
        "wall_seconds": time.time() - t0,
        "run_seconds": sum(r["seconds"] for r in results),
        "run_cpu_seconds": sum(r["cpu_seconds"] for r in results),
        "setup": asdict(setup),
    }
    write_outputs(sections, credit, info, meta, Path(args.out))
    print()
    print(markdown(sections, credit, info, meta).split("## Steps to the experiment's threshold")[0])
    print(f"wrote {Path(args.out) / args.name}.json/.md/.png ({meta['wall_seconds']:.0f}s)")
    return 0
