"""The attention row of one request from its recomputed queries and keys: plain torch, no vLLM, so that the math
(grouped-query heads, the split of heads under tensor parallelism) is tested on its own.

A decoder layer's attention from query token ``t`` to key token ``j`` in head ``h`` is
``softmax_j(scaling * q[t, h] . k[j, h // group])`` over ``j <= t``, with ``group = heads / kv_heads`` (grouped-query
attention: query head ``h`` reads key-value head ``h // group``). ABC reads the row of the request's last token,
which sees every token of the request, averaged over all the layer's heads. Under tensor parallelism each rank holds
a contiguous block of query heads and the key-value heads they read (vLLM's ``QKVParallelLinear``), so each rank sums
its heads' rows (:func:`head_row_sums`), the sums are added across ranks, and the total is divided by the number of
heads of the whole layer."""

from __future__ import annotations

import torch

__all__ = ["head_row_sums"]


def head_row_sums(q_last: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """The sum over heads of the attention rows from one query token to ``n`` key tokens, in float32.

    Args:
        q_last: [H, d] the query token's queries, one row per (local) query head, after the layer's norm and
            rotary embedding.
        k: [n, KV, d] the keys of the request's tokens (the query token's own included, last), per (local)
            key-value head; ``H`` must be a multiple of ``KV``.
        scaling: the layer's softmax scaling (``head_dim ** -0.5`` unless the model says otherwise).

    Returns:
        [n] float32: ``sum_h softmax(scaling * k[:, h // (H // KV)] @ q_last[h])``; divided by the total number of
        heads it is the head-averaged row, which sums to 1.
    """
    heads, dim = q_last.shape
    n, kv_heads, k_dim = k.shape
    if k_dim != dim or kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"q_last {tuple(q_last.shape)} and k {tuple(k.shape)} are not [H, d] and [n, KV, d] with KV | H"
        )
    group = heads // kv_heads
    q = q_last.float().view(kv_heads, group, dim)  # query head h = kv * group + g reads key-value head kv
    logits = torch.einsum("vgd,nvd->vgn", q, k.float()) * scaling
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1))
