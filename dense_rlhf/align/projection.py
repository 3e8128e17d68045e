"""Credit moved between two tokenisations of the same text by byte overlap (:func:`project_credit`), and the
reward model's per-token values of one row projected onto the policy's response tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from dense_rlhf.align.decoders import _BYTE_LEVEL, _BYTE_TOKEN, _backend_steps

if TYPE_CHECKING:
    from dense_rlhf.align.render import RewardModelInputs

__all__ = ["project_credit"]


def _as_spans(spans, argument: str) -> torch.Tensor:
    spans = torch.as_tensor(spans)
    if spans.numel() == 0:
        spans = spans.reshape(0, 2)
    if spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"{argument} must have shape [n, 2] ([start, end) byte offsets), got {tuple(spans.shape)}")
    if spans.dtype.is_floating_point or spans.dtype.is_complex or spans.dtype == torch.bool:
        raise TypeError(f"{argument} must hold integers, got {spans.dtype}")
    spans = spans.long()
    if bool((spans[:, 0] < 0).any()) or bool((spans[:, 1] < spans[:, 0]).any()):
        bad = ((spans[:, 0] < 0) | (spans[:, 1] < spans[:, 0])).nonzero().flatten().tolist()
        raise ValueError(f"{argument} must satisfy 0 <= start <= end; rows {bad[:10]} do not")
    return spans


def project_credit(
    credit: torch.Tensor,
    src_spans: torch.Tensor | Sequence[Sequence[int]],
    dst_spans: torch.Tensor | Sequence[Sequence[int]],
) -> torch.Tensor:
    """Move per-token credit between two tokenisations of the same bytes, in proportion to byte overlap.

    ``dst[i] = sum_j credit[j] * |src_j ∩ dst_i| / |src_j|``: each source token spreads its credit evenly over
    its bytes, and each destination token collects the credit of its bytes. Source tokens with empty spans
    carry nothing. The total is conserved whenever every byte of every non-empty source span lies in exactly
    one destination span (destination spans that tile a range covering the sources); credit on bytes that no
    destination span covers is dropped, and bytes covered by several destination spans count for each.

    Args:
        credit: [n_src] float (leading batch dimensions are allowed: [..., n_src], sharing the spans).
        src_spans, dst_spans: [n_src, 2] and [n_dst, 2] integer ``[start, end)`` offsets into one byte string.

    Returns:
        float32 [n_dst] (or [..., n_dst]) on credit's device. Vectorised: prefix sums of the credit density
        over the sorted span boundaries, O((n_src + n_dst) log(n_src + n_dst)).
    """
    if not isinstance(credit, torch.Tensor):
        credit = torch.as_tensor(credit)
    if not (credit.dtype.is_floating_point and credit.dim() >= 1):
        raise TypeError(
            f"credit must be a floating tensor of shape [..., n_src], got {credit.dtype} {tuple(credit.shape)}"
        )
    src = _as_spans(src_spans, "src_spans").to(credit.device)
    dst = _as_spans(dst_spans, "dst_spans").to(credit.device)
    if credit.shape[-1] != src.shape[0]:
        raise ValueError(f"credit has {credit.shape[-1]} values but src_spans has {src.shape[0]} spans")
    if not bool(torch.isfinite(credit).all()):
        raise ValueError("credit holds NaN or Inf")
    lead = credit.shape[:-1]
    if dst.shape[0] == 0:
        return torch.zeros(*lead, 0, dtype=torch.float32, device=credit.device)
    width = src[:, 1] - src[:, 0]
    keep = width > 0
    src, rate = src[keep], credit.double()[..., keep] / width[keep]
    points = torch.unique(torch.cat([src.reshape(-1), dst.reshape(-1)]))  # sorted span boundaries
    diff = torch.zeros(*lead, points.numel(), dtype=torch.float64, device=credit.device)
    diff.index_add_(-1, torch.searchsorted(points, src[:, 0].contiguous()), rate)
    diff.index_add_(-1, torch.searchsorted(points, src[:, 1].contiguous()), -rate)
    density = torch.cumsum(diff, -1)[..., :-1]  # credit per byte on [points[k], points[k + 1])
    mass = torch.cumsum(density * (points[1:] - points[:-1]).double(), -1)
    cumulative = torch.cat([torch.zeros(*lead, 1, dtype=torch.float64, device=credit.device), mass], -1)
    ends = torch.searchsorted(points, dst[:, 1].contiguous())
    out = cumulative[..., ends] - cumulative[..., torch.searchsorted(points, dst[:, 0].contiguous())]
    return out.float()


def _char_to_byte(text: str) -> torch.Tensor:
    """long [len(text) + 1]: the UTF-8 byte offset of every character boundary of ``text``."""
    points = (
        torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
        if text
        else torch.zeros(0, dtype=torch.int32)
    )
    lengths = 1 + (points >= 0x80).long() + (points >= 0x800).long() + (points >= 0x10000).long()
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])


def _own_byte_lengths(backend, ids: list[int]) -> list[int | None]:
    """Each token's own byte count where its string says it exactly: byte-level BPE tokens (one character per
    byte) and byte-fallback tokens (``<0xE3>``); None for the others."""
    steps = _backend_steps(backend)
    byte_level = any(step.get("type") == "ByteLevel" for step in steps)
    fallback = any(step.get("type") == "ByteFallback" for step in steps)
    lengths: list[int | None] = []
    for token_id in ids:
        token = backend.id_to_token(token_id) or ""
        if fallback and _BYTE_TOKEN.fullmatch(token):
            lengths.append(1)
        elif byte_level and token and all(c in _BYTE_LEVEL for c in token):
            lengths.append(len(token))
        else:
            lengths.append(None)
    return lengths


def _rm_byte_spans(
    backend, text: str, table: torch.Tensor, ids: list[int], offsets: list[tuple[int, int]]
) -> torch.Tensor:
    """Byte spans of the reward model's tokens in ``text`` from its character offsets (``table``:
    ``_char_to_byte(text)``).

    Offsets are in whole characters, so a byte-level (or byte-fallback) token holding part of a multi-byte
    character gets the whole character's span, overlapping its neighbours. Such a token, whose span is wider than
    its own bytes, is narrowed to its own bytes, starting where the previous token ended (or at its span's start)."""
    spans = table[torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)]
    if text.isascii():
        return spans  # no multi-byte character: no token holds part of one
    out = spans.tolist()
    cursor = 0
    for j, length in enumerate(_own_byte_lengths(backend, ids)):
        start, end = out[j]
        if length is not None and end - start > length:
            begin = max(start, cursor) if cursor <= end else start
            if begin + length <= end:
                out[j] = [begin, begin + length]
        if out[j][1] > out[j][0]:
            cursor = out[j][1]
    return torch.tensor(out, dtype=torch.long).reshape(-1, 2)


def _project_row(
    inputs: RewardModelInputs,
    b: int,
    rm_backend,
    values: torch.Tensor,
    policy_spans: torch.Tensor,
    differences: bool = False,
) -> torch.Tensor:
    """Row ``b``'s per-token values [n] over the reward model's n tokens (unpadded), restricted to the tokens that
    overlap the response and projected onto the policy's response tokens (byte spans ``policy_spans`` [R_b, 2] in
    the decoded response): float32 [R_b]. ``differences``: the values are prefix scores, and what is projected is
    each response token's change of the score (the first one's own score), as :func:`dense_rlhf.prefix_rewards`
    defines it."""
    text, row = inputs.texts[b], inputs.rows[b]
    table = _char_to_byte(text)
    spans = _rm_byte_spans(rm_backend, text, table, row["input_ids"], row["offsets"])
    first, last = int(table[inputs.regions[b][0]]), int(table[inputs.regions[b][1]])
    overlap = (spans[:, 0] < spans[:, 1]) & (spans[:, 0] < last) & (spans[:, 1] > first)
    positions = overlap.nonzero().flatten()
    credit = values[positions]
    if differences:
        credit = torch.diff(credit, prepend=credit.new_zeros(1))
    destination = (policy_spans - inputs.kept[b] + first).clamp(first, last)  # in the reward model's text
    return project_credit(credit, spans[positions], destination)
