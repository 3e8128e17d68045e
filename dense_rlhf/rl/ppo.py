"""A single-file PPO for RLHF that takes per-token rewards (for ABC and its baselines).

Why this exists: trl removed ``PPOTrainer`` after release 1.12 (its remaining online trainers, GRPO and
RLOO, are critic-free and take one scalar per completion), so there is no maintained, small PPO in the
installed stack that accepts a [B, response_len] reward tensor. This file is that loop, kept readable: one
function per stage, the equations next to the lines, no hidden state beyond the models and the optimiser.
Larger frameworks already take token-level rewards: in verl, hand ``dense_rewards(...)[:, P:P + N]`` (the
columns of the response tokens) as ``token_level_scores`` [B, response_len]; see experiments/README.md.
Sampling, log-probabilities, the KL estimate, the clipped surrogate, the minibatch update and the training loop
are shared with the critic-free trainer ``grpo.py`` (``common.py``). Any causal LM of transformers can be the
policy (GPT-2, Llama ...): the value head is sized from its config's ``hidden_size``.

Layout (fixed lengths, no padding): ``seq = [BOS] prompt (P tokens in all) | response (N tokens)``.
Response token t (0-based) is ``seq[:, P + t]``; its log-probability and the value of the state before it
are read at position ``P + t - 1``. Every per-token tensor below is [B, N], aligned to the response tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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
    text_config,
    whiten,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "PPOConfig",
    "PolicyWithValue",
    "Rollout",
    "RolloutHook",
    "gae",
    "generate",
    "kl_controller",
    "ppo_losses",
    "ppo_step",
    "response_logprobs",
    "rollout",
    "train",
    "whiten",
]


@dataclass
class PPOConfig:
    """PPO's settings. The KL coefficient is fixed unless ``kl_target`` is set; then ``kl_coef`` is the initial
    value of the adaptive controller (``AdaptiveKLController``, trl 0.7.4's)."""

    steps: int = 100
    """PPO steps (a rollout, then its update) in a run"""
    batch_size: int = 32
    """completions sampled per PPO step, one prompt each"""
    minibatch_size: int = 16
    """completions per optimiser step"""
    ppo_epochs: int = 4
    """passes over each rollout batch"""
    lr: float = 3e-4
    """Adam's learning rate"""
    kl_coef: float = 0.05
    """KL penalty coefficient in the per-token reward; the initial one when kl_target is set"""
    gamma: float = 1.0
    """GAE's discount"""
    lam: float = 0.95
    """GAE's lambda"""
    cliprange: float = 0.2
    """PPO's clip range of the probability ratio"""
    cliprange_value: float = 0.2
    """clip range of the value function's change"""
    vf_coef: float = 0.1
    """weight of the value loss in the total loss"""
    max_grad_norm: float | None = 1.0
    """the gradient norm is clipped to this (None: no clipping)"""
    whiten_rewards: bool = False
    """whiten the per-token rewards over the batch before GAE (the mean kept)"""
    temperature: float = 1.0
    """sampling temperature; log-probabilities are taken at the same temperature"""
    kl_target: float | None = None
    """the adaptive KL controller's target, nats per completion (None: a fixed coefficient)"""
    kl_horizon: float = 10000.0
    """the adaptive KL controller's horizon"""
    adam_eps: float = 1e-5
    """Adam's epsilon"""


class PolicyWithValue(Policy):
    """A causal LM with a scalar value head on its last hidden state (shared trunk, as in trl's
    ``AutoModelForCausalLMWithValueHead`` that the paper's PPO used). The head is a float32 linear layer of the
    language model's ``hidden_size`` (its text config's, see ``common.text_config``), initialised to zero."""

    def __init__(self, lm: nn.Module, banned_ids: list[int]):
        super().__init__(lm, banned_ids)
        self.v_head = nn.Linear(text_config(lm).hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits [B, L, V], values [B, L]), both float32."""
        out = self.lm(input_ids=ids, output_hidden_states=True, use_cache=False)
        logits = out.logits.float() + self.logit_bias
        hidden = out.hidden_states[-1].to(self.v_head.weight.dtype)
        values = self.v_head(hidden).squeeze(-1).float()
        return logits, values


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response, V(s_N) = 0 after the last token:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                      (the value target)

    Returns (A, R), both [B, N].
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


def ppo_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    adv: torch.Tensor,
    returns: torch.Tensor,
    cliprange: float,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate policy loss and clipped value loss (PPO, Schulman et al. 2017):

        rho_t   = exp(log pi(y_t) - log pi_old(y_t))
        L_pg    = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
        V_clip  = V_old + clip(V - V_old, -eps_v, eps_v)
        L_vf    = 0.5 mean_t max((V - R_t)^2, (V_clip - R_t)^2)

    Returns (L_pg, L_vf, the fraction of tokens whose ratio was clipped).
    """
    pg, clipfrac = clipped_policy_loss(logp, old_logp, adv, cliprange)
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    return pg, vf, clipfrac


@dataclass
class Rollout:
    seq: torch.Tensor  # [B, P + N] token ids
    old_logp: torch.Tensor  # [B, N]
    ref_logp: torch.Tensor  # [B, N]
    old_values: torch.Tensor  # [B, N] V(state before response token t)
    captured: Any = None  # what the rollout's hook returned on entering (None without a hook)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_completions: int) -> None:
        pass


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. (2019), as trl 0.7.4's ``PPOTrainer`` runs it (its default,
    ``adap_kl_ctrl=True``, initial coefficient 0.2, target 6, horizon 10000). After each PPO step, with that step's
    KL (the batch mean over completions of sum_t log pi_old(y_t) - log pi_ref(y_t), nats per completion) and the
    number n of completions in the step:

        e     = clip(KL / target - 1, -0.2, 0.2)
        coef <- coef * (1 + e * n / horizon)

    The step's rewards use the coefficient from before the update. One step moves it by at most a factor
    1 +- 0.2 n / horizon: with n = 16 and horizon 10000, 0.032% a step, at most 4.9% over 150 steps."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not target > 0 or not horizon > 0:
            raise ValueError(f"kl_target and kl_horizon must be positive, got {target} and {horizon}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_completions: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_completions / self.horizon


def kl_controller(cfg: PPOConfig) -> FixedKLController | AdaptiveKLController:
    """The KL coefficient's controller of a configuration: adaptive when ``cfg.kl_target`` is set, else fixed."""
    if cfg.kl_target is None:
        return FixedKLController(cfg.kl_coef)
    return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)


# token_scores(rollout) -> [B, N] per-token task rewards (before the KL penalty), plus a dict of metrics
TokenScoreFn = Callable[[Rollout], "tuple[torch.Tensor, dict]"]
# rollout_hook(lm, seq) -> a context manager entered around the rollout's forward of the policy's language model over
# the sampled sequences seq [B, P + N]; what it returns on entering is kept as Rollout.captured for score_fn. The
# study's ABC-D baseline reads the policy's own attention this way (dense_rlhf.study.methods.capture_policy_attention).
RolloutHook = Callable[[nn.Module, torch.Tensor], AbstractContextManager]


@torch.no_grad()
def rollout(
    policy: PolicyWithValue,
    ref_lm: nn.Module,
    prompts: torch.Tensor,
    n_new: int,
    gen: torch.Generator,
    temperature: float,
    hook: RolloutHook | None = None,
) -> Rollout:
    """Sample responses, then one forward each of policy and reference over the whole sequence; the policy's forward
    runs inside ``hook(policy.lm, seq)`` if given (``RolloutHook``), whose value is kept as ``Rollout.captured``."""
    policy.eval()
    seq = generate(policy, prompts, n_new, gen, temperature)
    p = prompts.shape[1]
    with hook(policy.lm, seq) if hook is not None else nullcontext() as captured:
        logits, values = policy(seq)
    old_logp = response_logprobs(logits / temperature, seq, p)
    ref_logp = reference_logprobs(ref_lm, seq, p, temperature, policy.logit_bias)
    return Rollout(seq, old_logp, ref_logp, values[:, p - 1 : -1], captured)


def ppo_step(
    state: TrainerState,
    kl_ctl: FixedKLController | AdaptiveKLController,
    ro: Rollout,
    token_scores: torch.Tensor,
    cfg: PPOConfig,
) -> dict[str, float]:
    """One PPO update from one rollout batch.

    Per-token reward, with the task reward s_t (ABC, sparse, uniform ...) and the KL penalty to the frozen
    reference (the k1 estimator, log pi_old - log pi_ref, at each sampled token):

        r_t = s_t - kl_coef * (log pi_old(y_t) - log pi_ref(y_t))

    then GAE's advantages, whitened over the batch, and ``cfg.ppo_epochs`` passes of minibatch updates on

        L = L_pg + vf_coef * L_vf                (``ppo_losses``)

    kl_coef is ``kl_ctl.value``; after the update the controller sees this step's KL (see
    ``AdaptiveKLController``).
    """
    p = ro.seq.shape[1] - token_scores.shape[1]
    kl = kl_k1(ro.old_logp, ro.ref_logp)  # [B, N]
    kl_coef = kl_ctl.value
    rewards = token_scores - kl_coef * kl
    if cfg.whiten_rewards:
        rewards = whiten(rewards, shift_mean=False)
    adv, returns = gae(rewards, ro.old_values, cfg.gamma, cfg.lam)
    adv = whiten(adv)  # A <- (A - mean A) / std A over the batch

    def minibatch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, values = state.policy(ro.seq[idx])
        logp = response_logprobs(logits / cfg.temperature, ro.seq[idx], p)
        pg, vf, clipfrac = ppo_losses(
            logp,
            ro.old_logp[idx],
            values[:, p - 1 : -1],
            ro.old_values[idx],
            adv[idx],
            returns[idx],
            cfg.cliprange,
            cfg.cliprange_value,
        )
        return pg + cfg.vf_coef * vf, {"pg_loss": pg, "vf_loss": vf, "clipfrac": clipfrac}

    b = ro.seq.shape[0]
    stats = minibatch_update(state, b, cfg.minibatch_size, cfg.ppo_epochs, cfg.max_grad_norm, minibatch_loss)
    stats["kl"] = kl.sum(1).mean().item()  # KL(pi || pi_ref) per sequence, k1 estimate
    stats["mean_token_reward"] = token_scores.sum(1).mean().item()
    stats["kl_coef"] = kl_coef
    kl_ctl.update(stats["kl"], b)
    return stats


def train(
    policy: PolicyWithValue,
    ref_lm: nn.Module,
    sample_prompts: Callable[[int], torch.Tensor],
    n_new: int,
    score_fn: TokenScoreFn,
    cfg: PPOConfig,
    seed: int,
    on_step: Callable[[int, dict], None] | None = None,
    rollout_hook: RolloutHook | None = None,
) -> list[dict]:
    """Run cfg.steps PPO steps; returns one metrics dict per step (score_fn's metrics included).
    ``rollout_hook``: entered around every rollout's policy forward (``RolloutHook``), for ``score_fn`` to read."""
    state = start_training(policy, ref_lm, cfg.lr, cfg.adam_eps, seed)
    kl_ctl = kl_controller(cfg)

    def one_step(step: int) -> dict:
        ro = rollout(policy, ref_lm, sample_prompts(cfg.batch_size), n_new, state.gen, cfg.temperature, rollout_hook)
        token_scores, metrics = score_fn(ro)
        return {**ppo_step(state, kl_ctl, ro, token_scores, cfg), **metrics}

    return run_steps(cfg.steps, one_step, "PPO", on_step)
