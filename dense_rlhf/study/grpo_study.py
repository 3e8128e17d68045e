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
score 1; ``methods.make_grpo_score_fn``). The schemes are in ``dense_rlhf.rl.grpo``. Final score, late spread
and final KL are ``dense_rlhf.study.stats.summarise``'s; the threshold is plain GRPO's (see :func:`summarise`),
and the score at a KL budget compares methods at equal distance from the reference. Writes ``<name>.json``
(every curve), ``<name>.md`` (the tables) and ``<name>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from dense_rlhf.cli import default_out
from dense_rlhf.rl import grpo
from dense_rlhf.rl.ppo import PPOConfig
from dense_rlhf.study import methods as M
from dense_rlhf.study import options, runs, stats
from dense_rlhf.study.library_log import quiet_transformers
from dense_rlhf.study.models import QUICK_SETUP, SetupConfig, cache_root, load_or_train
from dense_rlhf.study.plots import pyplot, save, score_curves
from dense_rlhf.study.report import fmt

# GRPO's KL-loss coefficients: the first (the default of --kl-coef) is the usual small one (DeepSeekMath used
# 0.04); the second, chosen by a pilot of plain GRPO on other seeds, holds plain GRPO near PPO's final KL.
KL_COEFS = (0.05, 0.15)
# Headline GRPO methods (scheme 2 and 3 settings fixed before any run; see experiments/README.md), the two
# sensitivity rows (all of the credit on attention; ABC beta 1), the headline methods again at the second KL
# coefficient, and the PPO baselines.
HEADLINE = ["grpo-plain", "grpo-credit-0.5", "grpo-dense-0.8"]
METHODS = (
    HEADLINE
    + ["grpo-credit-1.0", "grpo-dense-1.0"]
    + [f"{m}@kl{KL_COEFS[1]:g}" for m in HEADLINE]
    + ["ppo-sparse", "ppo-abc-0.8"]
)
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
                spec = {"scheme": scheme, key: float(base[len(prefix) :])}
            except ValueError:
                spec = None
    if spec is not None:
        try:
            return "grpo", {**spec, **({"kl_coef": float(kl)} if kl else {})}
        except ValueError:
            pass
    elif base.startswith("ppo-") and base[4:] in M.METHODS and not kl:
        return "ppo", base[4:]
    raise ValueError(
        f"unknown method {name!r}: use grpo-plain, grpo-credit-<beta> or grpo-dense-<abc beta>, each "
        f"with an optional @kl<coefficient>, or ppo-<one of {M.METHODS}>"
    )


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


# ------------------------------------------------------------------------------------------------ summary


def _score_at_kl(runs_of_method: list[dict], budget: float) -> tuple[float | None, int]:
    """Mean over seeds of the 5-step-MA score at the first step whose 5-step-MA KL reaches ``budget``, and the
    number of seeds whose KL got there."""
    values = []
    for r in runs_of_method:
        kl, score = stats.moving_average(r["curves"]["kl"]), stats.moving_average(r["curves"]["gt_score"])
        step = stats.first_reach(kl, budget)
        if step is not None:
            values.append(score[step])
    return (sum(values) / len(values) if values else None), len(values)


def summarise(results: list[dict], methods: list[str], default_kl: float) -> dict:
    """``stats.summarise``'s per-method statistics (final score, late spread, final KL), the score at each KL
    budget, and one section per GRPO KL coefficient whose threshold is plain GRPO's at that coefficient:

        threshold = SFT score + 0.8 (final score of plain GRPO - SFT score)

    with steps to threshold measured as in ``stats.summarise`` (seed mean, 5-step trailing MA; per seed too).
    PPO rows are in every section, for reference."""
    base = stats.summarise(results)
    per_method = base["methods"]
    for m in per_method:
        for key in ("steps_to_threshold", "per_seed_steps_to_threshold", "seeds_reaching", "median_seed_steps"):
            del per_method[m][key]  # against stats.summarise's best-method threshold; the sections hold ours
        mine = [r for r in results if r["method"] == m]
        per_method[m]["score_at_kl"] = {f"{k:g}": _score_at_kl(mine, k) for k in KL_BUDGETS}
        per_method[m]["kl_curve"] = [sum(step) / len(step) for step in zip(*(r["curves"]["kl"] for r in mine))]
    coefs = list(dict.fromkeys(kl_coef_of(m, default_kl) for m in methods if m.startswith("grpo-")))
    sections = []
    for coef in coefs:
        members = [m for m in methods if kl_coef_of(m, default_kl) in (coef, None) and m in per_method]
        plain = next((m for m in members if m.startswith("grpo-") and parse_method(m)[1]["scheme"] == "plain"), None)
        threshold = None
        if plain is not None:
            threshold = base["sft_score"] + 0.8 * (per_method[plain]["final_mean"] - base["sft_score"])
        rows = {}
        for m in members:
            row = {
                "steps_to_threshold": None,
                "per_seed_steps_to_threshold": [],
                "seeds_reaching": 0,
                "median_seed_steps": None,
            }
            if threshold is not None:
                curves = [r["curves"]["gt_score"][: base["steps"]] for r in results if r["method"] == m]
                row = stats.threshold_stats(per_method[m]["mean_curve"], curves, threshold)
            rows[m] = row
        sections.append({"kl_coef": coef, "reference": plain, "threshold": threshold, "rows": rows})
    return {"steps": base["steps"], "sft_score": base["sft_score"], "methods": per_method, "sections": sections}


# ------------------------------------------------------------------------------------------------ outputs


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
    per_method, n_steps = summary["methods"], summary["steps"]
    budgets = [f"{k:g}" for k in KL_BUDGETS]
    lines = [
        f"SFT score {summary['sft_score']:.2f} (mean of every run's first step); {n_steps} steps of 32 "
        "completions each. Score at KL k: the 5-step-MA score when the 5-step-MA KL first reaches k nats, "
        "mean over the seeds that got there (count in brackets)."
    ]
    for sec in summary["sections"]:
        ref = sec["reference"]
        base = sec["rows"][ref]["steps_to_threshold"] if ref else None
        head = (
            f"threshold {sec['threshold']:.2f} = SFT score + 80% of plain GRPO's gain at this coefficient"
            if ref
            else "no plain GRPO run at this coefficient: no threshold"
        )
        columns = [
            "method",
            "steps to threshold",
            "x plain GRPO",
            "per-seed median steps (seeds reaching)",
            "final score mean ± std",
            "late-training spread",
            "final KL",
        ] + [f"score at KL {b}" for b in budgets]
        lines += [
            "",
            f"### GRPO KL coefficient {sec['kl_coef']:g}: {head}",
            "",
            "| " + " | ".join(columns) + " |",
            "|---" * len(columns) + "|",
        ]
        for m, row in sec["rows"].items():
            s = per_method[m]
            ratio = _versus_plain(row["steps_to_threshold"], base, n_steps)[0] if ref else ""
            at_kl = [f"{fmt(v, 2)} ({n})" for v, n in (s["score_at_kl"][b] for b in budgets)]
            lines.append(
                f"| {label(m)} | {fmt(row['steps_to_threshold'])} | {ratio} | "
                f"{fmt(row['median_seed_steps'], 1)} ({row['seeds_reaching']}/{s['seeds']}) | "
                f"{s['final_mean']:.2f} ± {s['final_std']:.2f} | {s['late_spread']:.2f} | "
                f"{s['final_kl']:.2f} | " + " | ".join(at_kl) + " |"
            )
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
    plt = pyplot()
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
        score_curves(
            ax,
            [(label(m), summary["methods"][m], style(m)) for m in sec["rows"]],
            threshold=sec["threshold"],
            title=f"GRPO KL coefficient {sec['kl_coef']:g}",
            title_size=10,
            xlabel="step (32 completions each)",
        )
    ax = axes[0][-1]
    for m, s in summary["methods"].items():
        ax.plot(
            stats.moving_average(s["kl_curve"]),
            stats.moving_average(s["mean_curve"]),
            label=label(m),
            lw=1.2,
            **style(m),
        )
    ax.set_xscale("log")
    ax.set_xlabel("KL to the reference, nats per completion (seed mean, 5-step MA; log scale)")
    ax.set_ylabel("ground-truth score (seed mean, 5-step MA)")
    ax.set_title("score against KL, every method", fontsize=10)
    ax.legend(fontsize=7)
    save(fig, path, title=title, dpi=110)


# ---------------------------------------------------------------------------------------------------- CLI


@dataclass
class GRPOStudyOptions:
    """``dense-rlhf grpo-study``'s options (besides ``GRPO_OPTIONS``)."""

    seeds: int = 5
    """seeds per method"""
    first_seed: int | None = None
    """run seeds start here (default 1000 x --seed)"""
    methods: str = ",".join(METHODS)
    """comma-separated"""
    seed: int = 0
    """master seed: SFT/RM training and the run seeds"""
    workers: int = field(default_factory=runs.default_workers)
    """parallel runs (1 torch thread each)"""
    out: str = default_out("grpo-study")
    """output folder (`make grpo-study` writes the repository's committed results, experiments/results)"""
    name: str = "grpo_study"
    """output file stem"""
    threads: int = 1
    """torch threads of the main process (SFT/RM training)"""
    quick: bool = False
    """the demo's small SFT/RM setup (smoke test only)"""
    cache_dir: str | None = None
    """model cache (default $DENSE_RLHF_CACHE or ~/.cache/dense-rlhf)"""
    grpo_overrides: dict = field(default_factory=dict, metadata={"cli": False})
    """the GRPO_OPTIONS given on the command line"""


# The GRPOConfig fields that the command line can set, over GRPO's values.
GRPO_OPTIONS = ["steps", "kl_coef", "group_size"]
NOTES = {
    "steps": "(the PPO runs make as many)",
    "kl_coef": "where a method has no @kl suffix",
    "group_size": "(prompts per step = PPO's batch / G)",
}


def parse_args(argv: list[str]) -> GRPOStudyOptions:
    p = argparse.ArgumentParser(prog="dense-rlhf grpo-study", description=__doc__.splitlines()[0])
    options.add_fields(p, GRPOStudyOptions)
    options.add_fields(p, grpo.GRPOConfig, GRPO_OPTIONS, defaults=GRPO, notes=NOTES, override=True)
    opts, given = options.parse(p, GRPOStudyOptions, argv, overrides=(grpo.GRPOConfig,))
    return replace(opts, grpo_overrides=given[grpo.GRPOConfig])


def study_runs(
    methods: list[str],
    seeds: list[int],
    setup: SetupConfig,
    grpo_cfg: grpo.GRPOConfig,
    ppo_cfg: PPOConfig,
    cache_dir: str | None,
) -> list[runs.Run]:
    """One run per (method, seed): GRPO with the method's scheme, or PPO with its reward method."""
    out = []
    for m in methods:
        kind, spec = parse_method(m)
        for s in seeds:
            if kind == "grpo":
                out.append(runs.Run(m, s, setup, replace(grpo_cfg, **spec), cache_dir))
            else:
                out.append(runs.Run(m, s, setup, ppo_cfg, cache_dir, reward=spec))
    return out


def _describe(res: dict) -> str:
    kl = res["curves"]["kl"][-10:]
    return f"{res['method']:22s} seed {res['seed']:5d}  final KL {sum(kl) / len(kl):6.1f}"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    t0 = time.time()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        try:
            parse_method(m)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    grpo_cfg = replace(GRPO, **args.grpo_overrides)
    if PPO.batch_size % grpo_cfg.group_size:
        raise SystemExit(f"--group-size {grpo_cfg.group_size} must divide PPO's batch of {PPO.batch_size} completions")
    setup = replace(SetupConfig(), seed=args.seed, **(QUICK_SETUP if args.quick else {}))
    grpo_cfg = replace(grpo_cfg, prompts_per_step=PPO.batch_size // grpo_cfg.group_size)
    ppo_cfg = replace(PPO, steps=grpo_cfg.steps)
    cache = cache_root(args.cache_dir)
    print(f"[1/2] SFT policy and reward model (cache: {cache})")
    _, _, _, info = load_or_train(setup, cache)
    first = args.seed * 1000 if args.first_seed is None else args.first_seed
    seeds = list(range(first, first + args.seeds))
    jobs = study_runs(methods, seeds, setup, grpo_cfg, ppo_cfg, str(cache))
    print(
        f"[2/2] {len(jobs)} runs ({len(methods)} methods x {len(seeds)} seeds, {grpo_cfg.steps} steps, "
        f"{args.workers} workers)"
    )
    progress = runs.progress_printer(len(jobs), t0, _describe)
    t_runs = time.time()
    results = runs.run_all(jobs, args.workers, progress)
    summary = summarise(results, methods, grpo_cfg.kl_coef)
    wall = time.time() - t0
    title = f"Sentiment task: GRPO with ABC token-level advantages vs PPO, {len(seeds)} seeds, {grpo_cfg.steps} steps"
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
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1))
    (out / f"{args.name}.md").write_text(
        f"# {title}\n\nCommand: `{command}`; wall time {wall / 60:.1f} min on this machine ({args.workers} workers, "
        f"{models}). Every curve is in `{args.name}.json`.\n\n![curves]({args.name}.png)\n\n{table}"
    )
    plot(summary, out / f"{args.name}.png", title)
    print()
    print(table)
    print(f"wrote {out / args.name}.json/.md/.png ({wall:.0f}s)")
    return 0
