"""``dense-rlhf experiment``: the full multi-seed comparison of reward methods on the sentiment task.

Trains (or reuses from the cache) the SFT policy and the reward model, measures the credit diagnostics,
runs PPO for every (method, seed), and writes ``<name>.json`` (every curve), ``<name>.md`` (the table) and
``<name>.png`` (mean curves with seed bands) under ``--out``. Everything follows from ``--seed``.
``--study length`` runs the completion-length sweep instead (``dense_rlhf.study.length``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from dense_rlhf.cli import default_out
from dense_rlhf.study import methods as M
from dense_rlhf.study import runs as study
from dense_rlhf.study.models import QUICK_SETUP, SetupConfig, cache_root, load_or_train, load_or_train_chat_rm
from dense_rlhf.rl.ppo import PPOConfig

# The study's settings (see experiments/README.md for why these values).
SETUP = SetupConfig()
PPO = PPOConfig()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dense-rlhf experiment", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="PPO seeds per method (default 5)")
    p.add_argument("--steps", type=int, default=PPO.steps, help=f"PPO steps per run (default {PPO.steps})")
    p.add_argument("--study", choices=("methods", "length"), default="methods",
                   help="methods: every reward method at one completion length (default); length: the "
                        "completion-length sweep (sparse, ABC 0.8, prefix 0.8, uniform by default)")
    p.add_argument("--lengths", default="10,20,40,80", help="completion lengths of --study length (default 10,20,40,80)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of " + ",".join(M.ALL_METHODS) + " (default: all but bpe-*; "
                        "--study length: sparse,abc-0.8,prefix-0.8,uniform)")
    p.add_argument("--seed", type=int, default=0, help="master seed: SFT/RM training and the PPO seeds")
    p.add_argument("--kl-coef", type=float, default=PPO.kl_coef)
    p.add_argument("--lr", type=float, default=PPO.lr)
    p.add_argument("--batch-size", type=int, default=PPO.batch_size)
    p.add_argument("--lam", default=None,
                   help="GAE lambda; a comma-separated list runs one study per value (default 0.95,0.8; "
                        "--study length: one value, default 0.95)")
    p.add_argument("--whiten-rewards", action="store_true")
    p.add_argument("--workers", type=int, default=study.default_workers(), help="parallel runs (1 thread each)")
    p.add_argument("--out", default=default_out("experiment"),
                   help=f"output folder (default ./{default_out('experiment')}; `make experiment` writes the "
                        "repository's committed results, experiments/results)")
    p.add_argument("--name", default=None, help="output file stem (default experiment, or length_study)")
    p.add_argument("--rm-layers", type=int, default=SETUP.rm_n_layer,
                   help=f"reward-model layers (default {SETUP.rm_n_layer}); ABC reads the last one")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the main process (SFT/RM training); runs always use 1 each")
    p.add_argument("--quick", action="store_true", help="the demo's small SFT/RM setup (smoke test only)")
    p.add_argument("--cache-dir", default=None, help="model cache (default $DENSE_RLHF_CACHE or ~/.cache/dense-rlhf)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    study.quiet_transformers()
    t0 = time.time()
    methods = [m.strip() for m in (args.methods or ",".join(M.METHODS)).split(",") if m.strip()]
    for m in methods:
        if m not in M.ALL_METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {M.ALL_METHODS}")
    setup = replace(SETUP, seed=args.seed, rm_n_layer=args.rm_layers, **(QUICK_SETUP if args.quick else {}))
    base = replace(PPO, steps=args.steps, kl_coef=args.kl_coef, lr=args.lr, batch_size=args.batch_size,
                   whiten_rewards=args.whiten_rewards)
    if args.study == "length":
        from dense_rlhf.study import length

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
    credit = study.credit_report(setup, cache, aligned=aligned)
    seeds = [args.seed * 1000 + i for i in range(args.seeds)]
    jobs = [(m, s) for m in methods for s in seeds]
    sections = []
    for k, lam in enumerate(lams):
        ppo = replace(base, lam=lam)
        print(f"[3/3] study {k + 1}/{len(lams)}, GAE lambda {lam}: {len(jobs)} PPO runs ({len(methods)} methods x "
              f"{len(seeds)} seeds, {ppo.steps} steps, {args.workers} workers)")
        done = [0]

        def progress(res, done=done):
            done[0] += 1
            tail = res["curves"]["gt_score"][-10:]
            print(f"  {done[0]:3d}/{len(jobs)}  {res['method']:8s} seed {res['seed']:5d}  final true score "
                  f"{sum(tail) / len(tail):+.2f}  ({res['seconds']:.0f}s, {time.time() - t0:.0f}s elapsed)", flush=True)

        t_study = time.time()
        results = study.run_many(jobs, setup, ppo, cache, workers=args.workers, progress=progress)
        summary = study.summarise(results)
        name = f"{args.name}_lam{lam:g}"
        meta = {
            "title": f"Sentiment task, GAE lambda {lam:g}: reward methods over {len(seeds)} seeds, {ppo.steps} PPO steps",
            "command": "dense-rlhf experiment " + " ".join(argv),
            "study_seconds": time.time() - t_study,
            "reward_model": info["reward_model"],
            "chat_reward_model": info.get("chat_reward_model"),
            "config": study.config_dict(setup, ppo),
            "seeds": seeds,
        }
        paths = study.write_outputs(Path(args.out), name, results, summary, credit, meta)
        table = study.markdown_table(summary, credit if k == 0 else None, info["reward_model"] if k == 0 else None,
                                     info.get("chat_reward_model") if k == 0 else None)
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
