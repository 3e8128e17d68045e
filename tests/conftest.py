"""Shared test helpers: devices to run on and ABC inputs with controlled padding and prompts."""

from __future__ import annotations

import pytest
import torch

from dense_rlhf import _native


def _devices() -> list:
    devices = [pytest.param("cpu", id="cpu")]
    cuda_ready = torch.cuda.is_available() and _native.has_kernel("cuda")
    devices.append(
        pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not cuda_ready, reason="no CUDA kernel or GPU"))
    )
    return devices


DEVICES = _devices()


def make_case(
    batch: int,
    heads: int,
    length: int,
    *,
    layout: str = "maps",
    dtype: torch.dtype = torch.float32,
    padding: str = "right",
    prompt: int = 0,
    with_reward_index: bool = False,
    device: str = "cpu",
    generator: torch.Generator | None = None,
):
    """Random softmax attention, scores and a completion mask; returns (attn, score, mask, reward_index).

    Each row gets a completion of random length after `prompt` tokens, padded on the `padding` side.
    """
    g = generator or torch.Generator().manual_seed(0)
    logits = torch.randn(batch, heads, length, length, generator=g) * 3
    maps = logits.softmax(-1)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    reward_index = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        used = int(torch.randint(1, length + 1, (1,), generator=g))  # prompt + completion tokens of this row
        start_prompt = 0 if padding == "right" else length - used
        completion = range(start_prompt + min(prompt, used - 1), start_prompt + used)
        mask[b, list(completion)] = True
        reward_index[b] = int(torch.randint(0, length, (1,), generator=g))
    score = torch.randn(batch, generator=g) * 4
    rows_at = reward_index if with_reward_index else torch.where(mask, torch.arange(length), -1).amax(1)
    if layout == "maps":
        attn = maps
    elif layout == "rows":
        attn = maps[torch.arange(batch), :, rows_at, :]
    elif layout == "row":
        attn = maps[torch.arange(batch), :, rows_at, :].mean(1)
    else:
        raise ValueError(layout)
    return (
        attn.to(dtype).to(device),
        score.to(device),
        mask.to(device),
        reward_index.to(device) if with_reward_index else None,
    )
