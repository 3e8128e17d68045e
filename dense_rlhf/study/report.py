"""The study's markdown: the table of a reward-method comparison with its reward-model and credit-diagnostics
lines, and the outputs of ``dense-rlhf experiment`` and ``demo`` (``<name>.json``, ``.md`` and ``.png``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from dense_rlhf.rl.ppo import PPOConfig
from dense_rlhf.study import methods as M
from dense_rlhf.study.models import SetupConfig
from dense_rlhf.study.plots import plot_methods


def fmt(x: float | int | None, digits: int = 2) -> str:
    """A table cell: "never" for None (a threshold never reached), floats to ``digits`` decimals."""
    return "never" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def seed_ratios(r: dict) -> str:
    """The per-seed ratios of ``stats.ratios`` as ``[median; min-max]``, ``*`` after the range when a run never
    reached the threshold (it counts as the number of steps)."""
    seeds = r["per_seed"]
    star = "*" if any(r["per_seed_censored"]) else ""
    return f"[{r['per_seed_median']:.2f}; {min(seeds):.2f}-{max(seeds):.2f}{star}]"


def markdown_table(
    summary: dict, credit: dict | None, rm_metrics: dict | None, chat_rm_metrics: dict | None = None
) -> str:
    """The comparison's table (``stats.summarise``'s summary, one row per method), the steps-to-threshold ratios
    of the dense methods against their sparse baselines, then the reward models' held-out metrics and the credit
    diagnostics (``diagnostics.credit_report``) where given."""
    lines = [
        f"Threshold: {summary['threshold']:.2f} = SFT score {summary['sft_score']:.2f} + 80% of the way to the "
        f"best method's final score {summary['best_final']:.2f} ({summary['steps']} PPO steps).",
        "",
        "| method | seeds | steps to threshold (seed mean, 5-step MA) | per-seed median steps (seeds reaching) "
        "| final score mean ± std | late-training spread | final KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in M.ALL_METHODS:
        s = summary["methods"].get(m)
        if s is None:
            continue
        lines.append(
            f"| {M.LABELS[m]} | {s['seeds']} | {fmt(s['steps_to_threshold'])} | "
            f"{fmt(s['median_seed_steps'], 1)} ({s['seeds_reaching']}/{s['seeds']}) | "
            f"{s['final_mean']:.2f} ± {s['final_std']:.2f} | {s['late_spread']:.2f} | {s['final_kl']:.2f} |"
        )
    pairs = (
        ("abc-0.8", "sparse", "ABC", "sparse", " (target <= 0.6)"),
        ("prefix-0.8", "sparse", "prefix diff.", "sparse", ""),
        ("bpe-abc-0.8", "bpe-sparse", "ABC through alignment", "sparse with the BPE chat RM", ""),
        ("oracle-0.8", "sparse", "oracle, true credit", "sparse", ""),
    )
    for method, baseline, name, base_name, target in pairs:
        dense, sp = summary["methods"].get(method), summary["methods"].get(baseline)
        if not (sp and dense):
            continue
        a, b = dense["steps_to_threshold"], sp["steps_to_threshold"]
        if a is not None and b:
            verdict = f"{a / b:.2f}"
        elif a is not None:
            verdict = (
                f"below {a / summary['steps']:.2f} ({name} at step {a}; {base_name} never within "
                f"{summary['steps']} steps)"
            )
        else:
            verdict = f"undefined ({name} never reached the threshold)"
        lines += ["", f"{name} (beta=0.8) / {base_name} steps-to-threshold ratio: {verdict}{target}."]
    if rm_metrics:
        lines += [
            "",
            "Reward model, held-out preference pairs: accuracy against the Bradley-Terry labels "
            f"{rm_metrics['label_accuracy']:.3f}, against the hidden-score order "
            f"{rm_metrics['true_order_accuracy']:.3f}; corr(RM score, hidden score) "
            f"{rm_metrics['score_correlation']:.3f}.",
        ]
    if chat_rm_metrics:
        lines += [
            "",
            "BPE chat reward model (own byte-level BPE tokenizer, "
            f"{chat_rm_metrics['tokens_per_word']:.2f} tokens per word, and chat template; trained the same "
            f"way): accuracy against the labels {chat_rm_metrics['label_accuracy']:.3f}, against the "
            f"hidden-score order {chat_rm_metrics['true_order_accuracy']:.3f}; corr(RM score, hidden score) "
            f"{chat_rm_metrics['score_correlation']:.3f}.",
        ]
    if credit:
        lines += ["", *credit_lines(credit)]
    return "\n".join(lines) + "\n"


def credit_lines(credit: dict) -> list[str]:
    """The credit diagnostics of ``credit_report`` as markdown lines: the table, then the prefix tracking."""
    lines = [
        "Credit diagnostics: alpha against |leave-one-out true credit| per completion "
        "(Spearman rho; top-k overlap with k = number of credited tokens; alpha mass on credited tokens; "
        "sign agreement: share of credited tokens whose reward has the sign of their credit). For prefix "
        "differences alpha is |d_t|, the size of each token's score difference.",
        "",
        "| texts | alpha | Spearman rho | top-k overlap | mass on credited | sign agreement | random top-k |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {
        "abc": "ABC (RM last layer, from [EOS])",
        "prefix": "prefix differences (RM score per position)",
        "abcd": "ABC-D (SFT policy last layer)",
        "uniform": "uniform",
        "abc_aligned": "ABC through alignment (BPE chat RM, projected)",
        "oracle": "oracle: true credit in RM units (signed)",
        "oracle_abs": "oracle in ABC's shape (shares by absolute true credit)",
    }
    for texts, d in credit.items():
        for k in (k for k in names if k in d):
            x = d[k]
            sign = x.get("sign_agreement")
            lines.append(
                f"| {texts} | {names[k]} | {x['spearman']:.3f} | {x['topk_overlap']:.3f} | "
                f"{x['mass_on_credited']:.3f} | {'' if sign is None else f'{sign:.3f}'} | "
                f"{x['random_topk_overlap']:.3f} |"
            )
    tracking = {texts: d["prefix_tracking"] for texts, d in credit.items() if "prefix_tracking" in d}
    if tracking:
        lines += [
            "",
            "Prefix scores against the hidden score of the same prefix (Pearson r over all completion "
            "positions): " + ", ".join(f"{t} {r:.3f}" for t, r in tracking.items()) + ".",
        ]
    return lines


def write_outputs(
    out_dir: Path, name: str, results: list[dict], summary: dict, credit: dict | None, meta: dict
) -> dict:
    """``<name>.json`` (meta, summary, credit diagnostics and every run's curves), ``<name>.md`` (the table) and
    ``<name>.png`` (the curves) in ``out_dir``; returns their paths by kind (json, table, plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "table": out_dir / f"{name}.md", "plot": out_dir / f"{name}.png"}
    rm_metrics = meta.get("reward_model")
    table = markdown_table(summary, credit, rm_metrics, meta.get("chat_reward_model"))
    paths["table"].write_text(f"# {meta.get('title', name)}\n\n{table}")
    payload = {"meta": meta, "summary": summary, "credit_diagnostics": credit, "runs": results}
    paths["json"].write_text(json.dumps(payload, indent=1))
    plot_methods(summary, paths["plot"], meta.get("title", name))
    return {k: str(v) for k, v in paths.items()}


def config_dict(setup: SetupConfig, ppo: PPOConfig) -> dict:
    """The settings a results file records."""
    return {"setup": asdict(setup), "ppo": asdict(ppo)}
