"""Public reward functions: ABC dense rewards, prefix-difference rewards and the two baselines.

``dense_rewards`` validates and normalises its inputs here, in Python, then runs one backend: the native
op ``torch.ops.dense_rlhf.dense_rewards`` (C++ on CPU, CUDA on GPU) or the PyTorch reference. Every backend
returns the rewards and a per-row status code, so that bad rows are reported the same way everywhere.
``prefix_rewards`` shares the checks and the status codes; it runs in PyTorch on any device.
"""

from __future__ import annotations

import numbers
import sys
import warnings

import torch

from dense_rlhf import _native
from dense_rlhf.reference import (
    PREFIX_STATUS_MESSAGES,
    STATUS_BAD_SCORE,
    STATUS_EMPTY_MASK,
    STATUS_MESSAGES,
    STATUS_OK,
    dense_rewards_reference,
    last_true,
    prefix_rewards_reference,
)

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
    layout: str = "auto",
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
            [B, H, L] per-head rows already taken at the reward position, or [B, L] one row per sequence;
            head-averaged maps are [B, 1, L, L] (``maps.unsqueeze(1)``). Softmax probabilities, so >= 0.
            float16, bfloat16 or float32 (float64 accepted, read in float32); any strides.
        score: [B] or [B, 1] reward-model scores, any float dtype.
        mask: [B, L] bool or 0/1 integer mask of completion tokens (prompt and padding are False).
        beta: a real number in [0, 1] (Python, NumPy or a 0-dim tensor); 0 is the sparse RLHF reward, 1
            spreads all of the score by attention. Inside torch.compile pass a Python number.
        reward_index: optional [B] integer positions whose attention row produced the score; defaults to T_b.
            Used only with [B, H, L, L] maps.
        layout: "auto" reads attn's layout from its rank (4: maps, 3: rows, 2: one row) and refuses a 3-D
            attn whose last two sizes both equal the mask's L: head-averaged [B, L, L] maps and [B, H, L] rows
            with H == L look alike, and reading maps as rows gives wrong rewards silently. Pass head-averaged
            maps as [B, 1, L, L]; pass per-head rows with as many heads as positions with layout="rows".
            "maps", "rows" or "row" name the layout explicitly (attn must then have 4, 3 or 2 dims).
        backend: "auto" (native if built, else the reference with a one-time warning), "native" or
            "reference".
        validate: check values as well as shapes, which costs one device-to-host sync: empty mask rows,
            non-0/1 masks, reward_index out of range, NaN or Inf in score or in the attention values used, a
            float64 score beyond float32's range, and
            negative attention (a completion token whose head sum is < 0: attention weights are >= 0, so
            logits were probably passed) all raise ValueError naming the rows. Pass False inside CUDA graph
            capture or torch.compile(fullgraph=True); the output then never holds NaN: a row with an empty
            mask or a non-finite score is all zeros, and a row with a bad reward_index, non-finite or
            negative attention falls back to the sparse reward.

    Returns:
        float32 [B, L] rewards on attn's device, zero outside the mask; never requires grad.
    """
    attn4, score1, mask_b, index = _normalise(attn, score, mask, reward_index, layout, backend)
    beta = check_beta(beta)
    if validate:
        _check_mask_values(mask)
        _check_fits_float32(score, "score", "dense_rewards")
    with torch.no_grad():
        if _use_native(attn4.device, backend):
            out, status = torch.ops.dense_rlhf.dense_rewards(attn4, score1, mask_b, beta, index)
        else:
            out, status = dense_rewards_reference(attn4, score1, mask_b, beta, index)
    if validate:
        _raise_on_status(status)
    return out


def prefix_rewards(
    prefix_scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.8,
    reward_index: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Prefix-difference rewards (R3HF / RED): each completion token gets how much it moved the score.

    ``prefix_scores[b, t]`` is the reward model's score read at position t, i.e. the score of the prefix
    ending at t (for a causal reward model one forward gives every position; see
    :func:`dense_rlhf.capture_prefix_scores`). With c_1 < ... < c_n the completion positions of row b and r
    its reward position, the dense part d gives s[c_1] to c_1, s[c_k] - s[c_(k-1)] to c_k, and adds
    s[r] - s[c_n] to c_n, so it sums to s[r], the score. ``beta`` mixes it with the sparse reward exactly as in
    :func:`dense_rewards`::

        out[b, t] = beta * d[b, t] + (1 - beta) * s[b, r] * [t == c_n]

    Each row sums to s[b, r]. Unlike ABC's shares, d can have either sign on any token: a token that lowers
    the score is penalised even when the final score is positive.

    Args:
        prefix_scores: [B, L] per-position scores, float16, bfloat16, float32 or float64; any strides. Only
            the completion positions and the reward position are read.
        mask: [B, L] bool or 0/1 integer mask of completion tokens (prompt and padding are False).
        beta: a real number in [0, 1] (Python, NumPy or a 0-dim tensor); 0 is the sparse reward.
            Inside torch.compile pass a Python number.
        reward_index: optional [B] integer positions at which the score is read; defaults to c_n. A reward
            model that reads its score at a token after the completion (e.g. an appended EOS) needs it.
        validate: check values, which costs one device-to-host sync: empty mask rows, non-0/1 masks,
            reward_index out of range, NaN or Inf in the scores used, float64 scores used beyond float32's range,
            and rewards beyond float32's range all
            raise ValueError naming the rows. Pass False inside CUDA graph capture or
            torch.compile(fullgraph=True); the output then never holds NaN or Inf: a row with an empty mask, a
            bad reward_index or a non-finite score at r is all zeros, a row with non-finite scores at
            completion positions or a reward beyond float32's range falls back to the sparse reward.

    The scores are read in float32; the differences and the mix are computed in float64, so huge finite
    scores (e.g. +-3e38) give exact finite rewards wherever the reward itself fits in float32. Only a
    difference of opposite-signed scores near float32's limit can exceed it (e.g. 3e38 - (-3e38) at beta 1):
    that row is refused (validate=True) or gets the sparse reward (validate=False).

    Returns:
        float32 [B, L] rewards on prefix_scores' device, zero outside the mask; never requires grad.

    There is no native kernel: the computation is a handful of elementwise passes and one running maximum
    over [B, L], far cheaper than the reward-model forward that produced the scores, and in PyTorch it runs on
    every device and fuses under torch.compile (``benchmarks/bench_prefix_rewards.py`` measures it).
    """
    scores, mask_b, index = _normalise_prefix(prefix_scores, mask, reward_index)
    beta = check_beta(beta)
    if validate:
        _check_mask_values(mask)
        used = mask_b.clone()
        if index is not None:
            rows = torch.arange(used.shape[0], device=used.device)
            used[rows, index.clamp(0, used.shape[1] - 1)] = True
        _check_fits_float32(prefix_scores, "prefix_scores", "prefix_rewards", used)
    with torch.no_grad():
        out, status = prefix_rewards_reference(scores, mask_b, beta, index)
    if validate:
        _raise_on_status(status, "prefix_rewards", PREFIX_STATUS_MESSAGES)
    return out


def check_beta(beta: float | torch.Tensor, name: str = "beta") -> float:
    """beta as a Python float, checked: any real number in [0, 1], given as a Python number, a NumPy scalar
    or 0-dim array, or a 0-dim real tensor (read with one host sync). Anything else is a TypeError naming
    its type; a value outside [0, 1] (NaN included, or an int or Fraction beyond float's range) and a tensor on
    the meta device (no value to read) are ValueErrors. ``name``: the argument, for messages."""
    value = None
    try:
        if isinstance(beta, torch.Tensor):
            if beta.dim() == 0 and not (beta.dtype.is_complex or beta.dtype == torch.bool):
                if beta.device.type == "meta":
                    raise ValueError(
                        f"{name} is a tensor on the meta device, which holds no value: pass a Python "
                        "number or a tensor on a real device"
                    )
                value = float(beta.detach().item())
        elif isinstance(beta, numbers.Real) and not _is_boolean(beta):
            value = float(beta)
        elif _is_numpy_real_0d(beta):
            value = float(beta)
    except OverflowError:  # an int or Fraction beyond float's range, e.g. 10**400
        raise ValueError(f"{name} must be a number in [0, 1], got {_describe(beta)} too large for a float") from None
    if value is None:
        raise TypeError(
            f"{name} must be a real number in [0, 1] (a Python or NumPy number or a 0-dim real tensor), "
            f"got {_describe(beta)}"
        )
    if not 0.0 <= value <= 1.0:  # also False for NaN
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return value


def _is_boolean(value) -> bool:
    numpy = sys.modules.get("numpy")
    return isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_))


def _is_numpy_real_0d(value) -> bool:
    numpy = sys.modules.get("numpy")  # never imported here: a NumPy value means NumPy is loaded already
    return numpy is not None and isinstance(value, numpy.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu"


def _describe(value) -> str:
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(value, torch.Tensor):
        return f"{name} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if getattr(value, "shape", None) is not None and getattr(value, "dtype", None) is not None:
        return f"{name} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return name


def sparse_rewards(score: torch.Tensor, mask: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Standard RLHF reward: the whole score on the last completion token, zero elsewhere (float32 [B, L]).

    ``score`` [B] or [B, 1] and ``mask`` [B, L] as in :func:`dense_rewards`. ``validate`` checks values (one
    device-to-host sync): a non-0/1 mask, a row with no completion token, a NaN/Inf score or a float64 one beyond
    float32's range raise ValueError naming the rows. With ``validate=False`` (CUDA graphs, torch.compile) such
    rows are all zeros, so the output never holds NaN or Inf.
    """
    score1, mask_b = _baseline_inputs(score, mask, validate, "sparse_rewards")
    last = last_true(mask_b)
    ok = _baseline_rows_ok(last >= 0, score1, "sparse_rewards", validate)
    out = torch.zeros(mask_b.shape, dtype=torch.float32, device=mask_b.device)
    out[torch.arange(mask_b.shape[0], device=mask_b.device), last.clamp(min=0)] = torch.where(ok, score1, 0.0)
    return out


def uniform_rewards(score: torch.Tensor, mask: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """The paper's uniform baseline: score / n on each of the n completion tokens (float32 [B, L]).

    Arguments and ``validate`` as in :func:`sparse_rewards`: with ``validate=False`` a row with no completion
    token or a NaN/Inf score is all zeros.
    """
    score1, mask_b = _baseline_inputs(score, mask, validate, "uniform_rewards")
    count = mask_b.sum(dim=1)
    ok = _baseline_rows_ok(count > 0, score1, "uniform_rewards", validate)
    share = torch.where(ok, score1 / count.clamp(min=1), 0.0)
    return mask_b.float() * share[:, None]


def _baseline_inputs(score, mask, validate, function: str):
    """Check the baselines' inputs: float32 [B] score and bool [B, L] mask on one real device, L > 0."""
    if isinstance(mask, torch.Tensor):
        _not_meta(mask=mask)
    score1, mask_b = _score_and_mask(score, mask)
    _check_length(mask_b.shape[1])
    if validate:
        _check_mask_values(mask)
        _check_fits_float32(score, "score", function)
    return score1, mask_b


def _baseline_rows_ok(has_token, score1, function, validate):
    """Rows that get their score (a completion token and a finite score); with validate, raise naming the rest
    with the status messages that dense_rewards uses."""
    score_ok = torch.isfinite(score1)
    if validate:
        status = torch.full(score1.shape, STATUS_OK, dtype=torch.int32, device=score1.device)
        status = torch.where(score_ok, status, STATUS_BAD_SCORE)
        status = torch.where(has_token, status, STATUS_EMPTY_MASK)
        _raise_on_status(status, function)
    return has_token & score_ok


_LAYOUT_DIMS = {"maps": 4, "rows": 3, "row": 2}
_LAYOUT_SHAPES = {"maps": "[B, H, L, L]", "rows": "[B, H, L]", "row": "[B, L]"}


def _normalise(attn, score, mask, reward_index, layout, backend):
    """Check types and shapes (no device sync) and bring inputs to the op's canonical form."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if layout != "auto" and layout not in _LAYOUT_DIMS:
        raise ValueError(f"layout must be one of {('auto', *_LAYOUT_DIMS)}, got {layout!r}")
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if attn.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"attn must be float16, bfloat16, float32 or float64, got {attn.dtype}")
    _not_meta(attn=attn)
    if layout == "auto" and attn.dim() not in (2, 3, 4):
        raise ValueError(f"attn must be [B, H, L, L], [B, H, L] or [B, L], got {attn.dim()} dims {tuple(attn.shape)}")
    if layout != "auto" and attn.dim() != _LAYOUT_DIMS[layout]:
        raise ValueError(f"attn must be {_LAYOUT_SHAPES[layout]} with layout={layout!r}, got {tuple(attn.shape)}")
    if attn.dim() == 4 and attn.shape[2] != attn.shape[3]:
        raise ValueError(f"attn as [B, H, L, L] must have square maps, got {tuple(attn.shape)}")
    batch, length = attn.shape[0], attn.shape[-1]

    score1, mask_b = _score_and_mask(score, mask, batch, attn)
    if mask_b.shape[1] != length:
        raise ValueError(f"mask has L={mask_b.shape[1]} but attn {tuple(attn.shape)} has L={length}")
    _check_length(length)
    if layout == "auto" and attn.dim() == 3 and attn.shape[1] == length > 1:  # at L = 1 both readings agree
        raise ValueError(
            f"attn {tuple(attn.shape)} is ambiguous: head-averaged [B, L, L] maps or [B, H, L] per-head rows with "
            f"H == L == {length}. Pass head-averaged maps as [B, 1, L, L] (attn.unsqueeze(1)), or per-head rows "
            "with layout='rows'"
        )
    if attn.dim() >= 3 and attn.shape[1] == 0:
        raise ValueError(
            f"attn has no heads (H = 0 in {tuple(attn.shape)}): there is no attention to spread the score by"
        )
    index = _reward_index(reward_index, batch, attn)

    attn = attn.detach()
    if attn.dim() == 3:  # [B, H, L] rows: a stride-0 view makes every reward position read the same row
        attn = attn.unsqueeze(2).expand(batch, attn.shape[1], length, length)
    elif attn.dim() == 2:
        attn = attn[:, None, None, :].expand(batch, 1, length, length)
    return attn, score1, mask_b, index


def _normalise_prefix(prefix_scores, mask, reward_index):
    """Check prefix_rewards' inputs (no device sync); return float32 [B, L] scores, bool mask, long index."""
    if not isinstance(prefix_scores, torch.Tensor):
        raise TypeError(f"prefix_scores must be a torch.Tensor, got {type(prefix_scores).__name__}")
    if prefix_scores.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"prefix_scores must be float16, bfloat16, float32 or float64, got {prefix_scores.dtype}")
    if prefix_scores.dim() != 2:
        raise ValueError(f"prefix_scores must be [B, L], got {tuple(prefix_scores.shape)}")
    _not_meta(prefix_scores=prefix_scores)
    mask_b = _mask(mask)
    if mask_b.shape != prefix_scores.shape:
        raise ValueError(
            f"mask {tuple(mask_b.shape)} and prefix_scores {tuple(prefix_scores.shape)} must have the same [B, L]"
        )
    _same_device(prefix_scores, mask=mask)
    _check_length(prefix_scores.shape[1])
    index = _reward_index(reward_index, prefix_scores.shape[0], prefix_scores)
    return prefix_scores.detach().float(), mask_b, index


def _reward_index(reward_index, batch, ref):
    """Check an optional [B] integer reward_index on ref's device; return it as int64 (or None)."""
    if reward_index is None:
        return None
    if not isinstance(reward_index, torch.Tensor):
        raise TypeError(f"reward_index must be a torch.Tensor, got {type(reward_index).__name__}")
    if reward_index.dtype.is_floating_point or reward_index.dtype.is_complex or reward_index.dtype == torch.bool:
        raise TypeError(f"reward_index must be an integer tensor, got {reward_index.dtype}")
    if reward_index.shape != (batch,):
        raise ValueError(f"reward_index must be [B]=[{batch}], got {tuple(reward_index.shape)}")
    _same_device(ref, reward_index=reward_index)
    return reward_index.long()


def _mask(mask, name: str = "mask"):
    """Check the type and rank of a completion mask; return it as bool. ``name``: the argument, for messages."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or an integer 0/1 tensor, got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be [B, L], got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _score_and_mask(score, mask, batch=None, attn=None):
    """Check score and mask against B (default: mask's) and attn's device; return float32 [B] score, bool mask."""
    mask_b = _mask(mask)
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
    return score.detach().reshape(batch).float(), mask_b


def _not_meta(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device, which holds shapes but no values: rewards are computed "
                "from values, so pass tensors on a real device (cpu, cuda)"
            )


def _check_length(length: int) -> None:
    """The same error for every reward function: with L = 0 no token can carry the score."""
    if length == 0:
        raise ValueError("mask has L = 0 positions: there is no completion token to give the score to")


def _same_device(ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.device != ref.device:
            raise ValueError(f"{name} is on {tensor.device} but the other inputs are on {ref.device}")


def _check_mask_values(mask: torch.Tensor, name: str = "mask") -> None:
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool)")


def _check_fits_float32(values: torch.Tensor, name: str, function: str, used: torch.Tensor | None = None) -> None:
    """Raise naming the rows where finite float64 ``values`` ([B], [B, 1] or [B, L]; where ``used``) do not fit
    float32, in which the rewards are computed: cast, they would read as Inf."""
    if values.dtype != torch.float64:
        return
    over = torch.isfinite(values) & (values.abs() > torch.finfo(torch.float32).max)
    over = over.reshape(over.shape[0], -1) & (True if used is None else used)
    rows = over.any(1).nonzero().flatten().tolist()
    if rows:
        example = float(values.reshape(over.shape)[over][0])
        raise ValueError(
            f"{function}: {name} overflows float32 (a finite value beyond float32's range, e.g. {example:g}) in "
            f"rows {rows[:10]}; the rewards are float32, so rescale the scores"
        )


def _raise_on_status(status: torch.Tensor, function: str = "dense_rewards", messages=STATUS_MESSAGES) -> None:
    bad = status.nonzero().flatten()
    if bad.numel() == 0:
        return
    codes = status[bad].tolist()
    rows = bad.tolist()
    problems = {}
    for row, code in zip(rows, codes):
        problems.setdefault(code, []).append(row)
    lines = [f"{messages[code]} in rows {rows_[:10]}" for code, rows_ in sorted(problems.items())]
    raise ValueError(f"{function}: " + "; ".join(lines))


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
