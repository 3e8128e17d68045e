"""Public reward functions: ABC dense rewards and the two baselines it is compared with.

``dense_rewards`` validates and normalises its inputs here, in Python, then runs one backend: the native
op ``torch.ops.dense_rlhf.dense_rewards`` (C++ on CPU, CUDA on GPU) or the PyTorch reference. Every backend
returns the rewards and a per-row status code, so that bad rows are reported the same way everywhere.
"""

from __future__ import annotations

import warnings

import torch

from dense_rlhf import _native
from dense_rlhf.reference import STATUS_MESSAGES, dense_rewards_reference, last_true

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("auto", "native", "reference")
_warned_fallback: set[str] = set()


def dense_rewards(
    attn: torch.Tensor,
    score: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.8,
    reward_index: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Attention-Based Credit: spread each sequence's score over its completion tokens.

    out[b, t] = beta * score[b] * alpha[b, t] + (1 - beta) * score[b] * [t == T_b], where T_b is the last
    completion token and alpha[b] is the reward model's head-averaged attention row from the reward position,
    restricted to completion tokens and normalised to sum to 1 (one-hot at T_b if that row sums to 0).
    Each row sums to score[b], so the return is conserved.

    Args:
        attn: one layer's attention, [B, H, L, L] full maps (only the rows at the reward position are read),
            [B, H, L] per-head rows already taken at the reward position, or [B, L] one row per sequence.
            float16, bfloat16 or float32 (float64 accepted); any strides.
        score: [B] or [B, 1] reward-model scores, any float dtype.
        mask: [B, L] bool or 0/1 integer mask of completion tokens (prompt and padding are False).
        beta: in [0, 1]; 0 is the sparse RLHF reward, 1 spreads all of the score by attention.
        reward_index: optional [B] integer positions whose attention row produced the score; defaults to T_b.
            Used only with [B, H, L, L] maps.
        backend: "auto" (native if built, else the reference with a one-time warning), "native" or
            "reference".
        validate: check values as well as shapes, which costs one device-to-host sync: empty mask rows,
            non-0/1 masks, reward_index out of range, NaN or Inf in score or in the attention values used all
            raise ValueError. Pass False inside CUDA graph capture or torch.compile(fullgraph=True); the
            output then never holds NaN: a row with an empty mask or a non-finite score is all zeros, and a
            row with a bad reward_index or non-finite attention falls back to the sparse reward.

    Returns:
        float32 [B, L] rewards on attn's device, zero outside the mask; never requires grad.
    """
    attn4, score1, mask_b, index = _normalise(attn, score, mask, beta, reward_index, backend)
    if validate:
        _check_mask_values(mask)
    with torch.no_grad():
        if _use_native(attn4.device, backend):
            out, status = torch.ops.dense_rlhf.dense_rewards(attn4, score1, mask_b, float(beta), index)
        else:
            out, status = dense_rewards_reference(attn4, score1, mask_b, float(beta), index)
    if validate:
        _raise_on_status(status)
    return out


def sparse_rewards(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standard RLHF reward: the whole score on the last completion token, zero elsewhere (float32 [B, L])."""
    score1, mask_b = _score_and_mask(score, mask)
    _check_mask_values(mask)
    last = last_true(mask_b)
    _raise_on_empty(last < 0)
    out = torch.zeros(mask_b.shape, dtype=torch.float32, device=mask_b.device)
    out[torch.arange(mask_b.shape[0], device=mask_b.device), last] = score1
    return out


def uniform_rewards(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's uniform baseline: score / n on each of the n completion tokens (float32 [B, L])."""
    score1, mask_b = _score_and_mask(score, mask)
    _check_mask_values(mask)
    count = mask_b.sum(dim=1)
    _raise_on_empty(count == 0)
    return mask_b.float() * (score1 / count.clamp(min=1))[:, None]


def _normalise(attn, score, mask, beta, reward_index, backend):
    """Check types and shapes (no device sync) and bring inputs to the op's canonical form."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if attn.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"attn must be float16, bfloat16, float32 or float64, got {attn.dtype}")
    if attn.dim() not in (2, 3, 4):
        raise ValueError(
            f"attn must be [B, H, L, L], [B, H, L] or [B, L], got {attn.dim()} dims {tuple(attn.shape)}"
        )
    if attn.dim() == 4 and attn.shape[2] != attn.shape[3]:
        raise ValueError(f"attn as [B, H, L, L] must have square maps, got {tuple(attn.shape)}")
    batch, length = attn.shape[0], attn.shape[-1]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")

    score1, mask_b = _score_and_mask(score, mask, batch, attn)
    if mask_b.shape[1] != length:
        raise ValueError(f"mask has L={mask_b.shape[1]} but attn {tuple(attn.shape)} has L={length}")

    index = None
    if reward_index is not None:
        if not isinstance(reward_index, torch.Tensor):
            raise TypeError(f"reward_index must be a torch.Tensor, got {type(reward_index).__name__}")
        if reward_index.dtype.is_floating_point or reward_index.dtype.is_complex or reward_index.dtype == torch.bool:
            raise TypeError(f"reward_index must be an integer tensor, got {reward_index.dtype}")
        if reward_index.shape != (batch,):
            raise ValueError(f"reward_index must be [B]=[{batch}], got {tuple(reward_index.shape)}")
        _same_device(attn, reward_index=reward_index)
        index = reward_index.long()

    attn = attn.detach()
    if attn.dim() == 3:  # [B, H, L] rows: a stride-0 view makes every reward position read the same row
        attn = attn.unsqueeze(2).expand(batch, attn.shape[1], length, length)
    elif attn.dim() == 2:
        attn = attn[:, None, None, :].expand(batch, 1, length, length)
    return attn, score1, mask_b, index


def _score_and_mask(score, mask, batch=None, attn=None):
    """Check score and mask against B (default: mask's) and attn's device; return float32 [B] score, bool mask."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask must be bool or an integer 0/1 tensor, got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, L], got {tuple(mask.shape)}")
    batch = mask.shape[0] if batch is None else batch
    if not isinstance(score, torch.Tensor):
        raise TypeError(f"score must be a torch.Tensor, got {type(score).__name__}")
    if not score.dtype.is_floating_point:
        raise TypeError(f"score must be a float tensor, got {score.dtype}")
    if score.shape not in ((batch,), (batch, 1)):
        raise ValueError(f"score must be [B] or [B, 1] with B={batch}, got {tuple(score.shape)}")
    if mask.shape[0] != batch:
        raise ValueError(f"mask has B={mask.shape[0]} but attn/score have B={batch}")
    _same_device(mask if attn is None else attn, mask=mask, score=score)
    mask_b = mask if mask.dtype == torch.bool else mask != 0
    return score.detach().reshape(batch).float(), mask_b


def _same_device(ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.device != ref.device:
            raise ValueError(f"{name} is on {tensor.device} but the other inputs are on {ref.device}")


def _check_mask_values(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must hold only 0 and 1 (or be bool)")


def _raise_on_empty(empty_rows: torch.Tensor) -> None:
    empty = empty_rows.nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask has no completion token in rows {empty[:10]}: their score would be lost")


def _raise_on_status(status: torch.Tensor) -> None:
    bad = status.nonzero().flatten()
    if bad.numel() == 0:
        return
    codes = status[bad].tolist()
    rows = bad.tolist()
    problems = {}
    for row, code in zip(rows, codes):
        problems.setdefault(code, []).append(row)
    lines = [f"{STATUS_MESSAGES[code]} in rows {rows_[:10]}" for code, rows_ in sorted(problems.items())]
    raise ValueError("dense_rewards: " + "; ".join(lines))


def _use_native(device: torch.device, backend: str) -> bool:
    if backend == "reference":
        return False
    available = _native.has_kernel(device.type)
    if backend == "native" and not available:
        raise RuntimeError(
            f"backend='native' but the dense_rlhf native op for {device.type} is not built: "
            f"{_native.build_hint(device.type)}"
        )
    if not available and device.type not in _warned_fallback:
        _warned_fallback.add(device.type)
        warnings.warn(
            f"dense_rlhf native op for {device.type} is not built; using the PyTorch reference. "
            f"{_native.build_hint(device.type)}",
            stacklevel=3,
        )
    return available
