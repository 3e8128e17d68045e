"""The ABC reward-model architectures: vLLM's own Llama, Qwen2 and Qwen3 sequence classifiers and its
``Qwen2ForRewardModel``, whose forward also recomputes the attention layer's queries and keys for the pooler.

vLLM's decoder stack hands over the input of one layer at no cost through the hook EAGLE-3 uses
(``_set_aux_hidden_state_layers``: the residual stream entering that layer). From it the forward recomputes what the
layer's attention computes: the layer's own input norm, ``qkv_proj``, ``q_norm``/``k_norm`` where the model has them,
and ``rotary_emb(positions, q, k)``; static shapes and no host synchronisation, as in the layer itself. Per token it
returns ``[logits | position | q | k]`` in float32 (:class:`~dense_rlhf.integrations.vllm_plugin.pooler.ChannelLayout`),
and :class:`~dense_rlhf.integrations.vllm_plugin.pooler.ABCPooler` turns a finished request's tokens into its reply.

The layer is the last one, or the one that ``hf_overrides`` names with the key
:data:`~dense_rlhf.integrations.vllm_plugin.LAYER_KEY` (the same index as ``layer`` of
:func:`dense_rlhf.score_and_densify`). Variants whose attention the recomputation does not reproduce are refused when
the model loads, naming the variant: sliding-window or dual-chunk attention, multimodal rotary embeddings (mrope),
logit soft-capping, attention sinks, and pipeline parallelism (the layer's input would live on another rank). A vLLM
without the hook, or whose layers lack the attributes read here, is refused the same way.
"""

from __future__ import annotations

import torch
import vllm
from vllm.model_executor.models.adapters import as_seq_cls_model
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen2_rm import Qwen2ForRewardModel
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from dense_rlhf.integrations.vllm_plugin.checks import check_attention, check_config
from dense_rlhf.integrations.vllm_plugin.pooler import ABCPooler, ChannelLayout

__all__ = [
    "ABCLlamaForSequenceClassification",
    "ABCQwen2ForSequenceClassification",
    "ABCQwen3ForSequenceClassification",
    "ABCQwen2ForRewardModel",
]


class _ABCReward:
    """What the four architectures share: the checks at load, the hook, the pooler and the forward. Mixed in before
    vLLM's class, whose ``__init__`` builds ``self.model`` (the decoder stack) and ``self.score`` (the head)."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        architecture = type(self).__name__
        layer = check_config(vllm_config, architecture)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        model = self.model
        if not hasattr(model, "_set_aux_hidden_state_layers") or not hasattr(model, "layers"):
            raise RuntimeError(
                f"{architecture}: {type(model).__name__} in vLLM {vllm.__version__} has no "
                "_set_aux_hidden_state_layers hook (EAGLE-3's), through which dense-rlhf's ABC plugin reads the "
                "attention layer's input"
            )
        attention = model.layers[layer].self_attn
        check_attention(attention, architecture, layer, vllm.__version__)
        model._set_aux_hidden_state_layers((layer,))
        head = self.score[-1] if isinstance(self.score, torch.nn.Sequential) else self.score
        num_labels = getattr(head, "output_size", None) or getattr(head, "out_features", None)
        self.abc_layer = layer
        self.head_dtype = vllm_config.model_config.head_dtype
        self.pooler = ABCPooler(
            ChannelLayout(
                num_labels=num_labels,
                heads=attention.num_heads,
                kv_heads=attention.num_kv_heads,
                head_dim=attention.head_dim,
                total_heads=getattr(attention, "total_num_heads", attention.num_heads),
                scaling=attention.scaling,
            )
        )

    def _queries_and_keys(self, layer_input: torch.Tensor, positions: torch.Tensor):
        layer = self.model.layers[self.abc_layer]
        attention = layer.self_attn
        qkv = attention.qkv_proj(layer.input_layernorm(layer_input))
        qkv = qkv[0] if isinstance(qkv, tuple) else qkv
        q, k, _ = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        if getattr(attention, "q_norm", None) is not None and getattr(attention, "qk_norm", True):
            n, d = q.shape[0], attention.head_dim
            q = attention.q_norm(q.reshape(n, attention.num_heads, d)).reshape(n, attention.q_size)
            k = attention.k_norm(k.reshape(n, attention.num_kv_heads, d)).reshape(n, attention.kv_size)
        return attention.rotary_emb(positions, q, k)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        out = self.model(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list) and len(out[1]) == 1):
            raise RuntimeError(
                f"{type(self).__name__}: vLLM {vllm.__version__}'s decoder did not return the input of layer "
                f"{self.abc_layer} beside its hidden states (the EAGLE-3 hook changed); dense-rlhf's ABC plugin "
                "cannot recompute the attention row"
            )
        hidden, (layer_input,) = out
        logits = self.score(hidden.to(self.head_dtype))
        q, k = self._queries_and_keys(layer_input, positions)
        return torch.cat([logits.float(), positions.float()[:, None], q.float(), k.float()], dim=-1)


class ABCLlamaForSequenceClassification(_ABCReward, as_seq_cls_model(LlamaForCausalLM)):
    """``LlamaForSequenceClassification`` checkpoints (Llama 3.x, Mistral-style configs without a sliding window)."""


class ABCQwen2ForSequenceClassification(_ABCReward, as_seq_cls_model(Qwen2ForCausalLM)):
    """``Qwen2ForSequenceClassification`` checkpoints (q/k/v biases)."""


class ABCQwen3ForSequenceClassification(_ABCReward, as_seq_cls_model(Qwen3ForCausalLM)):
    """``Qwen3ForSequenceClassification`` checkpoints (per-head q/k norms)."""


class ABCQwen2ForRewardModel(_ABCReward, Qwen2ForRewardModel):
    """``Qwen2ForRewardModel`` checkpoints (a two-layer score head on the last hidden state, one label)."""
