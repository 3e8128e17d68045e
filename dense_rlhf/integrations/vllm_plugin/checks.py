"""The checks the ABC architectures run when vLLM loads them (:mod:`~dense_rlhf.integrations.vllm_plugin.models`),
on the model's config and on the attention module vLLM built: plain attribute reads, no vLLM import, so that they are
tested on their own. Each refusal names the variant it refuses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dense_rlhf.integrations.vllm_plugin import LAYER_KEY

__all__ = ["Refused", "check_attention", "check_config"]

_ATTENTION_ATTRIBUTES = ("qkv_proj", "q_size", "kv_size", "num_heads", "num_kv_heads", "head_dim", "scaling")


class Refused(ValueError):
    """A model variant the ABC recomputation does not cover, refused when the model loads."""


def _refuse(architecture: str, variant: str) -> None:
    raise Refused(
        f"{architecture} (dense-rlhf's ABC plugin) does not support {variant}: the attention row it recomputes would "
        "not be the one the model computes. Serve this model without the ABC architecture (prefix rewards need only "
        "token_classify) or compute ABC in-process with dense_rlhf.score_and_densify"
    )


def _layer_index(config, architecture: str) -> int:
    layers = config.num_hidden_layers
    layer = getattr(config, LAYER_KEY, -1)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -layers <= layer < layers:
        raise Refused(
            f"{architecture}: hf_overrides {LAYER_KEY}={layer!r} must be an integer layer index in "
            f"[{-layers}, {layers - 1}] (the model has {layers} layers; -1, the default, is the last)"
        )
    return layer % layers


def check_config(vllm_config: Any, architecture: str) -> int:
    """Refuse what the config alone shows; the chosen layer's index."""
    config = vllm_config.model_config.hf_config.get_text_config()
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        _refuse(
            architecture,
            f"pipeline parallelism (pipeline_parallel_size={vllm_config.parallel_config.pipeline_parallel_size})",
        )
    layer = _layer_index(config, architecture)
    if getattr(config, "dual_chunk_attention_config", None):
        _refuse(architecture, "dual-chunk attention (dual_chunk_attention_config)")
    for key in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, key, None)
        if isinstance(rope, Mapping) and ("mrope_section" in rope or "mrope" in str(rope.get("rope_type", ""))):
            _refuse(architecture, f"multimodal rotary embeddings (mrope, {key}={dict(rope)})")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer] != "full_attention":
        _refuse(architecture, f"{layer_types[layer]} in layer {layer} (layer_types)")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", not layer_types):
        _refuse(architecture, f"sliding-window attention (sliding_window={window})")
    return layer


def check_attention(attention: Any, architecture: str, layer: int, vllm_version: str) -> None:
    """Refuse what only the built layer shows: a vLLM whose attention module differs from the one read here, or
    an attention with a window, a soft cap or sinks."""
    missing = [name for name in (*_ATTENTION_ATTRIBUTES, "rotary_emb", "attn") if not hasattr(attention, name)]
    if missing:
        raise RuntimeError(
            f"{architecture}: layer {layer}'s attention ({type(attention).__name__}) in vLLM {vllm_version} has no "
            f"{missing}; dense-rlhf's ABC plugin reads them to recompute the attention row (see "
            "dense_rlhf.integrations.vllm_plugin.CHECKED_VERSIONS for the vLLM releases it was checked with)"
        )
    if "MRotary" in type(attention.rotary_emb).__name__ or "DualChunk" in type(attention.rotary_emb).__name__:
        _refuse(architecture, f"{type(attention.rotary_emb).__name__}")
    attn = attention.attn
    if getattr(attn, "sliding_window", None):
        _refuse(architecture, f"sliding-window attention (window {attn.sliding_window} in layer {layer})")
    impl = getattr(attn, "impl", None)
    if getattr(impl, "logits_soft_cap", None):
        _refuse(architecture, f"logit soft-capping (logits_soft_cap={impl.logits_soft_cap})")
    if getattr(impl, "sinks", None) is not None:
        _refuse(architecture, "attention sinks")
    attn_type = str(getattr(attn, "attn_type", "decoder"))
    if attn_type.lower().rsplit(".", 1)[-1] != "decoder":
        _refuse(architecture, f"non-causal attention (attn_type={attn_type})")
