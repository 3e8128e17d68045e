"""Ragged lists of token ids as one padded batch: the single padding helper of the text path and the integrations."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(
    rows: Sequence[Sequence[int] | torch.Tensor], pad_id: int, *, side: str = "right", width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: long [B, W] ids with each row's tokens at its start (``side="right"``) or end (``"left"``)
    and ``pad_id`` elsewhere, and the bool [B, W] mask of the tokens; on the CPU. ``rows``: lists of ints or 1-D
    integer tensors; ``width``: W, at least the longest row (default: the longest row)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    lengths = [len(row) for row in rows]
    longest = max(lengths, default=0)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width={width} is shorter than the longest row ({longest} tokens)")
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        start = width - n if side == "left" else 0
        ids[b, start : start + n] = torch.as_tensor(row, dtype=torch.long)
        mask[b, start : start + n] = True
    return ids, mask
