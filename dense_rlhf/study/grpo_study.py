"""``dense-rlhf grpo-study``: critic-free GRPO with ABC's token-level credit on the sentiment task, beside PPO.

Every run starts from the same cached SFT policy and reward model as ``dense-rlhf experiment``, with the same
seeds, and generates 32 completions per step: GRPO samples 8 prompts x G = 4, PPO 32 prompts. Both make 8
Adam updates per step (4 epochs of 2 minibatches of 16) at the same learning rate. Methods:

- ``grpo-plain``: scheme 1, every token gets its completion's group-normalised advantage A_i;
- ``grpo-credit-<beta>``: scheme 2, ``A[i, t] = A_i * n_i * (beta * alpha[i, t] + (1 - beta) / n_i)``;
- ``grpo-dense-<abc beta>``: scheme 3, group-normalised return-to-go of ABC's per-token rewards;
- ``ppo-<method>``: ``dense_rlhf.rl.ppo`` with a method of ``dense-rlhf experiment`` (``ppo-sparse``,
  ``ppo-abc-0.8`` ...), GAE lambda 0.95, re-run here so that every curve comes from this code and command.

``alpha`` is ABC's credit: the reward model's last-layer attention row from ``[EOS]``, captured with
``capture_reward_attention``, restricted to the completion and normalised (``dense_rewards`` with beta 1 and
score 1). The schemes are in ``dense_rlhf.rl.grpo``; the statistics (threshold, steps to threshold, final
score, late spread, final KL) are ``dense_rlhf.study.runs.summarise``'s. Writes ``<name>.json`` (every curve),
``<name>.md`` (the table) and ``<name>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dense_rlhf.ops import dense_rewards
from dense_rlhf.rl import grpo
from dense_rlhf.rl.common import Policy
from dense_rlhf.rl.ppo import PPOConfig
from dense_rlhf.study import methods as M
from dense_rlhf.study import runs
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.models import QUICK_SETUP, SetupConfig, cache_root, load_or_train

# Headline methods (scheme 2 and 3 settings fixed before any run; see experiments/README.md), then the two
# sensitivity rows (all of the credit on attention; ABC beta 1), then the PPO baselines.
METHODS = ["grpo-plain", "grpo-credit-0.5", "grpo-dense-0.8", "grpo-credit-1.0", "grpo-dense-1.0", "ppo-sparse",
           "ppo-abc-0.8"]
GRPO = grpo.GRPOConfig()
PPO = PPOConfig(lam=0.95)


def parse_method(name: str) -> tuple[str, dict | str]:
    """("grpo", GRPOConfig overrides) or ("ppo", the reward method of dense_rlhf.study.methods)."""
    if name == "grpo-plain":
        return "grpo", {"scheme": "plain"}
    for prefix, scheme, key in (("grpo-credit-", "credit", "credit_beta"), ("grpo-dense-", "dense", "abc_beta")):
        if name.startswith(prefix):
            try:
                return "grpo", {"scheme": scheme, key: float(name[len(prefix):])}
            except ValueError:
                break
    if name.startswith("ppo-") and name[4:] in M.METHODS:
        return "ppo", name[4:]
    raise ValueError(f"unknown method {name!r}: use grpo-plain, grpo-credit-<beta>, grpo-dense-<abc beta> or "
                     f"ppo-<one of {M.METHODS}>")


def label(name: str) -> str:
    kind, spec = parse_method(name)
    if kind == "ppo":
        return f"PPO, {M.LABELS[spec]}"
    if spec["scheme"] == "plain":
        return "GRPO plain (scheme 1)"
    if spec["scheme"] == "credit":
        return f"GRPO credit-weighted, beta={spec['credit_beta']:g} (scheme 2)"
    return f"GRPO dense returns, ABC beta={spec['abc_beta']:g} (scheme 3)"


def make_score_fn(rm, codec: task.Codec):
    """GRPO's ``score_fn``: reward-model scores [B] and ABC's credit alpha [B, N] (rows summing to 1), from one
    reward-model forward over ``seq + [EOS]`` with the last layer's rows captured, plus the step's metrics."""

    def score_fn(ro: grpo.GroupRollout):
        ids, mask = M.rm_inputs(codec, ro.seq)
        score, rows = M.score_with_attention(rm, ids)
        p, n_new = task.PROMPT_LEN, ro.seq.shape[1] - task.PROMPT_LEN
        alpha = dense_rewards(rows, torch.ones_like(score), mask, beta=1.0)[:, p : p + n_new]
        gt = task.scores_of(codec, ro.seq)
        return score, alpha, {"gt_score": gt.mean().item(), "rm_score": score.mean().item()}

    return score_fn


def run_grpo_one(method: str, seed: int, setup: SetupConfig, cfg: grpo.GRPOConfig, cache_dir=None) -> dict:
    """One GRPO run from the cached SFT policy with one advantage scheme; returns its per-step curves."""
    _, spec = parse_method(method)
    codec, sft, rm, _ = load_or_train(setup, cache_dir, log=None)
    torch.manual_seed(seed)
    policy = Policy(copy.deepcopy(sft), codec.special_ids)
    t0 = time.time()
    history = grpo.train(policy, sft, runs.prompt_sampler(codec, 10_000 + seed), setup.completion_len,
                         make_score_fn(rm, codec), replace(cfg, **spec), seed)
    curves = {key: [h[key] for h in history] for key in ("gt_score", "rm_score", "kl", "pg_loss", "kl_loss")}
    return {"method": method, "seed": seed, "seconds": time.time() - t0, "curves": curves}


def _run_job(args) -> dict:
    method, seed, setup, grpo_cfg, ppo_cfg, cache_dir = args
    torch.set_num_threads(1)
    runs.quiet_transformers()
    kind, spec = parse_method(method)
    if kind == "grpo":
        return run_grpo_one(method, seed, setup, grpo_cfg, cache_dir)
    res = runs.run_one(spec, seed, setup, ppo_cfg, cache_dir)
    return {**res, "method": method}


def run_many(jobs, setup, grpo_cfg, ppo_cfg, cache_dir=None, workers=1, progress=None) -> list[dict]:
    """All (method, seed) runs in ``workers`` spawned processes with one torch thread each."""
    args = [(m, s, setup, grpo_cfg, ppo_cfg, str(cache_dir) if cache_dir else None) for m, s in jobs]
    order = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in jobs))}
    results = []
    if workers <= 1:
        for a in args:
            results.append(_run_job(a))
            if progress:
                progress(results[-1])
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for res in pool.imap_unordered(_run_job, args):
                results.append(res)
                if progress:
                    progress(res)
    results.sort(key=lambda r: (order[r["method"]], r["seed"]))
    return results


# ------------------------------------------------------------------------------------------------ outputs


def _fmt(x, digits=1):
    return "never" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _versus_plain(steps, base, n_steps) -> tuple[str, bool]:
    """Steps to threshold relative to plain GRPO's, as text, and whether it meets the target (<= 0.8x)."""
    if steps is None:
        return "never reached", False
    if base is None:
        return f"below {steps / n_steps:.2f} (plain GRPO never within {n_steps} steps)", True
    return f"{steps / base:.2f}", steps / base <= 0.8


def markdown_table(summary: dict, methods: list[str]) -> str:
    st = summary["methods"]
    base = st.get("grpo-plain", {}).get("steps_to_threshold")
    lines = [
        f"Threshold: {summary['threshold']:.2f} = SFT score {summary['sft_score']:.2f} + 80% of the way to the best "
        f"method's final score {summary['best_final']:.2f} ({summary['steps']} steps of 32 completions each).",
        "",
        "| method | seeds | steps to threshold (seed mean, 5-step MA) | x plain GRPO | per-seed median steps "
        "(seeds reaching) | final score mean ± std | late-training spread | final KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        s = st.get(m)
        if s is None:
            continue
        ratio = _versus_plain(s["steps_to_threshold"], base, summary["steps"])[0] if "grpo-plain" in st else ""
        lines.append(
            f"| {label(m)} | {s['seeds']} | {_fmt(s['steps_to_threshold'])} | {ratio} | "
            f"{_fmt(s['median_seed_steps'])} ({s['seeds_reaching']}/{s['seeds']}) | "
            f"{s['final_mean']:.2f} ± {s['final_std']:.2f} | {s['late_spread']:.2f} | {s['final_kl']:.2f} |"
        )
    if "grpo-plain" in st:
        lines += ["", "Target: scheme 2 or 3 reaches the threshold in at most 0.8x plain GRPO's steps."]
        for m in methods:
            if m in st and m != "grpo-plain" and m.startswith("grpo-"):
                text, met = _versus_plain(st[m]["steps_to_threshold"], base, summary["steps"])
                lines.append(f"- {label(m)}: {text} x plain GRPO's steps ({'met' if met else 'not met'})")
    return "\n".join(lines) + "\n"


def plot(summary: dict, methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in methods:
        s = summary["methods"].get(m)
        if s is None:
            continue
        mean, std = runs.moving_average(s["mean_curve"]), runs.moving_average(s["std_curve"])
        xs = list(range(len(mean)))
        headline = m in METHODS[:3] or m.startswith("ppo-")
        ax.plot(xs, mean, label=label(m), ls="--" if m.startswith("ppo-") else "-", lw=1.8 if headline else 1.0)
        ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.12)
    ax.axhline(summary["threshold"], color="k", ls=":", lw=1, label="threshold")
    ax.set_xlabel("step (32 completions each)")
    ax.set_ylabel("ground-truth score (5-step MA, ±1 std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dense-rlhf grpo-study", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds per method (default 5)")
    p.add_argument("--steps", type=int, default=GRPO.steps, help=f"steps per run (default {GRPO.steps})")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated; default " + ",".join(METHODS))
    p.add_argument("--seed", type=int, default=0, help="master seed: SFT/RM training and the run seeds")
    p.add_argument("--kl-coef", type=float, default=GRPO.kl_coef, help="GRPO's KL loss coefficient")
    p.add_argument("--group-size", type=int, default=GRPO.group_size,
                   help=f"G (default {GRPO.group_size}); prompts per step = PPO's batch / G")
    p.add_argument("--workers", type=int, default=runs.default_workers(), help="parallel runs (1 thread each)")
    p.add_argument("--out", default="experiments/results", help="output folder")
    p.add_argument("--name", default="grpo_study", help="output file stem")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process (SFT/RM training)")
    p.add_argument("--quick", action="store_true", help="the demo's small SFT/RM setup (smoke test only)")
    p.add_argument("--cache-dir", default=None, help="model cache (default $DENSE_RLHF_CACHE or ~/.cache/dense-rlhf)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs.quiet_transformers()
    t0 = time.time()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        try:
            parse_method(m)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    if PPO.batch_size % args.group_size:
        raise SystemExit(f"--group-size {args.group_size} must divide PPO's batch of {PPO.batch_size} completions")
    setup = replace(SetupConfig(), seed=args.seed, **(QUICK_SETUP if args.quick else {}))
    grpo_cfg = replace(GRPO, steps=args.steps, kl_coef=args.kl_coef, group_size=args.group_size,
                       prompts_per_step=PPO.batch_size // args.group_size)
    ppo_cfg = replace(PPO, steps=args.steps)
    cache = cache_root(args.cache_dir)
    print(f"[1/2] SFT policy and reward model (cache: {cache})")
    _, _, _, info = load_or_train(setup, cache)
    seeds = [args.seed * 1000 + i for i in range(args.seeds)]
    jobs = [(m, s) for m in methods for s in seeds]
    print(f"[2/2] {len(jobs)} runs ({len(methods)} methods x {len(seeds)} seeds, {args.steps} steps, "
          f"{args.workers} workers)")
    done = [0]

    def progress(res):
        done[0] += 1
        tail = res["curves"]["gt_score"][-10:]
        print(f"  {done[0]:3d}/{len(jobs)}  {res['method']:16s} seed {res['seed']:5d}  final true score "
              f"{sum(tail) / len(tail):+.2f}  ({res['seconds']:.0f}s, {time.time() - t0:.0f}s elapsed)", flush=True)

    t_runs = time.time()
    results = run_many(jobs, setup, grpo_cfg, ppo_cfg, cache, workers=args.workers, progress=progress)
    summary = runs.summarise(results)
    wall = time.time() - t0
    title = f"Sentiment task: GRPO with ABC token-level advantages vs PPO, {len(seeds)} seeds, {args.steps} steps"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary, methods)
    command = "dense-rlhf grpo-study " + " ".join(argv)
    models = "models from the cache" if info.get("cached") else "models trained in this command"
    meta = {
        "title": title,
        "command": command.strip(),
        "wall_seconds": wall,
        "runs_seconds": time.time() - t_runs,
        "workers": args.workers,
        "models_cached": bool(info.get("cached")),
        "reward_model": info["reward_model"],
        "config": {"setup": asdict(setup), "grpo": asdict(grpo_cfg), "ppo": asdict(ppo_cfg)},
        "seeds": seeds,
    }
    (out / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1))
    (out / f"{args.name}.md").write_text(
        f"# {title}\n\nCommand: `{command.strip()}`; wall time {wall / 60:.1f} min on this machine "
        f"({args.workers} workers, {models}). Every curve is in `{args.name}.json`.\n\n"
        f"![curves]({args.name}.png)\n\n{table}")
    plot(summary, methods, out / f"{args.name}.png", title)
    print()
    print(table)
    print(f"wrote {out / args.name}.json/.md/.png ({wall:.0f}s)")
    return 0
