"""``dense-rlhf experiment``: the full multi-seed comparison of reward methods on the sentiment task.

Trains (or reuses from the cache) the SFT policy and the reward model, measures the credit diagnostics,
runs PPO for every (method, seed), and writes ``<name>.json`` (every curve), ``<name>.md`` (the table) and
``<name>.png`` (mean curves with seed bands) under ``--out``. Everything follows from ``--seed``.
``--study length`` runs the completion-length sweep instead (``dense_rlhf.study.length``), ``--study oracle`` the
oracle-credit methods in our PPO settings and the paper's (``dense_rlhf.study.oracle``), ``--study frontier``
the final score against the final KL over several KL strengths (``dense_rlhf.study.frontier``), ``--study rows``
label-free alternatives to ABC's row screened with the credit diagnostics (``dense_rlhf.study.free_rows``).
``--ppo paper`` runs PPO the paper's way (``config.PAPER_PPO``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from dense_rlhf.study import free_rows, frontier, length, oracle, report, runs
from dense_rlhf.study import methods as M
from dense_rlhf.study.config import SETUP, parse_args, ppo_settings
from dense_rlhf.study.diagnostics import credit_report
from dense_rlhf.study.library_log import quiet_transformers
from dense_rlhf.study.models import QUICK_SETUP, cache_root, load_or_train, load_or_train_chat_rm
from dense_rlhf.study.stats import summarise


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    t0 = time.time()
    methods = [m.strip() for m in (args.methods or ",".join(M.METHODS)).split(",") if m.strip()]
    for m in methods:
        if m not in M.ALL_METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {M.ALL_METHODS}")
    setup = replace(SETUP, seed=args.seed, **args.setup_overrides, **(QUICK_SETUP if args.quick else {}))
    settings = ppo_settings(args)
    if args.study == "oracle":
        args.name = args.name or "oracle_study"
        return oracle.main(args, argv, setup, settings)
    if args.study == "frontier":
        args.name = args.name or "frontier"
        return frontier.main(args, argv, setup, settings)
    if args.study == "rows":
        args.name = args.name or "free_rows"
        return free_rows.main(args, argv, setup)
    (base,) = settings.values()
    if args.study == "length":
        args.name = args.name or "length_study"
        return length.main(args, argv, setup, base)
    args.name = args.name or "experiment"
    lams = [float(x) for x in (args.lam or "0.95,0.8").split(",") if x.strip()]
    cache = cache_root(args.cache_dir)
    print(f"[1/3] SFT policy and reward model (cache: {cache})")
    _, _, _, info = load_or_train(setup, cache)
    aligned = any(m in M.ALIGNED_METHODS for m in methods)
    if aligned:
        _, _, chat_info = load_or_train_chat_rm(setup, cache)
        info["chat_reward_model"] = chat_info["reward_model"]
    print("[2/3] credit diagnostics")
    credit = credit_report(setup, cache, aligned=aligned)
    seeds = [args.seed * 1000 + i for i in range(args.seeds)]
    sections = []
    for k, lam in enumerate(lams):
        ppo = replace(base, lam=lam)
        jobs = [runs.Run(m, s, setup, ppo, str(cache)) for m in methods for s in seeds]
        print(
            f"[3/3] study {k + 1}/{len(lams)}, GAE lambda {lam}: {len(jobs)} PPO runs ({len(methods)} methods x "
            f"{len(seeds)} seeds, {ppo.steps} steps, {args.workers} workers)"
        )
        progress = runs.progress_printer(len(jobs), t0, lambda res: f"{res['method']:8s} seed {res['seed']:5d}")
        t_study = time.time()
        results = runs.run_all(jobs, args.workers, progress)
        summary = summarise(results)
        name = f"{args.name}_lam{lam:g}"
        meta = {
            "title": (
                f"Sentiment task, GAE lambda {lam:g}: reward methods over {len(seeds)} seeds, {ppo.steps} PPO steps"
            ),
            "command": "dense-rlhf experiment " + " ".join(argv),
            "study_seconds": time.time() - t_study,
            "reward_model": info["reward_model"],
            "chat_reward_model": info.get("chat_reward_model"),
            "config": report.config_dict(setup, ppo),
            "seeds": seeds,
        }
        paths = report.write_outputs(Path(args.out), name, results, summary, credit, meta)
        table = report.markdown_table(
            summary,
            credit if k == 0 else None,
            info["reward_model"] if k == 0 else None,
            info.get("chat_reward_model") if k == 0 else None,
        )
        sections.append(f"## GAE lambda = {lam:g}\n\n![curves]({Path(paths['plot']).name})\n\n{table}")
        print()
        print(table)
    wall = time.time() - t0
    index = Path(args.out) / f"{args.name}.md"
    index.write_text(
        f"# Reward methods on the sentiment task\n\nCommand: `dense-rlhf experiment {' '.join(argv)}`; "
        f"wall time {wall / 60:.1f} min on this machine ({args.workers} workers). Every curve is in "
        f"`{args.name}_lam*.json`.\n\n" + "\n".join(sections)
    )
    print(f"wrote {index} and the per-lambda .json/.md/.png ({wall:.0f}s)")
    return 0
