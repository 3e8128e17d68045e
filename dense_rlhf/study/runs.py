"""Running and summarising the reward-method comparison: one PPO run per (method, seed), the summary
statistics, the credit diagnostics, and the JSON / markdown / PNG outputs. Used by ``dense-rlhf demo``
and ``dense-rlhf experiment``.

Definitions (the issue's):
- curve: the seed-mean ground-truth score per PPO step, smoothed by a trailing 5-step moving average.
- threshold: 80% of the way from the SFT policy's score (mean over seeds of step 0) to the best method's
  final score; steps-to-threshold is the first step whose smoothed seed-mean reaches it (per seed too).
- final score: per seed, the mean over the last ``final_window`` steps; mean and std over seeds.
- late-training spread: the std over seeds of the score at each step, averaged over the last quarter of
  the steps.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dense_rlhf.study import methods as M
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.diagnostics import credit_diagnostics
from dense_rlhf.study.models import SetupConfig, load_or_train, load_or_train_chat_rm
from dense_rlhf.rl.ppo import PolicyWithValue, PPOConfig, generate, train


def prompt_sampler(codec: task.Codec, seed: int):
    rng = random.Random(seed)

    def sample(n: int) -> torch.Tensor:
        return codec.encode(task.sample_prompts(rng, n))

    return sample


def run_one(method: str, seed: int, setup: SetupConfig, ppo: PPOConfig, cache_dir=None, on_step=None) -> dict:
    """One PPO run from the cached SFT policy with one reward method; returns its per-step curves."""
    codec, sft, rm, _ = load_or_train(setup, cache_dir, log=None)
    chat_rm = load_or_train_chat_rm(setup, cache_dir, log=None)[:2] if method in M.ALIGNED_METHODS else None
    torch.manual_seed(seed)
    policy = PolicyWithValue(copy.deepcopy(sft), codec.special_ids)
    t0, c0 = time.time(), time.process_time()
    history = train(policy, sft, prompt_sampler(codec, 10_000 + seed), setup.completion_len,
                    M.make_score_fn(method, rm, codec, chat_rm), ppo, seed, on_step,
                    capture_policy_attention=method == "abcd")
    keys = ("gt_score", "rm_score", "kl", "pg_loss", "vf_loss", "kl_coef")
    curves = {key: [h[key] for h in history] for key in keys}
    return {"method": method, "seed": seed, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0,
            "curves": curves}


def quiet_transformers() -> None:
    """No weight-loading / shard-writing progress bars from transformers (they drown the CLI output)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _run_job(args):
    method, seed, setup, ppo, cache_dir, threads = args
    torch.set_num_threads(threads)
    quiet_transformers()
    return run_one(method, seed, setup, ppo, cache_dir)


def map_jobs(job, args: list, workers: int = 1, progress=None) -> list:
    """``job(a)`` for every ``a``: in this process and in order when ``workers <= 1``, else in ``workers`` spawned
    processes, results in the order they finish; ``progress(result)`` after each."""
    results = []
    if workers <= 1:
        for a in args:
            results.append(job(a))
            if progress:
                progress(results[-1])
        return results
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        for res in pool.imap_unordered(job, args):
            results.append(res)
            if progress:
                progress(res)
    return results


def run_many(jobs: list[tuple[str, int]], setup: SetupConfig, ppo: PPOConfig, cache_dir=None, workers: int = 1,
             progress=None) -> list[dict]:
    """All (method, seed) runs, in ``workers`` processes with one torch thread each (the models are tiny)."""
    args = [(m, s, setup, ppo, str(cache_dir) if cache_dir else None, 1) for m, s in jobs]
    results = map_jobs(_run_job, args, workers, progress)
    if workers > 1:
        results.sort(key=lambda r: (M.ALL_METHODS.index(r["method"]), r["seed"]))
    return results


# ------------------------------------------------------------------------------------------- statistics


def moving_average(xs: list[float], window: int = 5) -> list[float]:
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
            "final_kl": _mean([_mean(r["curves"]["kl"][steps - final_window : steps]) for r in results
                               if r["method"] == m]),
        }
    start = _mean([s["start"] for s in stats.values()])
    best = max(s["final_mean"] for s in stats.values())
    threshold = start + 0.8 * (best - start)
    for m, s in stats.items():
        s.update(threshold_stats(s["mean_curve"], [r["curves"][key][:steps] for r in results if r["method"] == m],
                                 threshold))
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
        reached = threshold_stats(s["mean_curve"], [r["curves"]["gt_score"][: summary["steps"]] for r in mine],
                                  threshold)
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
        out[m] = {"mean_curve_ratio": mean_ratio, "text": text, "steps": a, "sparse_steps": b, "per_seed": per_seed,
                  "per_seed_censored": censored, "per_seed_median": _median(per_seed)}
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


# ------------------------------------------------------------------------------------------ diagnostics


@torch.no_grad()
def credit_report(setup: SetupConfig, cache_dir=None, n: int = 512, seed: int = 123, aligned: bool = False,
                  oracle: bool = False) -> dict:
    """Diagnostics of ABC's alpha (RM attention), prefix differences (the RM's score at every position),
    ABC-D's alpha (SFT policy attention) and uniform against the leave-one-out true credit, on completions
    sampled from the SFT policy and on grammar texts; and ``prefix_tracking``, the Pearson correlation over all
    completion positions between the RM's score of each prefix and the hidden score of the same prefix. With
    ``aligned``, also ABC through alignment: the BPE chat reward model's alpha projected onto the policy's tokens
    (``score_and_densify_text`` with beta 1, divided by the score). With ``oracle``, also the oracle methods' rewards
    at beta 1 (alpha: their size; the signed oracle's last token carries the rest of the score) and
    ``rm_calibration``, the least-squares line of the RM's score on the hidden score, their Pearson r and the signed
    oracle's scale (``methods.rm_scale``)."""
    from dense_rlhf.capture import capture_reward_attention
    from dense_rlhf.ops import prefix_rewards

    codec, sft, rm, _ = load_or_train(setup, cache_dir, log=None)
    chat_rm = load_or_train_chat_rm(setup, cache_dir, log=None)[:2] if aligned else None
    policy = PolicyWithValue(sft, codec.special_ids)
    gen = torch.Generator().manual_seed(seed)
    n_new = setup.completion_len
    seq = generate(policy, prompt_sampler(codec, seed)(n), n_new, gen)
    rng = random.Random(seed)
    grammar = codec.encode([task.sample_words(rng, task.Style.random_for_preferences(rng), task.PROMPT_WORDS + n_new)
                            for _ in range(n)])
    out = {}
    p = task.PROMPT_LEN
    for name, s in (("sft_samples", seq), ("grammar_texts", grammar)):
        credit = task.credits_of(codec, s)
        ids, mask = M.rm_inputs(codec, s)
        fwd = M.rm_forward(rm, ids)
        alpha = fwd.rows.mean(1)[:, p : p + n_new]
        alpha = alpha / alpha.sum(1, keepdim=True)
        dense = prefix_rewards(fwd.prefix_scores, mask, beta=1.0, reward_index=fwd.reward_index)[:, p : p + n_new]
        with capture_reward_attention(sft, layer=-1, reward_index=s.shape[1] - 1) as cap:
            sft(input_ids=s, use_cache=False)
        policy_alpha = cap.rows.mean(1)[:, p : p + n_new]
        policy_alpha = policy_alpha / policy_alpha.sum(1, keepdim=True)
        score = fwd.score[:, None]
        prefix = fwd.prefix_scores[:, p : p + n_new].flatten()
        running = task.running_scores_of(codec, s).flatten()
        out[name] = {
            "prefix_tracking": torch.corrcoef(torch.stack([prefix, running]))[0, 1].item(),
            "abc": credit_diagnostics(alpha, credit, shares=score * alpha),
            "prefix": credit_diagnostics(dense.abs(), credit, shares=dense),
            "abcd": credit_diagnostics(policy_alpha, credit, shares=score * policy_alpha),
            "uniform": credit_diagnostics(torch.ones(s.shape[0], n_new), credit,
                                          shares=score.expand(-1, n_new) / n_new),
        }
        if chat_rm is not None:
            chat_score, shares = M.aligned_rewards(chat_rm, codec, s, beta=1.0)
            out[name]["abc_aligned"] = credit_diagnostics(shares / chat_score[:, None], credit, shares=shares)
        if oracle:
            scale = M.rm_scale(rm, codec, n_new)
            signed = M.oracle_rewards(credit, fwd.score, 1.0, abc_shape=False, scale=scale)
            shaped = M.oracle_rewards(credit, fwd.score, 1.0, abc_shape=True)
            out[name]["oracle"] = credit_diagnostics(signed.abs(), credit, shares=signed)
            out[name]["oracle_abs"] = credit_diagnostics(shaped / score, credit, shares=shaped)
            hidden = task.scores_of(codec, s).double()
            rm_score = fwd.score.double()
            slope = torch.cov(torch.stack([hidden, rm_score]))[0, 1] / hidden.var()
            out[name]["rm_calibration"] = {
                "slope": slope.item(), "intercept": (rm_score.mean() - slope * hidden.mean()).item(),
                "pearson": torch.corrcoef(torch.stack([hidden, rm_score]))[0, 1].item(), "oracle_scale": scale}
    return out


# ------------------------------------------------------------------------------------------------ outputs


def _fmt(x, digits=2):
    return "never" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def markdown_table(summary: dict, credit: dict | None, rm_metrics: dict | None,
                   chat_rm_metrics: dict | None = None) -> str:
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
            f"| {M.LABELS[m]} | {s['seeds']} | {_fmt(s['steps_to_threshold'])} | "
            f"{_fmt(s['median_seed_steps'], 1)} ({s['seeds_reaching']}/{s['seeds']}) | "
            f"{s['final_mean']:.2f} ± {s['final_std']:.2f} | {s['late_spread']:.2f} | {s['final_kl']:.2f} |"
        )
    pairs = (("abc-0.8", "sparse", "ABC", "sparse", " (target <= 0.6)"),
             ("prefix-0.8", "sparse", "prefix diff.", "sparse", ""),
             ("bpe-abc-0.8", "bpe-sparse", "ABC through alignment", "sparse with the BPE chat RM", ""),
             ("oracle-0.8", "sparse", "oracle, true credit", "sparse", ""))
    for method, baseline, name, base_name, target in pairs:
        dense, sp = summary["methods"].get(method), summary["methods"].get(baseline)
        if not (sp and dense):
            continue
        a, b = dense["steps_to_threshold"], sp["steps_to_threshold"]
        if a is not None and b:
            verdict = f"{a / b:.2f}"
        elif a is not None:
            verdict = (f"below {a / summary['steps']:.2f} ({name} at step {a}; {base_name} never within "
                       f"{summary['steps']} steps)")
        else:
            verdict = f"undefined ({name} never reached the threshold)"
        lines += ["", f"{name} (beta=0.8) / {base_name} steps-to-threshold ratio: {verdict}{target}."]
    if rm_metrics:
        lines += ["", "Reward model, held-out preference pairs: accuracy against the Bradley-Terry labels "
                  f"{rm_metrics['label_accuracy']:.3f}, against the hidden-score order "
                  f"{rm_metrics['true_order_accuracy']:.3f}; corr(RM score, hidden score) "
                  f"{rm_metrics['score_correlation']:.3f}."]
    if chat_rm_metrics:
        lines += ["", "BPE chat reward model (own byte-level BPE tokenizer, "
                  f"{chat_rm_metrics['tokens_per_word']:.2f} tokens per word, and chat template; trained the same "
                  f"way): accuracy against the labels {chat_rm_metrics['label_accuracy']:.3f}, against the "
                  f"hidden-score order {chat_rm_metrics['true_order_accuracy']:.3f}; corr(RM score, hidden score) "
                  f"{chat_rm_metrics['score_correlation']:.3f}."]
    if credit:
        lines += ["", *credit_lines(credit)]
    return "\n".join(lines) + "\n"


def credit_lines(credit: dict) -> list[str]:
    """The credit diagnostics of ``credit_report`` as markdown lines: the table, then the prefix tracking."""
    lines = ["Credit diagnostics: alpha against |leave-one-out true credit| per completion "
             "(Spearman rho; top-k overlap with k = number of credited tokens; alpha mass on credited tokens; "
             "sign agreement: share of credited tokens whose reward has the sign of their credit). For prefix "
             "differences alpha is |d_t|, the size of each token's score difference.",
             "", "| texts | alpha | Spearman rho | top-k overlap | mass on credited | sign agreement "
             "| random top-k |", "|---|---|---|---|---|---|---|"]
    names = {"abc": "ABC (RM last layer, from [EOS])", "prefix": "prefix differences (RM score per position)",
             "abcd": "ABC-D (SFT policy last layer)", "uniform": "uniform",
             "abc_aligned": "ABC through alignment (BPE chat RM, projected)",
             "oracle": "oracle: true credit in RM units (signed)",
             "oracle_abs": "oracle in ABC's shape (shares by absolute true credit)"}
    for texts, d in credit.items():
        for k in (k for k in names if k in d):
            x = d[k]
            sign = x.get("sign_agreement")
            lines.append(f"| {texts} | {names[k]} | {x['spearman']:.3f} | {x['topk_overlap']:.3f} | "
                         f"{x['mass_on_credited']:.3f} | {'' if sign is None else f'{sign:.3f}'} | "
                         f"{x['random_topk_overlap']:.3f} |")
    tracking = {texts: d["prefix_tracking"] for texts, d in credit.items() if "prefix_tracking" in d}
    if tracking:
        lines += ["", "Prefix scores against the hidden score of the same prefix (Pearson r over all completion "
                  "positions): " + ", ".join(f"{t} {r:.3f}" for t, r in tracking.items()) + "."]
    return lines


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in M.ALL_METHODS:
        s = summary["methods"].get(m)
        if s is None:
            continue
        mean = moving_average(s["mean_curve"])
        std = moving_average(s["std_curve"])
        xs = list(range(len(mean)))
        bold = ("sparse", "abc-0.8", "prefix-0.8", "bpe-sparse", "bpe-abc-0.8", "oracle-0.8")
        ax.plot(xs, mean, label=M.LABELS[m], lw=2 if m in bold else 1.2)
        ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.15)
    ax.axhline(summary["threshold"], color="k", ls=":", lw=1, label="threshold")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("ground-truth score (5-step MA, ±1 std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, name: str, results: list[dict], summary: dict, credit: dict | None,
                  meta: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "table": out_dir / f"{name}.md", "plot": out_dir / f"{name}.png"}
    rm_metrics = meta.get("reward_model")
    table = markdown_table(summary, credit, rm_metrics, meta.get("chat_reward_model"))
    paths["table"].write_text(f"# {meta.get('title', name)}\n\n{table}")
    payload = {"meta": meta, "summary": summary, "credit_diagnostics": credit, "runs": results}
    paths["json"].write_text(json.dumps(payload, indent=1))
    plot(summary, paths["plot"], meta.get("title", name))
    return {k: str(v) for k, v in paths.items()}


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def config_dict(setup: SetupConfig, ppo: PPOConfig) -> dict:
    return {"setup": asdict(setup), "ppo": asdict(ppo)}
