"""A single-file GRPO (Shao et al. 2024, DeepSeekMath) with token-level advantages from ABC's credit.

GRPO is critic-free: it samples G completions of every prompt, scores each with the reward model, and uses
the score's standing within its group as the advantage of the completion. Plain GRPO gives that one number
to every token; ABC's credit ``alpha`` (the reward model's attention share per completion token, see
``dense_rlhf.dense_rewards``) says which tokens earned the score. This file is the loop, kept readable like
``ppo.py`` and sharing its sampling, log-probabilities, KL estimate, clipped surrogate, minibatch update and
training loop (``common.py``), plus the three advantage schemes compared in ``dense-rlhf grpo-study``:

1. ``plain``   ``A[i, t] = A_i``                                                (GRPO as published)
2. ``credit``  ``A[i, t] = A_i * n_i * (beta * alpha[i, t] + (1 - beta) / n_i)`` (credit-weighted)
3. ``dense``   group-normalised return-to-go of ABC's per-token rewards         (dense returns)

with ``A_i = (r_i - mean_group(r)) / (std_group(r) + eps)``. The scheme functions take a completion mask so
that ``dense_rlhf.integrations.trl`` can apply them to trl's right-padded, variable-length completions.

Layout (fixed lengths, no padding): ``seq = [BOS] prompt (P tokens in all) | response (N tokens)``; the
batch holds ``prompts_per_step`` groups of ``group_size`` rows each, group g in rows ``g*G .. g*G + G - 1``.
Every per-token tensor is [B, N], aligned to the response tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dense_rlhf.ops import check_beta, dense_rewards
from dense_rlhf.rl.common import (
    Policy,
    TrainerState,
    clipped_policy_loss,
    generate,
    kl_k1,
    minibatch_update,
    reference_logprobs,
    response_logprobs,
    run_steps,
    start_training,
)

__all__ = [
    "GRPOConfig",
    "GroupRollout",
    "SCHEMES",
    "credit_weighted_advantages",
    "dense_return_advantages",
    "group_advantages",
    "grpo_losses",
    "grpo_step",
    "plain_advantages",
    "rollout",
    "token_advantages",
    "train",
]

SCHEMES = ("plain", "credit", "dense")
SCALES = ("group", "batch", "none")


@dataclass
class GRPOConfig:
    """GRPO's settings. The defaults match ``PPOConfig``'s budget: 8 prompts x 4 completions = 32 completions per
    step, 4 epochs of 2 minibatches of 16 = 8 Adam updates per step."""

    steps: int = 100
    """GRPO steps (a rollout, then its update) in a run"""
    prompts_per_step: int = 8
    """prompts sampled per step"""
    group_size: int = 4
    """G, completions per prompt"""
    minibatch_size: int = 16
    """completions per optimiser step"""
    epochs: int = 4
    """passes over each rollout batch (mu in the GRPO paper)"""
    lr: float = 3e-4
    """Adam's learning rate"""
    kl_coef: float = 0.05
    """coefficient of the KL term in the loss"""
    cliprange: float = 0.2
    """clip range of the probability ratio"""
    max_grad_norm: float | None = 1.0
    """the gradient norm is clipped to this (None: no clipping)"""
    temperature: float = 1.0
    """sampling temperature; log-probabilities are taken at the same temperature"""
    scheme: str = "plain"
    """the token advantages: plain, credit (scheme 2) or dense (scheme 3)"""
    credit_beta: float = 0.5
    """scheme 2: the attention-weighted share of each token's advantage; the rest is spread evenly"""
    abc_beta: float = 0.8
    """scheme 3: ABC's dense/sparse mix of the per-token rewards (the paper's value)"""
    scale: str = "group"
    """what divides the centred scores: group std (GRPO), batch std, or none (Dr. GRPO)"""
    eps: float = 1e-4
    """added to the divisor of the centred scores"""
    adam_eps: float = 1e-5
    """Adam's epsilon"""


# ------------------------------------------------------------------------------------ advantage schemes


def _check_mask(mask: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask must have the shape of {name} {tuple(like.shape)}, got {tuple(mask.shape)}")
    return mask.to(torch.bool)


def _check_adv(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if adv.dim() != 1 or adv.shape[0] != mask.shape[0]:
        raise ValueError(f"adv must be [B] with B = {mask.shape[0]} rows of mask, got {tuple(adv.shape)}")
    return adv.float()[:, None]


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (a group's std needs two samples), got {group_size}")
    if x.shape[0] % group_size:
        raise ValueError(f"the batch ({x.shape[0]} rows) is not a whole number of groups of group_size={group_size}")
    return x.view(-1, group_size, *x.shape[1:])


def _scale_of(scores: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """Per-row divisor: the group's or the batch's standard deviation of the scores (Bessel-corrected, as trl's
    ``nanstd``), or 1."""
    if scale == "group":
        return _groups(scores, group_size).std(dim=1).repeat_interleave(group_size)
    if scale == "batch":
        return scores.std().expand_as(scores)
    if scale == "none":
        return torch.ones_like(scores)
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def group_advantages(scores: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's sequence advantage, ``A_i = (r_i - mean_{j in g(i)} r_j) / (std_{j in g(i)} r_j + eps)``. [B].

    ``scores`` [B] holds groups of ``group_size`` consecutive rows; ``scale`` picks the divisor (``"group"``:
    the group std as above; ``"batch"``: the std over the batch; ``"none"``: 1, no ``eps``). These are trl's
    ``scale_rewards`` choices with its ``eps`` of 1e-4, so the numbers match trl's GRPOTrainer.
    """
    scores = scores.float()
    mean = _groups(scores, group_size).mean(dim=1).repeat_interleave(group_size)
    divisor = _scale_of(scores, group_size, scale)
    return (scores - mean) if scale == "none" else (scores - mean) / (divisor + eps)


def plain_advantages(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scheme 1, plain GRPO: every completion token carries its completion's advantage, ``A[i, t] = A_i``.
    [B, T], zero outside ``mask`` [B, T]."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got {tuple(mask.shape)}")
    return _check_adv(adv, mask) * mask.to(torch.bool)


def credit_weighted_advantages(
    adv: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Scheme 2, credit-weighted: ``A[i, t] = A_i * n_i * (beta * alpha[i, t] + (1 - beta) / n_i)``. [B, T].

    ``alpha`` [B, T] is ABC's credit, each row summing to 1 over its ``n_i`` completion tokens (``mask``). The
    weights ``n_i * (beta * alpha + (1 - beta) / n_i)`` average 1 over the completion, so the mean of
    ``A[i, :]`` over its tokens stays ``A_i`` (the sequence-level update keeps its size, only its spread over
    the tokens changes): beta = 0 is plain GRPO, beta = 1 gives token t the share ``n_i * alpha[i, t]``, zero
    where the reward model did not look. The default 0.5 keeps half of every token's plain advantage, so a
    token the attention misses still learns, and bounds the weight below by 0.5.
    """
    mask = _check_mask(mask, alpha, "alpha")
    beta = check_beta(beta)
    n = mask.sum(1, keepdim=True).float()
    weights = n * beta * alpha.float() + (1.0 - beta)
    return _check_adv(adv, mask) * weights * mask


def dense_return_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Scheme 3, dense returns: a per-step group baseline for the return-to-go of ABC's per-token rewards. [B, T].

        G[i, t] = sum_{s >= t} r[i, s]                                 (return-to-go, gamma = 1)
        A[i, t] = (G[i, t] - mean_{j in g(i), t < n_j} G[j, t]) / (std_{j in g(i)} G[j, 0] + eps)

    ``rewards`` [B, T]: ABC's rewards on the completion tokens (``mask``), each row summing to the score, so
    ``G[i, 0] = r_i`` and at the first token this is exactly plain GRPO's ``A_i``. The baseline at step t is
    the mean over the group's members that are still generating at t (completions may differ in length; one
    that has ended has no step t, and counting it as 0 would reward length). The divisor is one number per
    group, the std of the scores (``scale`` as in :func:`group_advantages`), not the std of ``G[:, t]`` at
    each step: late tokens, whose remaining reward varies little across the group, keep small advantages
    instead of being blown up to unit scale, and the advantages stay in the units of plain GRPO's.
    """
    mask = _check_mask(mask, rewards, "rewards")
    r = rewards.float() * mask
    ret = r.flip(1).cumsum(1).flip(1)  # G[i, t]
    g_ret, g_mask = _groups(ret, group_size), _groups(mask, group_size).float()
    count = g_mask.sum(1, keepdim=True)
    baseline = (g_ret * g_mask).sum(1, keepdim=True) / count.clamp(min=1.0)
    centred = ((g_ret - baseline) * g_mask).view_as(ret)
    divisor = _scale_of(r.sum(1), group_size, scale)
    return centred if scale == "none" else centred / (divisor + eps)[:, None]


def token_advantages(
    scheme: str,
    scores: torch.Tensor,
    alpha: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    credit_beta: float = 0.5,
    abc_beta: float = 0.8,
    scale: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """[B, T] advantages of one scheme from the scores [B] and ABC's credit alpha [B, T] (rows summing to 1 on
    ``mask``). Scheme 3's per-token rewards are ``dense_rewards(alpha, scores, mask, beta=abc_beta)``:
    ``abc_beta * r_i * alpha[i, t] + (1 - abc_beta) * r_i * [t == last]``."""
    if scheme == "plain":
        return plain_advantages(group_advantages(scores, group_size, scale, eps), mask)
    if scheme == "credit":
        return credit_weighted_advantages(group_advantages(scores, group_size, scale, eps), alpha, mask, credit_beta)
    if scheme == "dense":
        rewards = dense_rewards(alpha, scores.float(), mask, beta=abc_beta)
        return dense_return_advantages(rewards, mask, group_size, scale, eps)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


# ---------------------------------------------------------------------------------------------- training


@dataclass
class GroupRollout:
    seq: torch.Tensor  # [B, P + N] token ids, B = prompts x group_size, groups in consecutive rows
    old_logp: torch.Tensor  # [B, N]
    ref_logp: torch.Tensor  # [B, N]
    group_size: int


# score_fn(rollout) -> (scores [B], ABC's credit alpha [B, N] with rows summing to 1, metrics)
ScoreFn = Callable[[GroupRollout], "tuple[torch.Tensor, torch.Tensor, dict]"]


@torch.no_grad()
def rollout(
    policy: Policy,
    ref_lm: nn.Module,
    prompts: torch.Tensor,
    group_size: int,
    n_new: int,
    gen: torch.Generator,
    temperature: float,
) -> GroupRollout:
    """G completions of every prompt, then one forward each of policy and reference over the whole batch."""
    policy.eval()
    seq = generate(policy, prompts.repeat_interleave(group_size, dim=0), n_new, gen, temperature)
    p = prompts.shape[1]
    old_logp = response_logprobs(policy(seq) / temperature, seq, p)
    ref_logp = reference_logprobs(ref_lm, seq, p, temperature, policy.logit_bias)
    return GroupRollout(seq, old_logp, ref_logp, group_size)


def grpo_losses(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate with per-token advantages, and the KL term of the GRPO loss (Shao et al. 2024):

        L_pg = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi(y_t) / pi_old(y_t)
        L_kl = mean_t [ pi_ref(y_t) / pi(y_t) - log(pi_ref(y_t) / pi(y_t)) - 1 ]

    L_kl is the k3 estimator of KL(pi || pi_ref) at the sampled tokens: unbiased, never negative, and its
    gradient pulls pi towards pi_ref; GRPO adds it to the loss instead of to the reward (there is no critic to
    carry a per-token reward back).
    """
    pg, clipfrac = clipped_policy_loss(logp, old_logp, adv, cliprange)
    log_ratio_ref = ref_logp - logp
    kl = (torch.exp(log_ratio_ref) - log_ratio_ref - 1).mean()
    return pg, kl, clipfrac


def grpo_step(state: TrainerState, ro: GroupRollout, adv: torch.Tensor, cfg: GRPOConfig) -> dict[str, float]:
    """cfg.epochs passes over one rollout batch in shuffled minibatches, with the token advantages ``adv``
    [B, N] fixed for the batch:

        L = L_pg + kl_coef * L_kl                (``grpo_losses``)
    """
    p = ro.seq.shape[1] - adv.shape[1]

    def minibatch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp = response_logprobs(state.policy(ro.seq[idx]) / cfg.temperature, ro.seq[idx], p)
        pg, kl_loss, clipfrac = grpo_losses(logp, ro.old_logp[idx], ro.ref_logp[idx], adv[idx], cfg.cliprange)
        return pg + cfg.kl_coef * kl_loss, {"pg_loss": pg, "kl_loss": kl_loss, "clipfrac": clipfrac}

    stats = minibatch_update(state, ro.seq.shape[0], cfg.minibatch_size, cfg.epochs, cfg.max_grad_norm, minibatch_loss)
    stats["kl"] = kl_k1(ro.old_logp, ro.ref_logp).sum(1).mean().item()  # KL(pi || pi_ref) per sequence, k1
    return stats


def train(
    policy: Policy,
    ref_lm: nn.Module,
    sample_prompts: Callable[[int], torch.Tensor],
    n_new: int,
    score_fn: ScoreFn,
    cfg: GRPOConfig,
    seed: int,
    on_step: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Run cfg.steps GRPO steps; returns one metrics dict per step (score_fn's metrics included)."""
    if cfg.scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {cfg.scheme!r}")
    state = start_training(policy, ref_lm, cfg.lr, cfg.adam_eps, seed)

    def one_step(step: int) -> dict:
        ro = rollout(
            policy, ref_lm, sample_prompts(cfg.prompts_per_step), cfg.group_size, n_new, state.gen, cfg.temperature
        )
        scores, alpha, metrics = score_fn(ro)
        mask = torch.ones_like(ro.old_logp, dtype=torch.bool)  # fixed-length completions
        adv = token_advantages(
            cfg.scheme,
            scores,
            alpha,
            mask,
            cfg.group_size,
            credit_beta=cfg.credit_beta,
            abc_beta=cfg.abc_beta,
            scale=cfg.scale,
            eps=cfg.eps,
        )
        return {**grpo_step(state, ro, adv, cfg), **metrics}

    return run_steps(cfg.steps, one_step, "GRPO", on_step)
