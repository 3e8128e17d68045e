"""What :class:`dense_rlhf.integrations.vllm.ServedRewardModel` sends to vLLM's pooling API and reads back: the
pooler configuration, the rows of token ids, the replies checked against the request, the errors, and the checks
of the client's arguments. Nothing here does I/O or imports aiohttp."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence

import torch

from dense_rlhf.capture.model import _score_of
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


def _error_text(body: str) -> tuple[str, object]:
    """(message, param) of an error reply: vLLM's ``{"error": {"message", "param"}}``, FastAPI's ``{"detail"}``,
    or the text itself."""
    try:
        reply = json.loads(body)
    except ValueError:
        return body.strip()[:500], None
    if isinstance(reply, dict):
        error = reply.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))[:500], error.get("param")
        if "detail" in reply:
            return str(reply["detail"])[:500], None
        if "message" in reply:
            return str(reply["message"])[:500], None
    return body.strip()[:500], None


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


def _reply_values(reply, rows: list[list[int]], url: str) -> list[torch.Tensor]:
    """float32 [n_b, C] values per row from a token_classify reply, checked against the request: one result per
    row, each with one entry per token, numbers, the same C for every token."""
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list) or len(data) != len(rows):
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise ServedRewardModelError(
            f"POST {url} returned {got} results for {len(rows)} sequences", url=url, status=200
        )
    out: list[torch.Tensor | None] = [None] * len(rows)
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        values = item.get("data") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(rows) or out[index] is not None:
            raise ServedRewardModelError(
                f"POST {url} returned a result with a bad index ({index!r})", url=url, status=200
            )
        n = len(rows[index])
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise ServedRewardModelError(
                f"POST {url} returned {got} per-token values for sequence {index}, which has {n} tokens: the "
                "server does not apply the score head at every token (is its pooler token_classify with "
                "tok_pooling_type ALL?) or truncated the input",
                url=url,
                status=200,
            )
        try:
            logits = torch.tensor(values, dtype=torch.float32)
        except (TypeError, ValueError):
            raise ServedRewardModelError(
                f"POST {url} returned values for sequence {index} that are not numbers", url=url, status=200
            ) from None
        out[index] = logits[:, None] if logits.dim() == 1 else logits
    return out


def _is_abc_reply(values: torch.Tensor) -> bool:
    """Whether a row's values are the ABC plugin's ``[score, attention weight, position]`` per token: three channels
    whose third counts the tokens, which no classifier head's logits do."""
    n = values.shape[0]
    return (
        values.dim() == 2 and values.shape[1] == 3 and torch.equal(values[:, 2], torch.arange(n, dtype=torch.float32))
    )


def _prefix_rows(reply, rows: list[list[int]], url: str) -> list[torch.Tensor]:
    """float32 [n_b] scores per row from a token_classify reply, checked against the request: a one- or two-logit
    head's logits, or the score channel of an ABC reply (:func:`_is_abc_reply`)."""
    out = []
    for index, logits in enumerate(_reply_values(reply, rows, url)):
        if _is_abc_reply(logits):
            out.append(logits[:, 0].contiguous())
            continue
        if logits.dim() != 2 or logits.shape[1] not in (1, 2):
            raise ServedRewardModelError(
                f"POST {url} returned {tuple(logits.shape[1:])} values per token for sequence {index}; a reward "
                "model has one logit (the score) or two (logit[1] - logit[0]), and dense-rlhf's ABC architecture "
                "three (score, attention weight, position)",
                url=url,
                status=200,
            )
        out.append(_score_of(logits, "the served logits"))
    return out


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
    return attention, completion
