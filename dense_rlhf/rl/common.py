"""What the trainers in this package share: the policy wrapper, sampling, log-probabilities, the KL estimate,
the clipped surrogate loss, whitening, the minibatch update and the training loop with its logging.

Layout (fixed lengths, no padding): ``seq = [BOS] prompt (P tokens in all) | response (N tokens)``.
Response token t (0-based) is ``seq[:, P + t]``; its log-probability is read at position ``P + t - 1``.
Every per-token tensor is [B, N], aligned to the response tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def text_config(lm: nn.Module) -> Any:
    """The config of a causal LM's language model: ``config.get_text_config()`` where transformers has it (a
    multimodal model's config holds its text model's under another name), else ``config``."""
    config = lm.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class Policy(nn.Module):
    """A causal LM whose banned (special) tokens get probability 0: a -inf logit bias on every forward."""

    def __init__(self, lm: nn.Module, banned_ids: list[int]):
        super().__init__()
        self.lm = lm
        self.register_buffer("logit_bias", torch.zeros(text_config(lm).vocab_size))
        self.logit_bias[banned_ids] = float("-inf")  # special tokens are never generated

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] in float32, banned tokens at -inf."""
        return self.lm(input_ids=ids, use_cache=False).logits.float() + self.logit_bias


@torch.no_grad()
def generate(
    policy: Policy, prompts: torch.Tensor, n_new: int, gen: torch.Generator, temperature: float = 1.0
) -> torch.Tensor:
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


@torch.no_grad()
def reference_logprobs(
    ref_lm: nn.Module, seq: torch.Tensor, prompt_len: int, temperature: float, logit_bias: torch.Tensor
) -> torch.Tensor:
    """log pi_ref(y_t | x, y_<t) of the frozen reference, with the policy's logit bias and temperature. [B, N]."""
    ref_logits = ref_lm(input_ids=seq, use_cache=False).logits.float() + logit_bias
    return response_logprobs(ref_logits / temperature, seq, prompt_len)


def freeze(module: nn.Module) -> None:
    """Eval mode and no gradients: the reference policy never changes."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(pi || pi_ref) at the sampled tokens: log pi(y_t) - log pi_ref(y_t). [B, N].

    Summed over the response it is an unbiased estimate of the sequence KL; the trainers log its batch mean.
    """
    return logp - ref_logp


def whiten(x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the whole batch; with shift_mean=False the mean is added back."""
    mean, var = x.mean(), x.var(unbiased=False)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate (PPO, Schulman et al. 2017), averaged over every token:

        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        L_pg  = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))

    Returns (L_pg, the fraction of tokens whose ratio left [1 - eps, 1 + eps]).
    """
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange)).mean()
    clipfrac = ((ratio - 1).abs() > cliprange).float().mean()
    return pg, clipfrac


@dataclass
class TrainerState:
    """What a training run carries from step to step: the policy being trained, the frozen reference, the
    optimiser and the generator that draws the samples and the minibatch orders."""

    policy: Policy
    ref_lm: nn.Module
    optimizer: torch.optim.Optimizer
    gen: torch.Generator


def start_training(policy: Policy, ref_lm: nn.Module, lr: float, adam_eps: float, seed: int) -> TrainerState:
    """Seed torch and the sampling generator with ``seed``, freeze the reference and make the policy's Adam."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    freeze(ref_lm)
    return TrainerState(policy, ref_lm, torch.optim.Adam(policy.parameters(), lr=lr, eps=adam_eps), gen)


# minibatch_loss(rows) -> (the loss to minimise, the named terms to log), on the batch rows ``rows`` [M]
MinibatchLoss = Callable[[torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def minibatch_update(
    state: TrainerState,
    n_rows: int,
    minibatch_size: int,
    epochs: int,
    max_grad_norm: float | None,
    minibatch_loss: MinibatchLoss,
) -> dict[str, float]:
    """``epochs`` passes over a batch of ``n_rows`` rows, each in a fresh random order (from ``state.gen``) cut
    into minibatches of ``minibatch_size`` rows; one optimiser step per minibatch on ``minibatch_loss(rows)``,
    with the gradient's norm clipped to ``max_grad_norm`` (None: not clipped). The policy is in train mode
    during the update and in eval mode after it. Returns each logged term's mean over the updates."""
    policy = state.policy
    policy.train()
    totals: dict[str, float] = {}
    n_updates = 0
    for _ in range(epochs):
        order = torch.randperm(n_rows, generator=state.gen)
        for start in range(0, n_rows, minibatch_size):
            loss, terms = minibatch_loss(order[start : start + minibatch_size])
            state.optimizer.zero_grad()
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
            state.optimizer.step()
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.item()
            n_updates += 1
    policy.eval()
    return {name: total / n_updates for name, total in totals.items()}


def run_steps(
    n_steps: int, one_step: Callable[[int], dict], name: str, on_step: Callable[[int, dict], None] | None = None
) -> list[dict]:
    """Call ``one_step(step)`` n_steps times; each returns a dict of float metrics, to which the step index and
    its wall time are added. Stops with FloatingPointError at the first non-finite metric."""
    history = []
    for step in range(n_steps):
        t0 = time.perf_counter()
        stats = one_step(step)
        stats["step"] = step
        stats["seconds"] = time.perf_counter() - t0
        if not all(math.isfinite(v) for v in stats.values() if isinstance(v, float)):
            raise FloatingPointError(f"non-finite {name} statistics at step {step}: {stats}")
        history.append(stats)
        if on_step:
            on_step(step, stats)
    return history
