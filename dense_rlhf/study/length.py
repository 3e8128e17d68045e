"""``dense-rlhf experiment --study length``: does dense credit help more as completions get longer?

Under the sparse reward, GAE carries the terminal score back to token t scaled by about lambda^(T - t) while
the critic is still poor; dense rewards put it where it was earned. That predicts that the edge of a dense
method over sparse grows with the completion length T. This study measures it: for each completion length
(default 10, 20, 40, 80 tokens) an SFT policy and a reward model are trained for that length, the credit
diagnostics are measured, and PPO runs every (method, seed) at one GAE lambda (default 0.95, the paper's).

Per length, each dense method's steps to threshold against sparse's, for two thresholds, both 80% of the way
from the SFT score: to sparse's own final score ("sparse's level", the primary measure: sparse reaches it by
construction, so the ratio is always defined and does not depend on which other methods are run) and to the best
method's final score (``stats.summarise``, the definition of ``dense-rlhf experiment``). Each ratio is taken from
the seed-mean curves (the point) and per seed, paired with the sparse run of the same seed (same prompts); a run
that never reaches the threshold counts as the number of PPO steps and is marked as censored.

Everything (training, diagnostics, runs) goes through one pool of single-threaded worker processes, the longest
lengths first. Writes ``<name>.json`` (every curve), ``<name>.md`` (tables) and ``<name>.png`` (the ratios
against completion length, with every seed) under ``--out``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from dense_rlhf.rl.ppo import PPOConfig
from dense_rlhf.study import methods as M
from dense_rlhf.study import report, runs, stats
from dense_rlhf.study.config import ExperimentOptions
from dense_rlhf.study.diagnostics import credit_report
from dense_rlhf.study.library_log import quiet_transformers
from dense_rlhf.study.models import SetupConfig, load_or_train
from dense_rlhf.study.plots import pyplot, save

LENGTHS = (10, 20, 40, 80)
METHODS = ("sparse", "abc-0.8", "prefix-0.8", "uniform")
LAM = 0.95


# ------------------------------------------------------------------------------------------------ the work


def _prepare(job):
    """Train (or load) the SFT policy and reward model of one length, then its credit diagnostics."""
    setup, cache, threads = job
    torch.set_num_threads(threads)
    quiet_transformers()
    t0 = time.time()
    _, _, _, info = load_or_train(setup, cache, log=None)
    t1 = time.time()
    credit = credit_report(setup, cache)
    return {
        "completion_len": setup.completion_len,
        "info": info,
        "credit": credit,
        "train_seconds": t1 - t0,
        "diagnostics_seconds": time.time() - t1,
    }


# ------------------------------------------------------------------------------------------------ outputs


def _ratio_table(per_length: dict, key: str, dense: list[str], steps: int) -> list[str]:
    lines = [
        "| completion tokens | threshold | sparse steps | " + " | ".join(M.LABELS[m] for m in dense) + " |",
        "|---|---|---|" + "---|" * len(dense),
    ]
    for length in sorted(per_length):
        d = per_length[length][key]
        cells = []
        for m in dense:
            r = d["ratios"][m]
            if r["steps"] is None or r["sparse_steps"] is None or r["sparse_steps"] == 0:
                head = (
                    r["text"]
                    if r["steps"] is None
                    else f"{r['text'].split(' (')[0]} ({r['steps']} steps; "
                    + ("sparse never)" if r["sparse_steps"] is None else "sparse at step 0)")
                )
            else:
                head = f"{r['text']} ({r['steps']} steps)"
            cells.append(f"{head} {report.seed_ratios(r)}")
        sparse_steps = d["ratios"][dense[0]]["sparse_steps"] if dense else None
        lines.append(
            f"| {length} | {d['threshold']:.2f} | {sparse_steps if sparse_steps is not None else 'never'} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def markdown(per_length: dict, meta: dict) -> str:
    lengths = sorted(per_length)
    methods = meta["methods"]
    dense = [m for m in methods if m != "sparse"]
    lines = [
        f"# {meta['title']}",
        "",
        f"Command: `{meta['command']}`; wall time {meta['wall_seconds'] / 60:.1f} min ({meta['workers']} workers, "
        f"one torch thread each; training and diagnostics {meta['prepare_seconds'] / 60:.1f} min, PPO runs "
        f"{meta['runs_seconds'] / 60:.1f} min). Every curve is in `{meta['name']}.json`; the figure is "
        f"`{meta['name']}.png`.",
        "",
        "Each cell: the dense method's steps to the threshold over sparse's, from the seed-mean curves (5-step moving "
        "average), the method's own steps in brackets; then [median; range] of the per-seed ratios (dense seed s "
        f"against sparse seed s; * = some run never reached the threshold and counts as {meta['steps']} steps). "
        "Below 1: faster than sparse.",
        "",
        "## Steps to sparse's level (80% of the way from the SFT score to sparse's own final score)",
        "",
        *_ratio_table(per_length, "sparse_level", dense, meta["steps"]),
        "",
        "## Steps to the experiment's threshold (80% of the way to the best method's final score)",
        "",
        *_ratio_table(per_length, "best_threshold", dense, meta["steps"]),
        "",
        "## Final true score (mean ± std over seeds of the last 10 steps) and final KL",
        "",
        "| completion tokens | " + " | ".join(M.LABELS[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for length in lengths:
        stats = per_length[length]["summary"]["methods"]
        lines.append(
            f"| {length} | "
            + " | ".join(
                f"{stats[m]['final_mean']:.2f} ± {stats[m]['final_std']:.2f} (KL {stats[m]['final_kl']:.1f})"
                for m in methods
            )
            + " |"
        )
    lines += [
        "",
        "## Reward models and credit diagnostics by length (completions sampled from each SFT policy)",
        "",
        "Spearman rho and top-k overlap of |share| against |leave-one-out credit|, sign agreement on credited tokens "
        "(see `dense_rlhf/study/diagnostics.py`); prefix tracking: Pearson r between the reward model's score of "
        "each prefix and the hidden score of the same prefix.",
        "",
        "| completion tokens | RM accuracy vs hidden order | corr(RM, hidden score) | ABC: Spearman / top-k / sign "
        "| prefix diff.: Spearman / top-k / sign | prefix tracking | random top-k |",
        "|---|---|---|---|---|---|---|",
    ]
    for length in lengths:
        d = per_length[length]
        rm, credit = d["info"]["reward_model"], d["credit"]["sft_samples"]
        abc, prefix = credit["abc"], credit["prefix"]
        tracking = credit.get("prefix_tracking")
        lines.append(
            f"| {length} | {rm['true_order_accuracy']:.3f} | {rm['score_correlation']:.3f} | "
            f"{abc['spearman']:.2f} / {abc['topk_overlap']:.2f} / {abc['sign_agreement']:.2f} | "
            f"{prefix['spearman']:.2f} / {prefix['topk_overlap']:.2f} / {prefix['sign_agreement']:.2f} | "
            f"{'' if tracking is None else f'{tracking:.2f}'} | {abc['random_topk_overlap']:.2f} |"
        )
    lines += ["", "## Per length", ""]
    for length in lengths:
        d = per_length[length]
        rm = d["info"]["reward_model"]
        lines += [
            f"### {length} completion tokens",
            "",
            f"Reward model (held-out pairs): accuracy {rm['label_accuracy']:.3f} against the Bradley-Terry labels, "
            f"{rm['true_order_accuracy']:.3f} against the hidden-score order, corr(RM score, hidden score) "
            f"{rm['score_correlation']:.3f}. Training {d['train_seconds']:.0f} s, diagnostics "
            f"{d['diagnostics_seconds']:.0f} s, PPO runs {d['run_seconds']:.0f} s of worker time.",
            "",
            report.markdown_table(d["summary"], d["credit"], None).strip(),
            "",
        ]
    return "\n".join(lines) + "\n"


def plot(per_length: dict, methods: list[str], path: Path, title: str) -> None:
    """Each dense method's steps to sparse's level over sparse's against the completion length: the seed-mean
    curves' ratio and every seed's."""
    lengths = sorted(per_length)
    dense = [m for m in methods if m != "sparse"]
    colours = {"abc-0.8": "tab:blue", "prefix-0.8": "tab:orange", "uniform": "tab:gray"}
    fig, ax = pyplot().subplots(figsize=(7.5, 4.8))
    for k, m in enumerate(dense):
        colour = colours.get(m, f"C{k + 3}")
        offset = (k - (len(dense) - 1) / 2) * 0.035
        xs = [length * 2**offset for length in lengths]
        points = [per_length[length]["sparse_level"]["ratios"][m]["mean_curve_ratio"] for length in lengths]
        ax.plot(
            [x for x, p in zip(xs, points) if p is not None],
            [p for p in points if p is not None],
            "o-",
            color=colour,
            lw=2,
            ms=7,
            label=f"{M.LABELS[m]} (seed-mean curves)",
        )
        for x, length in zip(xs, lengths):
            r = per_length[length]["sparse_level"]["ratios"][m]
            for value, censored in zip(r["per_seed"], r["per_seed_censored"]):
                ax.scatter([x], [value], s=18, color=colour, alpha=0.45, marker="x" if censored else ".", linewidths=1)
    ax.axhline(1.0, color="k", lw=1, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(x) for x in lengths])
    ax.minorticks_off()
    ax.set_xlabel("completion length (tokens)")
    ax.set_ylabel("steps to sparse's level, method / sparse")
    ax.set_title(title, fontsize=10)
    ax.scatter([], [], s=18, color="k", alpha=0.45, marker=".", label="per seed (paired with sparse)")
    ax.scatter([], [], s=18, color="k", alpha=0.45, marker="x", label="per seed, a run never reached it")
    ax.legend(fontsize=8)
    save(fig, path)


# ------------------------------------------------------------------------------------------------ the command


def main(args: ExperimentOptions, argv: list[str], setup: SetupConfig, ppo: PPOConfig) -> int:
    """Run the study from ``dense-rlhf experiment``'s parsed arguments and its base setup and PPO settings."""
    t0 = time.time()
    lengths = sorted((int(x) for x in args.lengths.split(",") if x.strip()), reverse=True)
    methods = M.against_sparse(args.methods, METHODS, "length")
    lams = [float(x) for x in (args.lam or str(LAM)).split(",") if x.strip()]
    if len(lams) != 1:
        raise SystemExit("the length study runs one GAE lambda (--lam)")
    ppo = replace(ppo, lam=lams[0])
    cache = str(args.cache_dir) if args.cache_dir else None
    setups = {length: replace(setup, completion_len=length) for length in lengths}
    seeds = [args.seed * 1000 + i for i in range(args.seeds)]

    print(
        f"[1/2] SFT policy, reward model and credit diagnostics for completion lengths {sorted(lengths)} "
        f"({args.workers} workers)",
        flush=True,
    )
    prepared = {}

    def prepared_one(res):
        prepared[res["completion_len"]] = res
        rm = res["info"]["reward_model"]
        print(
            f"  {res['completion_len']:3d} tokens: reward model hidden-order accuracy {rm['true_order_accuracy']:.3f}, "
            f"corr {rm['score_correlation']:.3f}; ABC Spearman "
            f"{res['credit']['sft_samples']['abc']['spearman']:.2f}, prefix Spearman "
            f"{res['credit']['sft_samples']['prefix']['spearman']:.2f} ({res['train_seconds']:.0f}s + "
            f"{res['diagnostics_seconds']:.0f}s, {time.time() - t0:.0f}s elapsed)",
            flush=True,
        )

    runs.map_jobs(_prepare, [(setups[length], cache, 1) for length in lengths], args.workers, prepared_one)
    t_prepared = time.time()

    jobs = [
        runs.Run(m, s, setups[length], ppo, cache, tags=(("completion_len", length),))
        for length in lengths
        for m in methods
        for s in seeds
    ]
    print(
        f"[2/2] {len(jobs)} PPO runs ({len(lengths)} lengths x {len(methods)} methods x {len(seeds)} seeds, "
        f"{ppo.steps} steps, GAE lambda {ppo.lam:g}), longest completions first",
        flush=True,
    )
    progress = runs.progress_printer(
        len(jobs), t0, lambda res: f"{res['completion_len']:3d} tokens  {res['method']:10s} seed {res['seed']:5d}"
    )
    results = runs.run_all(jobs, args.workers, progress)
    t_runs = time.time()

    per_length = analyse(results, prepared, methods, ppo.steps)
    meta = {
        "title": f"Completion-length study: dense credit against sparse, GAE lambda {ppo.lam:g}, {len(seeds)} seeds, "
        f"{ppo.steps} PPO steps",
        "command": "dense-rlhf experiment " + " ".join(argv),
        "name": args.name,
        "methods": methods,
        "lengths": sorted(lengths),
        "seeds": seeds,
        "steps": ppo.steps,
        "workers": args.workers,
        "wall_seconds": time.time() - t0,
        "prepare_seconds": t_prepared - t0,
        "runs_seconds": t_runs - t_prepared,
        "config": report.config_dict(setup, ppo),
    }
    write_outputs(per_length, meta, Path(args.out))
    print()
    print(markdown(per_length, meta).split("## Final true score")[0])
    print(f"wrote {Path(args.out) / args.name}.json/.md/.png ({meta['wall_seconds']:.0f}s)")
    return 0


def analyse(results: list[dict], prepared: dict, methods: list[str], n_steps: int) -> dict:
    """Per completion length: the summary, the ratios against sparse for both thresholds, the runs, the models'
    metrics and credit diagnostics, and the time each part took."""
    per_length = {}
    for length in sorted(prepared):
        mine = sorted(
            (r for r in results if r["completion_len"] == length), key=lambda r: (methods.index(r["method"]), r["seed"])
        )
        summary = stats.summarise(mine)
        level = stats.sparse_level(summary)
        per_length[length] = {
            "summary": summary,
            "sparse_level": {
                "threshold": level,
                "ratios": stats.ratios(stats.steps_to(summary, mine, level), methods, n_steps),
            },
            "best_threshold": {
                "threshold": summary["threshold"],
                "ratios": stats.ratios(stats.steps_to(summary, mine, summary["threshold"]), methods, n_steps),
            },
            "runs": mine,
            "info": prepared[length]["info"],
            "credit": prepared[length]["credit"],
            "train_seconds": prepared[length]["train_seconds"],
            "diagnostics_seconds": prepared[length]["diagnostics_seconds"],
            "run_seconds": sum(r["seconds"] for r in mine),
        }
    return per_length


def write_outputs(per_length: dict, meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = meta["name"]
    (out / f"{name}.json").write_text(
        json.dumps({"meta": meta, "per_length": {str(k): v for k, v in per_length.items()}}, indent=1)
    )
    (out / f"{name}.md").write_text(markdown(per_length, meta))
    plot(per_length, meta["methods"], out / f"{name}.png", meta["title"])
