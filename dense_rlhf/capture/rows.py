"""The float32 maths of ABC's rows: from the query and key an attention function receives, each query head's
attention row from the reward position, with the model's mask, scaling, softcap and position bias, without ever
building a [B, H, L, L] map."""

from __future__ import annotations

import torch


def _reward_rows(query, key, attention_mask, index, **kwargs):
    """float32 [B, Hq, L]: softmax over keys of q[b, h, index[b]] . k[b, h // rep] * scaling + mask.

    Autocast is switched off so that the rows stay float32 when the forward runs under it (trl trains reward
    models with bf16 autocast, which stays on the trained model's forward).
    """
    with torch.autocast(query.device.type, enabled=False):
        return _reward_rows_fp32(query, key, attention_mask, index, **kwargs)


def _reward_rows_fp32(
    query, key, attention_mask, index, *, kind, scaling, causal, sliding_window, softcap, position_bias
):
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"capture_reward_attention: {q_heads} query heads are not a multiple of {kv_heads} kv heads")
    rows = torch.arange(batch, device=query.device)
    q = query[rows, :, index, :].float().reshape(batch, kv_heads, q_heads // kv_heads, dim)
    k = key.float()
    scores = torch.matmul(q, k.transpose(-1, -2)).reshape(batch, q_heads, length)
    scores = scores * (dim**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        bias = position_bias[..., :length].expand(batch, -1, -1, -1)
        scores = scores + bias[rows, :, index, :].float()

    lowest = torch.finfo(torch.float32).min
    keys = torch.arange(length, device=query.device)
    if kind in ("sdpa", "eager") and attention_mask is not None:
        if attention_mask.dim() != 4:
            raise NotImplementedError(
                f"capture_reward_attention: expected a 4D attention mask for {kind}, got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask[..., :length].expand(batch, -1, -1, -1)[rows, :, index, :]  # [B, 1 or H, L]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, lowest)
        else:
            scores = scores + mask.float()
    else:
        keep = torch.ones(batch, length, dtype=torch.bool, device=query.device)
        if kind == "flash" and attention_mask is not None:
            if attention_mask.dim() != 2:
                raise NotImplementedError(
                    f"capture_reward_attention: expected a 2D padding mask for flash attention, got "
                    f"{tuple(attention_mask.shape)}"
                )
            keep = attention_mask[:, -length:].bool()
        apply_causal = causal and (kind != "sdpa" or q_len > 1) and kind != "eager"
        if apply_causal:
            keep = keep & (keys[None, :] <= index[:, None])
        if kind == "flash" and sliding_window is not None and length > sliding_window:
            distance = index[:, None] - keys[None, :]
            keep = keep & (distance < sliding_window) & (causal | (distance > -sliding_window))
        scores = scores.masked_fill(~keep[:, None, :], lowest)
    return torch.softmax(scores, dim=-1)
