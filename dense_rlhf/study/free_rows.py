"""``dense-rlhf experiment --study rows``: the label-free candidate rows of ``candidate_rows`` (alternatives to ABC's
attention row from the same forward) screened with the credit diagnostics (``diagnostics.credit_diagnostics``).

Writes ``<name>.json`` and ``<name>.md`` under ``--out`` for the 1-layer reward model of the setup and a 2-layer
one (``RM_LAYERS``), on the diagnostics' held-out SFT samples and grammar texts (``credit_report``'s).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dense_rlhf.rl.common import Policy, generate
from dense_rlhf.study import methods as M
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.candidate_rows import CANDIDATES, LABELS, candidate_rows
from dense_rlhf.study.config import ExperimentOptions
from dense_rlhf.study.diagnostics import credit_diagnostics
from dense_rlhf.study.models import SetupConfig, load_or_train

RM_LAYERS = (1, 2)


def screen(rm, codec: task.Codec, seq: torch.Tensor, completion_len: int) -> dict:
    """Every candidate's credit diagnostics on the completions of ``seq`` [B, P + N] (shares: the score times the
    normalised weights, or for ``direct-score`` its signed shares scaled to sum to the score's size)."""
    p = task.PROMPT_LEN
    ids, _ = M.rm_inputs(codec, seq)
    score, cands = candidate_rows(rm, ids)
    credit = task.credits_of(codec, seq)
    out = {}
    for name, full in cands.items():
        part = full[:, p : p + completion_len]
        alpha = part.abs()
        alpha = alpha / alpha.sum(1, keepdim=True).clamp(min=1e-30)
        shares = part * (score.abs() / part.abs().sum(1).clamp(min=1e-30))[:, None] if name == "direct-score" else None
        out[name] = credit_diagnostics(alpha, credit, shares=score[:, None] * alpha if shares is None else shares)
    direct = cands["direct-score"][:, p : p + completion_len].sum(1)
    out["direct_score_vs_score"] = torch.corrcoef(torch.stack([direct, score]))[0, 1].item()
    return out


def texts(setup: SetupConfig, cache, n: int = 512, seed: int = 123) -> tuple[task.Codec, object, dict]:
    """The reward model and the diagnostics' texts of ``credit_report``: SFT-policy samples and grammar texts."""
    codec, sft, rm, info = load_or_train(setup, cache, log=None)
    gen = torch.Generator().manual_seed(seed)
    seq = generate(Policy(sft, codec.special_ids), task.prompt_sampler(codec, seed)(n), setup.completion_len, gen)
    rng = random.Random(seed)
    grammar = codec.encode(
        [
            task.sample_words(rng, task.Style.random_for_preferences(rng), task.PROMPT_WORDS + setup.completion_len)
            for _ in range(n)
        ]
    )
    return codec, rm, {"sft_samples": seq, "grammar_texts": grammar, "info": info}


def markdown(result: dict, meta: dict) -> str:
    lines = [
        f"# {meta['title']}",
        "",
        f"Command: `{meta['command']}`; wall time {meta['wall_seconds'] / 60:.1f} min. Everything is in "
        f"`{meta['name']}.json`; the candidates are defined in `dense_rlhf/study/candidate_rows.py`.",
        "",
        "Credit diagnostics against the leave-one-out true credit (`diagnostics.credit_diagnostics`): Spearman's rho "
        "between the weights and |credit|, top-k overlap with k = the number of credited tokens, the weights' mass on "
        "credited tokens, sign agreement (every candidate but `direct-score` gives each token the score's sign); "
        "512 SFT-policy samples and 512 grammar texts, as in the other studies.",
    ]
    for layers, per in result.items():
        lines += [
            "",
            f"## {layers}-layer reward model",
            "",
            "| texts | candidate | Spearman rho | top-k overlap | mass on credited | sign agreement | random top-k |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in ("sft_samples", "grammar_texts"):
            for c in CANDIDATES:
                d = per[t][c]
                lines.append(
                    f"| {t} | {LABELS[c]} | {d['spearman']:.3f} | {d['topk_overlap']:.3f} | "
                    f"{d['mass_on_credited']:.3f} | {d['sign_agreement']:.3f} | {d['random_topk_overlap']:.3f} |"
                )
        lines += [
            "",
            "Correlation of the direct-score shares' sum with the reward model's score: "
            + ", ".join(f"{t} {per[t]['direct_score_vs_score']:.3f}" for t in ("sft_samples", "grammar_texts"))
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(args: ExperimentOptions, argv: list[str], setup: SetupConfig) -> int:
    """Screen the candidates for the 1-layer and 2-layer reward models of ``setup``."""
    t0 = time.time()
    cache = str(args.cache_dir) if args.cache_dir else None
    result = {}
    for layers in RM_LAYERS:
        print(f"{layers}-layer reward model", flush=True)
        codec, rm, data = texts(replace(setup, rm_n_layer=layers), cache)
        result[str(layers)] = {
            t: screen(rm, codec, data[t], setup.completion_len) for t in ("sft_samples", "grammar_texts")
        }
        result[str(layers)]["reward_model"] = data["info"]["reward_model"]
    meta = {
        "title": "Label-free rows from the reward model's forward, screened with the credit diagnostics",
        "command": "dense-rlhf experiment " + " ".join(argv),
        "name": args.name,
        "wall_seconds": time.time() - t0,
        "setup": asdict(setup),
        "candidates": LABELS,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": result}, indent=1))
    text = markdown(result, meta)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0
