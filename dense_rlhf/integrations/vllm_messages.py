"""What :class:`dense_rlhf.integrations.vllm.ServedRewardModel` sends to vLLM's pooling API and reads back: the
pooler configuration, the rows of token ids and where the reward model pools them, the errors, and the checks of
the client's arguments (its replies are read by :mod:`dense_rlhf.integrations.vllm_replies`). Nothing here does I/O
or imports aiohttp."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import numbers
from collections.abc import Sequence

import torch

from dense_rlhf.ops import _check_mask_values, _mask

POOLER_CONFIG = '{"task":"token_classify","use_activation":false}'
"""The value of vLLM's ``--pooler-config`` that makes a reward-model server answer ``token_classify``."""
VERL_POOLER_CONFIG_KEY = "reward.reward_model.rollout.engine_kwargs.vllm.pooler_config"
"""Where verl 0.9.x takes that value from for the reward-model server it starts."""
TokenRows = Sequence[Sequence[int]] | Sequence[torch.Tensor] | torch.Tensor
"""A batch of token-id rows: lists of ints or 1-D integer tensors, or a [B, L] integer tensor."""
METHODS = ("prefix", "sparse", "uniform", "abc")
_RETRIED_STATUS = {408, 429, 500, 502, 503, 504}  # 501 (Not Implemented) is permanent
_MAX_BACKOFF_S = 30.0


class ServedRewardModelError(RuntimeError):
    """The served reward model could not give the prefix scores: ``url`` is the request's address, ``status`` the
    last HTTP status (None when no reply came)."""

    def __init__(self, message: str, *, url: str, status: int | None = None):
        super().__init__(message)
        self.url, self.status = url, status


class _Permanent(Exception):
    """An HTTP reply that retrying cannot change (raised inside a try, turned into ServedRewardModelError)."""

    def __init__(self, status: int, message: str, param):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _check_number(value, name: str, *, integer: bool = False, minimum: float = 0.0, strict: bool = False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {type(value).__name__}")
    if not math.isfinite(float(value)) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'above' if strict else 'at least'} {minimum}, got {value!r}")
    return int(value) if integer else float(value)


def _token_rows(token_ids: TokenRows, argument: str = "token_ids") -> list[list[int]]:
    """A batch of token-id rows as lists of Python ints: a sequence of sequences or 1-D integer tensors, or a 2-D
    integer tensor (every row then has the same length)."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 2:
            raise ValueError(f"{argument} as a tensor must be 2-D [B, L], got shape {tuple(token_ids.shape)}")
        token_ids = list(token_ids)
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise TypeError(f"{argument} must be a list of token-id lists, got {type(token_ids).__name__}")
    rows = []
    for b, row in enumerate(token_ids):
        if isinstance(row, torch.Tensor):
            if row.dim() != 1 or row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
                raise TypeError(
                    f"{argument}[{b}] must be a 1-D integer tensor, got {row.dtype} of shape {tuple(row.shape)}"
                )
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"{argument}[{b}] must be a list of token ids, got {type(row).__name__}")
        if not row:
            raise ValueError(f"{argument}[{b}] is empty: a reward model scores at least one token")
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in row):
            raise TypeError(f"{argument}[{b}] must hold non-negative integer token ids")
        rows.append([int(t) for t in row])
    if not rows:
        raise ValueError(f"{argument} is empty")
    return rows


def _check_method(method) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} for a served reward model, got {method!r}")


def _as_mask(mask, name: str, shape) -> torch.Tensor:
    """A [B, L] mask of ``shape``, checked as :mod:`dense_rlhf.ops` checks masks; bool, on the CPU."""
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have input_ids' shape {tuple(shape)}, got {tuple(mask.shape)}")
    checked = _mask(mask, name)
    _check_mask_values(mask, name)
    return checked.cpu()


def _check_batch(input_ids, attention_mask, completion_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be a 2-D [B, L] integer tensor, got {got}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    attention = _as_mask(attention_mask, "attention_mask", input_ids.shape)
    completion = _as_mask(completion_mask, "completion_mask", input_ids.shape)
    outside = (completion & ~attention).any(1).nonzero().flatten().tolist()
    if outside:
        raise ValueError(f"completion_mask marks padding (attention_mask False) in rows {outside[:10]}")
    empty = (~completion.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"completion_mask marks no completion token in rows {empty[:10]}, so the score would be lost")
    return attention, completion


def check_pad_token_id(pad_token_id, name: str = "pad_token_id") -> int | None:
    """``pad_token_id`` as an int, or None: a non-negative integer token id."""
    if pad_token_id is None:
        return None
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral) or pad_token_id < 0:
        raise TypeError(f"{name} must be a non-negative integer token id or None, got {pad_token_id!r}")
    return int(pad_token_id)


def pooled_index(row: Sequence[int], pad_token_id: int | None) -> int:
    """The position of ``row`` (a request's token ids) whose score a decoder reward model reports, as transformers'
    ``*ForSequenceClassification`` heads pool it: the last token whose id is not ``pad_token_id`` (the model's
    ``config.pad_token_id``; 0 when every token is the pad id), or the last token when it is None. Where the pad id is
    also the EOS id that ends a turn, this is the token before the trailing EOS tokens, not the request's last."""
    if pad_token_id is not None:
        for position in range(len(row) - 1, -1, -1):
            if row[position] != pad_token_id:
                return position
        return 0
    return len(row) - 1


def _pooled_positions(rows: list[list[int]], attention: torch.Tensor, completion: torch.Tensor, pad_token_id):
    """For a [B, L] batch whose rows' real tokens are ``rows``: each row's real positions, the index in its row of the
    token the model pools (:func:`pooled_index`) and that token's position [B]. A row whose completion tokens all come
    after it is refused: the score does not reflect them."""
    real = [attention[b].nonzero().flatten() for b in range(len(rows))]
    pooled = [pooled_index(row, pad_token_id) for row in rows]
    reward_index = torch.stack([real[b][k] for b, k in enumerate(pooled)])
    positions = torch.arange(attention.shape[1])
    unread = (completion.any(1) & ~(completion & (positions <= reward_index[:, None])).any(1)).nonzero()
    if len(unread):
        raise ValueError(
            f"completion_mask marks only tokens after the position the reward model reads its score from (its "
            f"last token that is not pad_token_id={pad_token_id}) in rows {unread.flatten().tolist()[:10]}: the "
            "score does not reflect those tokens, so no reward can be put on them"
        )
    return real, pooled, reward_index


def _run(coroutine):
    """Run a coroutine to completion from synchronous code, also when this thread already runs an event loop (a
    notebook, an async framework): then in a helper thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
