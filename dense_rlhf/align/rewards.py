"""The text path's rewards from the reward model's values projected onto the policy's tokens, through
:func:`dense_rlhf.dense_rewards` and :func:`dense_rlhf.prefix_rewards` (the single implementations of the formulas),
with rows that get the sparse reward (credit not mappable) or nothing (not scored)."""

from __future__ import annotations

import torch

from dense_rlhf.ops import dense_rewards, prefix_rewards, sparse_rewards, uniform_rewards


def _rewards_from_credit(
    credit: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta: float, sparse_rows=(), empty_rows=()
) -> torch.Tensor:
    """ABC's rewards [B, R] from the projected credit [B, R] (:func:`dense_rlhf.dense_rewards`); rows in
    ``sparse_rows`` get the score on their last response token instead, rows in ``empty_rows`` zeros."""
    special = set(sparse_rows) | set(empty_rows)
    dense = [b for b in range(credit.shape[0]) if b not in special]
    rewards = torch.zeros(credit.shape, dtype=torch.float32, device=credit.device)
    if dense:
        rewards[dense] = dense_rewards(credit[dense], scores[dense], mask[dense], beta=beta)
    last = torch.where(mask, torch.arange(mask.shape[1], device=mask.device), -1).amax(1)
    for b in sparse_rows:
        rewards[b, last[b]] = scores[b]
    return rewards


def _rewards_from_differences(
    projected: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta: float, sparse_rows=(), empty_rows=()
) -> torch.Tensor:
    """Prefix-difference rewards [B, R] from the reward model's score changes projected onto the policy's tokens
    [B, R], through :func:`dense_rlhf.prefix_rewards` (the single implementation of the formula): the projected
    changes, accumulated along each row, are its prefix scores, and the score is read at one position past the end,
    so the last response token also gets what did not reach any policy token (the change after the response, and the
    share of a reward-model token that straddles the response's start). Rows in ``sparse_rows`` get the score on
    their last response token instead, rows in ``empty_rows`` zeros."""
    batch, length = projected.shape
    special = set(sparse_rows) | set(empty_rows)
    dense = [b for b in range(batch) if b not in special]
    rewards = torch.zeros(projected.shape, dtype=torch.float32, device=projected.device)
    if dense:
        prefix = torch.cat([torch.cumsum(projected[dense] * mask[dense], 1), scores[dense, None]], 1)
        extended = torch.cat([mask[dense], mask.new_zeros(len(dense), 1)], 1)
        index = torch.full((len(dense),), length, dtype=torch.long, device=projected.device)
        rewards[dense] = prefix_rewards(prefix, extended, beta=beta, reward_index=index)[:, :length]
    last = torch.where(mask, torch.arange(length, device=mask.device), -1).amax(1)
    for b in sparse_rows:
        rewards[b, last[b]] = scores[b]
    return rewards


def _baseline_rewards(method: str, scores: torch.Tensor, mask: torch.Tensor, empty_rows=()) -> torch.Tensor:
    """The "sparse" or "uniform" rewards [B, R] of the rows not in ``empty_rows`` (zeros there)."""
    rows = [b for b in range(mask.shape[0]) if b not in set(empty_rows)]
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if rows:
        rewards[rows] = (sparse_rewards if method == "sparse" else uniform_rewards)(scores[rows], mask[rows])
    return rewards
