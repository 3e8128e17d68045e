"""Credit diagnostics: how well a method's per-token weights alpha match the task's true per-token credit
(``credit_diagnostics``), and the report of every method's on the study's models (``credit_report``).

For each completion with at least one credited token (nonzero leave-one-out credit), with c_t = |credit_t|:

- rank correlation: Spearman's rho between alpha_t and c_t over the N response tokens (average ranks for
  ties; completions where either side is constant are skipped, so uniform alpha has none: reported as 0).
- top-k overlap: with k = the number of credited tokens, the fraction of alpha's k largest tokens that are
  credited tokens. A random order scores k / N on average; uniform alpha is scored with random tie-breaking.
- mass on credited tokens: sum of alpha over credited tokens (uniform: k / N).
- sign agreement (when the method's signed per-token shares are given): the fraction of credited tokens
  whose share has the sign of their true credit. ABC and uniform give every token the score's sign; prefix
  differences can give a token a sign of its own (alpha is then |share|).
"""

from __future__ import annotations

import random

import torch

from dense_rlhf.capture import capture_reward_attention
from dense_rlhf.ops import prefix_rewards
from dense_rlhf.rl.common import Policy, generate
from dense_rlhf.study import methods as M
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.models import SetupConfig, load_or_train, load_or_train_chat_rm


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 along the last dim, ties given their average rank. [B, N] float."""
    order = x.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], dtype=torch.float64).expand_as(x).contiguous())
    out = ranks.clone()
    for b in range(x.shape[0]):  # average tied ranks (N is small)
        vals = x[b]
        for v in vals.unique():
            sel = vals == v
            if int(sel.sum()) > 1:
                out[b, sel] = ranks[b, sel].mean()
    return out


def credit_diagnostics(
    alpha: torch.Tensor, credit: torch.Tensor, seed: int = 0, shares: torch.Tensor | None = None
) -> dict:
    """alpha [B, N] nonnegative weights (rows may be unnormalised), credit [B, N] signed true credit, shares
    [B, N] optional signed per-token rewards of the method (adds ``sign_agreement``)."""
    alpha = alpha.double()
    c = credit.abs().double()
    credited = c > 1e-9
    k = credited.sum(1)
    keep = k > 0
    sign = None
    if shares is not None:
        agree = (torch.sign(shares.double()) == torch.sign(credit.double())) & credited
        sign = (agree[keep].sum() / credited[keep].sum().clamp(min=1)).item()
    alpha, c, credited, k = alpha[keep], c[keep], credited[keep], k[keep]
    if alpha.shape[0] == 0:
        return {
            "spearman": float("nan"),
            "topk_overlap": float("nan"),
            "mass_on_credited": float("nan"),
            "random_topk_overlap": float("nan"),
            "n": 0,
            **({} if sign is None else {"sign_agreement": sign}),
        }
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.rand(alpha.shape, generator=gen, dtype=torch.float64) * 1e-12  # random tie-breaking
    ra, rc = _average_ranks(alpha), _average_ranks(c)
    ra, rc = ra - ra.mean(1, keepdim=True), rc - rc.mean(1, keepdim=True)
    denom = ra.norm(dim=1) * rc.norm(dim=1)
    varying = denom > 0
    rho = (ra * rc).sum(1)[varying] / denom[varying]
    spearman = rho.mean().item() if varying.any() else 0.0
    order = (alpha + jitter * alpha.abs().max().clamp(min=1.0)).argsort(dim=1, descending=True)
    overlaps = []
    for b in range(alpha.shape[0]):
        top = order[b, : int(k[b])]
        overlaps.append(credited[b, top].double().mean().item())
    norm_alpha = alpha / alpha.sum(1, keepdim=True).clamp(min=1e-30)
    return {
        "spearman": spearman,
        "topk_overlap": sum(overlaps) / len(overlaps),
        "mass_on_credited": (norm_alpha * credited).sum(1).mean().item(),
        "random_topk_overlap": (k.double() / alpha.shape[1]).mean().item(),
        "n": int(alpha.shape[0]),
        **({} if sign is None else {"sign_agreement": sign}),
    }


@torch.no_grad()
def credit_report(
    setup: SetupConfig, cache_dir=None, n: int = 512, seed: int = 123, aligned: bool = False, oracle: bool = False
) -> dict:
    """Diagnostics of ABC's alpha (RM attention), prefix differences (the RM's score at every position),
    ABC-D's alpha (SFT policy attention) and uniform against the leave-one-out true credit, on completions
    sampled from the SFT policy and on grammar texts; and ``prefix_tracking``, the Pearson correlation over all
    completion positions between the RM's score of each prefix and the hidden score of the same prefix. With
    ``aligned``, also ABC through alignment: the BPE chat reward model's alpha projected onto the policy's tokens
    (``score_and_densify_text`` with beta 1, divided by the score). With ``oracle``, also the oracle methods' rewards
    at beta 1 (alpha: their size; the signed oracle's last token carries the rest of the score) and
    ``rm_calibration``, the least-squares line of the RM's score on the hidden score, their Pearson r and the signed
    oracle's scale (``methods.rm_scale``)."""
    codec, sft, rm, _ = load_or_train(setup, cache_dir, log=None)
    chat_rm = load_or_train_chat_rm(setup, cache_dir, log=None)[:2] if aligned else None
    policy = Policy(sft, codec.special_ids)
    gen = torch.Generator().manual_seed(seed)
    n_new = setup.completion_len
    seq = generate(policy, task.prompt_sampler(codec, seed)(n), n_new, gen)
    rng = random.Random(seed)
    grammar = codec.encode(
        [task.sample_words(rng, task.Style.random_for_preferences(rng), task.PROMPT_WORDS + n_new) for _ in range(n)]
    )
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
            "uniform": credit_diagnostics(
                torch.ones(s.shape[0], n_new), credit, shares=score.expand(-1, n_new) / n_new
            ),
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
                "slope": slope.item(),
                "intercept": (rm_score.mean() - slope * hidden.mean()).item(),
                "pearson": torch.corrcoef(torch.stack([hidden, rm_score]))[0, 1].item(),
                "oracle_scale": scale,
            }
    return out
