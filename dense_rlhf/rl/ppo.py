"""A single-file PPO for RLHF that takes per-token rewards (for ABC and its baselines).

Why this exists: trl removed ``PPOTrainer`` after release 1.12 (its remaining online trainers, GRPO and
RLOO, are critic-free and take one scalar per completion), so there is no maintained, small PPO in the
installed stack that accepts a [B, response_len] reward tensor. This file is that loop, kept readable: one
function per stage, the equations next to the lines, no hidden state beyond the models and the optimiser.
Larger frameworks already take token-level rewards: in verl, hand ``dense_rewards(...)[:, P:P + N]`` (the
columns of the response tokens) as ``token_level_scores`` [B, response_len]; see experiments/README.md.

Layout (fixed lengths, no padding): ``seq = [BOS] prompt (P tokens in all) | response (N tokens)``.
Response token t (0-based) is ``seq[:, P + t]``; its log-probability and the value of the state before it
are read at position ``P + t - 1``. Every per-token tensor below is [B, N], aligned to the response tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dense_rlhf.capture import capture_reward_attention


@dataclass
class PPOConfig:
    steps: int = 100
    batch_size: int = 32
    minibatch_size: int = 16
    ppo_epochs: int = 4
    lr: float = 3e-4
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    whiten_rewards: bool = False
    temperature: float = 1.0


class PolicyWithValue(nn.Module):
    """A causal LM with a scalar value head on its last hidden state (shared trunk, as in trl's
    ``AutoModelForCausalLMWithValueHead`` that the paper's PPO used)."""

    def __init__(self, lm: nn.Module, banned_ids: list[int]):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.n_embd, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)
        self.register_buffer("logit_bias", torch.zeros(lm.config.vocab_size))
        self.logit_bias[banned_ids] = float("-inf")  # special tokens are never generated

    def forward(self, ids: torch.Tensor):
        """Returns (logits [B, L, V], values [B, L])."""
        out = self.lm(input_ids=ids, output_hidden_states=True, use_cache=False)
        logits = out.logits.float() + self.logit_bias
        values = self.v_head(out.hidden_states[-1]).squeeze(-1).float()
        return logits, values


@torch.no_grad()
def generate(policy: PolicyWithValue, prompts: torch.Tensor, n_new: int, gen: torch.Generator,
             temperature: float = 1.0) -> torch.Tensor:
    """Ancestral sampling, full vocabulary (no top-k/top-p), with the KV cache: y_t ~ pi(. | x, y_<t)."""
    ids, x, cache = prompts, prompts, None
    for _ in range(n_new):
        out = policy.lm(input_ids=x, cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1].float() / temperature + policy.logit_bias
        x = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        ids = torch.cat([ids, x], dim=1)
    return ids


def response_logprobs(logits: torch.Tensor, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for the response tokens: logits at P+t-1 scored against seq[:, P+t]. [B, N]."""
    logp = torch.log_softmax(logits[:, prompt_len - 1 : -1], dim=-1)
    return logp.gather(-1, seq[:, prompt_len:, None]).squeeze(-1)


def whiten(x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the whole batch; with shift_mean=False the mean is added back."""
    mean, var = x.mean(), x.var(unbiased=False)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over the response, V(s_N) = 0 after the last token:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                      (the value target)
    """
    n = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(n)):
        next_v = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values


def ppo_losses(logp, old_logp, values, old_values, adv, returns, cliprange, cliprange_value):
    """Clipped surrogate policy loss and clipped value loss (PPO, Schulman et al. 2017):

        rho_t   = exp(log pi(y_t) - log pi_old(y_t))
        L_pg    = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
        V_clip  = V_old + clip(V - V_old, -eps_v, eps_v)
        L_vf    = 0.5 mean_t max((V - R_t)^2, (V_clip - R_t)^2)
    """
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange)).mean()
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    clipfrac = ((ratio - 1).abs() > cliprange).float().mean()
    return pg, vf, clipfrac


@dataclass
class Rollout:
    seq: torch.Tensor  # [B, P + N] token ids
    old_logp: torch.Tensor  # [B, N]
    ref_logp: torch.Tensor  # [B, N]
    old_values: torch.Tensor  # [B, N] V(state before response token t)
    policy_attn_rows: torch.Tensor  # [B, H, P + N] the policy's last-layer attention from its final token


# token_scores(rollout) -> [B, N] per-token task rewards (before the KL penalty), plus a dict of metrics
TokenScoreFn = Callable[[Rollout], "tuple[torch.Tensor, dict]"]


@dataclass
class PPOTrainerState:
    policy: PolicyWithValue
    ref_lm: nn.Module
    optimizer: torch.optim.Optimizer
    history: list = field(default_factory=list)


@torch.no_grad()
def rollout(policy: PolicyWithValue, ref_lm: nn.Module, prompts: torch.Tensor, n_new: int,
            gen: torch.Generator, temperature: float) -> Rollout:
    """Sample responses, then one forward each of policy and reference over the whole sequence."""
    policy.eval()
    seq = generate(policy, prompts, n_new, gen, temperature)
    p = prompts.shape[1]
    # ABC-D reads the policy's own last-layer attention row from its final generated token (one forward)
    with capture_reward_attention(policy.lm, layer=-1, reward_index=seq.shape[1] - 1) as cap:
        logits, values = policy(seq)
    old_logp = response_logprobs(logits / temperature, seq, p)
    ref_logits = ref_lm(input_ids=seq, use_cache=False).logits.float() + policy.logit_bias
    ref_logp = response_logprobs(ref_logits / temperature, seq, p)
    return Rollout(seq, old_logp, ref_logp, values[:, p - 1 : -1], cap.rows)


def ppo_step(state: PPOTrainerState, ro: Rollout, token_scores: torch.Tensor, cfg: PPOConfig,
             gen: torch.Generator) -> dict:
    """One PPO update from one rollout batch.

    Per-token reward, with the task reward s_t (ABC, sparse, uniform ...) and the KL penalty to the frozen
    reference (the k1 estimator, log pi_old - log pi_ref, at each sampled token):

        r_t = s_t - kl_coef * (log pi_old(y_t) - log pi_ref(y_t))
    """
    policy = state.policy
    p = ro.seq.shape[1] - token_scores.shape[1]
    kl = ro.old_logp - ro.ref_logp  # [B, N]
    rewards = token_scores - cfg.kl_coef * kl
    if cfg.whiten_rewards:
        rewards = whiten(rewards, shift_mean=False)
    adv, returns = gae(rewards, ro.old_values, cfg.gamma, cfg.lam)
    adv = whiten(adv)  # A <- (A - mean A) / std A over the batch

    policy.train()
    b = ro.seq.shape[0]
    stats = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(b, generator=gen)
        for start in range(0, b, cfg.minibatch_size):
            idx = order[start : start + cfg.minibatch_size]
            logits, values = policy(ro.seq[idx])
            logp = response_logprobs(logits / cfg.temperature, ro.seq[idx], p)
            pg, vf, clipfrac = ppo_losses(
                logp, ro.old_logp[idx], values[:, p - 1 : -1], ro.old_values[idx], adv[idx], returns[idx],
                cfg.cliprange, cfg.cliprange_value,
            )
            loss = pg + cfg.vf_coef * vf  # L = L_pg + c_vf * L_vf
            state.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            state.optimizer.step()
            stats["pg_loss"] += pg.item()
            stats["vf_loss"] += vf.item()
            stats["clipfrac"] += clipfrac.item()
            n_updates += 1
    policy.eval()
    stats = {k: v / n_updates for k, v in stats.items()}
    stats["kl"] = kl.sum(1).mean().item()  # KL(pi || pi_ref) per sequence, k1 estimate
    stats["mean_token_reward"] = token_scores.sum(1).mean().item()
    return stats


def train(policy: PolicyWithValue, ref_lm: nn.Module, sample_prompts: Callable[[int], torch.Tensor],
          n_new: int, score_fn: TokenScoreFn, cfg: PPOConfig, seed: int,
          on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run cfg.steps PPO steps; returns one metrics dict per step (score_fn's metrics included)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ref_lm.eval()
    for param in ref_lm.parameters():
        param.requires_grad_(False)
    state = PPOTrainerState(policy, ref_lm, torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5))
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        ro = rollout(policy, ref_lm, sample_prompts(cfg.batch_size), n_new, gen, cfg.temperature)
        token_scores, metrics = score_fn(ro)
        stats = ppo_step(state, ro, token_scores, cfg, gen)
        stats.update(metrics)
        stats["step"] = step
        stats["seconds"] = time.perf_counter() - t0
        if not all(math.isfinite(v) for v in stats.values() if isinstance(v, float)):
            raise FloatingPointError(f"non-finite PPO statistics at step {step}: {stats}")
        state.history.append(stats)
        if on_step:
            on_step(step, stats)
    return state.history
