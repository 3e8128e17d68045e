"""The pooler of the ABC architectures: per finished request, ``[score, attention weight, position]`` for each of
its tokens, from the per-token ``[logits | position | q | k]`` that the model's forward returns
(:mod:`dense_rlhf.integrations.vllm_plugin.models`).

vLLM's own token-wise ``AllPool`` gathers each request's tokens (the chunks of a chunked prefill included) and hands
over a request only when its prefill has finished; this head then takes the request's last token's queries against
every key (:func:`~dense_rlhf.integrations.vllm_plugin.attention.head_row_sums`), adds the sums of all tensor-parallel
ranks (one all-reduce per step, for all the requests that finished in it) and divides by the layer's number of heads.
No activation is applied: vLLM's default for a multi-channel token_classify output is a softmax across the channels.
"""

from __future__ import annotations

from collections.abc import Set

import torch
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.pooler import PoolingParamsUpdate
from vllm.model_executor.layers.pooler.abstract import Pooler
from vllm.model_executor.layers.pooler.tokwise.methods import get_tok_pooling_method

from dense_rlhf.integrations.vllm_plugin.attention import head_row_sums

__all__ = ["ABCPooler", "ChannelLayout"]


class ChannelLayout:
    """Where the model's forward puts each value of a token: ``num_labels`` logits, the token's position, the
    ``heads * head_dim`` queries and the ``kv_heads * head_dim`` keys of this rank (all float32)."""

    def __init__(self, num_labels: int, heads: int, kv_heads: int, head_dim: int, total_heads: int, scaling: float):
        if num_labels not in (1, 2):
            raise ValueError(
                f"dense-rlhf's ABC architectures read a reward model's score from one logit or two (logit[1] - "
                f"logit[0]); this model has num_labels={num_labels}"
            )
        self.num_labels, self.heads, self.kv_heads, self.head_dim = num_labels, heads, kv_heads, head_dim
        self.total_heads, self.scaling = total_heads, float(scaling)
        self.position = num_labels
        self.q = slice(num_labels + 1, num_labels + 1 + heads * head_dim)
        self.k = slice(self.q.stop, self.q.stop + kv_heads * head_dim)
        self.width = self.k.stop


class ABCPooler(Pooler):
    """token_classify only; replies ``[n, 3]`` float32 per request (score, attention weight, position)."""

    def __init__(self, layout: ChannelLayout):
        super().__init__()
        self.layout = layout
        self.pooling = get_tok_pooling_method("ALL")
        self.tp_size = get_tensor_model_parallel_world_size()

    def get_supported_tasks(self) -> Set[str]:
        return {"token_classify"}

    def get_pooling_updates(self, task) -> PoolingParamsUpdate:
        return self.pooling.get_pooling_updates(task)

    def forward(self, hidden_states: torch.Tensor, pooling_metadata) -> list[torch.Tensor | None]:
        layout = self.layout
        if hidden_states.shape[-1] != layout.width:
            raise RuntimeError(
                f"dense-rlhf's ABC pooler got {hidden_states.shape[-1]} values per token where its model writes "
                f"{layout.width}: this vLLM passes the pooler something else than the model's output"
            )
        requests = self.pooling(hidden_states, pooling_metadata)
        finished = [data for data in requests if data is not None]
        if not finished:
            return list(requests)
        sums = torch.cat(
            [
                head_row_sums(
                    data[-1, layout.q].view(layout.heads, layout.head_dim),
                    data[:, layout.k].view(-1, layout.kv_heads, layout.head_dim),
                    layout.scaling,
                )
                for data in finished
            ]
        )
        if self.tp_size > 1:
            sums = tensor_model_parallel_all_reduce(sums)
        weights = iter(torch.split(sums / layout.total_heads, [len(data) for data in finished]))
        out: list[torch.Tensor | None] = []
        for data in requests:
            if data is None:
                out.append(None)
                continue
            logits = data[:, : layout.num_labels].float()
            score = logits[:, 0] if layout.num_labels == 1 else logits[:, 1] - logits[:, 0]
            out.append(torch.stack([score, next(weights), data[:, layout.position].float()], dim=1))
        return out
