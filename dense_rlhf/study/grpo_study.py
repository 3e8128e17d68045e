"""``dense-rlhf grpo-study``: critic-free GRPO with ABC's token-level credit on the sentiment task, beside PPO.

Every run starts from the same cached SFT policy and reward model as ``dense-rlhf experiment``, with the same
seeds, and generates 32 completions per step: GRPO samples 8 prompts x G = 4, PPO 32 prompts. Both make 8
Adam updates per step (4 epochs of 2 minibatches of 16) at the same learning rate. Methods:

- ``grpo-plain``: scheme 1, every token gets its completion's group-normalised advantage A_i;
- ``grpo-credit-<beta>``: scheme 2, ``A[i, t] = A_i * n_i * (beta * alpha[i, t] + (1 - beta) / n_i)``;
- ``grpo-dense-<abc beta>``: scheme 3, group-normalised return-to-go of ABC's per-token rewards;
- ``ppo-<method>``: ``dense_rlhf.rl.ppo`` with a method of ``dense-rlhf experiment`` (``ppo-sparse``,
  ``ppo-abc-0.8`` ...), GAE lambda 0.95, re-run here so that every curve comes from this code and command.

GRPO names take an optional ``@kl<coefficient>`` (GRPO's KL-loss coefficient; default ``--kl-coef``).
``alpha`` is ABC's credit: the reward model's last-layer attention row from ``[EOS]``, captured with
``capture_reward_attention``, restricted to the completion and normalised (``dense_rewards`` with beta 1 and
score 1). The schemes are in ``dense_rlhf.rl.grpo``. Final score, late spread and final KL are
``dense_rlhf.study.runs.summarise``'s; the threshold is plain GRPO's (see :func:`summarise`), and the score at
a KL budget compares methods at equal distance from the reference. Writes ``<name>.json`` (every curve),
``<name>.md`` (the tables) and ``<name>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dense_rlhf.capture import score_with_credit
from dense_rlhf.rl import grpo
from dense_rlhf.rl.common import Policy
from dense_rlhf.rl.ppo import PPOConfig
from dense_rlhf.cli import default_out
from dense_rlhf.study import methods as M
from dense_rlhf.study import runs
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.models import QUICK_SETUP, SetupConfig, cache_root, load_or_train

# GRPO's KL-loss coefficients: the first (the default of --kl-coef) is the usual small one (DeepSeekMath used
# 0.04); the second, chosen by a pilot of plain GRPO on other seeds, holds plain GRPO near PPO's final KL.
KL_COEFS = (0.05, 0.15)
# Headline GRPO methods (scheme 2 and 3 settings fixed before any run; see experiments/README.md), the two
# sensitivity rows (all of the credit on attention; ABC beta 1), the headline methods again at the second KL
# coefficient, and the PPO baselines.
HEADLINE = ["grpo-plain", "grpo-credit-0.5", "grpo-dense-0.8"]
METHODS = (HEADLINE + ["grpo-credit-1.0", "grpo-dense-1.0"] + [f"{m}@kl{KL_COEFS[1]:g}" for m in HEADLINE]
           + ["ppo-sparse", "ppo-abc-0.8"])
KL_BUDGETS = (10.0, 20.0)  # nats per completion: near PPO's final KL, and twice that
GRPO = grpo.GRPOConfig(kl_coef=KL_COEFS[0])
PPO = PPOConfig(lam=0.95)


def parse_method(name: str) -> tuple[str, dict | str]:
    """("grpo", GRPOConfig overrides) or ("ppo", the reward method of dense_rlhf.study.methods). GRPO names
    take an optional ``@kl<coefficient>`` suffix; without it the run uses ``--kl-coef``."""
    base, _, kl = name.partition("@kl")
    spec = None
    if base == "grpo-plain":
        spec = {"scheme": "plain"}
    for prefix, scheme, key in (("grpo-credit-", "credit", "credit_beta"), ("grpo-dense-", "dense", "abc_beta")):
        if base.startswith(prefix):
            try:
                spec = {"scheme": scheme, key: float(base[len(prefix):])}
            except ValueError:
                spec = None
    if spec is not None:
        try:
            return "grpo", {**spec, **({"kl_coef": float(kl)} if kl else {})}
        except ValueError:
            pass
    elif base.startswith("ppo-") and base[4:] in M.METHODS and not kl:
        return "ppo", base[4:]
    raise ValueError(f"unknown method {name!r}: use grpo-plain, grpo-credit-<beta> or grpo-dense-<abc beta>, each "
                     f"with an optional @kl<coefficient>, or ppo-<one of {M.METHODS}>")


def kl_coef_of(name: str, default: float) -> float | None:
    """GRPO's KL coefficient of a method (None for PPO)."""
    kind, spec = parse_method(name)
    return spec.get("kl_coef", default) if kind == "grpo" else None


def label(name: str) -> str:
    kind, spec = parse_method(name)
    if kind == "ppo":
        return f"PPO, {M.LABELS[spec]}"
    kl = f", KL {spec['kl_coef']:g}" if "kl_coef" in spec else ""
    if spec["scheme"] == "plain":
        return f"GRPO plain (scheme 1){kl}"
    if spec["scheme"] == "credit":
        return f"GRPO credit-weighted, beta={spec['credit_beta']:g} (scheme 2){kl}"
    return f"GRPO dense returns, ABC beta={spec['abc_beta']:g} (scheme 3){kl}"


def make_score_fn(rm, codec: task.Codec):
    """GRPO's ``score_fn``: reward-model scores [B] and ABC's credit alpha [B, N] (rows summing to 1), from one
    reward-model forward over ``seq + [EOS]`` with the last layer's rows captured, plus the step's metrics."""

    def score_fn(ro: grpo.GroupRollout):
        ids, mask = M.rm_inputs(codec, ro.seq)
        score, credit = score_with_credit(rm, ids, None, mask)
        p, n_new = task.PROMPT_LEN, ro.seq.shape[1] - task.PROMPT_LEN
        alpha = credit[:, p : p + n_new]
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
    results = runs.map_jobs(_run_job, args, workers, progress)
    results.sort(key=lambda r: (order[r["method"]], r["seed"]))
    return results


# ------------------------------------------------------------------------------------------------ summary


def _score_at_kl(runs_of_method: list[dict], budget: float) -> tuple[float | None, int]:
    """Mean over seeds of the 5-step-MA score at the first step whose 5-step-MA KL reaches ``budget``, and the
    number of seeds whose KL got there."""
    values = []
    for r in runs_of_method:
        kl, score = runs.moving_average(r["curves"]["kl"]), runs.moving_average(r["curves"]["gt_score"])
        step = runs.first_reach(kl, budget)
        if step is not None:
            values.append(score[step])
    return (sum(values) / len(values) if values else None), len(values)


def summarise(results: list[dict], methods: list[str], default_kl: float) -> dict:
    """``runs.summarise``'s per-method statistics (final score, late spread, final KL), the score at each KL
    budget, and one section per GRPO KL coefficient whose threshold is plain GRPO's at that coefficient:

        threshold = SFT score + 0.8 (final score of plain GRPO - SFT score)

    with steps to threshold measured as in ``runs.summarise`` (seed mean, 5-step trailing MA; per seed too).
    PPO rows are in every section, for reference."""
    base = runs.summarise(results)
    stats = base["methods"]
    for m in stats:
        for key in ("steps_to_threshold", "per_seed_steps_to_threshold", "seeds_reaching", "median_seed_steps"):
            del stats[m][key]  # against runs.summarise's best-method threshold; the sections hold ours
        mine = [r for r in results if r["method"] == m]
        stats[m]["score_at_kl"] = {f"{k:g}": _score_at_kl(mine, k) for k in KL_BUDGETS}
        stats[m]["kl_curve"] = [sum(step) / len(step) for step in zip(*(r["curves"]["kl"] for r in mine))]
    coefs = list(dict.fromkeys(kl_coef_of(m, default_kl) for m in methods if m.startswith("grpo-")))
    sections = []
    for coef in coefs:
        members = [m for m in methods if kl_coef_of(m, default_kl) in (coef, None) and m in stats]
        plain = next((m for m in members if m.startswith("grpo-") and parse_method(m)[1]["scheme"] == "plain"), None)
        threshold = None
        if plain is not None:
            threshold = base["sft_score"] + 0.8 * (stats[plain]["final_mean"] - base["sft_score"])
        rows = {}
        for m in members:
            row = {"steps_to_threshold": None, "per_seed_steps_to_threshold": [], "seeds_reaching": 0,
                   "median_seed_steps": None}
            if threshold is not None:
                curves = [r["curves"]["gt_score"][: base["steps"]] for r in results if r["method"] == m]
                row = runs.threshold_stats(stats[m]["mean_curve"], curves, threshold)
            rows[m] = row
        sections.append({"kl_coef": coef, "reference": plain, "threshold": threshold, "rows": rows})
    return {"steps": base["steps"], "sft_score": base["sft_score"], "methods": stats, "sections": sections}


# ------------------------------------------------------------------------------------------------ outputs


def _fmt(x, digits=1):
    return "never" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _versus_plain(steps, base, n_steps) -> tuple[str, bool]:
    """Steps to threshold relative to plain GRPO's, as text, and whether it meets the target (<= 0.8x)."""
    if steps is None:
        return "never", False
    if base is None:
        return f"below {steps / n_steps:.2f} (plain never within {n_steps} steps)", True
    if base == 0:  # plain GRPO's threshold lies at or below the start: no ratio
        return "undefined (plain at step 0)", False
    return f"{steps / base:.2f}", steps / base <= 0.8


def markdown_table(summary: dict) -> str:
    stats, n_steps = summary["methods"], summary["steps"]
    budgets = [f"{k:g}" for k in KL_BUDGETS]
    lines = [f"SFT score {summary['sft_score']:.2f} (mean of every run's first step); {n_steps} steps of 32 "
             "completions each. Score at KL k: the 5-step-MA score when the 5-step-MA KL first reaches k nats, "
             "mean over the seeds that got there (count in brackets)."]
    for sec in summary["sections"]:
        ref = sec["reference"]
        base = sec["rows"][ref]["steps_to_threshold"] if ref else None
        head = (f"threshold {sec['threshold']:.2f} = SFT score + 80% of plain GRPO's gain at this coefficient"
                if ref else "no plain GRPO run at this coefficient: no threshold")
        columns = ["method", "steps to threshold", "x plain GRPO", "per-seed median steps (seeds reaching)",
                   "final score mean ± std", "late-training spread", "final KL"] + [f"score at KL {b}" for b in budgets]
        lines += ["", f"### GRPO KL coefficient {sec['kl_coef']:g}: {head}", "",
                  "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        for m, row in sec["rows"].items():
            s = stats[m]
            ratio = _versus_plain(row["steps_to_threshold"], base, n_steps)[0] if ref else ""
            at_kl = [f"{_fmt(v, 2)} ({n})" for v, n in (s["score_at_kl"][b] for b in budgets)]
            lines.append(f"| {label(m)} | {_fmt(row['steps_to_threshold'])} | {ratio} | "
                         f"{_fmt(row['median_seed_steps'])} ({row['seeds_reaching']}/{s['seeds']}) | "
                         f"{s['final_mean']:.2f} ± {s['final_std']:.2f} | {s['late_spread']:.2f} | "
                         f"{s['final_kl']:.2f} | " + " | ".join(at_kl) + " |")
        schemes = [m for m in sec["rows"] if m.startswith("grpo-") and m != ref]
        if ref and schemes:
            lines += ["", "Target: scheme 2 or 3 reaches the threshold in at most 0.8x plain GRPO's steps."]
            for m in schemes:
                text, met = _versus_plain(sec["rows"][m]["steps_to_threshold"], base, n_steps)
                lines.append(f"- {label(m)}: {text} ({'met' if met else 'not met'})")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """One panel of score against step per KL section, and one of score against KL for every method. A method's
    colour is its scheme; solid lines are GRPO at the first KL coefficient, dash-dotted at the others, dashed PPO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = summary["sections"]
    bases = list(dict.fromkeys(m.partition("@kl")[0] for m in summary["methods"]))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {b: cycle[i % len(cycle)] for i, b in enumerate(bases)}
    first_coef = sections[0]["kl_coef"] if sections else None

    def style(m):
        if m.startswith("ppo-"):
            ls = "--"
        else:
            ls = "-" if kl_coef_of(m, first_coef) == first_coef else "-."
        return {"color": colour[m.partition("@kl")[0]], "ls": ls}

    fig, axes = plt.subplots(1, len(sections) + 1, figsize=(6 * (len(sections) + 1), 5.5), squeeze=False)
    for ax, sec in zip(axes[0], sections):
        for m in sec["rows"]:
            s = summary["methods"][m]
            mean, std = runs.moving_average(s["mean_curve"]), runs.moving_average(s["std_curve"])
            xs = range(len(mean))
            ax.plot(xs, mean, label=label(m), **style(m))
            ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=style(m)["color"], alpha=0.1)
        if sec["threshold"] is not None:
            ax.axhline(sec["threshold"], color="k", ls=":", lw=1, label="threshold")
        ax.set_title(f"GRPO KL coefficient {sec['kl_coef']:g}", fontsize=10)
        ax.set_xlabel("step (32 completions each)")
        ax.set_ylabel("ground-truth score (5-step MA, ±1 std over seeds)")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for m, s in summary["methods"].items():
        ax.plot(runs.moving_average(s["kl_curve"]), runs.moving_average(s["mean_curve"]), label=label(m), lw=1.2,
                **style(m))
    ax.set_xscale("log")
    ax.set_xlabel("KL to the reference, nats per completion (seed mean, 5-step MA; log scale)")
    ax.set_ylabel("ground-truth score (seed mean, 5-step MA)")
    ax.set_title("score against KL, every method", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dense-rlhf grpo-study", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds per method (default 5)")
    p.add_argument("--first-seed", type=int, default=None, help="run seeds start here (default 1000 x --seed)")
    p.add_argument("--steps", type=int, default=GRPO.steps, help=f"steps per run (default {GRPO.steps})")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated; default " + ",".join(METHODS))
    p.add_argument("--seed", type=int, default=0, help="master seed: SFT/RM training and the run seeds")
    p.add_argument("--kl-coef", type=float, default=GRPO.kl_coef,
                   help=f"GRPO's KL loss coefficient where a method has no @kl suffix (default {GRPO.kl_coef:g})")
    p.add_argument("--group-size", type=int, default=GRPO.group_size,
                   help=f"G (default {GRPO.group_size}); prompts per step = PPO's batch / G")
    p.add_argument("--workers", type=int, default=runs.default_workers(), help="parallel runs (1 thread each)")
    p.add_argument("--out", default=default_out("grpo-study"),
                   help=f"output folder (default ./{default_out('grpo-study')}; `make grpo-study` writes the "
                        "repository's committed results, experiments/results)")
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
    first = args.seed * 1000 if args.first_seed is None else args.first_seed
    seeds = list(range(first, first + args.seeds))
    jobs = [(m, s) for m in methods for s in seeds]
    print(f"[2/2] {len(jobs)} runs ({len(methods)} methods x {len(seeds)} seeds, {args.steps} steps, "
          f"{args.workers} workers)")
    done = [0]

    def progress(res):
        done[0] += 1
        tail, kl = res["curves"]["gt_score"][-10:], res["curves"]["kl"][-10:]
        print(f"  {done[0]:3d}/{len(jobs)}  {res['method']:22s} seed {res['seed']:5d}  final true score "
              f"{sum(tail) / len(tail):+6.2f}  KL {sum(kl) / len(kl):6.1f}  ({res['seconds']:.0f}s, "
              f"{time.time() - t0:.0f}s elapsed)", flush=True)

    t_runs = time.time()
    results = run_many(jobs, setup, grpo_cfg, ppo_cfg, cache, workers=args.workers, progress=progress)
    summary = summarise(results, methods, args.kl_coef)
    wall = time.time() - t0
    title = f"Sentiment task: GRPO with ABC token-level advantages vs PPO, {len(seeds)} seeds, {args.steps} steps"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary)
    command = " ".join(["dense-rlhf grpo-study", *argv])
    models = "models from the cache" if info.get("cached") else "models trained in this command"
    meta = {
        "title": title,
        "command": command,
        "wall_seconds": wall,
        "runs_seconds": time.time() - t_runs,
        "workers": args.workers,
        "models_cached": bool(info.get("cached")),
        "reward_model": info["reward_model"],
        "config": {"setup": asdict(setup), "grpo": asdict(grpo_cfg), "ppo": asdict(ppo_cfg)},
        "seeds": seeds,
    }
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results},
                                                      indent=1))
    (out / f"{args.name}.md").write_text(
        f"# {title}\n\nCommand: `{command}`; wall time {wall / 60:.1f} min on this machine ({args.workers} workers, "
        f"{models}). Every curve is in `{args.name}.json`.\n\n![curves]({args.name}.png)\n\n{table}")
    plot(summary, out / f"{args.name}.png", title)
    print()
    print(table)
    print(f"wrote {out / args.name}.json/.md/.png ({wall:.0f}s)")
    return 0
