"""Reference implementations in vectorised PyTorch: Attention-Based Credit and prefix-difference rewards.

``dense_rewards_reference`` is the executable specification of ``dense_rewards``: the C++ and CUDA kernels are
tested against it, edge cases included. ``prefix_rewards_reference`` is the only implementation of
``prefix_rewards`` (a few elementwise passes over [B, L]; see ``ops.prefix_rewards`` for why it has no kernel).
Inputs are assumed already validated and normalised by :mod:`dense_rlhf.ops`.
"""

from __future__ import annotations

import torch

# Per-row status codes shared by every backend. 0 means the row was computed as specified; otherwise a row gets
# the first code that applies, in this order.
STATUS_OK = 0
STATUS_EMPTY_MASK = 1  # no completion token: the row is all zeros and its score is lost
STATUS_BAD_SCORE = 2  # score is NaN or Inf: the row is all zeros
STATUS_BAD_REWARD_INDEX = 3  # reward_index outside [0, L): the row falls back to the sparse reward
STATUS_BAD_ATTENTION = 4  # NaN or Inf among the dense weights' inputs used: the row falls back to sparse
STATUS_NEGATIVE_ATTENTION = 5  # finite, but a completion token's head sum is < 0: the row falls back to sparse
STATUS_OUT_OF_RANGE = 6  # prefix_rewards only: a reward beyond float32's range: the row falls back to sparse

STATUS_MESSAGES = {
    STATUS_EMPTY_MASK: "mask has no completion token, so the score would be lost",
    STATUS_BAD_SCORE: "score is NaN or Inf",
    STATUS_BAD_REWARD_INDEX: "reward_index is outside [0, L)",
    STATUS_BAD_ATTENTION: "attn has NaN or Inf in the values used (the row at the reward position, completion tokens)",
    STATUS_NEGATIVE_ATTENTION: "attn has negative values at completion tokens of the row at the reward position "
    "(attention weights are >= 0: were logits or scores passed instead of softmax probabilities?)",
}

# prefix_rewards reads its score at the reward position of prefix_scores: the same codes, worded for it. A bad
# reward index leaves no score to give, so that row is all zeros (dense_rewards falls back to sparse instead).
PREFIX_STATUS_MESSAGES = {
    STATUS_EMPTY_MASK: STATUS_MESSAGES[STATUS_EMPTY_MASK],
    STATUS_BAD_SCORE: "prefix_scores is NaN or Inf at the reward position",
    STATUS_BAD_REWARD_INDEX: STATUS_MESSAGES[STATUS_BAD_REWARD_INDEX],
    STATUS_BAD_ATTENTION: "prefix_scores has NaN or Inf at completion positions",
    STATUS_OUT_OF_RANGE: "prefix_scores' differences give rewards beyond float32's range (|reward| > 3.4e38)",
}


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True in each row of a [B, L] bool mask, -1 for an empty row (int64 [B])."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, positions, -1).amax(dim=1)


def dense_rewards_reference(
    attn: torch.Tensor,
    score: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    reward_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ABC rewards and per-row status from [B, H, R, L] attention, [B] float32 score, [B, L] bool mask.

    Row layouts ([B, H, L] or [B, L]) arrive as stride-0 expansions to [B, H, L, L], so the row read is
    the same whatever the reward position. With r the reward position and T the last completion token:

        a_t = sum_h attn[h, r, t]   (float32; the head mean's 1/H cancels below)
        total = sum_s mask_s * a_s
        r_t = (beta * score) * (mask_t * a_t / total) + (1 - beta) * score * [t == T]

    Each a_t is divided by total on its own: with no negative a_t, 0 <= a_t <= total, so nothing overflows
    however small total is (beta * score / total would). A row with total 0, or a bad reward index, NaN/Inf or
    negative a_t gets the sparse reward score * [t == T]; an empty mask or a non-finite score gives zeros.
    """
    batch, _, _, length = attn.shape
    rows_batch = torch.arange(batch, device=attn.device)
    last = last_true(mask)  # T_b
    has_token = last >= 0
    reward_pos = last if reward_index is None else reward_index
    index_ok = (reward_pos >= 0) & (reward_pos < attn.shape[2])
    safe_pos = torch.where(index_ok & has_token, reward_pos, 0)

    rows = attn[rows_batch, :, safe_pos, :]  # [B, H, L]: only the rows ABC needs are gathered
    head_sum = rows.float().sum(dim=1)  # a_t, fp32 accumulation
    masked = torch.where(mask, head_sum, 0.0)
    total = masked.sum(dim=1)
    attn_ok = torch.isfinite(total)
    nonnegative = ~(masked < 0).any(dim=1)
    usable = attn_ok & nonnegative & index_ok & (total != 0)

    one_hot = torch.zeros(batch, length, dtype=torch.float32, device=attn.device)
    one_hot[rows_batch[has_token], last[has_token]] = 1.0
    share = masked / torch.where(usable, total, 1.0)[:, None]
    dense = (beta * score)[:, None] * share + (1.0 - beta) * score[:, None] * one_hot
    out = torch.where(usable[:, None], dense, score[:, None] * one_hot)

    score_ok = torch.isfinite(score)
    out = torch.where((has_token & score_ok)[:, None] & mask, out, 0.0)

    status = torch.full((batch,), STATUS_OK, dtype=torch.int32, device=attn.device)
    status = torch.where(nonnegative, status, STATUS_NEGATIVE_ATTENTION)
    status = torch.where(attn_ok, status, STATUS_BAD_ATTENTION)
    status = torch.where(index_ok, status, STATUS_BAD_REWARD_INDEX)
    status = torch.where(score_ok, status, STATUS_BAD_SCORE)
    status = torch.where(has_token, status, STATUS_EMPTY_MASK)
    return out, status


def prefix_rewards_reference(
    prefix_scores: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    reward_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix-difference rewards and per-row status from [B, L] float32 scores and a [B, L] bool mask.

    With c_1 < ... < c_n the completion positions of a row, r its reward position (default c_n) and s its
    scores, the dense part d gives s[c_1] to c_1 and s[c_k] - s[c_(k-1)] to c_k, and s[r] - s[c_n] is added
    to c_n (computed as s[r] - s[c_(n-1)] there, one rounding fewer); it sums to s[r]. Then

        r_t = beta * d_t + (1 - beta) * s[r] * [t == c_n]

    Rows with status 1-3 are all zeros; a row whose completion scores are not finite (status 4), or whose
    rewards do not fit in float32 (status 6: differences of scores of opposite sign near float32's limit, e.g.
    3e38 - (-3e38)), falls back to the sparse reward s[r] at c_n. The scores are read in float32 and the
    differences and the mix computed in float64 (float32 on MPS, which has no float64), so only a reward
    beyond float32's range itself is refused. Only the completion positions and r are read: other columns
    may hold anything, NaN included. Pure tensor operations, no host sync, so it traces under torch.compile.
    """
    batch, length = prefix_scores.shape
    rows = torch.arange(batch, device=mask.device)
    positions = torch.arange(length, device=mask.device)
    last = last_true(mask)  # c_n
    has_token = last >= 0
    safe_last = last.clamp(min=0)
    reward_pos = last if reward_index is None else reward_index
    index_ok = (reward_pos >= 0) & (reward_pos < length)
    safe_pos = torch.where(index_ok & has_token, reward_pos, 0)

    wide = torch.float32 if prefix_scores.device.type == "mps" else torch.float64
    scores = prefix_scores.float().to(wide)
    score = scores[rows, safe_pos]  # s[r]
    through = torch.where(mask, positions, -1).cummax(dim=1).values  # last completion position <= t
    filled = scores.gather(1, through.clamp(min=0)).masked_fill_(through < 0, 0.0)
    previous = torch.nn.functional.pad(filled[:, :-1], (1, 0))  # s[c_(k-1)] at c_k, 0 at c_1
    dense = (scores - previous).masked_fill_(~mask, 0.0)
    dense[rows, safe_last] = score - previous[rows, safe_last]  # c_n's difference runs up to s[r]

    sparse = torch.zeros_like(scores)
    sparse[rows, safe_last] = score
    out = dense.mul_(beta).add_(sparse, alpha=1.0 - beta).float()
    sparse = sparse.float()
    completion_ok = (torch.isfinite(scores) | ~mask).all(dim=1)
    in_range = (torch.isfinite(out) | ~mask).all(dim=1)
    out = torch.where((completion_ok & in_range)[:, None], out, sparse)
    score_ok = torch.isfinite(score)
    out = out.masked_fill_(~((has_token & index_ok & score_ok)[:, None] & mask), 0.0)

    status = torch.full((batch,), STATUS_OK, dtype=torch.int32, device=mask.device)
    status = torch.where(in_range, status, STATUS_OUT_OF_RANGE)
    status = torch.where(completion_ok, status, STATUS_BAD_ATTENTION)
    status = torch.where(score_ok, status, STATUS_BAD_SCORE)
    status = torch.where(index_ok, status, STATUS_BAD_REWARD_INDEX)
    status = torch.where(has_token, status, STATUS_EMPTY_MASK)
    return out, status
